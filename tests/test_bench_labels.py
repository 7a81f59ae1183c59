"""benchmarks/bench_labels.py: the class-selective count against a planted probe, and bad options
refused in one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.bench_labels import class_only

ROOT = Path(__file__).resolve().parent.parent


def test_class_only_counts_units_of_a_conjunction_alone() -> None:
    rng = np.random.default_rng(0)
    colors, shapes = ["red", "green", "blue", "pink"], ["star", "circle", "square", "heart"]
    values = [("shape", s) for s in shapes] + [("color", c) for c in colors] + [("size", "large")]
    N = 1600
    color = rng.integers(0, 4, N)
    shape = rng.integers(0, 4, N)
    Y = np.zeros((N, len(values)), bool)
    Y[np.arange(N), shape] = True
    Y[np.arange(N), 4 + color] = True
    Y[:, 8] = rng.random(N) < 0.5
    noise = rng.normal(0, 0.1, (N, 4))
    red_star = ((color == 0) & (shape == 0)) + noise[:, 0]  # fires on red stars only: red ~0.6, star ~0.6
    red = (color == 0) + noise[:, 1]  # fires on every red image: red 1.0
    large = Y[:, 8] + noise[:, 2]  # an attribute value of another attribute
    A = np.stack([red_star, red, large, noise[:, 3]], 1)
    # independent reference: the AUROC of each unit for each value and each class by pair counting
    classes = np.stack([(color == c) & (shape == s) for c in range(4) for s in range(4)], 1)

    def pair_auroc(a: np.ndarray, y: np.ndarray) -> float:
        pos, neg = a[y], a[~y]
        return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))

    best_value = [max(pair_auroc(A[:, k], Y[:, j]) for j in range(len(values))) for k in range(4)]
    best_class = [max(pair_auroc(A[:, k], classes[:, j]) for j in range(16)) for k in range(4)]
    expected = sum(v < 0.85 <= c for v, c in zip(best_value, best_class))
    assert best_value[0] < 0.85 <= best_class[0] and best_value[1] >= 0.85 and best_class[3] < 0.85
    assert class_only(A, values, Y) == expected == 1


def test_gallery_share_list_rejects_a_bad_share_before_any_work() -> None:
    for bad in ("0.8,x", "1.5", ","):
        r = subprocess.run([sys.executable, "-m", "benchmarks.bench_labels", "--gallery-share", bad], cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr
        assert "--gallery-share" in r.stderr and "Traceback" not in r.stderr


def test_bad_signal_and_bad_word_list_are_one_line_errors() -> None:
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_labels", "--signals", "expected,foo"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "--signals" in r.stderr and "foo" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "benchmarks.bench_labels", "--signals", "expected", "--similarities", "auto",
                        "--concepts", "no_such_list", "--probes", "world:50:2", "--explain", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1 and "no_such_list" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
