"""Simulation scores against plain float64 NumPy transcriptions of their definitions."""
from __future__ import annotations

import math

import numpy as np
import pytest

import simulate


def _ap_reference(scores, positive) -> float:
    """Average precision by the textbook definition: for each positive, the precision among the
    items ranked at or above it (descending score, ties by index)."""
    items = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    precisions, hits = [], 0
    for rank, i in enumerate(items, 1):
        if positive[i]:
            hits += 1
            precisions.append(hits / rank)
    return sum(precisions) / len(precisions)


def test_correlations_and_auprc_against_references() -> None:
    rng = np.random.default_rng(0)
    A, B = rng.normal(size=(60, 5)), rng.normal(size=(60, 5))
    B[:, 1] = 2 * A[:, 1] + 0.1 * B[:, 1]
    want = [np.corrcoef(A[:, k], B[:, k])[0, 1] for k in range(5)]
    np.testing.assert_allclose(simulate.correlations(A, B), want, rtol=1e-12)
    A[:, 3] = 1.0  # constant: undefined
    assert math.isnan(simulate.correlations(A, B)[3])
    got = simulate.auprcs(A, B, share=0.1)
    for k in (0, 1, 2, 4):
        top = sorted(range(60), key=lambda i: (-A[i, k], i))[:6]
        assert got[k] == pytest.approx(_ap_reference(B[:, k], [i in top for i in range(60)]))
    assert math.isnan(got[3]) and got[1] > 0.9
    assert simulate.average_precision(np.array([3.0, 2, 1, 0]), np.array([1, 0, 1, 0], bool)) == pytest.approx((1 + 2 / 3) / 2)


def test_permutation_p_against_a_loop() -> None:
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(40, 6)), rng.normal(size=(40, 6))
    B[:, 2] = A[:, 2]
    got = simulate.permutation_p(A, B)
    for k in range(6):
        own = np.corrcoef(A[:, k], B[:, k])[0, 1]
        assert got[k] == pytest.approx(sum(np.corrcoef(A[:, k], B[:, j])[0, 1] >= own - 1e-12 for j in range(6)) / 6)
    assert got[2] == pytest.approx(1 / 6)


def test_a_neuron_equal_to_its_concept_scores_one_and_shuffled_labels_near_zero() -> None:
    rng = np.random.default_rng(2)
    A = rng.normal(size=(400, 30))
    P = np.concatenate([A, rng.normal(size=(400, 20))], 1)  # concept k is neuron k for k < 30
    right = simulate.held_out_scores(A, P, lambda a, p: np.arange(30))
    np.testing.assert_allclose(right["corr"], 1.0)
    assert np.all(right["p"] == pytest.approx(1 / 30)) and np.all(right["auprc"] == pytest.approx(1.0))
    shuffled = simulate.held_out_scores(A, P, lambda a, p: rng.permutation(30))
    assert abs(np.mean(shuffled["corr"])) < 0.05 and simulate.summary(shuffled)["significant_percent"] < 20


def test_the_held_out_half_never_scores_an_image_that_chose_the_label() -> None:
    n = 101
    ids = np.arange(n, dtype=np.float64)[:, None]
    seen = []

    def choose(a, p):
        seen.append(set(a[:, 0].astype(int)))
        return np.zeros(1, np.int64)

    simulate.held_out_scores(np.repeat(ids, 1, 1), np.repeat(ids, 2, 1), choose)
    ch, sc = simulate.probe_split(n)
    assert seen == [set(ch.tolist())] and not set(ch) & set(sc) and len(ch) + len(sc) == n
    assert len(ch) == 51 and np.array_equal(simulate.probe_split(n)[0], ch)


def test_sanity_tests_pass_for_correlation_and_fail_for_a_score_blind_to_extra_labels() -> None:
    rng = np.random.default_rng(3)
    C = (rng.random((500, 40)) < 0.2).astype(float)
    A = C + 0.3 * rng.normal(size=C.shape)
    r = simulate.sanity(simulate.correlations, A, C)
    assert r["missing"] == 1.0 and r["extra"] == 1.0 and r["neurons"] == 40

    def recall(a, c):  # the mean activation on the concept's images: extra labels lower it, missing do not
        return (a * c).sum(0) / c.sum(0)

    r = simulate.sanity(recall, A, C)
    assert r["extra"] == 1.0 and r["missing"] < 0.8
