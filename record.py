"""Record layer activations of a vision network on a probe set: the neuron vectors ``q_k`` of
SPEC §3 step 2, one safetensors file per layer.

Usage::

    python discover.py record --model runs/deit8 --layers blocks.5.mlp.act,head --probe world:2000 --out acts/
    python discover.py record --model timm:resnet50:weights/r50.pth --layers layer4 --probe ~/imagenet_val --out acts/
    python discover.py record --model runs/deit8 --list-layers            # every module and its output shape

From Python (``dissect``, ``explain`` and ``demo`` do this)::

    model, meta = models.load_model("runs/deit8")           # or "timm:NAME[:WEIGHTS]", "torchvision:NAME[:WEIGHTS]"
    probe = probes.load_probe("world:2000")                 # or an image folder
    paths = record.record_layers(model, meta, ["blocks.5.mlp.act"], probe, "acts/")
    A, info = record.read_activations(paths["blocks.5.mlp.act"])   # A: N x K float32

Summaries reduce a layer's output for one image to one number per neuron:

- ``auto``: the class token (token 0) of a ViT token tensor ``N x T x K`` (the mean of the tokens
  when the model has no class token), the spatial mean of a conv map ``N x C x H x W``, the vector
  itself for ``N x K``;
- ``cls`` / ``mean`` / ``max``: token 0 / mean / max over tokens or positions;
- ``identity``: vector outputs only.

For an LWTA layer with the ``cls`` summary (the default for DeiT CVNs) the vector of unit (b, u) is
sparse: each image has exactly one non-zero unit per block, the winner of the class token's
competition. The spatial mean of an LWTA *conv* map is not sparse: every position has its own
winner, so nearly every unit wins somewhere and has a non-zero mean (CLIP-Dissect's convention,
which the papers follow for ResNets).

Recording streams: each batch's summaries are written straight into the output files (memory is
O(batch size x layers), never O(N x layers) of raw maps), and the forward pass stops after the
last recorded layer. Each file is keyed by the content of what produced it (model weights and
structure, layer, summary, probe fingerprint, preprocessing, LWTA mode and seed): a re-run with the
same inputs reuses it ("cached"), any change recomputes it.

The neuron signal of an LWTA layer (``signal``; other layers record their output):

- ``pi``: unit (b, u)'s winning probability pi_b[u] = softmax(h_b)[u] (Eq. 2), the quantity
  DISCOVER defines a unit's function by; a conv map's spatial mean of pi is the unit's win rate
  over its positions;
- ``expected`` (default, :data:`DEFAULT_SIGNAL`): pi * h, the expected output E[xi h] of the unit;
- ``sample``: the layer's output in one posterior draw (Eq. 1), the paper's Table 4 recording;
- ``argmax``: the output with the deterministic winner (argmax h) of each block.

``pi`` and ``expected`` are computed from the layer's input h, the other layers running in
``mode``. LWTA mode ``sample`` draws winners from the posterior; the generator is seeded per batch from
``seed`` and the batch index, so a run is reproducible for a given (seed, batch size, device type),
and a layer's values do not depend on which other layers are recorded with it.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import os
import struct
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwta
from common import DiscoverError, atomic_path, cache_dir, progress_bar, sha256_json, write_json_atomic
from models import device_of, model_hash, to_input
from probes import Probe
from schema import ModelMeta

SUMMARIES = ("auto", "cls", "mean", "max", "identity")
SIGNALS = ("pi", "expected", "sample", "argmax")  # what an LWTA layer's neuron vector is made of
DEFAULT_SIGNAL = "expected"  # pi*h: a decisive CVN's pi saturates at 1 on many images (docs/labels.md)
FORMAT_VERSION = "2"  # of the activation files; bump to invalidate every cached recording
LIST_LAYERS = "python discover.py record --list-layers --model MODEL"  # the command that lists a model's layers


# --- layers and summaries -------------------------------------------------------------------------

def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, nn.Module]:
    """Modules by ``named_modules()`` path; ``lwta`` stands for every LWTA layer. An unknown name is
    a :class:`DiscoverError` listing the close names."""
    modules = dict(model.named_modules())
    modules.pop("", None)
    out: dict[str, nn.Module] = {}
    for name in layers:
        name = name.strip()
        if name == "lwta" and name not in modules:
            found = lwta.lwta_modules(model)
            if not found:
                raise DiscoverError("`layers` lwta: the model has no LWTA layers")
            out.update(found)
        elif name in modules:
            out[name] = modules[name]
        else:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = (f"close names: {', '.join(close)}" if close else
                    f"the model has {len(modules)} named modules, e.g. {', '.join(list(modules)[:4])}")
            raise DiscoverError(f"unknown layer {name!r}; {hint} ({LIST_LAYERS} prints them all)")
    if not out:
        raise DiscoverError(f"`layers`: give at least one layer ({LIST_LAYERS} prints them)")
    return out


def neuron_signal(module: nn.Module, h: torch.Tensor, out: torch.Tensor, signal: str) -> torch.Tensor:
    """The per-unit signal of ``module`` (input ``h``, output ``out``) before summarising: for an
    LWTA layer pi, pi * h, its output (``sample``) or the argmax winner's output, each with the
    output's shape; for any other layer its output."""
    if signal not in SIGNALS:
        raise DiscoverError(f"`signal` must be one of {', '.join(SIGNALS)}, got {signal!r}")
    if not isinstance(module, lwta.LWTABase) or signal == "sample":
        return out
    dim = 1 if isinstance(module, lwta.ConvLWTA) else -1
    h = h.float()
    if signal == "argmax":
        y, _, _ = lwta.compete(h.movedim(dim, -1).reshape(-1, module.U, 1), tau=module.tau, training=False,
                               mode="argmax", fused=False)
        return y.reshape(h.movedim(dim, -1).shape).movedim(-1, dim)
    pi = lwta.block_probabilities(h, module.U, dim)
    return pi if signal == "pi" else pi * h


def winner_mask(module: lwta.LWTABase, h: torch.Tensor, signal: str) -> torch.Tensor:
    """1.0 where a unit won its block in this forward, else 0 (the output's shape): the drawn
    winners for the ``sample`` signal, the argmax winners (first maximum of h) for the others."""
    conv = isinstance(module, lwta.ConvLWTA)
    U = module.U
    if conv:
        N, C, H, W = h.shape
        w = lwta.winners(module) if signal == "sample" else h.reshape(N, C // U, U, H, W).argmax(2)
        return F.one_hot(w.long(), U).permute(0, 1, 4, 2, 3).reshape(N, C, H, W).float()
    K = h.shape[-1]
    w = lwta.winners(module) if signal == "sample" else h.reshape(*h.shape[:-1], K // U, U).argmax(-1)
    return F.one_hot(w.long(), U).reshape(h.shape).float()


def read_wins(path: str | os.PathLike) -> np.ndarray | None:
    """The ``N x K`` winner indicators (summarised like the activations: per image 0/1 for a class
    token, the win rate over positions for a conv map) of an LWTA layer's file; None for others."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor("wins") if "wins" in f.keys() else None
    except Exception as e:
        raise DiscoverError(f"activation file {path}: cannot be read ({type(e).__name__})") from e


def layer_signal(module: nn.Module, signal: str) -> str:
    """The signal a layer records: ``signal`` for an LWTA layer, ``output`` for any other."""
    return signal if isinstance(module, lwta.LWTABase) else "output"


def summarise(out: torch.Tensor, summary: str, has_cls: bool = True) -> tuple[torch.Tensor, str, str]:
    """Reduce a layer output to ``N x K``; returns (values, summary applied, shape meaning)."""
    if summary not in SUMMARIES:
        raise DiscoverError(f"`summary` must be one of {', '.join(SUMMARIES)}, got {summary!r}")
    d = out.dim()
    if d == 2:
        return out, "identity", "N x K: probe images x units"
    if d == 3:  # ViT tokens N x T x K
        how = {"auto": "cls" if has_cls and out.shape[1] > 1 else "mean"}.get(summary, summary)
        if how == "cls":
            return out[:, 0], how, "N x K: probe images x units (class token of N x T x K)"
        if how == "mean":
            return out.mean(1), how, "N x K: probe images x units (mean over the T tokens)"
        if how == "max":
            return out.amax(1), how, "N x K: probe images x units (max over the T tokens)"
    if d == 4:  # conv maps N x C x H x W
        how = "mean" if summary == "auto" else summary
        if how == "mean":
            return out.mean((2, 3)), how, "N x C: probe images x channels (spatial mean of N x C x H x W)"
        if how == "max":
            return out.amax((2, 3)), how, "N x C: probe images x channels (spatial max of N x C x H x W)"
    raise DiscoverError(f"`summary` {summary} does not apply to an output of shape "
                        f"{tuple(out.shape)} (tokens: auto|cls|mean|max; maps: auto|mean|max)")


def describe_layers(model: nn.Module, meta: ModelMeta, probe: Probe | None = None) -> list[dict[str, Any]]:
    """Every named module with its output shape for one probe image (a grey image without a probe),
    how often it runs per forward and its LWTA U: what ``--list-layers`` prints."""
    size = meta.img_size
    img = probe.images(0, 1, size, meta.interpolation) if probe else \
        np.full((1, size, size, 3), 128, np.uint8)
    shapes: dict[str, list[str]] = {}

    def hook(name: str):
        def fn(_m, _inp, out):
            ts = [out] if isinstance(out, torch.Tensor) else \
                [t for t in (out if isinstance(out, (tuple, list)) else ()) if isinstance(t, torch.Tensor)]
            shapes.setdefault(name, []).append(" , ".join("x".join(map(str, t.shape)) for t in ts) or "-")
        return fn

    named = [(n, m) for n, m in model.named_modules() if n]
    handles = [m.register_forward_hook(hook(n)) for n, m in named]
    try:
        with torch.inference_mode():
            model(to_input(img, meta, device_of(model)))
    finally:
        for h in handles:
            h.remove()
    return [{"layer": n, "type": type(m).__name__, "shape": shapes.get(n, ["(not run)"])[0],
             "calls": len(shapes.get(n, [])), "U": m.U if isinstance(m, lwta.LWTABase) else None}
            for n, m in named]


# --- recording ------------------------------------------------------------------------------------

def _batch_seed(seed: int, b: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{b}".encode()).digest()[:8], "little") >> 1


class _Stop(Exception):
    """Raised by a hook once every recorded layer has run: the rest of the forward is not needed."""


class _StreamWriter:
    """Writes a safetensors file of float32 ``n x K`` tensors ("activations", and "wins" for an
    LWTA layer), row block by row block, so that no more than a batch is ever in memory (header:
    8-byte length, JSON; each tensor's rows go to their own region of the file)."""

    def __init__(self, path: Path, n: int, metadata: dict[str, str]) -> None:
        self.path, self.n, self.metadata = path, n, metadata
        self.rows, self.k, self.f = 0, None, None
        self.names: list[str] = []
        self.base = 0

    def write(self, blocks: dict[str, np.ndarray], extra: dict[str, str]) -> None:
        blocks = {k: np.ascontiguousarray(v, dtype="<f4") for k, v in blocks.items()}
        first = next(iter(blocks.values()))
        if self.f is None:
            self.k, self.names = first.shape[1], list(blocks)
            meta = {**self.metadata, **extra, "shape": f"{self.n}x{self.k}"}
            size = self.n * self.k * 4
            header: dict[str, Any] = {"__metadata__": meta}
            for j, name in enumerate(self.names):
                header[name] = {"dtype": "F32", "shape": [self.n, self.k], "data_offsets": [j * size, (j + 1) * size]}
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)
            self.f = open(self.path, "wb")
            self.f.write(struct.pack("<Q", len(raw)) + raw)
            self.base = 8 + len(raw)
            self.f.truncate(self.base + len(self.names) * size)
        if list(blocks) != self.names:  # pragma: no cover - the hook always gives the same tensors
            raise DiscoverError(f"recording {self.metadata.get('layer')}: tensors changed between batches")
        for j, name in enumerate(self.names):
            self.f.seek(self.base + (j * self.n + self.rows) * self.k * 4)
            self.f.write(blocks[name].tobytes())
        self.rows += first.shape[0]

    def close(self) -> None:
        if self.f is not None:
            self.f.close()
            self.f = None


def _file_key(path: Path) -> str | None:
    try:
        return read_metadata(path).get("key")
    except DiscoverError:
        return None


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of an activation file (no tensor is read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return dict(f.metadata() or {})
    except Exception as e:
        raise DiscoverError(f"activation file {path}: cannot be read ({type(e).__name__})") from e


def read_activations(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """``(activations N x K float32, metadata)`` of a file written by :func:`record_layers`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as f:
            return f.get_tensor("activations"), dict(f.metadata() or {})
    except Exception as e:
        raise DiscoverError(f"activation file {path}: cannot be read ({type(e).__name__})") from e


def record_layers(model: nn.Module, meta: ModelMeta, layers: Sequence[str], probe: Probe,
                  out_dir: str | os.PathLike, summary: str | dict[str, str] = "auto",
                  mode: str = "sample", seed: int = 0, batch_size: int = 64, *, signal: str = DEFAULT_SIGNAL,
                  progress: bool = True, log: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Record ``layers`` of ``model`` on ``probe`` into ``out_dir/<layer>.safetensors``.

    Runs on the model's device; ``summary`` is one name or a dict layer -> name; ``mode``/``seed``
    set the LWTA winners (``sample`` is seeded per batch); ``signal`` what an LWTA layer records
    (see the module doc). Files whose content key matches are
    reused (``log`` gets "<layer>: cached"). Also writes ``out_dir/record.json``. Returns the paths.
    """
    if mode not in lwta.MODES:
        raise DiscoverError(f"`mode` must be one of {', '.join(lwta.MODES)}, got {mode!r}")
    if batch_size < 1:
        raise DiscoverError(f"`batch_size` must be at least 1, got {batch_size}")
    if signal not in SIGNALS:
        raise DiscoverError(f"`signal` must be one of {', '.join(SIGNALS)}, got {signal!r}")
    log = log or (lambda _msg: None)
    modules = resolve_layers(model, layers)
    summaries = {name: summary if isinstance(summary, str) else summary.get(name, "auto") for name in modules}
    for s in summaries.values():
        if s not in SUMMARIES:
            raise DiscoverError(f"`summary` must be one of {', '.join(SUMMARIES)}, got {s!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device_of(model)
    stochastic = mode == "sample" and bool(lwta.lwta_modules(model))
    digest = model_hash(model)
    inputs = {"format": FORMAT_VERSION, "model_hash": digest, "probe_fingerprint": probe.fingerprint,
              "probe_n": probe.n, "img_size": meta.img_size, "mean": list(meta.mean),
              "std": list(meta.std), "interpolation": meta.interpolation,
              "lwta_mode": mode if lwta.lwta_modules(model) else "none",
              "seed": seed if stochastic else "none",
              "batch_size": batch_size if stochastic else "none",  # sample: the random stream
              "device": device.type if stochastic else "none"}
    signals = {name: layer_signal(m, signal) for name, m in modules.items()}
    keys = {name: sha256_json({**inputs, "layer": name, "summary": summaries[name], "signal": signals[name]})
            for name in modules}
    paths = {name: out_dir / f"{name}.safetensors" for name in modules}
    todo = [name for name in modules if _file_key(paths[name]) != keys[name]]
    for name in modules:
        if name not in todo:
            log(f"{name}: cached")
    if todo:
        base = {name: {**{k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in inputs.items()},
                       "key": keys[name], "layer": name, "summary": summaries[name], "signal": signals[name],
                       "model": str(meta.spec or meta.arch), "probe": probe.spec,
                       "U": str(getattr(modules[name], "U", "none")),
                       "lwta": "yes" if isinstance(modules[name], lwta.LWTABase) else "no"}
                for name in todo}
        _record(model, meta, {n: modules[n] for n in todo}, probe, paths, summaries, base, mode, seed,
                batch_size, progress, signals)
        for name in todo:
            log(f"{name}: recorded")
    _write_record_json(out_dir, meta, digest, probe, {n: paths[n] for n in modules}, summaries, mode, seed)
    return paths


def _record(model: nn.Module, meta: ModelMeta, modules: dict[str, nn.Module], probe: Probe,
            paths: dict[str, Path], summaries: dict[str, str], base: dict[str, dict[str, str]],
            mode: str, seed: int, batch_size: int, progress: bool, signals: dict[str, str]) -> None:
    device = device_of(model)
    has_cls = getattr(model, "cls_token", None) is not None or not hasattr(model, "num_prefix_tokens")
    calls = {name: 0 for name in modules}
    results: dict[str, tuple[torch.Tensor, str, str]] = {}
    win_results: dict[str, torch.Tensor] = {}
    early = [False]

    def hook(name: str):
        def fn(m, inp, out):
            if not isinstance(out, torch.Tensor):
                raise DiscoverError(f"layer {name} outputs a {type(out).__name__}, not a tensor; "
                                    "record one of its submodules")
            calls[name] += 1
            h = inp[0].detach() if inp and isinstance(inp[0], torch.Tensor) else out
            values = neuron_signal(m, h, out.detach(), signals[name] if signals[name] != "output" else "sample")
            results[name] = summarise(values.float(), summaries[name], has_cls)
            if isinstance(m, lwta.LWTABase):
                win_results[name] = summarise(winner_mask(m, h, signals[name]), summaries[name], has_cls)[0]
            if early[0] and all(calls.values()):
                raise _Stop
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    size, interp = meta.img_size, meta.interpolation
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(lwta.inference(model, mode))
            tmps = {n: stack.enter_context(atomic_path(paths[n])) for n in modules}
            writers = {n: _StreamWriter(tmps[n], probe.n, base[n]) for n in modules}
            stack.callback(lambda: [w.close() for w in writers.values()])  # before the renames
            bar = progress_bar(progress, note="images", transient=True, stderr=True)
            stack.enter_context(bar)
            task = bar.add_task(f"record {len(modules)} layer(s)", total=probe.n)
            stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
            stack.enter_context(torch.inference_mode())
            for b, images in enumerate(probe.batches(batch_size, size, interp)):
                x = to_input(images, meta, device)
                torch.manual_seed(_batch_seed(seed, b))
                for n in calls:
                    calls[n] = 0
                results.clear()
                win_results.clear()
                try:
                    model(x)
                except _Stop:
                    pass
                if b == 0:  # the one full forward: every layer must run exactly once
                    for n, c in calls.items():
                        if c != 1:
                            raise DiscoverError(f"layer {n} runs {c} times per forward "
                                                f"({'never' if not c else 'a shared module'}); "
                                                f"record another layer ({LIST_LAYERS} shows the calls)")
                    early[0] = True
                for n, (values, how, meaning) in results.items():
                    blocks = {"activations": values.cpu().numpy()}
                    if n in win_results:
                        blocks["wins"] = win_results[n].cpu().numpy()
                    writers[n].write(blocks, {"summary_applied": how, "shape_meaning": meaning})
                bar.advance(task, len(images))
            for w in writers.values():
                if w.rows != probe.n:  # pragma: no cover - a probe that lied about its size
                    raise DiscoverError(f"recording {w.metadata['layer']}: {w.rows} rows for {probe.n} images")
    finally:
        for h in handles:
            h.remove()


def activation_cache(model_digest: str, probe: Probe, *, signal: str, mode: str, seed: int) -> Path:
    """The cache directory of a (model, probe, signal, LWTA mode, seed) recording: dissect and
    evaluate record into it, so recordings that differ in any of these never overwrite each other
    (each file is still checked against its full content key before it is used)."""
    key = sha256_json({"model": model_digest, "probe": probe.fingerprint, "signal": signal,
                       "mode": mode, "seed": seed})[:24]
    return cache_dir() / "activations" / key


def _write_record_json(out_dir: Path, meta: ModelMeta, digest: str, probe: Probe,
                       paths: dict[str, Path], summaries: dict[str, str], mode: str, seed: int) -> None:
    """``record.json``: the model and probe specs, the probe image names and every layer recorded
    for this (model, probe) pair in ``out_dir`` (earlier runs' layers kept while their files last)."""
    path = out_dir / "record.json"
    layers: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
        old = json.loads(path.read_text())
        if old["model_hash"] == digest and old["probe_fingerprint"] == probe.fingerprint:
            layers = {k: v for k, v in old["layers"].items() if (out_dir / v["file"]).is_file()}
    for name, p in paths.items():
        info = read_metadata(p)
        layers[name] = {"file": p.name, "U": info.get("U"), "summary": info.get("summary_applied"),
                        "signal": info.get("signal"),
                        "shape": info.get("shape"), "lwta_mode": info.get("lwta_mode"),
                        "seed": info.get("seed")}
    write_json_atomic(path, {
        "model": meta.spec, "model_hash": digest, "arch": meta.arch, "U": meta.U,
        "img_size": meta.img_size, "mean": list(meta.mean), "std": list(meta.std),
        "classes": meta.classes, "probe": probe.spec, "probe_fingerprint": probe.fingerprint,
        "n": probe.n, "skipped": probe.skipped, "mode": mode, "seed": seed,
        "requested_summaries": summaries, "layers": layers, "names": probe.names,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
