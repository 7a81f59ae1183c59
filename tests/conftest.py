"""Test setup: a private cache directory, small thread counts (pyproject.toml puts the root on pytest's path)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("NUMBA_NUM_THREADS", "2")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own content cache, so no test reads a developer's cache."""
    monkeypatch.setenv("DISCOVER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    import torch
    torch.set_num_threads(2)
