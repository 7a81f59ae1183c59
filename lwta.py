"""Stochastic Local-Winner-Takes-All (LWTA) layers: the competition of the DISCOVER paper.

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

Usage (the networks that use these layers are built by ``models.build``)::

    layer = lwta.LWTA(U=8)                                  # on the last dimension (tokens, vectors)
    conv = lwta.ConvLWTA(U=2)                               # among channel blocks, at every position
    loss = ce + lwta.kl_divergence(model)                   # ELBO, Eq. 3 (per-example scaling)
    lwta.set_mode(model, "argmax")                          # deterministic inference
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import torch
import torch.nn as nn
import lwta_kernels
from common import DiscoverError

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


@contextlib.contextmanager
def inference(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """``model`` in eval mode with every LWTA module in ``mode`` (winners sampled from pi or the
    argmax) inside the block; its train flag and each LWTA module's mode as they were after it."""
    was_training = model.training
    old = {n: m.mode for n, m in lwta_modules(model).items()}
    model.eval()
    set_mode(model, mode)
    try:
        yield model
    finally:
        for n, m in lwta_modules(model).items():
            m.mode = old[n]
        model.train(was_training)


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
