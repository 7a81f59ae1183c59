"""Click's own usage errors are one line on stderr with exit code 2, and a mistyped choice names
the closest one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "discover.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["dissect", "--model", "m", "--layers", "l", "--out", "OUT", "--similarity", "softwpmi"],
     "did you mean 'soft_wpmi'?"),
    (["explain", "world:2:0", "--model", "m", "--labels", "l", "--sort", "activations"], "did you mean 'activation'?"),
    (["train", "--arch", "deit_world", "--U", "8", "--out", "OUT"], "Missing option '--data'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["layers", "--arch", "deit_world", "--U", "eight"], "'eight' is not a valid integer"),
    (["layers", "--arch", "deit_world", "--U", "8", "--num-classes", "-5"], "--num-classes must be an integer >= 1"),
    (["layers", "--arch", "deit_world", "--U", "8", "--num-classes", "0"], "--num-classes must be an integer >= 1"),
    pytest.param(["dissect", "--model", "checkpoints/deit_world_u8", "--layers", "head", "--out", "OUT", "--device",
                  "cuda:0"], "--device cuda:0: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["explain", "world:2:0", "--model", "checkpoints/deit_world_u8", "--labels", "nowhere", "--device", "gpu"],
     "--device gpu: not a torch device"),
    (["evaluate", "nowhere", "--device", "tpu0"], "--device tpu0: not a torch device"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = _cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    usage = "must be" not in expected and "--device" not in expected  # Click's own errors point to --help
    assert expected in lines[0] and ("--help" in lines[0]) == usage
    assert not (tmp_path / "out").exists() and r.stdout == ""
