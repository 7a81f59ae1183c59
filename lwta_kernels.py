"""The fused CPU kernels of the LWTA competition (``lwta.compete`` chooses them for CPU float32).

Both layer types hand the competition a ``(G, U, S)`` view: G independent groups (batch x
blocks), U competitors, S positions that share nothing (1 for tokens / linear outputs, H*W for
conv maps). Here that runs in Numba: one pass forward (the Gumbel-max sample of Eq. 2, or the
Straight-Through Gumbel-softmax sample of Eq. 6 in training, with the KL of Sec. 3.1) and one pass
backward (Eq. 6's surrogate gradient, plus the KL's when it is in the loss). Noise: each call takes
one key from torch's generator and hashes (key, element index) with ``numba_math``, so a seeded run
is reproducible whatever the thread count. Token blocks (S = 1) run in tiles of :data:`_TILE`
blocks transposed in cache; conv maps in place. ``lwta.py`` holds the same maths in torch ops,
the reference these kernels are tested against (``tests/test_lwta.py``); the measurements behind
the kernels' shape are in ``docs/performance.md``.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from numba_math import FAST, exp32, gumbel32, log32, uniform32

_TILE = 512  # blocks per tile: U x 512 float32 stays in a core's L2 cache


@njit(fastmath=FAST, cache=True, inline="always")
def _load_tile(x, b0, n, t, c):  # pragma: no cover - compiled
    """t[c, u, j] = x[b0 + j, u] for j < n, 0 beyond (a (B, U) slab transposed into tile c).
    For U a multiple of 8, in 8 x 8 blocks of constant size, which LLVM turns into vector loads
    and shuffles (docs/performance.md)."""
    U = x.shape[1]
    j8 = n - n % 8 if U % 8 == 0 else 0
    for j0 in range(0, j8, 8):
        for u0 in range(0, U, 8):
            for a in range(8):
                for b in range(8):
                    t[c, u0 + a, j0 + b] = x[b0 + j0 + b, u0 + a]
    for j in range(j8, n):
        for u in range(U):
            t[c, u, j] = x[b0 + j, u]
    for u in range(U):
        for j in range(n, t.shape[2]):
            t[c, u, j] = 0.0


@njit(fastmath=FAST, cache=True, inline="always")
def _store_tile(t, c, b0, n, x):  # pragma: no cover - compiled
    """x[b0 + j, u] = t[c, u, j] for j < n: the inverse of :func:`_load_tile`, blocked alike."""
    U = x.shape[1]
    j8 = n - n % 8 if U % 8 == 0 else 0
    for j0 in range(0, j8, 8):
        for u0 in range(0, U, 8):
            for b in range(8):
                for a in range(8):
                    x[b0 + j0 + b, u0 + a] = t[c, u0 + a, j0 + b]
    for j in range(j8, n):
        for u in range(U):
            x[b0 + j, u] = t[c, u, j]


@njit(fastmath=FAST, cache=True, inline="always")
def _eval_tile(h, g0, g1, seed, key0, sample, out, w):  # pragma: no cover - compiled
    """Inference on groups g0 .. g1-1 of ``h`` (G, U, S), U units at S positions: each block
    (g, s) gets w[g, s] = winner ~ Categorical(softmax(h[g, :, s])) by inverse CDF of
    ``uniform32(seed, key0 + (g - g0) S + s)`` (``sample``), or the first argmax (0 for an
    all-NaN block) (Eq. 1-2); out = the winner's h, others 0. Every loop runs along s (SIMD
    lanes), none branches on the data; the arrays are indexed, never sliced (through views LLVM
    vectorised none of the loops). The winners are kept in an int32 tile ``wt`` and copied into
    ``w`` (uint8 or int64) at the end: selects and compares on mixed-width lanes do not
    vectorise. For U = 2 the inverse
    CDF is one comparison: winner 1 iff V >= pi_0 = 1 / (1 + exp(h_1 - h_0)) (one exp per block,
    no argmax pass)."""
    _, U, S = h.shape
    n = g1 - g0
    one = np.float32(1.0)
    zero = np.float32(0.0)
    wt = np.zeros((n, S), np.int32)
    if U == 2:
        vt = np.empty(S, np.float32)
        for i in range(n):
            if sample:
                for s in range(S):
                    vt[s] = uniform32(seed, key0 + i * S + s)
                for s in range(S):
                    wt[i, s] = np.int32(vt[s] * (one + exp32(h[g0 + i, 1, s] - h[g0 + i, 0, s])) >= one)
            else:
                for s in range(S):
                    wt[i, s] = np.int32(h[g0 + i, 1, s] > h[g0 + i, 0, s])
    else:
        m = np.empty((n, S), np.float32)
        for i in range(n):
            for s in range(S):
                m[i, s] = h[g0 + i, 0, s]
        for u in range(1, U):
            uu = np.int32(u)
            for i in range(n):
                for s in range(S):
                    x = h[g0 + i, u, s]
                    wt[i, s] = uu if x > m[i, s] else wt[i, s]
                    m[i, s] = max(m[i, s], x)
        if sample:
            e = np.empty((n, U, S), np.float32)
            t = np.zeros((n, S), np.float32)
            for i in range(n):
                for u in range(U):
                    for s in range(S):
                        e[i, u, s] = exp32(h[g0 + i, u, s] - m[i, s])
                        t[i, s] += e[i, u, s]
                for s in range(S):
                    t[i, s] *= uniform32(seed, key0 + i * S + s)
                    wt[i, s] = 0
            acc = np.zeros(S, np.float32)
            for i in range(n):
                acc[:] = 0.0
                for u in range(U - 1):  # winner = how many prefix sums stay <= t
                    for s in range(S):
                        acc[s] += e[i, u, s]
                        wt[i, s] += np.int32(acc[s] <= t[i, s])
    for i in range(n):
        for u in range(U):
            uu = np.int32(u)
            for s in range(S):
                out[g0 + i, u, s] = h[g0 + i, u, s] if wt[i, s] == uu else zero
        for s in range(S):
            w[g0 + i, s] = wt[i, s]


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def _eval_tokens_kernel(h, seed, sample, out, idx):  # pragma: no cover - compiled
    """Inference on token blocks ``h`` (B, U), U consecutive units per block: tiles of _TILE
    blocks are transposed in cache to (1, U, _TILE) for :func:`_eval_tile`, and the outputs back."""
    B, U = h.shape
    for c in prange((B + _TILE - 1) // _TILE):
        b0 = c * _TILE
        n = min(_TILE, B - b0)
        tile = np.empty((1, U, _TILE), np.float32)
        _load_tile(h, b0, n, tile, 0)
        otile = np.empty((1, U, _TILE), np.float32)
        w = np.empty((1, _TILE), np.int64)
        _eval_tile(tile, 0, 1, seed, b0, sample, otile, w)
        _store_tile(otile, 0, b0, n, out)
        for j in range(n):
            idx[b0 + j] = w[0, j]


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def _eval_maps_kernel(h, seed, sample, out, idx):  # pragma: no cover - compiled
    """Inference on conv maps ``h`` (G, U, S): tiles of whole groups, about _TILE positions each
    (one group when S >= _TILE), handed to :func:`_eval_tile` in place."""
    G, U, S = h.shape
    per = max(1, _TILE // S)
    for c in prange((G + per - 1) // per):
        g0 = c * per
        _eval_tile(h, g0, min(G, g0 + per), seed, g0 * S, sample, out, idx)


@njit(fastmath=FAST, cache=True, inline="always")
def _fwd_rows(h, out, idx, lse, g, soft, gs, seed, bkey0, tau, n):  # pragma: no cover - compiled
    """Training forward (Eq. 6) of the blocks of tile g, h[g] (U, S), column s = one block of U
    units: soft = softmax((h + g) / tau) along u, winner = its first argmax (0 for an all-NaN
    block), out = the winner's h, others 0, lse = logsumexp_u h (kept for the backward pass);
    soft[gs] holds the tile's soft sample (the 3-d arrays are indexed, not sliced into 2-d views:
    through views LLVM vectorised none of these loops, 4-5x slower). Returns the KL to the
    uniform prior, sum_u pi_u (log pi_u + log U) with pi = softmax(h) (Sec. 3.1), summed over
    the first ``n`` columns (the rest pad a short tile).

    The noise: ``soft`` holds the given Gumbels on entry when ``seed`` < 0; else block s draws
    from the counter bkey0 + s, element (u, s) gumbel32(seed, (bkey0 + s) U + u), written into
    ``soft`` first (a loop of its own: drawn inside the main loop it vectorised 2.5x worse; and
    one array for both, as a choice between two arrays halved the kernel's speed). For U = 2
    only d = h_1 - h_0 and the difference of two Gumbels, L ~ Logistic(0, 1), matter: one draw
    L = log(V / (1 - V)), V = uniform32(seed, bkey0 + s), per block, then sigmoids, less than
    half the transcendental functions. Every loop runs along s (SIMD lanes)."""
    _, U, S = h.shape
    one = np.float32(1.0)
    klg = 0.0
    if U == 2:
        L = np.empty(S, np.float32)
        if seed < 0:
            for s in range(S):
                L[s] = soft[gs, 1, s] - soft[gs, 0, s]
        else:
            for s in range(S):
                v = uniform32(seed, bkey0 + s)
                L[s] = log32(v / (one - v))
        ln2 = np.float32(math.log(2.0))
        for s in range(S):
            h0, h1 = h[g, 0, s], h[g, 1, s]
            d = h1 - h0
            zd = (d + L[s]) / tau
            ez = exp32(-abs(zd))  # sigmoid(|zd|) = 1 / (1 + ez), its complement ez / (1 + ez)
            win = zd > 0  # a tie goes to unit 0
            s1 = one / (one + ez) if win else ez / (one + ez)
            soft[gs, 0, s] = one - s1
            soft[gs, 1, s] = s1
            ed = exp32(-abs(d))
            p1 = one / (one + ed) if d > 0 else ed / (one + ed)
            l = max(h0, h1) + log32(one + ed)
            lse[g, s] = l
            out[g, 0, s] = np.float32(0.0) if win else h0
            out[g, 1, s] = h1 if win else np.float32(0.0)
            idx[g, s] = 1 if win else 0
            L[s] = ln2 + (one - p1) * (h0 - l) + p1 * (h1 - l)  # the block's KL
        for s in range(n):
            klg += L[s]
        return klg
    if seed >= 0:
        for u in range(U):
            for s in range(S):
                soft[gs, u, s] = gumbel32(seed, (bkey0 + s) * U + u)
    zm = np.full(S, -np.inf, np.float32)
    hm = np.full(S, -np.inf, np.float32)
    w = np.zeros(S, np.int32)  # int32 lanes beside the float32 ones (see _eval_tile)
    for u in range(U):  # perturbed logits, their first maximum, and the maximum of h
        uu = np.int32(u)
        for s in range(S):
            z = (h[g, u, s] + soft[gs, u, s]) / tau
            soft[gs, u, s] = z
            w[s] = uu if z > zm[s] else w[s]
            zm[s] = max(zm[s], z)
            hm[s] = max(hm[s], h[g, u, s])
    tot = np.zeros(S, np.float32)
    th = np.zeros(S, np.float32)
    for u in range(U):
        for s in range(S):
            ez = exp32(soft[gs, u, s] - zm[s])
            soft[gs, u, s] = ez
            tot[s] += ez
            eh = exp32(h[g, u, s] - hm[s])
            out[g, u, s] = eh  # held here until the output is written
            th[s] += eh
    kls = np.full(S, math.log(U))
    for s in range(S):
        lse[g, s] = hm[s] + math.log(th[s])
        tot[s] = one / tot[s]
        th[s] = one / th[s]
    for u in range(U):
        uu = np.int32(u)
        for s in range(S):
            soft[gs, u, s] *= tot[s]
            x = h[g, u, s]
            kls[s] += out[g, u, s] * th[s] * (x - lse[g, s])  # pi (x - lse)
            out[g, u, s] = x if w[s] == uu else np.float32(0.0)
    for s in range(S):
        idx[g, s] = w[s]
    for s in range(n):
        klg += kls[s]
    return klg


@njit(fastmath=FAST, cache=True, inline="always")
def _bwd_rows(gy, h, gh, idx, lse, g, soft, gs, tau, gkl):  # pragma: no cover - compiled
    """Straight-Through backward of tile g (U, S), soft sample soft[gs]:
    dL/dh = gy * hard + J_soft^T (gy * h) / tau, plus gkl times dKL/dh = pi * (log pi - sum pi
    log pi) when the KL is in the loss (gkl != 0; log pi = h - lse, pi recomputed from the saved
    lse into ``gh`` first). For U = 2 both terms have closed forms in the two units' difference
    (one exp per block). Loops run along the blocks s."""
    _, U, S = h.shape
    zero = np.float32(0.0)
    if U == 2:  # the same in closed form: s0 s1 (a0 - a1) / tau, a = gy h; dKL/dh1 = pi0 pi1 d
        one = np.float32(1.0)
        for s in range(S):
            h0, h1 = h[g, 0, s], h[g, 1, s]
            s1 = soft[gs, 1, s]
            c = (one - s1) * s1 * (gy[g, 0, s] * h0 - gy[g, 1, s] * h1) / tau
            d = h1 - h0
            e = exp32(-abs(d))
            k = gkl * e / ((one + e) * (one + e)) * d  # pi0 pi1 = e / (1 + e)^2, e = exp(-|d|)
            win = idx[g, s] == 1
            gh[g, 0, s] = c - k + (zero if win else gy[g, 0, s])
            gh[g, 1, s] = k - c + (gy[g, 1, s] if win else zero)
        return
    dot = np.zeros(S, np.float32)
    for u in range(U):
        for s in range(S):
            dot[s] += gy[g, u, s] * h[g, u, s] * soft[gs, u, s]
    if gkl != 0:
        ent = np.zeros(S, np.float32)
        for u in range(U):
            for s in range(S):
                lp = h[g, u, s] - lse[g, s]
                p = exp32(lp)
                gh[g, u, s] = p
                ent[s] += p * lp
        for u in range(U):
            for s in range(S):
                lp = h[g, u, s] - lse[g, s]
                gh[g, u, s] = (soft[gs, u, s] * (gy[g, u, s] * h[g, u, s] - dot[s]) / tau
                               + gkl * gh[g, u, s] * (lp - ent[s])  # gh holds pi here
                               + (gy[g, u, s] if idx[g, s] == u else zero))
    else:
        for u in range(U):
            for s in range(S):
                gh[g, u, s] = (soft[gs, u, s] * (gy[g, u, s] * h[g, u, s] - dot[s]) / tau
                               + (gy[g, u, s] if idx[g, s] == u else zero))


# Conv maps (G, U, S): each group is a (U, S) tile in place. Tokens (B, U), U consecutive units
# per block: tiles of _TILE blocks are transposed in cache to (U, _TILE) (padded), and the soft
# sample stays in that tiled layout (T, U, _TILE) for the backward pass, so the activation itself
# is read and written once in its own layout and never copied by torch.

@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def _train_fwd_maps(h, seed, tau, out, idx, soft, lse, kl):  # pragma: no cover - compiled
    """:func:`_fwd_rows` on every group of conv maps ``h`` (G, U, S); kl[g] = the group's KL.
    With ``seed`` < 0 ``soft`` holds the given noise (no copy in here: one slowed every loop 5x)."""
    G, U, S = h.shape
    for g in prange(G):
        kl[g] = _fwd_rows(h, out, idx, lse, g, soft, g, seed, g * S, tau, S)


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def _train_fwd_tokens(h, seed, tau, out, idx, soft, lse, kl):  # pragma: no cover - compiled
    """:func:`_fwd_rows` on token blocks ``h`` (B, U): tile c holds blocks c _TILE ..; ``soft``
    (T, U, _TILE) keeps its tiled layout (and holds the given noise, tiled, when ``seed`` < 0),
    out (B, U), idx and lse (B,) and kl[c] the natural one."""
    B, U = h.shape
    for c in prange(soft.shape[0]):
        b0 = c * _TILE
        n = min(_TILE, B - b0)
        ht = np.empty((1, U, _TILE), np.float32)
        _load_tile(h, b0, n, ht, 0)
        ot = np.empty((1, U, _TILE), np.float32)
        it = np.empty((1, _TILE), np.int64)
        lt = np.empty((1, _TILE), np.float32)
        kl[c] = _fwd_rows(ht, ot, it, lt, 0, soft, c, seed, b0, tau, n)
        _store_tile(ot, 0, b0, n, out)
        for j in range(n):
            idx[b0 + j] = it[0, j]
            lse[b0 + j] = lt[0, j]


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def _train_bwd_maps(gy, h, soft, idx, lse, tau, gkl, gh):  # pragma: no cover - compiled
    G = h.shape[0]
    for g in prange(G):
        _bwd_rows(gy, h, gh, idx, lse, g, soft, g, tau, gkl)


@njit(parallel=True, fastmath=FAST, cache=True, error_model="numpy")
def _train_bwd_tokens(gy, h, soft, idx, lse, tau, gkl, gh):  # pragma: no cover - compiled
    B, U = h.shape
    for c in prange(soft.shape[0]):
        b0 = c * _TILE
        n = min(_TILE, B - b0)
        gt = np.empty((1, U, _TILE), np.float32)
        ht = np.empty((1, U, _TILE), np.float32)
        _load_tile(gy, b0, n, gt, 0)
        _load_tile(h, b0, n, ht, 0)
        it = np.zeros((1, _TILE), np.int64)
        lt = np.zeros((1, _TILE), np.float32)
        for j in range(n):
            it[0, j] = idx[b0 + j]
            lt[0, j] = lse[b0 + j]
        ot = np.empty((1, U, _TILE), np.float32)
        _bwd_rows(gt, ht, ot, it, lt, 0, soft, c, tau, gkl)
        _store_tile(ot, 0, b0, n, gh)


class FusedTrainLWTA(torch.autograd.Function):
    """CPU float32 training competition on ``(G, U, S)``: returns (y, winner index ``(G, S)``, KL
    summed over all blocks). Token blocks (S = 1) run in tiles transposed in cache, conv maps in
    place. Saves h, the soft sample (in the kernels' layout) and logsumexp(h) per block, so the
    backward pass needs no logarithm."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, g: torch.Tensor | None, tau: float):
        """``g``: the Gumbel noise, or None to draw it inside the kernel (one key from torch's
        generator per call, so seeded runs stay reproducible)."""
        h = h.contiguous()
        G, U, S = h.shape
        tokens = S == 1
        tiles = (G + _TILE - 1) // _TILE
        if g is None:
            seed = int(torch.randint(0, 2**32, ()))
            soft = torch.empty(tiles, U, _TILE, dtype=h.dtype) if tokens else torch.empty_like(h)
        else:  # the kernels read given noise from the soft buffer, in their layout (a copy)
            seed, g = -1, g.to(h.dtype)
            if tokens:
                g = torch.cat([g.reshape(G, U), g.new_zeros(tiles * _TILE - G, U)])
                g = g.view(tiles, _TILE, U).transpose(1, 2)
            soft = g.clone(memory_format=torch.contiguous_format)
        out = torch.empty_like(h)
        idx = torch.empty(G, S, dtype=_index_dtype(U))
        lse = torch.empty(G, S, dtype=h.dtype)
        if tokens:
            kl = torch.empty(tiles, dtype=torch.float64)
            _train_fwd_tokens(h.view(G, U).numpy(), seed, np.float32(tau), out.view(G, U).numpy(),
                              idx.view(G).numpy(), soft.numpy(), lse.view(G).numpy(), kl.numpy())
        else:
            kl = torch.empty(G, dtype=torch.float64)
            _train_fwd_maps(h.numpy(), seed, np.float32(tau), out.numpy(), idx.numpy(), soft.numpy(),
                            lse.numpy(), kl.numpy())
        ctx.save_for_backward(h, soft, idx, lse)
        ctx.tau, ctx.tokens = tau, tokens
        ctx.mark_non_differentiable(idx)
        return out, idx, kl.sum().to(h.dtype)

    @staticmethod
    def backward(ctx, gy: torch.Tensor, _gidx: Any, gkl: torch.Tensor | None):
        h, soft, idx, lse = ctx.saved_tensors
        gh = torch.empty_like(h)
        args = (np.float32(ctx.tau), np.float32(0.0 if gkl is None else float(gkl)))
        gy = gy.contiguous()
        if ctx.tokens:
            G, U, _ = h.shape
            _train_bwd_tokens(gy.view(G, U).numpy(), h.view(G, U).numpy(), soft.numpy(), idx.view(G).numpy(),
                              lse.view(G).numpy(), *args, gh.view(G, U).numpy())
        else:
            _train_bwd_maps(gy.numpy(), h.numpy(), soft.numpy(), idx.numpy(), lse.numpy(), *args, gh.numpy())
        return gh, None, None


def _index_dtype(U: int) -> torch.dtype:
    """The fused kernels' winner index: uint8 where it fits (U <= 256), an eighth of the memory
    traffic of int64, which for U = 2 conv maps was as much as the activation's own."""
    return torch.uint8 if U <= 256 else torch.int64


def evaluate(h: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation competition on ``(G, U, S)`` float32 CPU responses: the winners drawn from pi
    (``mode`` "sample", Gumbel-max) or its argmax. Returns (output, winner index ``(G, S)``)."""
    h = h.contiguous()
    G, U, S = h.shape
    out = torch.empty_like(h)
    idx = torch.empty(G, S, dtype=_index_dtype(U))
    seed = int(torch.randint(0, 2**32, ())) if mode == "sample" else 0
    if S == 1:  # token blocks, tiles transposed in cache
        _eval_tokens_kernel(h.view(G, U).numpy(), seed, mode == "sample", out.view(G, U).numpy(), idx.view(G).numpy())
    else:
        _eval_maps_kernel(h.numpy(), seed, mode == "sample", out.numpy(), idx.numpy())
    return out, idx
