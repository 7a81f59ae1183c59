"""Record layer activations of a vision network on a probe set: the neuron vectors ``q_k`` of
SPEC §3 step 2, one safetensors file per layer.

Usage::

    python discover.py record --model runs/deit8 --layers blocks.5.mlp.act,head --probe world:2000 --out acts/
    python discover.py record --model timm:resnet50:weights/r50.pth --layers layer4 --probe ~/imagenet_val --out acts/
    python discover.py record --model runs/deit8 --list-layers            # every module and its output shape

From Python (``dissect``, ``explain`` and ``demo`` do this)::

    model, meta = record.load_model("runs/deit8")           # or "timm:NAME[:WEIGHTS]", "torchvision:NAME[:WEIGHTS]"
    probe = record.load_probe("world:2000")                 # or an image folder
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

- ``pi`` (default): unit (b, u)'s winning probability pi_b[u] = softmax(h_b)[u] (Eq. 2), the
  quantity DISCOVER defines a unit's function by; a conv map's spatial mean of pi is the unit's
  win rate over its positions;
- ``expected``: pi * h, the expected output E[xi h] of the unit;
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
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import concepts
import lwta
import world
from common import DiscoverError, atomic_path, cache_dir, progress_bar, sha256_json, write_json_atomic

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # probes and explain alike
SUMMARIES = ("auto", "cls", "mean", "max", "identity")
SIGNALS = ("pi", "expected", "sample", "argmax")  # what an LWTA layer's neuron vector is made of
DEFAULT_SIGNAL = "pi"
WORLD_PROBE_SEED = world.SEEDS["probe"]
FORMAT_VERSION = "2"  # of the activation files; bump to invalidate every cached recording


# --- models ---------------------------------------------------------------------------------------

def load_model(spec: str, class_names: str | Path | None = None,
               **build_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Resolve a model spec to ``(model in eval mode, meta)``.

    ``spec`` is a run directory (``model.safetensors`` + ``meta.json``), a ``.safetensors``/``.pth``
    weights file (``build_kwargs`` name the architecture: ``arch``, ``U`` or ``act``), ``timm:NAME``
    or ``torchvision:NAME``, each optionally followed by ``:WEIGHTS`` (a local file; ``pretrained``
    for the library's own weights, which need a download or a filled cache; torchvision also takes
    enum names like ``IMAGENET1K_V1``). ``meta`` holds the preprocessing (``img_size``, ``mean``,
    ``std``, ``interpolation``), ``U`` (None for a plain network), ``classes`` when known (from
    ``class_names``, a file of one name per output, when given; synset ids read as words), ``spec``.
    """
    kwargs = {k: v for k, v in build_kwargs.items() if v is not None}
    if spec.startswith("timm:"):
        model, meta = _load_timm(spec, *_split_weights(spec[len("timm:"):]), kwargs)
    elif spec.startswith("torchvision:"):
        model, meta = _load_torchvision(spec, *_split_weights(spec[len("torchvision:"):]), kwargs)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            model, meta = lwta.load(path, **kwargs)
        elif path.is_file():
            model, meta = _load_weights_file(path, kwargs)
        else:
            raise DiscoverError(f"--model {spec}: no such run directory or weights file "
                                "(or give timm:NAME[:WEIGHTS] / torchvision:NAME[:WEIGHTS])")
    meta = dict(meta)
    meta.setdefault("img_size", 224)
    meta.setdefault("mean", list(IMAGENET_MEAN))
    meta.setdefault("std", list(IMAGENET_STD))
    meta.setdefault("interpolation", "bilinear")
    meta.setdefault("classes", None)
    if class_names is not None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        meta["classes"] = concepts.read_class_names(class_names, linears[-1].out_features if linears else None)
    meta["classes"] = concepts.readable_class_names(meta["classes"])
    units = {m.U for m in lwta.lwta_modules(model).values()}
    meta["U"] = meta.get("U") or (units.pop() if len(units) == 1 else None)
    meta["spec"] = spec
    return model.eval(), meta


def _split_weights(rest: str) -> tuple[str, str | None]:
    name, _, weights = rest.partition(":")
    if not name:
        raise DiscoverError("--model: give a model name after timm: / torchvision:")
    return name, weights or None


def _classifier_width(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(model's, checkpoint's) output width of the last Linear layer, when the checkpoint has it."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or f"{linears[-1]}.weight" not in state:
        return None
    return dict(model.named_modules())[linears[-1]].out_features, state[f"{linears[-1]}.weight"].shape[0]


def _load_weights_file(path: Path, kwargs: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    if "arch" not in kwargs:
        raise DiscoverError(f"--model {path}: a weights file needs its architecture: --arch NAME "
                            "and --U N (a CVN) or --act gelu|relu (its twin)")
    state = lwta.read_state_dict(path)
    model = lwta.build(**kwargs)
    widths = _classifier_width(model, state)
    if "num_classes" not in kwargs and widths and widths[0] != widths[1]:
        kwargs = {**kwargs, "num_classes": widths[1]}  # a head of another width: build to fit it
        model = lwta.build(**kwargs)
    lwta.load_state(model, state, str(path))
    arch = lwta.ARCHS[kwargs["arch"]]
    meta = {"arch": kwargs["arch"], "U": kwargs.get("U"), "act": kwargs.get("act"),
            "num_classes": kwargs.get("num_classes", arch.num_classes),
            "img_size": kwargs.get("img_size", arch.img_size)}
    return model, meta


def _hub_offline_error(spec: str, what: str, e: BaseException | None = None) -> DiscoverError:
    why = f" ({type(e).__name__})" if e else ""
    return DiscoverError(f"--model {spec}: {what}{why}; without internet, copy the weights file to this machine "
                         f"and pass {spec.rsplit(':', 1)[0]}:/path/to/weights")


def reachable(host: str, timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_timm(spec: str, name: str, weights: str | None, kwargs: dict[str, Any]):
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        raise DiscoverError(f"--model {spec}: timm has no model {name!r}"
                            + (f"; close names: {', '.join(close)}" if close else ""))
    tkw = {k: v for k, v in kwargs.items() if k in ("num_classes", "img_size")}
    if weights == "pretrained":
        # Offline, huggingface_hub retries for a minute before failing: look in its cache only.
        offline = not reachable("huggingface.co")
        with hf_offline(offline):
            try:
                model = timm.create_model(name, pretrained=True, **tkw)
            except Exception as e:  # LocalEntryNotFoundError, URLError, HTTPError, ...
                raise _hub_offline_error(spec, "timm could not download its pretrained weights "
                                         + ("(offline, and they are not in the Hugging Face cache)"
                                            if offline else ""), e) from e
    else:
        with _seeded_init(spec, weights):
            model = timm.create_model(name, pretrained=False, **tkw)
        if weights:
            state = lwta.read_state_dict(Path(weights).expanduser())
            widths = _classifier_width(model, state)
            if "num_classes" not in tkw and widths and widths[0] != widths[1]:
                model = timm.create_model(name, pretrained=False, **{**tkw, "num_classes": widths[1]})
            _load_timm_state(model, state, weights)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {"arch": f"timm:{name}", "num_classes": getattr(model, "num_classes", None),
            "img_size": kwargs.get("img_size", (cfg.get("input_size") or (3, 224, 224))[-1]),
            "mean": list(cfg.get("mean", IMAGENET_MEAN)), "std": list(cfg.get("std", IMAGENET_STD)),
            "interpolation": cfg.get("interpolation", "bicubic"), "classes": concepts.imagenet_class_names(model)}
    return model, meta


@contextlib.contextmanager
def _seeded_init(spec: str, weights: str | None) -> Iterator[None]:
    """Build a hub model's random initialisation from seed 0 (torch's global generator untouched),
    so that the same spec is the same network, with the same hash and cache entries, on every run;
    without ``weights`` say on stderr that the network is random."""
    if not weights:
        print(f"note: --model {spec}: no weights given, a randomly initialised network (seed 0); "
              f"pass {spec}:pretrained or {spec}:/path/to/weights for a trained one", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@contextlib.contextmanager
def hf_offline(offline: bool) -> Iterator[None]:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on it
        yield
        return
    old = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = old or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old


def _load_timm_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load; on a mismatch retry through the model family's ``checkpoint_filter_fn`` (timm's
    one place for foreign layouts: original DeiT/BiT/CLIP checkpoints)."""
    try:
        lwta.load_state(model, state, source)
        return
    except DiscoverError as first:
        filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
        if filter_fn is None:
            raise
        try:
            filtered = filter_fn(state, model)
        except Exception as exc:
            raise first from exc
        try:
            lwta.load_state(model, filtered, source)
        except DiscoverError as exc:
            raise first from exc


def _load_torchvision(spec: str, name: str, weights: str | None, kwargs: dict[str, Any]):
    import torchvision.models as tvm

    if name not in tvm.list_models():
        close = difflib.get_close_matches(name, tvm.list_models(), n=5, cutoff=0.6)
        raise DiscoverError(f"--model {spec}: torchvision has no model {name!r}"
                            + (f"; close names: {', '.join(close)}" if close else ""))
    tkw = {k: v for k, v in kwargs.items() if k == "num_classes"}
    meta: dict[str, Any] = {"arch": f"torchvision:{name}", "img_size": kwargs.get("img_size", 224),
                            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
                            "interpolation": "bilinear"}
    path = Path(weights).expanduser() if weights else None
    if weights and not path.is_file() and "/" not in weights and not path.suffix:
        enum = tvm.get_model_weights(name)
        member = "DEFAULT" if weights == "pretrained" else weights
        if member not in enum.__members__:
            raise DiscoverError(f"--model {spec}: no weights {weights!r} for {name} "
                                f"(choose {', '.join(enum.__members__)}, pretrained or a file)")
        w = enum[member]
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
        if not cached.is_file() and not reachable("download.pytorch.org"):
            raise _hub_offline_error(spec, f"the weights {w} are not in the torch hub cache "
                                     f"({cached}) and download.pytorch.org cannot be reached")
        try:
            model = tvm.get_model(name, weights=w, **tkw)
        except Exception as e:
            raise _hub_offline_error(spec, f"torchvision could not load {w} from {w.url}", e) from e
        t = w.transforms()
        meta.update(img_size=kwargs.get("img_size", t.crop_size[0]), mean=list(t.mean), std=list(t.std),
                    interpolation=t.interpolation.value, classes=w.meta.get("categories"))
    else:
        with _seeded_init(spec, weights):
            model = tvm.get_model(name, weights=None, **tkw)
        if weights:
            state = lwta.read_state_dict(path)
            widths = _classifier_width(model, state)
            if "num_classes" not in tkw and widths and widths[0] != widths[1]:
                model = tvm.get_model(name, weights=None, num_classes=widths[1])
            lwta.load_state(model, state, str(path))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    meta["num_classes"] = getattr(model, "num_classes", None) or (linears[-1].out_features if linears else None)
    if meta.get("classes") is None and meta["num_classes"] == 1000:  # torchvision's classifiers are ImageNet-1k's
        meta["classes"] = concepts.imagenet_categories()
    return model, meta


def random_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """An untrained copy of ``model`` (same architecture, LWTA settings and layer names), seeded:
    every module with ``reset_parameters`` is re-initialised by it (BatchNorm statistics included),
    and the parameters of modules without one (a ViT's class token, position embedding) are
    re-drawn from a normal of std 0.02 truncated at 2 std (timm's choice). In eval mode."""
    import copy

    rand = copy.deepcopy(model)
    gen = torch.random.fork_rng(devices=[])
    with gen:
        torch.manual_seed(seed)
        for mod in rand.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
            else:
                for p in mod.parameters(recurse=False):
                    with torch.no_grad():
                        nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
    return rand.eval()


def model_hash(model: nn.Module) -> str:
    """sha256 of the model's state dict (names, dtypes, shapes, bytes) and of its parameter-free
    structure (module types and settings: GELU vs ReLU vs LWTA with its U and tau), so that a CVN
    and its twin, which share every parameter name, never share a cache entry."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        if isinstance(m, lwta.LWTABase):
            h.update(f"{name}:{type(m).__name__}:U={m.U}:tau={m.tau}\n".encode())
        else:
            h.update(f"{name}:{type(m).__name__}:{m.extra_repr()}\n".encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


# --- probes ---------------------------------------------------------------------------------------

@dataclass
class Probe:
    """A probe image set: ``n`` images named ``names`` (paths relative to the folder, or
    ``world:SEED:i``), identified by ``fingerprint`` (a content hash)."""

    spec: str
    names: list[str]
    fingerprint: str
    root: Path | None = None  # folder probes
    world_seed: int | None = None  # world probes
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad)

    @property
    def n(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.n

    def get_image(self, i: int):
        """Image ``i`` as an RGB ``PIL.Image`` at its own size (galleries, CLIP embeddings)."""
        from PIL import Image

        if not 0 <= i < self.n:
            raise IndexError(f"probe image {i} out of range 0..{self.n - 1}")
        if self.root is None:

            return Image.fromarray(world.render_batch(self.world_seed, i, 1)[0][0])
        return _open_rgb(self.root / self.names[i])

    def images(self, start: int, stop: int, size: int, interpolation: str = "bilinear") -> np.ndarray:
        """Images ``start..stop-1`` as uint8 ``(B, size, size, 3)``: what the network sees before
        normalisation (folder images: shorter side resized to ``size``, centre crop)."""
        return next(self.batches(stop - start, size, interpolation, start=start, stop=stop))

    def batches(self, batch_size: int, size: int, interpolation: str = "bilinear", *,
                start: int = 0, stop: int | None = None, workers: int = 4) -> Iterator[np.ndarray]:
        """Consecutive batches of :meth:`images`; folder images are decoded by a thread pool one
        batch ahead of the consumer."""
        stop = self.n if stop is None else stop
        starts = range(start, stop, batch_size)
        if self.root is None:

            for s in starts:
                yield world.render_batch(self.world_seed, s, min(batch_size, stop - s), size=size)[0]
            return
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pending = None
            for s in starts:
                futures = [pool.submit(self._fitted, i, size, interpolation)
                           for i in range(s, min(s + batch_size, stop))]
                if pending is not None:
                    yield np.stack([f.result() for f in pending])
                pending = futures
            if pending is not None:
                yield np.stack([f.result() for f in pending])

    def _fitted(self, i: int, size: int, interpolation: str) -> np.ndarray:
        from PIL import Image, ImageOps

        path = self.root / self.names[i]
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                    "nearest": Image.NEAREST}.get(interpolation, Image.BILINEAR)
        img = _open_rgb(path, draft=size)
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), method=resample)
        return np.asarray(img, dtype=np.uint8)


def _open_rgb(path: Path, draft: int | None = None):
    from PIL import Image

    try:
        with Image.open(path) as img:
            if draft:  # JPEG: decode at a reduced scale that still covers draft x draft
                img.draft("RGB", (draft, draft))
            return img.convert("RGB")
    except Exception as e:
        raise DiscoverError(f"probe image {path}: cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else 'corrupt'})") from e


def check_image(path: Path) -> str | None:
    """None if ``path`` decodes (JPEGs at 1/8 scale: fast, still reads every byte), else why not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (1, 1))
            img.load()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'corrupt'}"


def load_probe(spec: str, skip_bad: bool = False) -> Probe:
    """``world:N[:SEED]`` (N synthetic images, seed 2 by default) or an image folder (recursive;
    the suffixes of :data:`IMAGE_EXTS`; sorted relative paths; hidden files ignored).

    Folder images are checked once per folder fingerprint (the check is cached): an unreadable one
    is a :class:`DiscoverError` naming it, or with ``skip_bad`` is left out (``probe.skipped``).
    """
    if spec.startswith("world:"):
        return _world_probe(spec)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DiscoverError(f"--probe {spec}: no such folder (give an image folder or world:N[:SEED])")
    if not root.is_dir():
        raise DiscoverError(f"--probe {spec}: not a folder (give an image folder or world:N[:SEED])")
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not any(s.startswith(".") for s in rel.parts):
            st = p.stat()
            entries.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
    if not entries:
        raise DiscoverError(f"--probe {spec}: no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {root}")
    listing = sha256_json(entries)
    bad = _bad_images(root, entries, listing)
    if bad and not skip_bad:
        rel, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DiscoverError(f"--probe {spec}: corrupt image {rel} ({why}){more}; "
                            "pass --skip-bad to leave unreadable images out")
    kept = [e for e in entries if e[0] not in bad]
    if not kept:
        raise DiscoverError(f"--probe {spec}: none of its {len(entries)} images can be read")
    return Probe(spec=spec, names=[e[0] for e in kept], fingerprint=sha256_json(["folder", kept]),
                 root=root, skipped=sorted(bad))


def _bad_images(root: Path, entries: list[tuple[str, int, int]], listing: str) -> dict[str, str]:
    memo = cache_dir() / "probe_checks" / f"{listing}.json"
    if memo.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(memo.read_text())
    with ThreadPoolExecutor(4) as pool:
        results = pool.map(lambda e: check_image(root / e[0]), entries)
        bad = {e[0]: why for e, why in zip(entries, results) if why}
    write_json_atomic(memo, bad)
    return bad


def _world_probe(spec: str) -> Probe:
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else WORLD_PROBE_SEED
    except ValueError as exc:
        raise DiscoverError(f"--probe {spec}: expected world:N or world:N:SEED (integers)") from exc
    if n < 1:
        raise DiscoverError(f"--probe {spec}: N must be at least 1")
    return Probe(spec=spec, names=[f"world:{seed}:{i}" for i in range(n)],
                 fingerprint=sha256_json(["world", n, seed, world.VERSION]), world_seed=seed)


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
                raise DiscoverError("--layers lwta: the model has no LWTA layers")
            out.update(found)
        elif name in modules:
            out[name] = modules[name]
        else:
            close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
            hint = (f"close names: {', '.join(close)}" if close else
                    f"the model has {len(modules)} named modules, e.g. {', '.join(list(modules)[:4])}")
            raise DiscoverError(f"unknown layer {name!r}; {hint} (--list-layers prints them all)")
    if not out:
        raise DiscoverError("--layers: give at least one layer (--list-layers prints them)")
    return out


def neuron_signal(module: nn.Module, h: torch.Tensor, out: torch.Tensor, signal: str) -> torch.Tensor:
    """The per-unit signal of ``module`` (input ``h``, output ``out``) before summarising: for an
    LWTA layer pi, pi * h, its output (``sample``) or the argmax winner's output, each with the
    output's shape; for any other layer its output."""
    if signal not in SIGNALS:
        raise DiscoverError(f"--signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
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
        raise DiscoverError(f"--summary must be one of {', '.join(SUMMARIES)}, got {summary!r}")
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
    raise DiscoverError(f"--summary {summary} does not apply to an output of shape "
                        f"{tuple(out.shape)} (tokens: auto|cls|mean|max; maps: auto|mean|max)")


def describe_layers(model: nn.Module, meta: dict[str, Any], probe: Probe | None = None) -> list[dict[str, Any]]:
    """Every named module with its output shape for one probe image (a grey image without a probe),
    how often it runs per forward and its LWTA U: what ``--list-layers`` prints."""
    size = int(meta["img_size"])
    img = probe.images(0, 1, size, meta.get("interpolation", "bilinear")) if probe else \
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

def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_input(images: np.ndarray, meta: dict[str, Any], device: torch.device) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` -> normalised float ``(B, 3, S, S)`` on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(meta["mean"], device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


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


def record_layers(model: nn.Module, meta: dict[str, Any], layers: Sequence[str], probe: Probe,
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
        raise DiscoverError(f"--mode must be one of {', '.join(lwta.MODES)}, got {mode!r}")
    if batch_size < 1:
        raise DiscoverError(f"--batch-size must be at least 1, got {batch_size}")
    if signal not in SIGNALS:
        raise DiscoverError(f"--signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
    log = log or (lambda _msg: None)
    modules = resolve_layers(model, layers)
    summaries = {name: summary if isinstance(summary, str) else summary.get(name, "auto") for name in modules}
    for s in summaries.values():
        if s not in SUMMARIES:
            raise DiscoverError(f"--summary must be one of {', '.join(SUMMARIES)}, got {s!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = device_of(model)
    stochastic = mode == "sample" and bool(lwta.lwta_modules(model))
    digest = model_hash(model)
    inputs = {"format": FORMAT_VERSION, "model_hash": digest, "probe_fingerprint": probe.fingerprint,
              "probe_n": probe.n, "img_size": int(meta["img_size"]), "mean": list(meta["mean"]),
              "std": list(meta["std"]), "interpolation": meta.get("interpolation", "bilinear"),
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
                       "model": str(meta.get("spec", meta.get("arch", "?"))), "probe": probe.spec,
                       "U": str(getattr(modules[name], "U", "none")),
                       "lwta": "yes" if isinstance(modules[name], lwta.LWTABase) else "no"}
                for name in todo}
        _record(model, meta, {n: modules[n] for n in todo}, probe, paths, summaries, base, mode, seed,
                batch_size, progress, signals)
        for name in todo:
            log(f"{name}: recorded")
    _write_record_json(out_dir, meta, digest, probe, {n: paths[n] for n in modules}, summaries, mode, seed)
    return paths


def _record(model: nn.Module, meta: dict[str, Any], modules: dict[str, nn.Module], probe: Probe,
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

    was_training = model.training
    old_modes = {n: m.mode for n, m in lwta.lwta_modules(model).items()}
    model.eval()
    lwta.set_mode(model, mode)
    handles = [m.register_forward_hook(hook(n)) for n, m in modules.items()]
    size, interp = int(meta["img_size"]), meta.get("interpolation", "bilinear")
    try:
        with contextlib.ExitStack() as stack:
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
                                                "record another layer (--list-layers shows the calls)")
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
        for n, m in lwta.lwta_modules(model).items():
            m.mode = old_modes[n]
        model.train(was_training)


def activation_cache(model_digest: str, probe: Probe, *, signal: str, mode: str, seed: int) -> Path:
    """The cache directory of a (model, probe, signal, LWTA mode, seed) recording: dissect and
    evaluate record into it, so recordings that differ in any of these never overwrite each other
    (each file is still checked against its full content key before it is used)."""
    key = sha256_json({"model": model_digest, "probe": probe.fingerprint, "signal": signal,
                       "mode": mode, "seed": seed})[:24]
    return cache_dir() / "activations" / key


def _write_record_json(out_dir: Path, meta: dict[str, Any], digest: str, probe: Probe,
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
        "model": meta.get("spec"), "model_hash": digest, "arch": meta.get("arch"), "U": meta.get("U"),
        "img_size": meta["img_size"], "mean": list(meta["mean"]), "std": list(meta["std"]),
        "classes": meta.get("classes"), "probe": probe.spec, "probe_fingerprint": probe.fingerprint,
        "n": probe.n, "skipped": probe.skipped, "mode": mode, "seed": seed,
        "requested_summaries": summaries, "layers": layers, "names": probe.names,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S")})
