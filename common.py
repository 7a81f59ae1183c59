"""Small shared utilities: the user-facing error type, atomic file writes, content hashes, caches.

Every module raises :class:`DiscoverError` for bad input; ``discover.py`` turns it into one line on
stderr and a non-zero exit, never a traceback.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

REPO_DIR = Path(__file__).resolve().parent
DEMO_MARKER = ".discover-demo"  # identifies a directory as a demo output (demo writes it, report reads it)


class DiscoverError(Exception):
    """A user-facing error: bad input, a missing or corrupt file. Printed as one line."""


def cache_dir() -> Path:
    """Root of the content-keyed caches (``$DISCOVER_CACHE`` or ``~/.cache/discover``)."""
    root = Path(os.environ.get("DISCOVER_CACHE", Path.home() / ".cache" / "discover"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def resolve_device(spec: str, flag: str = "--device"):
    """``auto`` (CUDA when present, else the CPU), ``cpu``, ``cuda``, ``cuda:1`` ... as a
    ``torch.device``; a bad or unavailable one is a one-line :class:`DiscoverError`."""
    import torch

    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DiscoverError(f"{flag} {spec}: not a torch device") from None
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
        except OSError:
            f.seek(0)
            pid = f.read().strip()
            raise DiscoverError(f"{flag} {path}: another process{' (pid ' + pid + ')' if pid else ''} is writing "
                                "it now; wait for it or choose another directory") from None
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


def progress_bar(enabled: bool = True, *, note: str | None = None, transient: bool = False,
                 stderr: bool = False) -> Any:
    """The project's rich progress bar: description, bar, n/N, ``note`` (e.g. "images"), elapsed,
    remaining. Disabled when not ``enabled``; with ``stderr`` it draws on stderr and only on a
    terminal, so logs and pipes stay clean."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    console = Console(stderr=True) if stderr else None
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    columns += [TextColumn(note)] if note else []
    columns += [TimeElapsedColumn(), TimeRemainingColumn()]
    disable = not enabled or (console is not None and not console.is_terminal)
    return Progress(*columns, console=console, disable=disable, transient=transient)


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
                                "pass --force to overwrite")
    parent = path if path.is_dir() else path.parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise DiscoverError(f"{flag}: {parent} is not writable")
    return path
