"""Fast float32 math for the project's Numba kernels (``dissect_kernels``, ``lwta``).

Numba's ``math.exp`` is a scalar libm call that LLVM cannot vectorise; :func:`exp32` is a short
polynomial that inlines into the caller's loop, so a loop of them runs on SIMD lanes.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

LN2 = math.log(2.0)
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
