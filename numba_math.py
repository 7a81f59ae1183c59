"""Fast float32 math for the project's Numba kernels (``dissect_kernels``, ``lwta``).

Numba's ``math.exp`` is a scalar libm call that LLVM cannot vectorise; :func:`exp32` is a short
polynomial that inlines into the caller's loop, so a loop of them runs on SIMD lanes.
"""
from __future__ import annotations

import math

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

LN2 = math.log(2.0)
# LLVM fast-math flags for the project's kernels: everything but 'nnan' / 'ninf', so NaN and inf
# keep their IEEE meaning (NaN checks, "0 for an all-NaN block") while sums may be reordered.
FAST = {"nsz", "reassoc", "contract", "arcp"}
_EXP_C = tuple(np.float32(c) for c in (  # Cephes expf: exp(r) = 1 + r + r^2 poly(r), |r| <= ln2/2
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1))
_F = tuple(np.float32(c) for c in (-87.0, 88.0, 1.0 / LN2, 0.693359375, -2.12194440e-4, 0.5, 1.0))


@intrinsic
def float32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 ``bits`` (a reinterpretation, not a conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))
    return types.float32(types.int32), codegen


@njit(cache=True, fastmath=True, inline="always")
def exp32(v: float) -> float:
    """exp(v) in float32, relative error < 3e-7; inlines into loops that LLVM then vectorises.

    v is clamped to [-87, 88]: exp(-87) ~ 1.6e-38 stands in for anything smaller (every caller adds
    the result to a term >= 1e-7 or sums it with a term equal to 1). v = k ln2 + r, exp(r) by the
    Cephes polynomial, 2^k built from its exponent bits.
    """
    c0, c1, c2, c3, c4, c5 = _EXP_C
    lo, hi, log2e, ln2_hi, ln2_lo, half, one = _F
    v = min(max(np.float32(v), lo), hi)
    kf = np.floor(v * log2e + half)
    r = v - kf * ln2_hi - kf * ln2_lo
    y = ((((c0 * r + c1) * r + c2) * r + c3) * r + c4) * r + c5
    return (y * r * r + r + one) * float32_from_bits((np.int32(kf) + np.int32(127)) << np.int32(23))


@intrinsic
def bits_from_float32(typingctx, x):
    """The int32 bit pattern of the float32 ``x`` (a reinterpretation, not a conversion)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int32))
    return types.int32(types.float32), codegen


_LOG_C = tuple(np.float32(c) for c in (  # Cephes logf: log(1 + x) = x - x^2/2 + x^3 poly(x)
    7.0376836292e-2, -1.1514610310e-1, 1.1676998740e-1, -1.2420140846e-1, 1.4249322787e-1,
    -1.6668057665e-1, 2.0000714765e-1, -2.4999993993e-1, 3.3333331174e-1))
_LOG_F = tuple(np.float32(c) for c in (0.70710678118654752, 1.0, 0.5, -2.12194440e-4, 0.693359375))


@njit(cache=True, fastmath=True, inline="always")
def log32(v: float) -> float:
    """log(v) in float32 for a *normal, positive, finite* v (>= 1.18e-38), relative error < 2e-7
    (measured over 1e-38..3e38); inlines and vectorises like :func:`exp32`. v = m 2^e with m in
    [sqrt(1/2), sqrt(2)) from the bits, log(m) by the Cephes polynomial; no branch."""
    c0, c1, c2, c3, c4, c5, c6, c7, c8 = _LOG_C
    sqrth, one, half, ln2_lo, ln2_hi = _LOG_F
    bits = bits_from_float32(np.float32(v))
    e = np.float32(((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(126))
    m = float32_from_bits((bits & np.int32(0x007FFFFF)) | np.int32(0x3F000000))  # in [0.5, 1)
    low = m < sqrth
    e = e - np.float32(low)
    x = m + m * np.float32(low) - one  # 2m - 1 below sqrt(1/2), else m - 1
    z = x * x
    y = ((((((((c0 * x + c1) * x + c2) * x + c3) * x + c4) * x + c5) * x + c6) * x + c7) * x + c8) * x * z
    return x + (y + ln2_lo * e - half * z) + ln2_hi * e


@intrinsic
def lowbias32(typingctx, seed, i):
    """The Weyl step and the ``lowbias32`` integer hash of the low 32 bits of ``i`` under the key
    ``seed``, as a uint32: x = i 0x9E3779B9 + seed, then x ^= x >> 16, x *= 0x7FEB352D,
    x ^= x >> 15, x *= 0x846CA68B, x ^= x >> 16, all modulo 2^32.

    Emitted as 32-bit LLVM IR: written in Numba, the integer arithmetic is widened to 64 bits,
    and a loop of hashes then vectorises on 4 lanes of 64-bit multiplies (vpmuludq) instead of 8
    of 32-bit ones (vpmulld), 3.8x slower (measured over 512 K draws)."""
    if not (isinstance(seed, types.Integer) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)

        def low32(v, ty):  # as np.uint32(v): the low 32 bits, narrower types extended by sign
            w = v.type.width
            if w >= 32:
                return builder.trunc(v, i32) if w > 32 else v
            return builder.sext(v, i32) if ty.signed else builder.zext(v, i32)

        def const(v):
            return ir.Constant(i32, v)

        seed_ty, i_ty = signature.args
        x = builder.add(builder.mul(low32(args[1], i_ty), const(0x9E3779B9)), low32(args[0], seed_ty))
        for mult, shift in ((0x7FEB352D, 16), (0x846CA68B, 15), (None, 16)):
            x = builder.xor(x, builder.lshr(x, const(shift)))
            if mult is not None:
                x = builder.mul(x, const(mult))
        return x
    return types.uint32(seed, i), codegen


@njit(cache=True, fastmath=True, inline="always")
def uniform32(seed: int, i: int) -> float:
    """A uniform float32 in (0, 1), never 0 or 1, from the counter ``i`` under the 32-bit key
    ``seed``: :func:`lowbias32`, 23 bits kept. Pure in (seed, i), so parallel loops draw the
    same numbers whatever their thread count; 32-bit integer ops only, so a loop of them
    vectorises."""
    x = lowbias32(seed, i)
    # 23 bits + 1/2: exact in float32, so V is in [2^-24, 1 - 2^-24], never rounded to 0 or 1
    return (np.float32(np.int32(x >> np.uint32(9))) + np.float32(0.5)) * np.float32(1.1920928955078125e-07)


@njit(cache=True, fastmath=True, inline="always")
def gumbel32(seed: int, i: int) -> float:
    """Standard Gumbel noise -log(-log V), V = uniform32(seed, i)."""
    return -log32(-log32(uniform32(seed, i)))
