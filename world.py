"""The synthetic world: procedural images whose every attribute is known.

Each image shows one object on a background. Attributes (``ATTRIBUTES``): shape (8), colour (8),
texture (4), size (2), background (4). Image ``i`` of seed ``s`` is a pure function of ``(s, i)``;
with it come its attribute labels, a per-pixel object mask and a caption.

Seeds (``SEEDS``, a convention every command follows, so no evaluation ever sees training images):
    0       target-network training          1       target-network validation
    2       default dissection probe         3       target-network test (after the last epoch)
    777     CLIP zero-shot evaluation        >= 1000 CLIP training (never 0-999)

Tasks for target networks (``TASKS``): ``shape`` (8), ``color`` (8), ``texture`` (4) and ``object``
(64 classes = colour x shape, named like "red circle", colour-major).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from common import DiscoverError

SEEDS = {"train": 0, "val": 1, "probe": 2, "test": 3, "clip_eval": 777, "clip_train": 1000}
VERSION = 1  # of the generator: bump it when an image of (seed, index) changes (probe fingerprints, caches)

SHAPES = ["circle", "square", "triangle", "star", "cross", "heart", "diamond", "hexagon"]
COLORS = {  # RGB; no neutral tones, which the backgrounds use
    "red": (220, 38, 38), "green": (40, 170, 60), "blue": (40, 80, 225), "yellow": (245, 215, 35),
    "purple": (135, 55, 200), "orange": (245, 135, 25), "pink": (245, 125, 195), "cyan": (35, 205, 215),
}
TEXTURES = ["plain", "striped", "dotted", "checkered"]
SIZES = ["small", "large"]
BACKGROUNDS = ["dark", "light", "gradient", "noisy"]

ATTRIBUTES: dict[str, list[str]] = {
    "shape": SHAPES, "color": list(COLORS), "texture": TEXTURES, "size": SIZES, "background": BACKGROUNDS,
}
TASKS: dict[str, list[str]] = {
    "shape": SHAPES,
    "color": list(COLORS),
    "texture": TEXTURES,
    "object": [f"{c} {s}" for c in COLORS for s in SHAPES],
}
SIZE_RADIUS = {"small": (0.12, 0.16), "large": (0.30, 0.36)}  # object radius / image side
CAPTIONS = [
    "a {size} {color} {texture} {shape} on a {background} background",
    "a photo of a {size} {texture} {color} {shape}, {background} background",
    "a {color} {shape} with a {texture} pattern, {size}, on a {background} background",
    "{background} background with a {size} {color} {shape} that is {texture}",
    "a {texture} {shape} in {color}, {size} size, {background} backdrop",
]
TEXTURE_SHADE = 0.45  # the pattern's second tone: the colour darkened to this fraction


@dataclass
class Sample:
    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool: the object's pixels
    attrs: dict[str, str]
    caption: str


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centres in [-1, 1] (x to the right, y downwards)."""
    c = (np.arange(size) + 0.5) / size * 2 - 1
    return np.meshgrid(c, c, indexing="xy")


def _polygon(x: np.ndarray, y: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Even-odd point-in-polygon test of every pixel (x, y) against vertices (px, py)."""
    inside = np.zeros(x.shape, bool)
    for i in range(len(px)):
        x1, y1, x2, y2 = px[i - 1], py[i - 1], px[i], py[i]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = x1 + (y - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (x < xc)
    return inside


def _regular(n: int, r: float, phase: float, inner: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of a regular n-gon of radius r (or an n-pointed star with inner radius ``inner``)."""
    k = 2 * n if inner else n
    ang = phase + np.arange(k) * 2 * np.pi / k
    rad = np.where(np.arange(k) % 2 == 1, inner, r) if inner else np.full(k, r)
    return rad * np.cos(ang), rad * np.sin(ang)


def _shape_mask(shape: str, x: np.ndarray, y: np.ndarray, r: float, rot: float) -> np.ndarray:
    """Mask of ``shape`` of radius ``r`` centred at the origin of (x, y), rotated by ``rot``."""
    c, s = math.cos(rot), math.sin(rot)
    u, v = c * x + s * y, -s * x + c * y
    up = -np.pi / 2
    if shape == "circle":
        return u * u + v * v < r * r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) < r * 0.82
    if shape == "diamond":
        return np.abs(u) / 0.8 + np.abs(v) < r
    if shape == "cross":
        w = r * 0.34
        return ((np.abs(u) < w) & (np.abs(v) < r)) | ((np.abs(v) < w) & (np.abs(u) < r))
    if shape == "heart":
        a, b = u / (r * 0.95), -(v / (r * 0.95)) + 0.15
        return (a * a + b * b - 1) ** 3 - a * a * b ** 3 < 0
    if shape == "triangle":
        px, py = _regular(3, r * 1.1, up)
        return _polygon(u, v + r * 0.2, px, py)
    if shape == "hexagon":
        px, py = _regular(6, r, 0.0)
        return _polygon(u, v, px, py)
    if shape == "star":
        px, py = _regular(5, r * 1.1, up, inner=r * 0.45)
        return _polygon(u, v, px, py)
    raise ValueError(shape)


def _texture_mask(texture: str, x: np.ndarray, y: np.ndarray, period: float, angle: float) -> np.ndarray:
    """Pixels that take the pattern's second tone (none for plain)."""
    if texture == "plain":
        return np.zeros(x.shape, bool)
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * x + s * y) / period, (-s * x + c * y) / period
    if texture == "striped":
        return (np.floor(u) % 2) == 1
    if texture == "checkered":
        return ((np.floor(u) + np.floor(v)) % 2) == 1
    if texture == "dotted":
        fu, fv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        return fu * fu + fv * fv < 0.12
    raise ValueError(texture)


def _background(kind: str, rng: np.random.Generator, size: int, y: np.ndarray) -> np.ndarray:
    if kind == "dark":
        base = np.full((size, size), rng.uniform(18, 40))
    elif kind == "light":
        base = np.full((size, size), rng.uniform(210, 235))
    elif kind == "gradient":
        lo, hi = rng.uniform(30, 70), rng.uniform(190, 230)
        t = (y + 1) / 2 if rng.random() < 0.5 else 1 - (y + 1) / 2
        base = lo + (hi - lo) * t
    else:  # noisy: mid-grey speckle
        base = rng.uniform(80, 175, size=(size, size))
    tint = rng.uniform(-6, 6, size=3)  # slight colour cast, never a hue of its own
    return np.clip(base[..., None] + tint, 0, 255)


def sample_attributes(rng: np.random.Generator) -> dict[str, str]:
    """Every attribute drawn independently and uniformly."""
    return {k: v[rng.integers(len(v))] for k, v in ATTRIBUTES.items()}


def render(seed: int, index: int, size: int = 64) -> Sample:
    """Image ``index`` of world ``seed``: a pure function of (seed, index, size)."""
    rng = np.random.default_rng([seed, index])
    attrs = sample_attributes(rng)
    x, y = _grid(size)
    lo, hi = SIZE_RADIUS[attrs["size"]]
    r = rng.uniform(lo, hi) * 2  # in [-1, 1] units
    margin = 1 - r * 1.15
    cx, cy = rng.uniform(-margin, margin, size=2)
    rot = rng.uniform(-0.3, 0.3)
    mask = _shape_mask(attrs["shape"], x - cx, y - cy, r, rot)
    img = _background(attrs["background"], rng, size, y)
    color = np.array(COLORS[attrs["color"]], float) * rng.uniform(0.92, 1.05)
    pattern = _texture_mask(attrs["texture"], x - cx, y - cy, period=rng.uniform(0.14, 0.18) * 2 * (r / 0.5) ** 0.5,
                            angle=rng.uniform(-0.5, 0.5) + (np.pi / 4 if rng.random() < 0.5 else 0))
    obj = np.where(pattern[..., None], color * TEXTURE_SHADE, color)
    img = np.where(mask[..., None], obj, img)
    img += rng.normal(0, 3, size=img.shape)  # sensor noise
    image = np.clip(img, 0, 255).astype(np.uint8)
    caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(**attrs)
    return Sample(image, mask, attrs, caption)


def render_batch(seed: int, start: int, n: int, size: int = 64) -> tuple[np.ndarray, list[dict[str, str]]]:
    """Images ``start .. start+n-1`` of world ``seed``: ``(n, size, size, 3)`` uint8 and their labels."""
    images = np.empty((n, size, size, 3), np.uint8)
    attrs = []
    for j in range(n):
        s = render(seed, start + j, size)
        images[j] = s.image
        attrs.append(s.attrs)
    return images, attrs


def render_masks(seed: int, start: int, n: int, size: int = 64) -> np.ndarray:
    """The object masks of images ``start .. start+n-1`` of world ``seed``: ``(n, size, size)`` bool."""
    return np.stack([render(seed, start + j, size).mask for j in range(n)]) if n else np.zeros((0, size, size), bool)


def label(attrs: dict[str, str], task: str) -> int:
    """Class index of an image with ``attrs`` in ``task``."""
    if task not in TASKS:
        raise DiscoverError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    name = f"{attrs['color']} {attrs['shape']}" if task == "object" else attrs[task]
    return TASKS[task].index(name)


def class_name(attrs: dict[str, str], task: str) -> str:
    return TASKS[task][label(attrs, task)]
