"""Small shared utilities: the user-facing error type, atomic file writes, content hashes, caches.

Every module raises :class:`DiscoverError` for bad input; ``discover.py`` turns it into one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

def _data_dir() -> Path:
    """Where the templates, concept lists, world-clip and shipped checkpoints are: beside the
    modules in a checkout (or an editable install), in ``<prefix>/share/discover`` once installed."""
    here = Path(__file__).resolve().parent
    if (here / "templates").is_dir():
        return here
    import sys

    installed = Path(sys.prefix) / "share" / "discover"
    return installed if installed.is_dir() else here


REPO_DIR = _data_dir()
DEMO_MARKER = ".discover-demo"  # identifies a directory as a demo output (demo writes it, report reads it)


class DiscoverError(Exception):
    """A user-facing error: bad input, a missing or corrupt file. Printed as one line."""


def cache_dir() -> Path:
    """Root of the content-keyed caches (``$DISCOVER_CACHE`` or ``~/.cache/discover``)."""
    root = Path(os.environ.get("DISCOVER_CACHE", Path.home() / ".cache" / "discover"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_device(spec: str, flag: str = "`device`"):
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:1`` ... as a
    ``torch.device``; a bad or unavailable one is a one-line :class:`DiscoverError`."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise DiscoverError(f"{flag} {spec}: not a torch device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiscoverError(f"{flag} {spec}: CUDA is not available")
    return dev


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A reader never sees a half-written file: either the old content or the complete new one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp (or a writer that recreates it) made 0600
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, flag: str) -> Iterator[None]:
    """Hold an exclusive lock on output ``path`` (a file ``.NAME.lock`` beside it, flock'ed) for the
    block; a second writer of the same path fails at once with a one-line error naming ``flag``.
    The kernel releases the lock when its process ends, however it ends (a killed run may leave
    the lock file, which the next run reuses)."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.parent / f".{path.name}.lock"
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            f.seek(0)
            pid = f.read().strip()
            raise DiscoverError(f"{flag} {path}: another process{' (pid ' + pid + ')' if pid else ''} is writing "
                                "it now; wait for it or choose another directory") from exc
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while still holding it: no lock file is left behind
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``path``; move it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; outputs honour the user's umask
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def make_console(stderr: bool = False) -> Any:
    """A rich console as the CLI prints with: no ``:name:`` emoji codes in what a user typed (paths,
    image names); where the stream is a pipe or a CI log, rows 200 columns wide (not the 80 rich
    assumes there) unless ``COLUMNS`` says otherwise."""
    from rich.console import Console

    console = Console(stderr=stderr, emoji=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 200
    return console


def progress_bar(enabled: bool = True, *, note: str | None = None, transient: bool = False,
                 stderr: bool = False) -> Any:
    """The project's rich progress bar: description, bar, n/N, ``note`` (e.g. "images"), elapsed,
    remaining. Disabled when not ``enabled``. Where its stream is not a terminal (a pipe, a CI log)
    it prints a plain line per task at every tenth of the work and at least once a minute instead
    of a bar, so a long job is never silent there."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = make_console(stderr=stderr)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(note)] if note else []
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    if enabled and not console.is_terminal:
        return _line_progress_class()(*columns, console=console, disable=True, note=note or "")
    return Progress(*columns, console=console, disable=not enabled, transient=transient)


@functools.cache
def _line_progress_class() -> type:
    from rich.progress import Progress

    class LineProgress(Progress):
        """A rich Progress that writes plain progress lines instead of a live bar."""

        def __init__(self, *columns: Any, note: str = "", **kwargs: Any) -> None:
            super().__init__(*columns, **kwargs)
            self._note = f" {note}" if note else ""
            self._logged: dict[Any, tuple[int, float]] = {}

        def update(self, task_id: Any, **kwargs: Any) -> None:
            super().update(task_id, **kwargs)
            self._log(task_id)

        def advance(self, task_id: Any, advance: float = 1) -> None:
            super().advance(task_id, advance)
            self._log(task_id)

        def _log(self, task_id: Any) -> None:
            import time

            task = self._tasks[task_id]
            if not task.total:
                return
            tenth = int(10 * task.completed / task.total)
            now = time.monotonic()
            last_tenth, last_time = self._logged.setdefault(task_id, (0, task.start_time or now))
            if tenth > last_tenth or now - last_time >= 60 or (task.completed >= task.total and last_tenth < 10):
                eta = task.time_remaining
                left = f", about {eta:.0f} s left" if eta is not None and task.completed < task.total else ""
                self.console.print(f"{task.description}: {task.completed:g}/{task.total:g}{self._note} "
                                   f"({100 * task.completed / task.total:.0f} %, {task.elapsed or 0:.0f} s{left})",
                                   markup=False, highlight=False, soft_wrap=True)
                self._logged[task_id] = (tenth, now)

    return LineProgress


def slug(text: str) -> str:
    """``text`` as a file name: every run of characters other than letters, digits, ``_``, ``.``
    and ``-`` becomes one ``_`` (none at the ends; "x" if nothing is left)."""
    import re

    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "x"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable description (sorted keys): the key of a content cache."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def ensure_writable_dir(path: str | os.PathLike, flag: str, force: bool = False,
                        allowed: tuple[str, ...] = ()) -> Path:
    """Check that ``path`` can be written as an output directory.

    Refuses a non-empty directory (unless ``force``, or it only holds names in ``allowed``) and
    an unwritable parent, with one-line errors that name ``flag``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiscoverError(f"{flag}: {path} exists and is not a directory")
    if path.is_dir():
        foreign = [p.name for p in path.iterdir() if p.name not in allowed]
        if foreign and not force:
            raise DiscoverError(f"{flag}: {path} is not empty ({len(foreign)} entries); "
                                "pass `force` to overwrite")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise DiscoverError(f"{flag}: {parent} is not writable")
    return path
