"""Probe sets: the images a layer is recorded on. ``world:N[:SEED]`` (N synthetic images of world
seed SEED, 2 by default) or an image folder (recursive; the suffixes of :data:`IMAGE_EXTS`; sorted
relative paths; hidden files ignored), each identified by a content fingerprint; image checking
shared by record, explain and report.

    probe = probes.load_probe("world:2000")          # or "~/imagenet/val", skip_bad=True
    img = probe.get_image(0)                          # a PIL RGB image
"""
from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

import world
from common import DiscoverError, cache_dir, sha256_json, write_json_atomic

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")  # probes and explain alike
WORLD_PROBE_SEED = world.SEEDS["probe"]


@dataclass
class Probe:
    """A probe image set: ``n`` images named ``names`` (paths relative to the folder, or
    ``world:SEED:i``), identified by ``fingerprint`` (a content hash)."""

    spec: str
    names: list[str]
    fingerprint: str
    root: Path | None = None  # folder probes
    world_seed: int | None = None  # world probes
    skipped: list[str] = field(default_factory=list)  # unreadable files left out (--skip-bad)

    @property
    def n(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.n

    def get_image(self, i: int):
        """Image ``i`` as an RGB ``PIL.Image`` at its own size (galleries, CLIP embeddings)."""
        from PIL import Image

        if not 0 <= i < self.n:
            raise IndexError(f"probe image {i} out of range 0..{self.n - 1}")
        if self.root is None:

            return Image.fromarray(world.render_batch(self.world_seed, i, 1)[0][0])
        return _open_rgb(self.root / self.names[i])

    def images(self, start: int, stop: int, size: int, interpolation: str = "bilinear") -> np.ndarray:
        """Images ``start..stop-1`` as uint8 ``(B, size, size, 3)``: what the network sees before
        normalisation (folder images: shorter side resized to ``size``, centre crop)."""
        return next(self.batches(stop - start, size, interpolation, start=start, stop=stop))

    def batches(self, batch_size: int, size: int, interpolation: str = "bilinear", *,
                start: int = 0, stop: int | None = None, workers: int = 4) -> Iterator[np.ndarray]:
        """Consecutive batches of :meth:`images`; folder images are decoded by a thread pool one
        batch ahead of the consumer."""
        stop = self.n if stop is None else stop
        starts = range(start, stop, batch_size)
        if self.root is None:

            for s in starts:
                yield world.render_batch(self.world_seed, s, min(batch_size, stop - s), size=size)[0]
            return
        with ThreadPoolExecutor(max(1, workers)) as pool:
            pending = None
            for s in starts:
                futures = [pool.submit(self._fitted, i, size, interpolation)
                           for i in range(s, min(s + batch_size, stop))]
                if pending is not None:
                    yield np.stack([f.result() for f in pending])
                pending = futures
            if pending is not None:
                yield np.stack([f.result() for f in pending])

    def _fitted(self, i: int, size: int, interpolation: str) -> np.ndarray:
        from PIL import Image, ImageOps

        path = self.root / self.names[i]
        resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                    "nearest": Image.NEAREST}.get(interpolation, Image.BILINEAR)
        img = _open_rgb(path, draft=size)
        if img.size != (size, size):
            img = ImageOps.fit(img, (size, size), method=resample)
        return np.asarray(img, dtype=np.uint8)


def _open_rgb(path: Path, draft: int | None = None):
    from PIL import Image

    try:
        with Image.open(path) as img:
            if draft:  # JPEG: decode at a reduced scale that still covers draft x draft
                img.draft("RGB", (draft, draft))
            return img.convert("RGB")
    except Exception as e:
        raise DiscoverError(f"probe image {path}: cannot be read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else 'corrupt'})") from e


def check_image(path: Path) -> str | None:
    """None if ``path`` decodes (JPEGs at 1/8 scale: fast, still reads every byte), else why not."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.draft("RGB", (1, 1))
            img.load()
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else 'corrupt'}"


def load_probe(spec: str, skip_bad: bool = False) -> Probe:
    """``world:N[:SEED]`` (N synthetic images, seed 2 by default) or an image folder (recursive;
    the suffixes of :data:`IMAGE_EXTS`; sorted relative paths; hidden files ignored).

    Folder images are checked once per folder fingerprint (the check is cached): an unreadable one
    is a :class:`DiscoverError` naming it, or with ``skip_bad`` is left out (``probe.skipped``).
    """
    if spec.startswith("world:"):
        return _world_probe(spec)
    root = Path(spec).expanduser()
    if not root.exists():
        raise DiscoverError(f"`probe` {spec}: no such folder (give an image folder or world:N[:SEED])")
    if not root.is_dir():
        raise DiscoverError(f"`probe` {spec}: not a folder (give an image folder or world:N[:SEED])")
    entries = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.suffix.lower() in IMAGE_EXTS and p.is_file() and not any(s.startswith(".") for s in rel.parts):
            st = p.stat()
            entries.append((rel.as_posix(), st.st_size, st.st_mtime_ns))
    if not entries:
        raise DiscoverError(f"`probe` {spec}: no images ({', '.join(e[1:] for e in IMAGE_EXTS)}) in {root}")
    listing = sha256_json(entries)
    bad = _bad_images(root, entries, listing)
    if bad and not skip_bad:
        rel, why = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DiscoverError(f"`probe` {spec}: corrupt image {rel} ({why}){more}; "
                            "pass `skip_bad` to leave unreadable images out")
    kept = [e for e in entries if e[0] not in bad]
    if not kept:
        raise DiscoverError(f"`probe` {spec}: none of its {len(entries)} images can be read")
    return Probe(spec=spec, names=[e[0] for e in kept], fingerprint=sha256_json(["folder", kept]),
                 root=root, skipped=sorted(bad))


def _bad_images(root: Path, entries: list[tuple[str, int, int]], listing: str) -> dict[str, str]:
    memo = cache_dir() / "probe_checks" / f"{listing}.json"
    if memo.is_file():
        with contextlib.suppress(ValueError, OSError):
            return json.loads(memo.read_text())
    with ThreadPoolExecutor(4) as pool:
        results = pool.map(lambda e: check_image(root / e[0]), entries)
        bad = {e[0]: why for e, why in zip(entries, results) if why}
    write_json_atomic(memo, bad)
    return bad


def _world_probe(spec: str) -> Probe:
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3):
            raise ValueError
        n = int(parts[1])
        seed = int(parts[2]) if len(parts) == 3 else WORLD_PROBE_SEED
    except ValueError as exc:
        raise DiscoverError(f"`probe` {spec}: expected world:N or world:N:SEED (integers)") from exc
    if n < 1:
        raise DiscoverError(f"`probe` {spec}: N must be at least 1")
    if seed < 0:
        raise DiscoverError(f"`probe` {spec}: SEED must be 0 or more")
    return Probe(spec=spec, names=[f"world:{seed}:{i}" for i in range(n)],
                 fingerprint=sha256_json(["world", n, seed, world.VERSION]), world_seed=seed)
