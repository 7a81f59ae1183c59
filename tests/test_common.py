"""The atomic-write helpers: a crash mid-write leaves the old file, and outputs honour the umask."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from common import atomic_dir, atomic_path, write_text_atomic


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_path_keeps_the_old_file_on_a_crash_and_honours_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]
    old = os.umask(0o027)
    try:
        with atomic_path(target) as tmp:  # a writer that replaces the temporary file with a 0600 one
            tmp.unlink()
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, b"new")
            os.close(fd)
        assert target.read_text() == "new" and _mode(target) == 0o640
        os.umask(0o022)
        write_text_atomic(tmp_path / "b.txt", "x")
        assert _mode(tmp_path / "b.txt") == 0o644
    finally:
        os.umask(old)


def test_atomic_dir_keeps_the_old_directory_on_a_crash_and_honours_the_umask(tmp_path: Path) -> None:
    target = tmp_path / "labels"
    target.mkdir()
    (target / "a.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.json").write_text("new")
            raise RuntimeError("killed")
    assert (target / "a.json").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["labels"]
    old = os.umask(0o022)
    try:
        with atomic_dir(target) as tmp:
            (tmp / "a.json").write_text("new")
        assert (target / "a.json").read_text() == "new" and _mode(target) == 0o755
    finally:
        os.umask(old)


def test_output_lock_lets_one_writer_in(tmp_path: Path) -> None:
    """A second holder of the same output path fails at once (in another process too); the lock
    is free again after the block, and no lock file is left."""
    import subprocess
    import sys

    from common import DiscoverError, output_lock

    out = tmp_path / "labels"
    code = ("import sys; from common import output_lock\n"
            "try:\n    with output_lock(sys.argv[1], '--out'): pass\nexcept Exception as e:\n"
            "    print(e); sys.exit(3)")
    root = str(Path(__file__).resolve().parent.parent)
    with output_lock(out, "--out"):
        with pytest.raises(DiscoverError, match=r"--out .*labels: another process \(pid \d+\) is writing it"):
            with output_lock(out, "--out"):
                pass
        r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=root)
        assert r.returncode == 3 and "another process" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not out.exists() and not (tmp_path / ".labels.lock").exists()  # released and removed


def test_progress_prints_lines_where_its_stream_is_not_a_terminal(capsys) -> None:
    """Piped or logged, a progress bar becomes a plain line at each tenth of the work (never silence)."""
    from common import progress_bar

    with progress_bar(note="images", stderr=True) as bar:
        task = bar.add_task("recording blocks.3", total=40)
        for _ in range(40):
            bar.advance(task)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 10
    assert [int(line.split(": ")[1].split("/")[0]) for line in lines] == [4 * i for i in range(1, 11)]
    assert all(line.startswith("recording blocks.3: ") and "/40 images" in line for line in lines)
    assert lines[-1].startswith("recording blocks.3: 40/40 images (100 %")
    with progress_bar(enabled=False, stderr=True) as bar:  # disabled: nothing at all
        bar.advance(bar.add_task("x", total=3), 3)
    assert capsys.readouterr() == ("", "")
