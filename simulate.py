"""Simulation scores: how well a neuron's label predicts the neuron, on probe images not used to
choose the label (Linear Explanations, ICML 2024; "Evaluating Neuron Explanations", ICML 2025).

The simulated activation of neuron k on image i is the CLIP similarity of image i to k's label,
``P[i, m_k]`` (the column of P that ``dissect`` already computed). The probe is split in two
(:func:`probe_split`): the label is chosen on one half exactly as ``dissect`` chooses it (same
similarity, same gallery check), and scored on the other:

- ``corr``: Pearson correlation of ``A[:, k]`` and ``P[:, m_k]`` over the held-out images;
- ``auprc``: average precision of ranking the held-out images by ``P[:, m_k]`` when the positives
  are the neuron's top :data:`TOP_SHARE` of them;
- ``p``: a permutation p-value of ``corr`` against the layer's other labels (labels shuffled among
  the layer's neurons): the share of the layer's distinct labels that correlate with neuron k at
  least as well as its own, its own included;
- ``precision`` (a CLIP with a truth threshold, e.g. world-clip): the share of the neuron's top
  :data:`TOP_SHARE` of the held-out images on which the CLIP holds its label true (cosine above the
  threshold): a gallery of images the label was not chosen on, judged by the simulator;
- ``corr_truth`` (the same CLIPs): the Pearson correlation of ``A[:, k]`` with the CLIP's verdict
  on the label, 1 where it holds the label true of the image and 0 where not: a simulator that
  says whether the concept is there rather than how much the image looks like its words (0 when
  the CLIP holds the label true on all or none of the held-out images).

Without ground truth, a layer's mean correlation and the share of neurons with ``p < 0.05`` say how
far its labels can be trusted. ``sanity`` runs the "missing labels" / "extra labels" tests of the
ICML 2025 paper on any score function.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from common import DiscoverError

SPLIT_SEED = 0  # the seed of the choose / score split of the probe
TOP_SHARE = 0.05  # auprc: the neuron's top 5 % of the held-out images are the positives
P_VALUE = 0.05
SCORES = ("corr", "auprc", "p", "precision", "corr_truth")  # the per-neuron scores of held_out_scores


def probe_split(n: int, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of the images that choose the labels and of the held-out images that score
    them: a seeded random half each (the first gets the odd one out)."""
    if n < 4:
        raise DiscoverError(f"a probe of {n} images is too small to split into choose and score halves")
    perm = np.random.default_rng(seed).permutation(n)
    half = (n + 1) // 2
    return np.sort(perm[:half]), np.sort(perm[half:])


def _standardise(X: np.ndarray) -> np.ndarray:
    X = np.asarray(X, np.float64)
    X = X - X.mean(0)
    norm = np.sqrt((X * X).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return X / np.where(norm > 0, norm, np.nan)


def correlations(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Pearson correlation of each column pair ``A[:, k]``, ``B[:, k]`` (NaN where one is constant)."""
    return (_standardise(A) * _standardise(B)).sum(0)


def truth_correlations(A: np.ndarray, T: np.ndarray) -> np.ndarray:
    """Per column k: the Pearson correlation of ``A[:, k]`` with the 0/1 verdict ``T[:, k]``; 0 where
    the verdict is the same on every row (a label held true everywhere or nowhere explains none of
    the neuron's variation), NaN where ``A[:, k]`` is constant."""
    r = correlations(A, np.asarray(T, np.float64))
    return np.where(np.isnan(r) & (np.ptp(A, axis=0) > 0), 0.0, r)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Average precision of ranking by ``scores`` (descending) for the ``positive`` items: the mean,
    over the positives, of the precision at each positive's rank (ties broken by index)."""
    positive = np.asarray(positive, bool)
    if not positive.any():
        return math.nan
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    hits = positive[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].mean())


def _top_rows(a: np.ndarray, share: float) -> np.ndarray | None:
    """The indices of ``a``'s top ``share`` of the rows (at least one; ties by index), None when
    ``a`` is constant."""
    if np.ptp(a) == 0:
        return None
    return np.argsort(-a, kind="stable")[:max(1, int(round(share * len(a))))]


def auprcs(A: np.ndarray, B: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    """Per column k: :func:`average_precision` of ranking by ``B[:, k]`` with ``A[:, k]``'s top
    ``share`` of the rows (at least one) as the positives."""
    out = np.full(A.shape[1], math.nan)
    for k in range(A.shape[1]):
        top = _top_rows(A[:, k], share)
        if top is not None:
            pos = np.zeros(A.shape[0], bool)
            pos[top] = True
            out[k] = average_precision(B[:, k], pos)
    return out


def top_precisions(A: np.ndarray, T: np.ndarray, share: float = TOP_SHARE) -> np.ndarray:
    """Per column k: the share of ``A[:, k]``'s top ``share`` of the rows (at least one; ties by
    index) on which ``T[:, k]`` holds (NaN where ``A[:, k]`` is constant)."""
    T = np.asarray(T, bool)
    out = np.full(A.shape[1], math.nan)
    for k in range(A.shape[1]):
        top = _top_rows(A[:, k], share)
        if top is not None:
            out[k] = T[top, k].mean()
    return out


def permutation_p(A: np.ndarray, B: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """p-value of each neuron's correlation with its own label column against the layer's labels
    shuffled among its neurons: the share of the layer's *distinct* labels (``labels``: the concept
    index of each column of B; None: every column its own) that correlate with neuron k at least as
    well as its own, its own included: p >= 1 / (number of distinct labels). Neurons that share a
    label do not count against each other. NaN where the correlation is undefined."""
    labels = np.arange(B.shape[1]) if labels is None else np.asarray(labels)
    distinct, first = np.unique(labels, return_index=True)
    C = _standardise(A).T @ _standardise(B[:, first])  # K x D: neuron k against distinct label d
    own = C[np.arange(A.shape[1]), np.searchsorted(distinct, labels)]
    with np.errstate(invalid="ignore"):
        p = (np.nan_to_num(C, nan=-np.inf) >= own[:, None]).sum(1) / len(distinct)
    return np.where(np.isfinite(own), p, math.nan)


def held_out_scores(A: np.ndarray, P: np.ndarray, choose: Callable[[np.ndarray, np.ndarray], np.ndarray],
                    seed: int = SPLIT_SEED, threshold: float | None = None) -> dict[str, np.ndarray]:
    """Simulation scores of one layer. ``A`` (N x K) the activations, ``P`` (N x M) the CLIP
    similarities, ``choose(A_part, P_part)`` the label rule (the concept index per neuron, as
    ``dissect`` picks it). Labels are chosen on one half of the probe and scored on the other.
    A neuron constant on the choosing half (it never fired there) has no label to score: NaN.
    The permutation p-values shuffle the labels of the neurons that vary on both halves alone.
    Returns ``label`` (K concept indices), ``corr``, ``auprc``, ``p``, ``precision`` and
    ``corr_truth`` (K each; the last two NaN without the CLIP's truth ``threshold``)."""
    ch, sc = probe_split(A.shape[0], seed)
    m = np.asarray(choose(A[ch], P[ch]), np.int64)
    B = P[sc][:, m]
    chose = np.ptp(A[ch], axis=0) > 0
    varies = chose & (np.ptp(A[sc], axis=0) > 0)
    p = np.full(A.shape[1], math.nan)
    p[varies] = permutation_p(A[sc][:, varies], B[:, varies], m[varies])
    out = {"corr": correlations(A[sc], B), "auprc": auprcs(A[sc], B), "p": p,
           "precision": np.full(A.shape[1], math.nan), "corr_truth": np.full(A.shape[1], math.nan)}
    if threshold is not None:
        held = B > threshold  # the CLIP's verdict on each held-out image and label
        out.update(precision=top_precisions(A[sc], held), corr_truth=truth_correlations(A[sc], held))
    return {"label": m, **{k: np.where(chose, v, math.nan) for k, v in out.items()}}


def summary(scores: dict[str, np.ndarray]) -> dict[str, Any]:
    """A layer's figures: mean and median correlation, mean AUPRC, share with p < 0.05, mean
    precision and mean truth correlation (None without them) over the live neurons (a finite
    correlation), and the number of their distinct labels (``label``; None without it). A layer of
    at most 1 / P_VALUE distinct labels has no share with p < 0.05 (None): its p-values are at
    least 1 / that number (:func:`permutation_p` over the same neurons), whatever the labels explain."""
    corr, live = scores["corr"], np.isfinite(scores["corr"])
    distinct = len({lab for lab, ok in zip(np.asarray(scores["label"]).tolist(), live) if ok}) if "label" in scores else None
    if not live.any():
        return {"neurons": 0, "corr_mean": None, "corr_median": None, "auprc_mean": None, "significant_percent": None,
                "precision_mean": None, "corr_truth_mean": None, "distinct_labels": distinct}

    def mean_of(key: str) -> float | None:
        v = np.asarray(scores.get(key, np.full(len(corr), math.nan)), np.float64)[live]
        return float(np.nanmean(v)) if np.isfinite(v).any() else None

    return {"neurons": int(live.sum()), "corr_mean": float(corr[live].mean()), "corr_median": float(np.median(corr[live])),
            "auprc_mean": float(np.nanmean(scores["auprc"][live])),
            "significant_percent": None if distinct is not None and distinct * P_VALUE <= 1
            else float(100 * np.mean(scores["p"][live] < P_VALUE)),
            "precision_mean": mean_of("precision"), "corr_truth_mean": mean_of("corr_truth"), "distinct_labels": distinct}


def significant_text(figures: dict[str, Any], fmt: Callable[[float], str]) -> str:
    """A layer's share of labels with p < P_VALUE (:func:`summary`) as ``fmt`` writes it, or, for a
    layer with too few distinct labels to have one, "n/a (N labels)"."""
    share = figures["significant_percent"]
    return f"n/a ({figures.get('distinct_labels')} labels)" if share is None else fmt(share)


def sanity(score: Callable[[np.ndarray, np.ndarray], np.ndarray], A: np.ndarray, C: np.ndarray,
           drop: float = 0.5, seed: int = 0) -> dict[str, float]:
    """The two sanity tests of "Evaluating Neuron Explanations" (ICML 2025) for a score function.

    ``A`` (N x K) activations, ``C`` (N x K) binary concept vectors, column k the true concept of
    neuron k; ``score(A, C)`` returns one score per neuron. *Missing labels*: ``drop`` of each
    concept's positives are set to 0; *extra labels*: as many negatives are set to 1. A score
    passes a test when it falls for the neuron. Returns the share of neurons (with both positives
    and negatives) for which it falls, per test."""
    rng = np.random.default_rng(seed)
    C = np.asarray(C, np.float64)
    missing, extra = C.copy(), C.copy()
    for k in range(C.shape[1]):
        pos, neg = np.flatnonzero(C[:, k] > 0), np.flatnonzero(C[:, k] == 0)
        n = max(1, int(round(drop * len(pos)))) if len(pos) else 0
        missing[rng.choice(pos, n, replace=False), k] = 0
        extra[rng.choice(neg, min(n, len(neg)), replace=False), k] = 1
    base, s_missing, s_extra = score(A, C), score(A, missing), score(A, extra)
    ok = np.isfinite(base) & (C.sum(0) > 0) & (C.sum(0) < C.shape[0])
    return {"missing": float(np.mean(s_missing[ok] < base[ok])), "extra": float(np.mean(s_extra[ok] < base[ok])),
            "neurons": int(ok.sum())}
