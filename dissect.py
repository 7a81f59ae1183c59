"""Label every neuron of a layer with a concept: CLIP-Dissect (paper 001, Sec. 3; SPEC §3).

    model + probe --record--> A [N x K]     CLIP(probe images) . CLIP(concepts)^T --> P [N x M]
                  sim(A, P) (dissect_kernels) --> S [K x M] --> label_k = argmax_m S[k, m]

With a CLIP that says when a concept is true (world-clip's truth threshold), a hidden layer's label
is instead chosen among the concepts true of at least half (``GALLERY_SHARE``) of the unit's top 20
images (the gallery check): the one whose truth follows the unit best over the whole probe
(``gallery_fit``).

Outputs in DIR, written atomically:
- ``descriptions.csv``: CLIP-Dissect's columns ``layer,unit,description,similarity`` first, then
  ``block,competitor,active_rate,interpretable,top_images``;
- ``labels.json``: provenance (model, probe, concepts, CLIP, similarity, fingerprints) and per neuron
  the top-5 concepts with scores and the top-20 probe images.
A neuron that never fires (all-zero activations) is *dead*: no concept, score NaN, ``dead: true``.
"""
from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import simulate
from common import DiscoverError, atomic_dir, output_lock, resolve_device
from schema import LABELS_FORMAT, Labels, LayerInfo, Neuron, Provenance, Simulation

SIMILARITY_NAMES = ("auto", "soft_wpmi", "wpmi", "rank_reorder", "cos", "cos3")
# "auto": SoftWPMI on the output layer, WPMI on every other layer. SoftWPMI (lam = 1) scores a
# concept by how much more it fits this neuron than the layer's other neurons: right where each
# neuron has a concept of its own (a classifier's output layer, CLIP-Dissect's benchmark), wrong
# where many neurons share one (hidden layers: forty "red" units make "red" score low for each of
# them); WPMI's lam = 0.6 keeps 40 % of how well the concept fits the neuron's top images itself.
# The ground-truth table behind the choice: docs/labels.md.
AUTO_SIMILARITY = {"output": "soft_wpmi", "hidden": "wpmi"}
TOP_IMAGES = 20
TOP_CONCEPTS = 5
RANDOM_QUANTILE = 0.95  # interpretable: the label scores above this quantile of a random copy's neurons
GALLERY_SHARE = 0.5  # hidden layers: a label must hold on at least this share of the unit's top images (most of them)
CONFIDENCE_MIN_RANK = 10  # the confidence curve's first point: the unit's 10 most active probe images


@dataclass
class DissectConfig:
    model: str
    layers: list[str]
    probe: str = "world:2000"
    concepts: str = "world"
    clip: str = "world-clip"
    similarity: str = "auto"
    out: str = "dissect_out"
    summary: str = "auto"
    mode: str = "sample"
    signal: str = "expected"  # what an LWTA layer's neuron vector is (record.SIGNALS; record.DEFAULT_SIGNAL)
    seed: int = 0
    batch_size: int = 64
    cutoff: float | None = None  # interpretable above it; None: calibrated per layer (random_cutoff)
    gallery_share: float = GALLERY_SHARE  # 0: off; see gallery_mask
    score: bool = False  # simulation scores of every label on held-out probe images (simulate.py)
    skip_bad: bool = False  # leave unreadable probe images out (else an error naming the first)
    device: str = "cpu"  # where the model and the CLIP run ("auto": CUDA when present)
    build_kwargs: dict[str, Any] = field(default_factory=dict)  # a weights file's arch, U, act
    class_names: str | None = None  # a file of the model's class names (models.load_model)


def output_layer(model: Any) -> str | None:
    """The model's output layer: its last ``nn.Linear`` module (a classifier's one neuron per class)."""
    import torch.nn as nn

    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def layer_similarity(similarity: str, layer: str, output: str | None) -> str:
    """The similarity a layer is scored with: ``similarity`` itself, or for ``auto`` SoftWPMI on
    the output layer and WPMI on the others (:data:`AUTO_SIMILARITY`)."""
    if similarity != "auto":
        return similarity
    return AUTO_SIMILARITY["output" if layer == output else "hidden"]


def scores(similarity: str, A: np.ndarray, P: np.ndarray, name: str | None = None) -> np.ndarray:
    """S (K x M) of one layer: the kernel's scores, in float64 for WPMI / SoftWPMI. Those saturate
    at lam log K for concepts that one neuron dominates; float32 rounds such concepts to one value
    (argmax would then take the lowest concept index), float64 still orders them."""
    import dissect_kernels

    precise = {"dtype": np.float64} if similarity in ("wpmi", "soft_wpmi") else {}
    return dissect_kernels.SIMILARITIES[similarity](A, P, name=name, **precise)


def verdicts(P: np.ndarray, threshold: float) -> np.ndarray:
    """The CLIP's verdicts (N x M bool): True where the cosine P[i, m] of image i and concept m
    exceeds the CLIP's truth ``threshold``, i.e. where it holds concept m true of image i."""
    return P > np.float32(threshold)


def gallery_mask(holds: np.ndarray, top: np.ndarray, share: float) -> np.ndarray:
    """Which concepts the CLIP finds true of a unit's gallery: ``mask[k, m]`` is True when its
    verdict ``holds[i, m]`` (:func:`verdicts`) is True on at least ``share`` of unit k's top images
    ``top[k]`` (K x T indices into the rows). A label chosen among these names something that many
    of the unit's top images show (a "red star" only for a gallery of mostly red stars)."""
    return np.stack([holds[t].mean(0) >= share for t in top]) if len(top) else np.zeros((0, holds.shape[1]), bool)


def gallery_fit(A: np.ndarray, holds: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """How well each concept of a unit's gallery (``allowed``, K x M, :func:`gallery_mask`) follows
    the unit over the whole probe: ``fit[k, m]`` is the Pearson correlation of A[:, k] (N x K) with
    the CLIP's verdict on concept m (``holds``, :func:`verdicts`: 1 where it holds m true, 0
    elsewhere); 0 where the verdict or the unit is the same on every image; -inf where m is not
    allowed for k. Of what a unit's top images share ("large" and "heart" for a gallery of large
    hearts), the concept that rises and falls with the unit on every image ("heart")."""
    N, K = A.shape
    fit = np.full(allowed.shape, -np.inf)
    rate = holds.mean(0)
    by_concept = np.ascontiguousarray(holds.T).view(np.uint8)  # M x N: a unit's concepts are rows to gather
    for k in np.flatnonzero(allowed.any(1)):
        ms = np.flatnonzero(allowed[k])
        a = A[:, k].astype(np.float64)
        a -= a.mean()
        norm = np.sqrt((a @ a) * N * rate[ms] * (1 - rate[ms]))  # |a - mean| |t - mean| of each 0/1 verdict t
        with np.errstate(invalid="ignore", divide="ignore"):
            fit[k, ms] = np.where(norm > 0, (by_concept[ms] @ a) / norm, 0.0)  # sum_i (a_i - mean)(t_i - rate) = t . a
    return fit


def _allowed_first(s: np.ndarray, ok: np.ndarray, f: np.ndarray | None) -> np.ndarray:
    """The concepts allowed for a neuron (``ok``) in label order: by fit ``f`` (None: no fit, so
    by score alone), then by score ``s`` (non-finite as -inf), then in concept-list order."""
    ms = np.flatnonzero(ok)
    keys = (ms, -s[ms]) if f is None else (ms, -s[ms], -f[ms])
    return ms[np.lexsort(keys)]  # the last key sorts first


def concept_order(s: np.ndarray, ok: np.ndarray | None = None, f: np.ndarray | None = None) -> np.ndarray:
    """One neuron's concepts in label order, as indices into its scores ``s`` (M): the concepts
    allowed for it (``ok``, M bools, a row of :func:`gallery_mask`) first, by fit (``f``, a row of
    :func:`gallery_fit`; None: by score) and then by score, then the others by score; equal keys in
    concept-list order, non-finite scores last. The first is the neuron's label."""
    s = np.where(np.isfinite(s), s, -np.inf)
    if ok is None:
        return np.argsort(-s, kind="stable")
    rest = np.flatnonzero(~ok)
    return np.concatenate([_allowed_first(s, ok, f), rest[np.argsort(-s[rest], kind="stable")]])


def label_indices(S: np.ndarray, allowed: np.ndarray | None = None, fit: np.ndarray | None = None) -> np.ndarray:
    """Each neuron's label, as a concept index into S's columns (K x M): the first of its
    :func:`concept_order` (among the concepts ``allowed`` for it, the one that fits it best, ties by
    score; its best-scoring concept when none is allowed or no mask is given)."""
    S = np.where(np.isfinite(S), S, -np.inf)
    best = S.argmax(1)
    if allowed is not None:
        for k in np.flatnonzero(allowed.any(1)):
            best[k] = _allowed_first(S[k], allowed[k], None if fit is None else fit[k])[0]
    return best


def choose_labels(similarity: str, A: np.ndarray, P: np.ndarray, threshold: float | None = None,
                  share: float = GALLERY_SHARE) -> np.ndarray:
    """The whole label rule of a layer on activations A (N x K) and similarities P (N x M): the
    similarity's scores, the gallery check and fit when the CLIP has a truth ``threshold`` (and
    ``share`` > 0), :func:`label_indices`. Concept index per neuron."""
    import dissect_kernels

    S = scores(similarity, A, P)
    allowed = fit = None
    if threshold is not None and share > 0:
        holds = verdicts(P, threshold)
        allowed = gallery_mask(holds, dissect_kernels.top_images(A, min(TOP_IMAGES, A.shape[0])), share)
        fit = gallery_fit(A, holds, allowed)
    return label_indices(S, allowed, fit)


def best_scores(S: np.ndarray) -> np.ndarray:
    """Each neuron's best concept score (row maximum of S, K x M); -inf for a dead neuron's row."""
    S = np.where(np.isfinite(S), S, -np.inf)
    return S.max(1) if S.shape[1] else np.full(S.shape[0], -np.inf)


def random_cutoff(S_random: np.ndarray, q: float = RANDOM_QUANTILE) -> float:
    """The interpretability cutoff of a layer: the ``q`` quantile of the best concept scores of the
    same layer in an untrained copy of the network (:func:`models.random_copy`), scored with the same
    similarity, probe and concepts. A neuron whose label scores above it is better explained than
    all but 1 - q of the random network's neurons, on any similarity's scale; a random network
    itself gets about 1 - q of its neurons interpretable."""
    best = best_scores(S_random)
    best = best[np.isfinite(best)]
    return float(np.quantile(best, q)) if best.size else math.inf


def neuron_rows(layer: str, A: np.ndarray, S: np.ndarray, concepts: list[str], U: int | None,
                cutoff: float | None, wins: np.ndarray | None = None,
                allowed: np.ndarray | None = None, top: np.ndarray | None = None,
                fit: np.ndarray | None = None) -> list[Neuron]:
    """Per-neuron label records of one layer from its activations A (N x K) and scores S (K x M).
    A neuron is active on an image where it won its block (``wins`` > 0, LWTA layers) or where
    its activation is non-zero; a neuron active on no image is dead. ``interpretable``: the label's
    score exceeds ``cutoff`` (None when there is no cutoff).
    ``allowed`` (K x M, :func:`gallery_mask`): neuron k's label is its best-fitting allowed concept
    (``fit``, :func:`gallery_fit`; without it the best-scoring one), its best concept overall when
    none is allowed; ``top_concepts`` lists its first :data:`TOP_CONCEPTS` in :func:`concept_order`.
    ``top``: the neurons' top images (``dissect_kernels.top_images(A, TOP_IMAGES)``) when already at hand."""
    import dissect_kernels

    N, K = A.shape
    active = dissect_kernels.active_counts(A if wins is None else wins)
    top = dissect_kernels.top_images(A, min(TOP_IMAGES, N)) if top is None else top
    mean, std = A.mean(0, dtype=np.float64), A.std(0, dtype=np.float64)
    rows = []
    for k in range(K):
        dead = bool(active[k] == 0)
        rec = Neuron(layer=layer, unit=k, block=k // U if U else None, competitor=k % U if U else None,
                     active_rate=float(active[k]) / N, dead=dead, top_images=[int(i) for i in top[k]],
                     signal_mean=float(mean[k]), signal_std=float(std[k]))
        if dead or not np.isfinite(S[k]).any():
            rec.interpretable, rec.dead = False, True
        else:
            order = concept_order(S[k], None if allowed is None else allowed[k], None if fit is None else fit[k])
            order = order[:TOP_CONCEPTS]
            rec.description, rec.similarity = concepts[order[0]], float(S[k, order[0]])
            rec.top_concepts = [[concepts[m], float(S[k, m])] for m in order]
            rec.interpretable = None if cutoff is None else bool(S[k, order[0]] > cutoff)
            rec.gallery_checked = None if allowed is None else bool(allowed[k].any())
        rows.append(rec)
    return rows


def add_simulation(rows: list[Neuron], sim: dict[str, np.ndarray], concepts: list[str]) -> dict[str, Any]:
    """Put each live neuron's simulation scores (:func:`simulate.held_out_scores`) in its row as
    ``simulation`` (the label chosen on the choosing half and its :data:`simulate.SCORES`; None for a
    dead one) and return the layer's :func:`simulate.summary` over the live neurons."""
    live = np.array([not r.dead for r in rows])
    for k, r in enumerate(rows):
        val = {key: float(sim[key][k]) if np.isfinite(sim[key][k]) else None
               for key in simulate.SCORES}
        r.simulation = None if r.dead else Simulation(concepts[int(sim["label"][k])], **val)
    return simulate.summary({key: np.where(live, v, np.nan) if key != "label" else v for key, v in sim.items()})


def confidence_curve(a: np.ndarray, truth: np.ndarray, min_rank: int = CONFIDENCE_MIN_RANK) -> list[list[float]]:
    """How far a unit's label can be trusted at each level of its signal ``a`` (N probe images):
    ``[t, p]`` pairs at the ranks r = ``min_rank``, x sqrt(2), ..., N of ``a`` in descending order,
    where t is the r-th highest signal and p the share of the images that move the unit about as
    much on which the label holds (``truth``, N bools: the CLIP holds it true): the images whose
    signal lies between those ranked r/2 + 1 and 2r, ties included (a saturated winning
    probability: every image at 1). Ascending in t, one pair per distinct t (its highest-ranked one)."""
    a = np.asarray(a, np.float64)
    truth = np.asarray(truth, bool)
    N = a.shape[0]
    if N == 0:
        return []
    order = np.argsort(-a, kind="stable")
    desc = a[order]
    held = np.concatenate([[0], np.cumsum(truth[order])])  # held[i]: true among the i most active
    ranks = {N}
    r = float(min(min_rank, N))
    while r < N:
        ranks.add(int(round(r)))
        r *= math.sqrt(2)
    curve: dict[float, float] = {}
    for r in sorted(ranks):
        hi, lo = desc[r // 2], desc[min(N, 2 * r) - 1]  # the signals ranked r/2 + 1 and 2r
        first = int(np.searchsorted(-desc, -hi, side="left"))  # the band: every image with lo <= a <= hi
        stop = int(np.searchsorted(-desc, -lo, side="right"))
        curve.setdefault(float(desc[r - 1]), float(held[stop] - held[first]) / (stop - first))
    return [[t, curve[t]] for t in sorted(curve)]


def add_confidence(rows: list[Neuron], A: np.ndarray, P: np.ndarray, concepts: list[str], threshold: float) -> None:
    """Put each live neuron's :func:`confidence_curve` in its row: the truth of its label on each
    probe image is the CLIP's (cosine of the image and the label's text above the CLIP's truth
    ``threshold``), so the curve says, for a signal level, how often the CLIP finds the label in
    the probe images that move the unit about as much; and its ``base_rate``, how often the CLIP
    finds the label in any probe image (what the curve's shares are measured against)."""
    index = {c: m for m, c in reversed(list(enumerate(concepts)))}  # a repeated concept: its first column
    for r in rows:
        m = index.get(r.description)
        truth = None if r.dead or m is None else P[:, m] > threshold
        r.confidence = None if truth is None else confidence_curve(A[:, r.unit], truth)
        r.base_rate = None if truth is None else float(truth.mean())


def _csv(rows: list[Neuron], probe_names: list[str], signals: dict[str, str]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["layer", "unit", "description", "similarity", "block", "competitor", "active_rate",
                "interpretable", "signal", "top_images", "simulation_label",
                *(f"simulation_{key}" for key in simulate.SCORES)])

    def sim(r: Neuron, key: str) -> str:
        v = None if r.simulation is None else getattr(r.simulation, key)
        return "" if v is None else v if isinstance(v, str) else f"{v:.6g}"

    for r in rows:
        w.writerow([r.layer, r.unit, r.description, f"{r.similarity:.6g}",
                    "" if r.block is None else r.block, "" if r.competitor is None else r.competitor,
                    f"{r.active_rate:.6g}", "" if r.interpretable is None else int(r.interpretable), signals.get(r.layer, ""),
                    ";".join(probe_names[i] for i in r.top_images),
                    *(sim(r, key) for key in ("label", *simulate.SCORES))])
    return buf.getvalue()


def dissect(cfg: DissectConfig, log: Any = print) -> dict[str, Any]:
    """Run the whole pipeline; returns the summary (layers, neurons, dead units, seconds per stage).
    ``cfg.out`` is locked for the run: a second dissect into it fails at once."""
    with output_lock(cfg.out, "`out`"):
        return _dissect(cfg, log)


def _dissect(cfg: DissectConfig, log: Any) -> dict[str, Any]:
    import clip_backend
    import concepts as concepts_mod
    import dissect_kernels
    import record
    import models
    import probes

    if not 0 <= cfg.gallery_share <= 1:
        raise DiscoverError(f"`gallery_share` must be in [0, 1], got {cfg.gallery_share}")
    if cfg.similarity not in SIMILARITY_NAMES:
        raise DiscoverError(f"`similarity`: unknown {cfg.similarity!r}; choose one of {', '.join(SIMILARITY_NAMES)}")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    concept_list = concepts_mod.load_concepts(cfg.concepts)
    device = resolve_device(cfg.device)
    model, meta = models.load_model(cfg.model, class_names=cfg.class_names, **cfg.build_kwargs)
    model.to(device)
    probe = probes.load_probe(cfg.probe, skip_bad=cfg.skip_bad)
    record.resolve_layers(model, cfg.layers)  # unknown layer: one line with close names, before any work
    clip = clip_backend.load_clip(cfg.clip, str(device))  # a bad --clip: before the recording, too
    seconds["load"] = time.perf_counter() - t

    def record_model(net: Any) -> dict[str, Path]:
        cache = record.activation_cache(models.model_hash(net), probe, signal=cfg.signal, mode=cfg.mode, seed=cfg.seed)
        return record.record_layers(net, meta, cfg.layers, probe, cache, summary=cfg.summary, mode=cfg.mode,
                                    seed=cfg.seed, batch_size=cfg.batch_size, signal=cfg.signal)

    t = time.perf_counter()
    paths = record_model(model)
    seconds["record"] = time.perf_counter() - t
    if cfg.cutoff is None:  # the random baseline of the interpretability cutoff: an untrained copy, recorded alike
        t = time.perf_counter()
        random_paths = record_model(models.random_copy(model))
        seconds["record random copy"] = time.perf_counter() - t

    t = time.perf_counter()
    P = clip_backend.similarity_matrix(clip, probe, concept_list)
    seconds["clip"] = time.perf_counter() - t

    t = time.perf_counter()
    gallery_check = cfg.gallery_share > 0 and clip.truth_threshold is not None
    rows, layers_info = [], {}
    out_layer = output_layer(model)
    for layer, path in paths.items():
        A, info = record.read_activations(path)
        if A.shape[0] != P.shape[0] or info.get("probe_fingerprint", probe.fingerprint) != probe.fingerprint:
            raise DiscoverError(f"layer {layer}: activations ({A.shape[0]} images) and CLIP similarities "
                                f"({P.shape[0]} images) come from different probes; delete {path} to recompute")
        U = None if info.get("U", "none") in ("none", "", None) else int(info["U"])
        sim = layer_similarity(cfg.similarity, layer, out_layer)
        try:
            S = scores(sim, A, P, name=layer)
        except ValueError as e:  # NaN/inf in the activations or similarities: names the layer
            raise DiscoverError(str(e)) from e
        checked = gallery_check and layer != out_layer  # an output layer: one class per neuron
        top = dissect_kernels.top_images(A, min(TOP_IMAGES, A.shape[0]))
        holds = verdicts(P, clip.truth_threshold) if checked else None
        allowed = gallery_mask(holds, top, cfg.gallery_share) if checked else None
        fit = gallery_fit(A, holds, allowed) if checked else None
        cutoff = (random_cutoff(scores(sim, record.read_activations(random_paths[layer])[0], P))
                  if cfg.cutoff is None else cfg.cutoff)
        layer_rows = neuron_rows(layer, A, S, concept_list, U, cutoff, record.read_wins(path), allowed, top, fit)
        if clip.truth_threshold is not None:
            add_confidence(layer_rows, A, P, concept_list, clip.truth_threshold)
        simulation = None
        if cfg.score:
            threshold = clip.truth_threshold if checked else None
            sim_scores = simulate.held_out_scores(
                A, P, lambda a, p: choose_labels(sim, a, p, threshold, cfg.gallery_share),
                threshold=clip.truth_threshold)
            simulation = add_simulation(layer_rows, sim_scores, concept_list)
        rows += layer_rows
        layers_info[layer] = LayerInfo(
            K=A.shape[1], U=U, summary=info.get("summary", cfg.summary), signal=info.get("signal", "output"),
            similarity=sim, dead=sum(r.dead for r in layer_rows), gallery_share=cfg.gallery_share if checked else None,
            cutoff=cutoff if math.isfinite(cutoff) else None, cutoff_from="random copy" if cfg.cutoff is None else "fixed",
            interpretable=sum(bool(r.interpretable) for r in layer_rows), simulation=simulation, activations=str(path))
    seconds["similarity"] = time.perf_counter() - t

    model_args = {k: v for k, v in cfg.build_kwargs.items() if v is not None}
    if cfg.class_names is not None:
        model_args["class_names"] = str(Path(cfg.class_names).expanduser().resolve())
    provenance = Provenance(
        format=LABELS_FORMAT, model=cfg.model, model_args=model_args, model_hash=models.model_hash(model),
        arch=meta.arch, classes=meta.classes, probe=cfg.probe, probe_fingerprint=probe.fingerprint, probe_n=probe.n,
        probe_names=list(probe.names), concepts=cfg.concepts, n_concepts=len(concept_list), clip=cfg.clip,
        clip_fingerprint=clip.fingerprint, similarity=cfg.similarity,
        cutoff=cfg.cutoff if cfg.cutoff is not None else "random", mode=cfg.mode, signal=cfg.signal, seed=cfg.seed,
        summary=cfg.summary, skip_bad=cfg.skip_bad, gallery_share=cfg.gallery_share if gallery_check else None,
        truth_threshold=clip.truth_threshold)
    out = Path(cfg.out)
    with atomic_dir(out) as tmp:
        (tmp / "descriptions.csv").write_text(_csv(rows, list(probe.names), {k: v.signal for k, v in layers_info.items()}))
        (tmp / "labels.json").write_text(Labels(provenance, layers_info, rows).to_json())
    return {"out": str(out), "layers": layers_info, "seconds": seconds, "neurons": len(rows)}
