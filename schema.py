"""The files DISCOVER writes and reads, as typed records, read and written here alone:

- a dissection's ``labels.json`` (:class:`Labels`): its :class:`Provenance` (what was dissected, with
  what), one :class:`LayerInfo` per layer and one :class:`Neuron` per unit;
- a model's ``meta.json`` (:class:`ModelMeta`): what is needed to rebuild and feed the network, and
  the training record of a ``discover train`` run.

Files of older formats read with the defaults their writers implied (documented per field);
keys a record does not know are kept, so reading and writing a file loses nothing.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import DiscoverError, write_json_atomic

LABELS_FORMAT = 5  # labels.json: 2 adds the gallery check, per-neuron signal_mean / signal_std; 3 per-layer
# cutoffs calibrated on a random copy, model_args, simulation scores (dissect --score); 4 per-neuron confidence curves;
# 5 gallery labels chosen by their fit over the probe (dissect.gallery_fit), per-neuron base_rate
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the input normalisation of ImageNet models, and of DISCOVER's own
IMAGENET_STD = (0.229, 0.224, 0.225)
SOFT_WPMI_CUTOFF = 0.16  # CLIP-Dissect A.8: the fixed SoftWPMI interpretability cutoff (labels before format 3)


def _split(cls: type, d: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``d``'s keys that are fields of ``cls``, and the rest. A null in a file for a field that
    cannot be None reads as the field's default (left out here)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "extra"}
    known = {k: v for k, v in d.items() if k in fields and (v is not None or "None" in str(fields[k].type))}
    return known, {k: v for k, v in d.items() if k not in fields}


def _as_dict(record: Any) -> dict[str, Any]:
    """A record as its JSON object: its fields (nested records too), then the keys it did not know."""
    out = {f.name: getattr(record, f.name) for f in dataclasses.fields(record) if f.name != "extra"}
    out = {k: _as_dict(v) if dataclasses.is_dataclass(v) else v for k, v in out.items()}
    return {**out, **getattr(record, "extra", {})}


class _Record:
    """A record of a JSON file: its fields, and ``extra`` for the keys it does not know."""

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        known, extra = _split(cls, d)
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass
class Simulation(_Record):
    """A neuron's held-out simulation scores (simulate.py): the label chosen on the choosing half of
    the probe, and its Pearson correlation, AUPRC, permutation p, precision and truth correlation
    (the last two None without a CLIP truth threshold) on the scoring half."""
    label: str = ""
    corr: float | None = None
    auprc: float | None = None
    p: float | None = None
    precision: float | None = None
    corr_truth: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Neuron(_Record):
    """One unit's label record. ``block``/``competitor``: its LWTA block and place in it (None
    outside LWTA layers); ``active_rate``: the share of probe images it won (LWTA) or was non-zero
    on; ``top_images``: probe indices of its highest signals; ``description``: its label ("" when
    dead), ``similarity`` that label's score, ``top_concepts`` the best [concept, score] pairs;
    ``interpretable``: score above the layer's cutoff (None without a cutoff); ``signal_mean`` /
    ``signal_std``: its signal over the probe (None before format 2); ``confidence``: how often the
    CLIP finds the label in the probe images that move the unit about as much as a signal, as ``[signal,
    share]`` pairs (``dissect.confidence_curve``; None for a CLIP without a truth threshold, a dead
    unit, or labels before format 4); ``base_rate``: the share of all probe images on which the CLIP
    finds the label (None alike, and before format 5)."""
    layer: str
    unit: int
    block: int | None = None
    competitor: int | None = None
    active_rate: float = math.nan
    dead: bool = False
    top_images: list[int] = field(default_factory=list)
    signal_mean: float | None = None
    signal_std: float | None = None
    description: str = ""
    similarity: float = math.nan
    top_concepts: list[list[Any]] = field(default_factory=list)
    interpretable: bool | None = None
    gallery_checked: bool | None = None
    simulation: Simulation | None = None
    confidence: list[list[float]] | None = None
    base_rate: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Neuron:
        known, extra = _split(cls, d)
        if known.get("simulation") is not None:
            known["simulation"] = Simulation.from_dict(known["simulation"])
        return cls(**known, extra=extra)


@dataclass
class LayerInfo(_Record):
    """One dissected layer: K units in blocks of U (None: no LWTA); the per-image ``summary`` of its
    output, the ``signal`` recorded ("output" for a non-LWTA layer), the ``similarity`` that chose its
    labels, its ``dead`` and ``interpretable`` counts, the ``cutoff`` and where it came from ("random
    copy" or "fixed"; labels before format 3: the provenance's SoftWPMI cutoff on SoftWPMI layers,
    none on others), the gallery check's share (None: not checked), the layer's simulation summary
    (``dissect --score``) and its activations file."""
    K: int
    U: int | None = None
    summary: str | None = None
    signal: str = "output"
    similarity: str | None = None
    dead: int = 0
    gallery_share: float | None = None
    cutoff: float | None = None
    cutoff_from: str = "fixed"
    interpretable: int | None = None
    simulation: dict[str, Any] | None = None
    activations: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any], prov: Provenance) -> LayerInfo:
        known, extra = _split(cls, d)
        known.setdefault("similarity", prov.similarity)
        known.setdefault("signal", prov.signal if known.get("U") else "output")
        if "cutoff" not in known:  # before format 3: one fixed cutoff, for SoftWPMI layers
            fixed = prov.cutoff if isinstance(prov.cutoff, (int, float)) else SOFT_WPMI_CUTOFF
            known["cutoff"] = float(fixed) if known["similarity"] == "soft_wpmi" else None
        return cls(**known, extra=extra)


@dataclass
class Provenance(_Record):
    """What a dissection dissected, with what: the model (its spec, the arguments that rebuild a
    bare weights file, its content hash, arch and class names), the probe (spec, fingerprint, size,
    image names), the concept set, the CLIP (spec, fingerprint, truth threshold), the similarity, the
    cutoff ("random" or a number), the LWTA mode, the signal ("sample" before the signal option),
    the seed, the summary and the gallery check's share."""
    format: int = 1
    model: str | None = None
    model_args: dict[str, Any] = field(default_factory=dict)
    model_hash: str | None = None
    arch: str | None = None
    classes: list[str] | None = None
    probe: str | None = None
    probe_fingerprint: str | None = None
    probe_n: int | None = None
    probe_names: list[str] = field(default_factory=list)
    concepts: str | None = None
    n_concepts: int | None = None
    clip: str | None = None
    clip_fingerprint: str | None = None
    similarity: str | None = None
    cutoff: float | str | None = None
    mode: str = "sample"
    signal: str = "sample"
    seed: int = 0
    summary: str | None = None
    skip_bad: bool = False
    gallery_share: float | None = None
    truth_threshold: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Labels:
    """A dissection: ``labels.json``."""
    provenance: Provenance
    layers: dict[str, LayerInfo]
    neurons: list[Neuron]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Labels:
        prov = Provenance.from_dict(d.get("provenance") or {})
        return cls(prov, {k: LayerInfo.from_dict(v, prov) for k, v in (d.get("layers") or {}).items()},
                   [Neuron.from_dict(n) for n in d.get("neurons") or []])

    @classmethod
    def read(cls, path: str | Path, where: str = "`labels`") -> Labels:
        """The ``labels.json`` of a dissection directory, or the file itself (one-line errors naming
        the argument ``where`` for a missing file, bad JSON or a file that is no dissection)."""
        path = Path(path)
        f = path / "labels.json" if path.is_dir() else path
        if not f.is_file():
            raise DiscoverError(f"{where} {path}: no labels.json (run python discover.py dissect first)")
        try:
            d = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise DiscoverError(f"{f}: not valid JSON ({e.msg}, line {e.lineno})") from e
        if not isinstance(d, dict) or not isinstance(d.get("layers"), dict) or not isinstance(d.get("neurons"), list):
            raise DiscoverError(f"{where} {path}: {f.name} lacks layers/neurons (not a dissection)")
        try:
            return cls.from_dict(d)
        except (TypeError, KeyError, AttributeError) as e:
            raise DiscoverError(f"{where} {path}: {f.name} does not match the labels format ({e})") from e

    def to_dict(self) -> dict[str, Any]:
        return {"provenance": self.provenance.to_dict(), "layers": {k: v.to_dict() for k, v in self.layers.items()},
                "neurons": [n.to_dict() for n in self.neurons]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=True) + "\n"

    def neurons_of(self, layer: str) -> list[Neuron]:
        """The layer's neurons, by unit."""
        return sorted((n for n in self.neurons if n.layer == layer), key=lambda n: n.unit)


@dataclass
class ModelMeta(_Record):
    """What feeds and names a network: the architecture it was built as (``arch``, ``U`` for a CVN,
    ``act`` for a twin, ``num_classes``), its input (``img_size``, ``mean``, ``std``,
    ``interpolation``), its class names when known and the spec it was loaded from. A ``discover
    train`` run's ``meta.json`` also keeps its training record (epoch, metrics, test figures,
    reproduce, ...) in ``extra``."""
    arch: str
    img_size: int | None = None  # None in a meta.json: the size the arch is built for (models.load fills it in)
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    interpolation: str = "bilinear"
    U: int | None = None
    act: str | None = None
    num_classes: int | None = None
    classes: list[str] | None = None
    spec: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelMeta:
        known, extra = _split(cls, d)
        if "arch" not in known:
            raise DiscoverError("a model's meta names no arch")
        return cls(**known, extra=extra)

    @classmethod
    def read(cls, path: str | Path) -> ModelMeta:
        """A run's ``meta.json`` (one-line errors for bad JSON or a file without ``arch``)."""
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DiscoverError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
        if not isinstance(d, dict) or "arch" not in d:
            raise DiscoverError(f"{path}: names no arch (not a model's meta.json)")
        return cls.from_dict(d)

    def write(self, path: str | Path) -> None:
        """Write it as a ``meta.json`` (atomically)."""
        write_json_atomic(Path(path), self.to_dict())
