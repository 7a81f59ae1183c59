"""numba_math's float32 polynomials and counter-based noise against NumPy float64 references."""
from __future__ import annotations

import numpy as np
from numba import njit

from numba_math import exp32, gumbel32, log32, uniform32


@njit(fastmath=True)
def _map(fn_id: int, x: np.ndarray) -> np.ndarray:
    out = np.empty(x.size, np.float32)
    for i in range(x.size):
        out[i] = exp32(x[i]) if fn_id == 0 else log32(x[i])
    return out


@njit(fastmath=True)
def _draw(kind: int, seed: int, n: int) -> np.ndarray:
    out = np.empty(n, np.float32)
    for i in range(n):
        out[i] = uniform32(seed, i) if kind == 0 else gumbel32(seed, i)
    return out


def _lowbias32_uniform(seed: int, n: int) -> np.ndarray:
    """The Weyl step + lowbias32 hash, written independently in uint64 NumPy with masks."""
    m = 0xFFFFFFFF
    x = (np.arange(n, dtype=np.uint64) * 0x9E3779B9 + seed) & m
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    x ^= x >> 16
    return ((x >> 9).astype(np.float64) + 0.5) / 2.0**23


def test_exp32_and_log32_match_float64() -> None:
    g = np.random.default_rng(0)
    v = np.concatenate([g.uniform(-87, 88, 200_000), g.uniform(-1, 1, 50_000), [0.0, -87.0, 88.0]]).astype(np.float32)
    ref = np.exp(v.astype(np.float64))
    assert (np.abs(_map(0, v) - ref) / ref).max() < 5e-7
    x = np.concatenate([np.exp(g.uniform(-87, 88, 200_000)), g.uniform(0.5, 2, 50_000), [1.0, 2.0, 0.5, 1.2e-38]])
    x = x.astype(np.float32)
    ref = np.log(x.astype(np.float64))
    err = np.abs(_map(1, x) - ref)
    assert (err / np.maximum(np.abs(ref), 1.0)).max() < 2e-7  # relative, absolute near log = 0


def test_uniform32_is_the_lowbias32_hash_and_never_0_or_1() -> None:
    for seed in (0, 12345, 2**32 - 1):
        u = _draw(0, seed, 300_000).astype(np.float64)
        np.testing.assert_array_equal(u, _lowbias32_uniform(seed, 300_000))
        assert 0.0 < u.min() and u.max() < 1.0
    assert not np.array_equal(_draw(0, 1, 1000), _draw(0, 2, 1000))


def test_gumbel32_has_the_gumbel_distribution() -> None:
    """1e6 draws: mean Euler-Mascheroni, variance pi^2/6, and the CDF exp(-exp(-x)) at deciles."""
    x = _draw(1, 7, 1_000_000).astype(np.float64)
    assert abs(x.mean() - 0.5772156649) < 0.005 and abs(x.var() - np.pi**2 / 6) < 0.01
    qs = np.quantile(x, np.linspace(0.1, 0.9, 9))
    np.testing.assert_allclose(np.exp(-np.exp(-qs)), np.linspace(0.1, 0.9, 9), atol=2e-3)
