"""benchmarks/bench_labels.py: bad options refused in one line, before any work."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


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
