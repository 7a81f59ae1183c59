"""Stochastic Local-Winner-Takes-All (LWTA) layers and Competitive Vision Network (CVN) builders.

DISCOVER (paper 000), Sec. 2 and App. A.2-A.3. A layer of K units is split into B = K / U blocks of
U competing units. Per block and example (and per spatial position / token):

    h[b, u]   = w[b, u]^T x                          unit responses (the layer's input here)
    pi_b      = softmax(h[b, 1..U])                  winner probabilities            (Eq. 2)
    xi_b      ~ Categorical(pi_b)                    one-hot winner indicator
    y[b, u]   = xi[b, u] * h[b, u]                   winner passes its linear response (Eq. 1)

Training draws one relaxed sample per forward (Gumbel-softmax, Eq. 6, temperature tau) with the
Straight-Through estimator: the forward pass uses the hard one-hot of the relaxed sample, the
backward pass the gradient of the soft sample. At evaluation the winner is drawn from pi ("sample",
the paper's default) or taken as argmax h ("argmax", deterministic).

A neuron's flat index k within a layer maps to block ``b = k // U`` and competitor ``u = k % U``.

Usage::

    import lwta
    model = lwta.build("deit_tiny", U=16)                  # DeiT-T/16 CVN (timm)
    twin = lwta.build("deit_tiny", act="gelu")             # its GELU twin, same parameter count
    loss = ce + lwta.kl_divergence(model)                  # ELBO, Eq. 3 (per-example scaling)
    lwta.set_mode(model, "argmax")                         # deterministic inference
    lwta.save(model, "runs/x", {"arch": "deit_tiny", "U": 16, ...}); model, meta = lwta.load("runs/x")
"""
from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import lwta_kernels
from common import DiscoverError, atomic_path, write_json_atomic

MODES = ("sample", "argmax")


# --- the competition ------------------------------------------------------------------------------
# Both layer types hand the competition a (G, U, S) view: G independent groups (batch x blocks),
# U competitors, S positions that share nothing (1 for tokens/linear outputs, H*W for conv maps).
# On CPU float32 the work runs in the fused Numba kernels of lwta_kernels.py (one pass forward, one
# backward); elsewhere (CUDA, other dtypes) in the plain torch ops below, the reference those
# kernels are tested against. The torch path draws its noise with torch.rand, the kernels hash
# (key, element index) under one key per call drawn from torch's generator: either way a seeded run
# is reproducible, whatever the thread count. The torch path
# draws the noise and runs the competition's softmax / logsumexp in at least float32 (compute_dtype):
# a bfloat16 uniform has 8 bits of mantissa, never exceeds 0.996, and biases the winners.

def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the competition runs in for inputs of ``dtype``: float32 for half types (bfloat16,
    float16), the input's own for float32 / float64."""
    return torch.promote_types(dtype, torch.float32)


def gumbel_like(h: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise g = -log(-log V), V ~ U(0,1), shaped like ``h``, in
    :func:`compute_dtype` of ``h``'s dtype (float32 for half inputs)."""
    v = torch.rand(h.shape, dtype=compute_dtype(h.dtype), device=h.device)
    return -v.clamp_(min=1e-20).log_().neg_().log_()


class _StraightThroughLWTA(torch.autograd.Function):
    """Eq. 1 and 6 in torch ops (any device): y = hard(xi~) * h forward; d/dh of soft(xi~) * h
    backward. With z = (h + g) / tau, soft = softmax(z) (log pi's normaliser cancels inside the
    softmax), hard = one_hot(argmax z). Returns (y, winner index); the index is not differentiable.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, g: torch.Tensor, tau: float, dim: int):
        ct = compute_dtype(h.dtype)  # a half-precision h competes in float32; y keeps h's dtype
        soft = ((h.to(ct) + g.to(ct)) / tau).softmax(dim)
        idx = soft.argmax(dim, keepdim=True)
        ctx.save_for_backward(h, soft, idx)
        ctx.tau, ctx.dim = tau, dim
        ctx.mark_non_differentiable(idx)
        return torch.zeros_like(h).scatter_(dim, idx, h.gather(dim, idx)), idx

    @staticmethod
    def backward(ctx, gy: torch.Tensor, _gidx: torch.Tensor | None):
        h, soft, idx = ctx.saved_tensors
        dim, tau = ctx.dim, ctx.tau
        gy32, h32 = gy.to(soft.dtype), h.to(soft.dtype)
        # direct path: y = xi * h with xi the (forward) hard one-hot
        gh = torch.zeros_like(gy32).scatter_(dim, idx, gy32.gather(dim, idx))
        # relaxed path: d(soft * h)/dh through soft = softmax((h + g) / tau)
        gxi = gy32 * h32
        gh += soft * (gxi - (gxi * soft).sum(dim, keepdim=True)) / tau
        return gh.to(h.dtype), None, None, None


def block_kl(h: torch.Tensor, dim: int, U: int) -> torch.Tensor:
    """KL[q(xi_b) || Categorical(1/U)] = sum_u pi_u (log pi_u - log(1/U)), per block (Sec. 3.1),
    in :func:`compute_dtype` (float32 for half inputs)."""
    logp = h.to(compute_dtype(h.dtype)).log_softmax(dim)
    return (logp.exp() * (logp + math.log(U))).sum(dim)


def _fused_ok(h: torch.Tensor) -> bool:
    return h.device.type == "cpu" and h.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")


def compete(h: torch.Tensor, *, tau: float, training: bool, mode: str, want_kl: bool = True,
            gumbel: torch.Tensor | None = None, fused: bool | None = None
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The competition of Eq. 1-2 on a ``(G, U, S)`` tensor of unit responses.

    Returns (output, winner index ``(G, S)``: uint8 from the fused kernels for U <= 256, else
    int64, KL summed over all blocks or None). Training draws a
    Straight-Through Gumbel-softmax sample (Eq. 6); evaluation samples pi ("sample") or takes the
    argmax ("argmax"). ``gumbel`` (training) fixes the noise; ``fused`` forces a path (tests).
    """
    fused = _fused_ok(h) if fused is None else fused
    G, U, S = h.shape
    if training:
        if fused:  # without a given noise the kernel draws its own (numba_math.gumbel32)
            y, idx, kl = lwta_kernels.FusedTrainLWTA.apply(h, gumbel, tau)
            return y, idx, kl if want_kl else None
        g = gumbel_like(h) if gumbel is None else gumbel
        y, idx = _StraightThroughLWTA.apply(h, g, tau, 1)
        return y, idx.squeeze(1), block_kl(h, 1, U).sum() if want_kl else None
    if fused and not h.requires_grad:
        out, idx = lwta_kernels.evaluate(h, mode)
        return out, idx, None
    if mode == "argmax":
        idx = h.argmax(1, keepdim=True)
    else:  # Gumbel-max trick: argmax(log pi + g) ~ Categorical(pi), in at least float32
        idx = (h.to(compute_dtype(h.dtype)) + gumbel_like(h)).argmax(1, keepdim=True)
    return torch.zeros_like(h).scatter_(1, idx, h.gather(1, idx)), idx.squeeze(1), None


class LWTABase(nn.Module):
    """Shared state of the dense and convolutional LWTA layers (no parameters)."""

    def __init__(self, U: int, tau: float = 0.67, mode: str = "sample", name: str = "") -> None:
        super().__init__()
        if isinstance(U, bool) or not isinstance(U, int) or U < 2:
            raise DiscoverError(f"LWTA: U must be an integer >= 2 (competitors per block), got {U!r}")
        if mode not in MODES:
            raise DiscoverError(f"LWTA: mode must be one of {MODES}, got {mode!r}")
        self.U, self.tau, self.mode, self.name = U, tau, mode, name
        self.track_kl = True
        self.last_kl: torch.Tensor | None = None
        self.last_winners: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"U={self.U}, tau={self.tau}, mode={self.mode!r}"

    def _check_width(self, K: int) -> None:
        if K % self.U:
            raise DiscoverError(f"LWTA layer {self.name or '?'}: width K={K} is not divisible by U={self.U}")

    def _compete(self, h: torch.Tensor, n_examples: int, winners_shape: tuple[int, ...]) -> torch.Tensor:
        """compete() on the (G, U, S) view ``h``; keeps the KL per example and the winners
        (reshaped to ``winners_shape``) of this forward, written straight into the instance dict
        (past nn.Module.__setattr__'s lookup of parameters, buffers and submodules; see
        docs/performance.md)."""
        want_kl = self.training and self.track_kl
        y, idx, kl = compete(h, tau=self.tau, training=self.training, mode=self.mode, want_kl=want_kl)
        state = self.__dict__
        state["last_kl"] = kl / n_examples if kl is not None else None
        state["last_winners"] = idx.reshape(winners_shape)
        return y


class LWTA(LWTABase):
    """Competition over the last dimension (tokens ``...xK``, linear outputs ``NxK``).

    K is split into K/U consecutive blocks of U units; the output has the input's shape, exactly one
    non-zero per block (the winner's linear response).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        self._check_width(K)
        y = self._compete(x.reshape(-1, self.U, 1), x.shape[0] if x.dim() > 1 else 1,
                          (*x.shape[:-1], K // self.U))
        return y.reshape(x.shape)


class ConvLWTA(LWTABase):
    """Competition among the U feature maps of each block of channels, at every position (Eq. 7-9).

    Input ``NxCxHxW``; channels ``b*U .. b*U+U-1`` form block b.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        self._check_width(C)
        y = self._compete(x.reshape(N * (C // self.U), self.U, H * W), N, (N, C // self.U, H, W))
        return y.reshape(x.shape)


def lwta_modules(model: nn.Module) -> dict[str, LWTABase]:
    """Every LWTA module of ``model`` by its ``named_modules()`` path."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LWTABase)}


def set_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set the evaluation mode ("sample" or "argmax") of every LWTA module of ``model``."""
    if mode not in MODES:
        raise DiscoverError(f"LWTA mode must be one of {MODES}, got {mode!r}")
    for m in lwta_modules(model).values():
        m.mode = mode
    return model


def kl_divergence(model: nn.Module) -> torch.Tensor:
    """KL of the last (training) forward to the uniform prior: summed over blocks, positions and
    layers, averaged over the examples of the batch (Eq. 3; SPEC §2). Differentiable.

    Zero (a plain tensor) for a model without LWTA layers.
    """
    kls = [m.last_kl for m in lwta_modules(model).values() if m.last_kl is not None]
    if not kls:
        return torch.zeros(())
    return torch.stack(kls).sum()


def block_probabilities(h: torch.Tensor, U: int, dim: int) -> torch.Tensor:
    """pi = softmax over each block of U consecutive units along ``dim`` (Eq. 2), float32 whatever
    the input dtype; the result has the input's shape (unit (b, u) holds pi_b[u])."""
    h = h.float().movedim(dim, -1)
    shape = h.shape
    pi = h.reshape(*shape[:-1], shape[-1] // U, U).softmax(-1)
    return pi.reshape(shape).movedim(-1, dim)


def certainty(h: torch.Tensor, U: int, dim: int) -> dict[str, torch.Tensor]:
    """How decided the competitions of the responses ``h`` are, summed over their blocks (float64):
    ``max_pi`` (sum of max_u pi_b[u]), ``entropy`` (sum of -sum_u pi log pi, nats), ``agree4``
    (sum of sum_u pi_b[u]^4: the probability that 4 independent draws pick the same winner) and
    ``blocks`` (their number). Divide by ``blocks`` for the means."""
    pi = block_probabilities(h, U, dim).movedim(dim, -1)
    pi = pi.reshape(*pi.shape[:-1], pi.shape[-1] // U, U).double()
    ent = -(pi * pi.clamp_min(1e-300).log()).sum(-1)
    return {"max_pi": pi.amax(-1).sum(), "entropy": ent.sum(), "agree4": pi.pow(4).sum(-1).sum(),
            "blocks": torch.tensor(float(pi[..., 0].numel()), dtype=torch.float64)}


class CertaintyMeter:
    """Accumulates :func:`certainty` of every LWTA layer of ``model`` over the forwards run inside
    ``with meter:`` (a forward pre-hook on each layer reads its responses h)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = lwta_modules(model)
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> "CertaintyMeter":
        for name, m in self.layers.items():
            dim = 1 if isinstance(m, ConvLWTA) else -1
            self._handles.append(m.register_forward_pre_hook(
                lambda mod, inp, name=name, dim=dim: self._add(name, certainty(inp[0].detach(), mod.U, dim))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _add(self, name: str, stats: dict[str, torch.Tensor]) -> None:
        acc = self.sums.setdefault(name, {k: torch.zeros((), dtype=torch.float64) for k in stats})
        for k, v in stats.items():
            acc[k] += v.cpu()

    def means(self) -> dict[str, dict[str, float]]:
        """Per layer: mean max pi, mean entropy (nats) and mean 4-draw agreement per block."""
        return {name: {k: float(acc[k] / acc["blocks"]) for k in ("max_pi", "entropy", "agree4")}
                for name, acc in self.sums.items() if float(acc["blocks"]) > 0}


def winners(module: LWTABase) -> torch.Tensor:
    """Winning competitor per block in the last forward (int64): ``(..., B)`` for LWTA (``...`` =
    batch, tokens), ``(N, B, H, W)`` for ConvLWTA; flat neuron index = ``b * U + winner``."""
    if module.last_winners is None:
        raise DiscoverError(f"LWTA layer {module.name or '?'} has not run a forward yet")
    return module.last_winners.long()


# --- builders ------------------------------------------------------------------------------------

def _act_factory(U: int | None, act: str | None, conv: bool, tau: float) -> Callable[[], nn.Module]:
    if U is not None:
        return partial(ConvLWTA if conv else LWTA, U, tau)
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
    """timm's VisionTransformer (DeiT) with the MLP activation of every block a GELU or an LWTA;
    ``stem`` "conv" swaps the linear patch embedding for :func:`conv_stem` (in CVN and twin alike:
    the MLP activations are the ones that compete, as in DISCOVER's DeiT)."""
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=img_size, patch_size=patch_size, num_classes=num_classes,
                              embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                              act_layer=_act_factory(U, act, conv=False, tau=tau))
    if stem == "conv":
        model.patch_embed.proj = conv_stem(embed_dim, patch_size)
    for i, blk in enumerate(model.blocks):
        if isinstance(blk.mlp.act, LWTABase):
            blk.mlp.act.name = f"blocks.{i}.mlp.act"
            blk.mlp.act._check_width(blk.mlp.fc1.out_features)
    return model


class CompetitiveBasicBlock(nn.Module):
    """torchvision's ``BasicBlock`` with one activation module per site (``act1``, ``act2``).

    torchvision calls one ``relu`` module twice per block, which would make forward hooks fire
    twice and let two sites share one LWTA state. Parameter names are torchvision's, so its state
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
    for name, m in lwta_modules(model).items():
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

    ``U=None`` with ``act="gelu"``/``"relu"`` (or None: the family's own) builds the twin. LWTA has no
    parameters, so a CVN has exactly its twin's parameter count.
    """
    if arch not in ARCHS:
        raise DiscoverError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if U is not None and act is not None:
        raise DiscoverError("give either --U (a CVN) or --act (its plain twin), not both")
    if U is not None and (isinstance(U, bool) or not isinstance(U, int) or U < 2):
        raise DiscoverError(f"--U must be an integer >= 2, got {U!r}")
    if act is not None and act not in ("gelu", "relu"):
        raise DiscoverError(f"--act must be gelu or relu, got {act!r}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 1):
        raise DiscoverError(f"--num-classes must be an integer >= 1, got {num_classes!r}")
    spec = ARCHS[arch]
    return spec.builder(U, act, tau, num_classes=num_classes or spec.num_classes,
                        img_size=img_size or spec.img_size, **spec.kwargs)


# --- checkpoints ---------------------------------------------------------------------------------

def save(model: nn.Module, out_dir: str | Path, meta: dict[str, Any]) -> None:
    """Write ``model.safetensors`` and ``meta.json`` (arch, U, act, classes, img size, metrics, ...)
    into ``out_dir``, each atomically. ``meta`` must name ``arch`` so that :func:`load` can rebuild."""
    from safetensors.torch import save_file

    if "arch" not in meta:
        raise ValueError("lwta.save: meta must contain 'arch'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in unwrap(model).state_dict().items()}
    with atomic_path(out / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"arch": str(meta["arch"])})
    write_json_atomic(out / "meta.json", meta)


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


def load(path: str | Path, **build_kwargs: Any) -> tuple[nn.Module, dict[str, Any]]:
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
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DiscoverError(f"{meta_path}: not valid JSON ({e.msg}, line {e.lineno})") from e
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
    return model.eval(), meta
