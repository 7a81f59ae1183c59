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


def test_permutation_p_against_a_loop_over_distinct_labels() -> None:
    rng = np.random.default_rng(1)
    A, P = rng.normal(size=(40, 6)), rng.normal(size=(40, 4))
    P[:, 2] = A[:, 2]
    labels = np.array([0, 1, 2, 2, 3, 1])  # neurons 2 and 3 share label 2, neurons 1 and 5 label 1
    got = simulate.permutation_p(A, P[:, labels], labels)
    for k in range(6):
        own = np.corrcoef(A[:, k], P[:, labels[k]])[0, 1]
        others = [np.corrcoef(A[:, k], P[:, d])[0, 1] for d in sorted(set(labels.tolist()))]
        assert got[k] == pytest.approx(sum(c >= own - 1e-12 for c in others) / 4)
    assert got[2] == pytest.approx(1 / 4)  # the best of the 4 distinct labels, whoever shares it


def test_shared_labels_do_not_count_against_each_other() -> None:
    """Forty units of one concept, all truly correlated with it: each is significant."""
    rng = np.random.default_rng(4)
    P = rng.normal(size=(300, 50))
    A = np.concatenate([P[:, :1] + 0.8 * rng.normal(size=(300, 40)), rng.normal(size=(300, 24))], 1)
    labels = np.concatenate([np.zeros(40, int), np.arange(1, 25)])
    p = simulate.permutation_p(A, P[:, labels], labels)
    assert np.all(p[:40] == pytest.approx(1 / 25))


def test_a_neuron_equal_to_its_concept_scores_one_and_shuffled_labels_near_zero() -> None:
    rng = np.random.default_rng(2)
    A = rng.normal(size=(400, 30))
    P = np.concatenate([A, rng.normal(size=(400, 20))], 1)  # concept k is neuron k for k < 30
    right = simulate.held_out_scores(A, P, lambda a, p: np.arange(30))
    np.testing.assert_allclose(right["corr"], 1.0)
    assert np.all(right["p"] == pytest.approx(1 / 30)) and np.all(right["auprc"] == pytest.approx(1.0))
    quiet = A.copy()
    ch, sc = simulate.probe_split(400)
    quiet[ch, 5] = 0.0  # never fires on the choosing half: no label to score
    got = simulate.held_out_scores(quiet, P, lambda a, p: np.arange(30))
    assert np.isnan(got["corr"][5]) and np.isnan(got["p"][5]) and np.isfinite(got["corr"][4])
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


def test_held_out_precision_against_a_loop() -> None:
    """precision: the share of the neuron's top 5 % of held-out images (ties by index) on which the
    label's similarity is above the CLIP's truth threshold; NaN for every neuron without a threshold."""
    rng = np.random.default_rng(5)
    A, P = rng.normal(size=(200, 6)), rng.normal(size=(200, 9))
    P[:, 4] = A[:, 1] + 0.5  # the label of neuron 1: above 0.3 wherever the neuron is above -0.2
    labels = np.array([0, 4, 2, 3, 8, 5])
    got = simulate.held_out_scores(A, P, lambda a, p: labels, threshold=0.3)
    _, sc = simulate.probe_split(200)
    for k in range(6):
        top = sorted(range(len(sc)), key=lambda i: (-A[sc[i], k], i))[:5]  # 5 % of 100 held-out images
        assert got["precision"][k] == pytest.approx(sum(P[sc[i], labels[k]] > 0.3 for i in top) / 5)
    assert got["precision"][1] == 1.0
    assert np.isnan(simulate.held_out_scores(A, P, lambda a, p: labels)["precision"]).all()
    assert simulate.summary(got)["precision_mean"] == pytest.approx(got["precision"].mean())
    # as a sanity-test score: missing labels lower it; extra labels can only raise it
    C = (rng.random((500, 40)) < 0.2).astype(float)
    r = simulate.sanity(lambda a, c: simulate.top_precisions(a, c > 0), C + 0.3 * rng.normal(size=C.shape), C)
    assert r["missing"] > 0.9 and r["extra"] == 0.0


def test_truth_correlation_against_np_corrcoef_of_the_clips_verdict() -> None:
    """corr_truth: Pearson correlation (np.corrcoef, float64) of the neuron with 1 where the label's
    similarity is above the truth threshold and 0 where not, over the held-out images; NaN without
    a threshold."""
    rng = np.random.default_rng(8)
    A, P = rng.normal(size=(300, 5)), rng.normal(size=(300, 7))
    P[:, 6] = A[:, 2] + 0.3 * rng.normal(size=300)
    labels = np.array([1, 0, 6, 3, 5])
    got = simulate.held_out_scores(A, P, lambda a, p: labels, threshold=0.4)
    _, sc = simulate.probe_split(300)
    for k in range(5):
        verdict = (P[sc, labels[k]] > 0.4).astype(np.float64)
        assert got["corr_truth"][k] == pytest.approx(np.corrcoef(A[sc, k], verdict)[0, 1], abs=1e-9)
    assert got["corr_truth"][2] > 0.6 and abs(got["corr_truth"][0]) < 0.25
    assert np.isnan(simulate.held_out_scores(A, P, lambda a, p: labels)["corr_truth"]).all()
    never = simulate.held_out_scores(A, P, lambda a, p: labels, threshold=100.0)  # held true nowhere
    assert (never["corr_truth"] == 0.0).all() and np.isnan(never["corr"]).sum() == 0
    assert simulate.summary(got)["corr_truth_mean"] == pytest.approx(np.mean(got["corr_truth"]))


def test_a_layer_of_twenty_labels_or_fewer_has_no_share_below_p_0_05() -> None:
    """p >= 1 / (distinct labels): with 20 or fewer, p < 0.05 cannot happen, so the share is None
    rather than 0 %; with 25 perfect labels every p is 1/25 < 0.05 (counted by hand)."""
    rng = np.random.default_rng(3)
    A = rng.normal(size=(400, 40))
    P = np.concatenate([A, rng.normal(size=(400, 5))], 1)  # concept k is neuron k for k < 40
    few = simulate.summary(simulate.held_out_scores(A, P, lambda a, p: np.arange(40) % 20))
    assert few["distinct_labels"] == 20 and few["significant_percent"] is None and few["corr_mean"] is not None
    many = simulate.summary(simulate.held_out_scores(A[:, :25], P, lambda a, p: np.arange(25)))
    assert many["distinct_labels"] == 25 and many["significant_percent"] == 100.0


def test_the_permutation_leaves_out_neurons_without_a_scored_label() -> None:
    """A neuron that never fires on the choosing half has no label in the shuffle: 21 live neurons
    with perfect labels and one silent neuron with a 22nd label give p = 1/21 (< 0.05, counted by
    hand) to each live one, and the layer's 21 distinct labels a share."""
    rng = np.random.default_rng(4)
    A = rng.normal(size=(400, 22))
    P = np.concatenate([A, rng.normal(size=(400, 3))], 1)
    ch, _ = simulate.probe_split(400)
    A[ch, 21] = 0.0  # silent where labels are chosen
    s = simulate.held_out_scores(A, P, lambda a, p: np.arange(22))
    assert np.isnan(s["p"][21]) and np.all(s["p"][:21] == pytest.approx(1 / 21))
    summ = simulate.summary(s)
    assert summ["distinct_labels"] == 21 and summ["significant_percent"] == 100.0
