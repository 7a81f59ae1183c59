"""dissect_kernels against plain float64 NumPy transcriptions of CLIP-Dissect's equations.

The references (``dissect_kernels.REFERENCES``) are written from the paper (Sec. 3.2, App. A.1;
SPEC.md section 3), one loop per neuron, in float64, and never call the kernels. Scores must agree within 1e-4 relative, with an absolute
floor of 1e-5 for scores near zero (they are cosines or log-ratios in nats; the float32 kernels
resolve about 1e-6 there), and labels (argmax) must be the same unless the reference has a tie.
"""
from __future__ import annotations

import numpy as np
import pytest

import dissect_kernels as dk

THREADS = 2


REFERENCES = dk.REFERENCES


# --- inputs ---------------------------------------------------------------------------------------

def make_inputs(case: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    N, K, M = {"k1": (130, 1, 11), "m1": (130, 12, 1), "small_n": (15, 8, 11),
               "wide": (130, 12, 1100)}.get(case, (130, 12, 11))  # wide: several concept panels
    A = rng.standard_normal((N, K))
    P = rng.normal(0.2, 0.05, (N, M))  # CLIP-like cosines
    if case == "lwta":  # blocks of U = 4 units, exactly one (possibly negative) winner per row
        U = 4
        win = rng.integers(0, U, (N, K // U))
        mask = np.zeros((N, K // U, U), bool)
        np.put_along_axis(mask, win[..., None], True, axis=2)
        A = np.where(mask.reshape(N, K), A, 0.0)
    elif case == "dead":
        A[:, [1, 6]] = 0.0
    elif case == "ties":  # few distinct activations, P on a coarse grid
        A = rng.integers(-2, 3, (N, K)).astype(float)
        P = np.round(P, 2)
    return A.astype(np.float32), P.astype(np.float32)


def assert_scores_match(S: np.ndarray, R: np.ndarray) -> None:
    assert S.dtype == np.float32 and S.shape == R.shape
    nan = np.isnan(R)
    np.testing.assert_array_equal(np.isnan(S), nan)
    np.testing.assert_array_equal(np.isneginf(S), np.isneginf(R))
    ok = np.isfinite(R)
    tol = 1e-4 * np.abs(R[ok]) + 1e-5
    err = np.abs(S[ok] - R[ok])
    assert (err <= tol).all(), f"max error {err.max():.3g}, worst relative {(err / tol).max():.3g}x tol"
    for k in np.flatnonzero(~nan.all(axis=1)):  # labels: same argmax unless R ties there
        got, want = int(np.argmax(S[k])), int(np.argmax(R[k]))
        assert got == want or R[k, got] >= R[k, want] - 1e-4 * abs(R[k, want]), (k, got, want)


# --- tests ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["dense", "lwta", "dead", "ties", "k1", "m1", "small_n", "wide"])
@pytest.mark.parametrize("sim", list(dk.SIMILARITIES))
def test_matches_reference(sim: str, case: str) -> None:
    A, P = make_inputs(case)
    S = dk.SIMILARITIES[sim](A, P, n_threads=THREADS)
    with np.errstate(divide="ignore", invalid="ignore"):
        R = REFERENCES[sim](A.astype(np.float64), P.astype(np.float64))
    R[~(A != 0).any(axis=0)] = np.nan  # the kernels' dead-neuron rule (WPMI refs apply it already)
    if case == "dead":
        assert np.isnan(S[[1, 6]]).all()
    assert_scores_match(S, R)


@pytest.mark.parametrize("sim", ["wpmi", "soft_wpmi"])
def test_dead_neurons_do_not_move_the_normaliser(sim: str) -> None:
    A, P = make_inputs("dense")
    with_dead = np.concatenate([A, np.zeros((A.shape[0], 3), np.float32)], axis=1)
    S = dk.SIMILARITIES[sim](A, P, n_threads=THREADS)
    S_dead = dk.SIMILARITIES[sim](with_dead, P, n_threads=THREADS)
    np.testing.assert_array_equal(S_dead[: A.shape[1]], S)
    assert np.isnan(S_dead[A.shape[1]:]).all()


@pytest.mark.parametrize("sim", ["wpmi", "soft_wpmi"])
def test_a_lone_live_neuron_scores_exactly_zero_at_lam_1(sim: str) -> None:
    # With one live neuron, logsumexp over the layer is that neuron's own log p(t|B) (Eq. 7, 13),
    # so with lam = 1 and log #live = 0 every concept scores L - L = 0, exactly: the normaliser
    # must use the very L it subtracts from, not a second, separately rounded copy of it.
    g = np.random.default_rng(4)
    A = np.zeros((400, 3), np.float32)
    A[:, 1] = g.random(400, dtype=np.float32)
    P = g.normal(0.2, 0.05, (400, 257)).astype(np.float32)
    S = dk.SIMILARITIES[sim](A, P, lam=1.0, dtype=np.float64, n_threads=THREADS)
    assert np.isnan(S[[0, 2]]).all()
    assert (S[1] == 0.0).all(), np.abs(S[1]).max()


def test_hyper_parameters_are_passed_through() -> None:
    A, P = make_inputs("dense", seed=1)
    S = dk.soft_wpmi(A, P, a=5.0, top_k=40, lam=0.5, p_start=1.0, p_end=0.9, n_threads=THREADS)
    assert_scores_match(S, dk.reference_soft_wpmi(A.astype(float), P.astype(float), 5.0, 40, 0.5, 1.0, 0.9))
    S = dk.wpmi(A, P, a=3.0, top_k=7, lam=1.0, n_threads=THREADS)
    assert_scores_match(S, dk.reference_wpmi(A.astype(float), P.astype(float), 3.0, 7, 1.0))
    S = dk.rank_reorder(A, P, top_fraction=0.2, power=2.0, scale_power=1.0, n_threads=THREADS)
    assert_scores_match(S, dk.reference_rank_reorder(A.astype(float), P.astype(float), 0.2, 2.0, 1.0))


def test_top_images_by_hand() -> None:
    A = np.array([[1, 0, 0], [3, -1, 0], [3, 0, 0], [2, -2, 0], [3, 0, 0]], np.float32)
    # ties keep the lower image first; the LWTA-style unit ranks its zeros above negative winners
    np.testing.assert_array_equal(dk.top_images(A, 4), [[1, 2, 4, 3], [0, 2, 4, 1], [0, 1, 2, 3]])
    np.testing.assert_array_equal(dk.top_images(A, 9).shape, (3, 5))  # k > N: all N images
    np.testing.assert_array_equal(dk.active_counts(A), [5, 2, 0])


def test_top_images_matches_lexsort() -> None:
    A, _ = make_inputs("ties", seed=3)
    top = dk.top_images(A, 20, n_threads=THREADS)
    want = np.stack([dk.reference_top(A[:, k].astype(float), 20) for k in range(A.shape[1])])
    np.testing.assert_array_equal(top, want)


def test_wpmi_by_hand() -> None:
    # one concept per image is certain (a large), so log p(t|B) counts the misses
    P = np.eye(3, dtype=np.float32)
    A = np.array([[1, 0], [0, 1], [0, 0]], np.float32)  # neuron 0 -> image 0, neuron 1 -> image 1
    S = dk.wpmi(A, P, a=50.0, top_k=1, lam=0.0)
    np.testing.assert_allclose(np.exp(S), [[1, 0, 0], [0, 1, 0]], atol=1e-6)
    np.testing.assert_array_equal(S.argmax(axis=1), [0, 1])


@pytest.mark.parametrize("sim, p0, p1, other", [("wpmi", 0.3, 0.4, 0.0),
                                                  ("soft_wpmi", 0.32, 0.35, -0.3)])
def test_float64_scores_order_saturated_concepts(sim: str, p0: float, p1: float,
                                                  other: float) -> None:
    # Concepts 0 and 1 are strong only on neuron 0's images, 1 more so: both score
    # lam log 2 - lam log(1 + r) with r ~ 1e-8 and ~1e-10 (WPMI: 4e-9, 2e-13). float32 rounds both
    # to log 2 (a tie, argmax takes concept 0); float64 ranks them as the float64 reference does.
    A = np.zeros((10, 2), np.float32)
    A[:5, 0] = A[5:, 1] = np.arange(5, 0, -1)
    P = np.zeros((10, 3), np.float32)
    P[:5, 0], P[:5, 1], P[5:, 2], P[5:, :2] = p0, p1, 0.3, other
    kw = {"a": 20.0, "top_k": 5, "lam": 1.0}
    R = (dk.reference_wpmi if sim == "wpmi" else dk.reference_soft_wpmi)(A.astype(float), P.astype(float), **kw)
    S32 = dk.SIMILARITIES[sim](A, P, **kw)
    S64 = dk.SIMILARITIES[sim](A, P, dtype=np.float64, **kw)
    assert S32.dtype == np.float32 and S64.dtype == np.float64
    assert S32[0, 0] == S32[0, 1]  # the float32 tie
    assert R[0, 1] > R[0, 0] and S64[0, 1] > S64[0, 0]
    np.testing.assert_array_equal(S64.argmax(axis=1), R.argmax(axis=1))
    np.testing.assert_allclose(np.log(2) - S64[0, :2], np.log(2) - R[0, :2], rtol=1e-3)
    with pytest.raises(ValueError, match="dtype"):
        dk.SIMILARITIES[sim](A, P, dtype=np.int32)


@pytest.mark.parametrize("sim", list(dk.SIMILARITIES))
@pytest.mark.parametrize("which", ["A", "P"])
def test_non_finite_input_is_an_error(sim: str, which: str) -> None:
    A, P = make_inputs("dense")
    (A if which == "A" else P)[3, 2] = np.nan if which == "A" else np.inf
    with pytest.raises(ValueError, match=rf"in {which} .*'blocks\.3\.mlp'"):
        dk.SIMILARITIES[sim](A, P, name="blocks.3.mlp")


def test_shape_mismatch_is_an_error() -> None:
    A, P = make_inputs("dense")
    with pytest.raises(ValueError, match="rows"):
        dk.cos(A, P[:-1])


def test_thread_count_is_restored() -> None:
    import numba
    before = numba.get_num_threads()
    A, P = make_inputs("dense")
    dk.soft_wpmi(A, P, n_threads=1)
    assert numba.get_num_threads() == before
