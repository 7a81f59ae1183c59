"""Models by spec, one front door (as open_clip's ``create_model_and_transforms``): a run
directory, a weights file with its architecture, ``timm:NAME[:WEIGHTS]`` or
``torchvision:NAME[:WEIGHTS]`` in, ``(model in eval mode, meta)`` out, with the preprocessing,
class names and LWTA settings in ``meta``; plus the model's content hash, an untrained copy, and
its input transform.

    model, meta = models.load_model("runs/deit8")                   # a run of `discover train`
    model, meta = models.load_model("w.pth", arch="deit_world", U=8)  # a weights file
    model, meta = models.load_model("timm:resnet50:pretrained")      # needs a download or a cache
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn as nn

import concepts
import lwta
from common import DiscoverError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
        except Exception:
            raise first from None  # the filter's own failure says less than the direct load's
        try:
            lwta.load_state(model, filtered, source)
        except DiscoverError:
            raise first from None


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

    device = device_of(model)
    rand = copy.deepcopy(model).cpu()  # initialised on the CPU: the same copy whatever the model's device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for mod in rand.modules():
            if hasattr(mod, "reset_parameters"):
                mod.reset_parameters()
            else:
                for p in mod.parameters(recurse=False):
                    with torch.no_grad():
                        nn.init.trunc_normal_(p, std=0.02, a=-0.04, b=0.04)
    return rand.to(device).eval()


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




def device_of(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def to_input(images: np.ndarray, meta: dict[str, Any], device: torch.device) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` -> normalised float ``(B, 3, S, S)`` on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(meta["mean"], device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta["std"], device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std
