"""The networks: the architectures (``ARCHS``: DeiT and ResNet-18 CVNs with LWTA layers where
GELU/ReLU were, and their plain twins, DISCOVER App. A.1-A.3), run checkpoints, and models by
spec, one front door (as open_clip's ``create_model_and_transforms``): a run directory, a weights
file with its architecture, ``timm:NAME[:WEIGHTS]`` or ``torchvision:NAME[:WEIGHTS]`` in,
``(model in eval mode, meta)`` out, with the preprocessing, class names and LWTA settings in
``meta``; plus the model's content hash, an untrained copy, and its input transform.

    model = models.build("deit_tiny", U=16)                         # DeiT-T/16 CVN (timm)
    twin = models.build("deit_tiny", act="gelu")                    # its twin, same parameter count
    models.save(model, "runs/x", {"arch": "deit_tiny", "U": 16, ...})

    model, meta = models.load_model("runs/deit8")                   # a run of `discover train`
    model, meta = models.load_model("w.pth", arch="deit_world", U=8)  # a weights file
    model, meta = models.load_model("timm:resnet50:pretrained")      # needs a download or a cache
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import math
import os
import sys
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

import concepts
import lwta
from common import DiscoverError, atomic_path
from schema import IMAGENET_MEAN, IMAGENET_STD, ModelMeta



# --- builders ------------------------------------------------------------------------------------

def _act_factory(U: int | None, act: str | None, conv: bool, tau: float) -> Callable[[], nn.Module]:
    if U is not None:
        return partial(lwta.ConvLWTA if conv else lwta.LWTA, U, tau)
    return {"gelu": nn.GELU, "relu": partial(nn.ReLU, inplace=False)}[act or ("relu" if conv else "gelu")]


def conv_stem(embed_dim: int, patch_size: int, width: int = 24) -> nn.Sequential:
    """A convolutional patch embedding (Xiao et al. 2021, "Early convolutions help transformers
    see better"): log2(patch_size) 3x3 stride-2 conv-BN-ReLU layers doubling ``width`` up to
    ``embed_dim``, then a 1x1 conv; one token per patch_size x patch_size patch, as the linear one."""
    n = int(round(math.log2(patch_size)))
    if 2 ** n != patch_size:
        raise DiscoverError(f"a conv stem needs a power-of-two patch size, got {patch_size}")
    layers: list[nn.Module] = []
    c_in = 3
    for i in range(n):
        c_out = embed_dim if i == n - 1 else width * 2 ** i
        layers += [nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    layers.append(nn.Conv2d(c_in, embed_dim, 1))
    return nn.Sequential(*layers)


def _vit(U: int | None, act: str | None, tau: float, *, num_classes: int, img_size: int,
         patch_size: int, embed_dim: int, depth: int, num_heads: int, stem: str = "linear") -> nn.Module:
    """timm's VisionTransformer (DeiT) with the MLP activation of every block a GELU or an lwta.LWTA;
    ``stem`` "conv" swaps the linear patch embedding for :func:`conv_stem` (in CVN and twin alike:
    the MLP activations are the ones that lwta.compete, as in DISCOVER's DeiT)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                              act_layer=_act_factory(U, act, conv=False, tau=tau))
    if stem == "conv":
        model.patch_embed.proj = conv_stem(embed_dim, patch_size)
    for i, blk in enumerate(model.blocks):
        if isinstance(blk.mlp.act, lwta.LWTABase):
            blk.mlp.act.name = f"blocks.{i}.mlp.act"
            blk.mlp.act._check_width(blk.mlp.fc1.out_features)
    return model


class CompetitiveBasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` with one activation module per site (``act1``, ``act2``).

    torchvision calls one ``relu`` module twice per block, which would make forward hooks fire
    twice and let two sites share one lwta.LWTA state. Parameter names are torchvision's, so its state
    dicts load unchanged.
    """

    def __init__(self, block: nn.Module, act: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.conv1, self.bn1, self.conv2, self.bn2 = block.conv1, block.bn1, block.conv2, block.bn2
        self.downsample = block.downsample
        self.act1, self.act2 = act(), act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.act1(self.bn1(self.conv1(x)))
        return self.act2(self.bn2(self.conv2(out)) + identity)


def _resnet(U: int | None, act: str | None, tau: float, *, num_classes: int, img_size: int,
            layers: tuple[int, ...], small_stem: bool, width: int = 64) -> nn.Module:
    """torchvision's ResNet with BasicBlocks; ``width`` is the first stage's channel count (64 in
    ResNet-18; the stages double it), ``small_stem`` a 3x3 stride-2 stem without max-pool."""
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, list(layers), num_classes=num_classes)
    if width != 64:  # rebuild the stages with torchvision's own _make_layer at the new width
        model.inplanes = width
        model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        model.bn1 = nn.BatchNorm2d(width)
        for i, n in enumerate(layers):
            setattr(model, f"layer{i + 1}", model._make_layer(BasicBlock, width * 2 ** i, n, stride=1 if i == 0 else 2))
        model.fc = nn.Linear(width * 2 ** (len(layers) - 1), num_classes)
        for m in model.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if small_stem:  # 64x64 world images: 3x3 stride-2 stem, no max-pool (32x32 into layer1)
        model.conv1 = nn.Conv2d(3, width, 3, 2, 1, bias=False)
        model.maxpool = nn.Identity()
    make_act = _act_factory(U, act, conv=True, tau=tau)
    model.relu = make_act()
    for lname in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, lname)
        for i in range(len(stage)):
            stage[i] = CompetitiveBasicBlock(stage[i], make_act)
    for name, m in lwta.lwta_modules(model).items():
        m.name = name
    if U is not None:
        model.relu._check_width(model.bn1.num_features)
        for name, m in model.named_modules():
            if isinstance(m, CompetitiveBasicBlock):
                m.act1._check_width(m.bn1.num_features)
                m.act2._check_width(m.bn2.num_features)
    return model


@dataclass(frozen=True)
class Arch:
    family: str  # "deit" or "resnet": picks the training recipe
    builder: Callable[..., nn.Module]
    num_classes: int
    img_size: int
    kwargs: dict[str, Any]


ARCHS: dict[str, Arch] = {
    "deit_tiny": Arch("deit", _vit, 1000, 224, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)),
    "deit_small": Arch("deit", _vit, 1000, 224, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)),
    "resnet18": Arch("resnet", _resnet, 365, 224, dict(layers=(2, 2, 2, 2), small_stem=False)),
    "deit_world": Arch("deit", _vit, 64, 64, dict(patch_size=8, embed_dim=96, depth=4, num_heads=4, stem="conv")),
    "resnet18_world": Arch("resnet", _resnet, 64, 64, dict(layers=(1, 1, 1, 1), small_stem=True, width=16)),
}


def build(arch: str, U: int | None = None, act: str | None = None, num_classes: int | None = None,
          img_size: int | None = None, tau: float = 0.67) -> nn.Module:
    """Build ``arch`` as a CVN (``U`` competitors per block) or as its plain twin (``act``).

    ``U=None`` with ``act="gelu"``/``"relu"`` (or None: the family's own) builds the twin. lwta.LWTA has no
    parameters, so a CVN has exactly its twin's parameter count.
    """
    if arch not in ARCHS:
        raise DiscoverError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if U is not None and act is not None:
        raise DiscoverError("give either `U` (a CVN) or `act` (its plain twin), not both")
    if U is not None and (isinstance(U, bool) or not isinstance(U, int) or U < 2):
        raise DiscoverError(f"`U` must be an integer >= 2, got {U!r}")
    if act is not None and act not in ("gelu", "relu"):
        raise DiscoverError(f"`act` must be gelu or relu, got {act!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise DiscoverError(f"`num_classes` must be an integer >= 1, got {num_classes!r}")
    spec = ARCHS[arch]
    return spec.builder(U, act, tau, num_classes=num_classes or spec.num_classes,
                        img_size=img_size or spec.img_size, **spec.kwargs)


# --- checkpoints ---------------------------------------------------------------------------------

def save(model: nn.Module, out_dir: str | Path, meta: ModelMeta | dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``meta.json`` (:class:`schema.ModelMeta`: arch, U, act, classes,
    img size, the training record, ...) into ``out_dir``, each atomically."""
    from safetensors.torch import save_file

    meta = meta if isinstance(meta, ModelMeta) else ModelMeta.from_dict(meta)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"arch": str(meta.arch)})
    meta.write(out / "meta.json")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` or third-party ``.pth`` file (``weights_only=True``).

    Unwraps timm/DeiT-style ``{'model': ...}`` / ``{'state_dict': ...}`` and strips DataParallel
    ``module.`` prefixes. A corrupt or unreadable file is a :class:`DiscoverError`.
    """
    path = Path(path)
    if not path.is_file():
        raise DiscoverError(f"checkpoint {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state: Any = load_file(str(path))
        else:
            with warnings.catch_warnings():  # torch warns on pickle protocols it reads fine
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt pickle, truncated zip, bad header ...
        raise DiscoverError(f"checkpoint {path}: cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else 'corrupt'})") from e
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiscoverError(f"checkpoint {path}: not a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load ``state`` strictly; a mismatch is one line naming the first few offending keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    if problems:
        raise DiscoverError(f"checkpoint {source} does not fit the model: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model


def load(path: str | Path, **build_kwargs: Any) -> tuple[nn.Module, ModelMeta]:
    """Load a model: a run directory (``model.safetensors`` + ``meta.json``), or a weights file
    (``.safetensors``/``.pth``) with the architecture given as ``build_kwargs`` (arch, U, act, ...).

    Returns ``(model, meta)``; the model is in eval mode.
    """
    path = Path(path)
    if path.is_dir():
        meta_path, weights = path / "meta.json", path / "model.safetensors"
        for f in (meta_path, weights):
            if not f.is_file():
                raise DiscoverError(f"model directory {path}: missing {f.name}")
        meta = ModelMeta.read(meta_path).to_dict()
        kwargs = {k: meta.get(k) for k in ("arch", "U", "act", "num_classes", "img_size")}
        kwargs.update(build_kwargs)
    else:
        meta, kwargs, weights = {}, dict(build_kwargs), path
        if "arch" not in kwargs:
            raise DiscoverError(f"{path}: a weights file needs its architecture (arch=...)")
        meta.update({k: v for k, v in kwargs.items()})
    arch = kwargs.pop("arch")
    model = build(arch, **{k: v for k, v in kwargs.items() if v is not None})
    load_state(model, read_state_dict(weights), str(weights))
    meta.setdefault("arch", arch)
    if meta.get("img_size") is None:  # the size the arch was built for
        meta["img_size"] = ARCHS[arch].img_size if arch in ARCHS else None
    return model.eval(), ModelMeta.from_dict(meta)


def load_model(spec: str, class_names: str | Path | None = None,
               **build_kwargs: Any) -> tuple[nn.Module, ModelMeta]:
    """Resolve a model spec to ``(model in eval mode, meta)``.

    ``spec`` is a run directory (``model.safetensors`` + ``meta.json``), a ``.safetensors``/``.pth``
    weights file (``build_kwargs`` name the architecture: ``arch``, ``U`` or ``act``), ``timm:NAME``
    or ``torchvision:NAME``, each optionally followed by ``:WEIGHTS`` (a local file; ``pretrained``
    for the library's own weights, which need a download or a filled cache; torchvision also takes
    enum names like ``IMAGENET1K_V1``). ``meta`` (:class:`schema.ModelMeta`) holds the preprocessing
    (``img_size``, ``mean``, ``std``, ``interpolation``), ``U`` (None for a plain network), ``classes``
    when known (from ``class_names``, a file of one name per output, when given; synset ids read as
    words), ``spec``.
    """
    kwargs = {k: v for k, v in build_kwargs.items() if v is not None}
    if spec.startswith("timm:"):
        model, meta = _load_timm(spec, *_split_weights(spec[len("timm:"):]), kwargs)
    elif spec.startswith("torchvision:"):
        model, meta = _load_torchvision(spec, *_split_weights(spec[len("torchvision:"):]), kwargs)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            model, meta = load(path, **kwargs)
        elif path.is_file():
            model, meta = _load_weights_file(path, kwargs)
        else:
            raise DiscoverError(f"`model` {spec}: no such run directory or weights file "
                                "(or give timm:NAME[:WEIGHTS] / torchvision:NAME[:WEIGHTS])")
    if meta.img_size is None:  # else schema.ModelMeta's defaults: an ImageNet-normalised input
        meta.img_size = 224
    if class_names is not None:
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        meta.classes = concepts.read_class_names(class_names, linears[-1].out_features if linears else None)
    meta.classes = concepts.readable_class_names(meta.classes)
    units = {m.U for m in lwta.lwta_modules(model).values()}
    meta.U = meta.U or (units.pop() if len(units) == 1 else None)
    meta.spec = spec
    return model.eval(), meta


def _split_weights(rest: str) -> tuple[str, str | None]:
    name, _, weights = rest.partition(":")
    if not name:
        raise DiscoverError("`model`: give a model name after timm: / torchvision:")
    return name, weights or None


def _classifier_width(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """(model's, checkpoint's) output width of the last Linear layer, when the checkpoint has it."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears or f"{linears[-1]}.weight" not in state:
        return None
    return dict(model.named_modules())[linears[-1]].out_features, state[f"{linears[-1]}.weight"].shape[0]


def _load_weights_file(path: Path, kwargs: dict[str, Any]) -> tuple[nn.Module, ModelMeta]:
    if "arch" not in kwargs:
        raise DiscoverError(f"`model` {path}: a weights file needs its architecture: `arch` NAME "
                            "and `U` N (a CVN) or `act` gelu|relu (its twin)")
    state = read_state_dict(path)
    model = build(**kwargs)
    widths = _classifier_width(model, state)
    if "num_classes" not in kwargs and widths and widths[0] != widths[1]:
        kwargs = {**kwargs, "num_classes": widths[1]}  # a head of another width: build to fit it
        model = build(**kwargs)
    load_state(model, state, str(path))
    arch = ARCHS[kwargs["arch"]]
    meta = {"arch": kwargs["arch"], "U": kwargs.get("U"), "act": kwargs.get("act"),
            "num_classes": kwargs.get("num_classes", arch.num_classes),
            "img_size": kwargs.get("img_size", arch.img_size)}
    return model, ModelMeta.from_dict(meta)


def _hub_offline_error(spec: str, what: str, e: BaseException | None = None) -> DiscoverError:
    why = f" ({type(e).__name__})" if e else ""
    return DiscoverError(f"`model` {spec}: {what}{why}; without internet, copy the weights file to this machine "
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
        raise DiscoverError(f"`model` {spec}: timm has no model {name!r}"
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
            state = read_state_dict(Path(weights).expanduser())
            widths = _classifier_width(model, state)
            if "num_classes" not in tkw and widths and widths[0] != widths[1]:
                model = timm.create_model(name, pretrained=False, **{**tkw, "num_classes": widths[1]})
            _load_timm_state(model, state, weights)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    meta = {"arch": f"timm:{name}", "num_classes": getattr(model, "num_classes", None),
            "img_size": kwargs.get("img_size", (cfg.get("input_size") or (3, 224, 224))[-1]),
            "mean": list(cfg.get("mean", IMAGENET_MEAN)), "std": list(cfg.get("std", IMAGENET_STD)),
            "interpolation": cfg.get("interpolation", "bicubic"), "classes": concepts.imagenet_class_names(model)}
    return model, ModelMeta.from_dict(meta)


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
        load_state(model, state, source)
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
            load_state(model, filtered, source)
        except DiscoverError:
            raise first from None


def _load_torchvision(spec: str, name: str, weights: str | None, kwargs: dict[str, Any]):
    import torchvision.models as tvm

    if name not in tvm.list_models():
        close = difflib.get_close_matches(name, tvm.list_models(), n=5, cutoff=0.6)
        raise DiscoverError(f"`model` {spec}: torchvision has no model {name!r}"
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
            raise DiscoverError(f"`model` {spec}: no weights {weights!r} for {name} "
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
            state = read_state_dict(path)
            widths = _classifier_width(model, state)
            if "num_classes" not in tkw and widths and widths[0] != widths[1]:
                model = tvm.get_model(name, weights=None, num_classes=widths[1])
            load_state(model, state, str(path))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    meta["num_classes"] = getattr(model, "num_classes", None) or (linears[-1].out_features if linears else None)
    if meta.get("classes") is None and meta["num_classes"] == 1000:  # torchvision's classifiers are ImageNet-1k's
        meta["classes"] = concepts.imagenet_categories()
    return model, ModelMeta.from_dict(meta)


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


def to_input(images: np.ndarray, meta: ModelMeta, device: torch.device) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` -> normalised float ``(B, 3, S, S)`` on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(meta.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(meta.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std
