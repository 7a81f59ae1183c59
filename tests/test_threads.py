"""Results do not depend on the number of threads: the similarity kernels (Numba threads 1 and 2)
and a seeded LWTA run, training and sampling (torch and Numba threads 1 and 2)."""
from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

import dissect_kernels as dk
import lwta


@pytest.mark.parametrize("sim", list(dk.SIMILARITIES))
def test_similarity_kernels_are_thread_count_independent(sim: str) -> None:
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("Numba has one thread here")
    rng = np.random.default_rng(5)
    A = np.maximum(rng.normal(size=(300, 40)), 0).astype(np.float32)
    P = rng.uniform(-0.3, 0.5, (300, 257)).astype(np.float32)
    one, two = (dk.SIMILARITIES[sim](A, P, n_threads=n) for n in (1, 2))
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(dk.top_images(A, 20, n_threads=1), dk.top_images(A, 20, n_threads=2))


@pytest.mark.parametrize("U, S", [(8, 1), (2, 1), (4, 37)])
def test_a_seeded_lwta_run_is_thread_count_independent(U: int, S: int) -> None:
    old_torch, old_numba = torch.get_num_threads(), numba.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
            torch.manual_seed(9)
            h = torch.randn(3000, U, S, requires_grad=True)
            y, idx, kl = lwta.compete(h, tau=0.67, training=True, mode="sample")
            (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
            _, idx_eval, _ = lwta.compete(h.detach(), tau=0.67, training=False, mode="sample")
            results.append((y.detach(), idx, kl.detach(), h.grad, idx_eval))
    finally:
        torch.set_num_threads(old_torch)
        numba.set_num_threads(old_numba)
    for a, b in zip(*results):
        assert torch.equal(a, b)
