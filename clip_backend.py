"""The CLIP side of CLIP-Dissect: image and text embeddings (cached by content) and the concept
activation matrix ``P = I Tᵀ`` (SPEC §3 step 1).

Usage::

    clip = clip_backend.load_clip()                        # the shipped world-clip
    clip = clip_backend.load_clip("ViT-B-16:openai")       # any open_clip tag (download or HF cache)
    clip = clip_backend.load_clip("ViT-B-16:/path/to/open_clip_pytorch_model.bin")   # a local file
    I = clip_backend.embed_images(clip, probes.load_probe("world:2000"))   # N x d, L2-normalised
    T = clip_backend.embed_texts(clip, ["red", "striped", "circle"])       # M x d, L2-normalised
    P = clip_backend.similarity_matrix(clip, probe, concepts)              # N x M cosines

A CLIP spec mirrors open_clip's one front door, ``create_model_and_transforms(NAME, pretrained=…)``:
``world-clip`` (``world_clip/world-clip.safetensors``), ``NAME:TAG`` (``open_clip.list_pretrained()``)
or ``NAME:/path/to/weights``. ``ClipModel.fingerprint`` hashes the weights file, the spec and the
preprocessing; embeddings are cached under ``common.cache_dir()/clip/`` by that fingerprint and the
content of what was embedded (a probe's fingerprint, the images' bytes, the texts), never by a name.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import world_clip
from common import DiscoverError, atomic_path, cache_dir, progress_bar, sha256_file, sha256_json, write_text_atomic
from models import hf_offline, reachable
from probes import Probe

DEFAULT = world_clip.NAME
WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


@dataclass
class ClipModel:
    """An open_clip model in eval mode with its image transform and tokenizer. ``fingerprint``
    identifies what it computes: sha256 of (weights file sha256, spec, preprocessing)."""

    model: torch.nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    fingerprint: str
    spec: str = DEFAULT
    weights: Path | None = None
    truth_threshold: float | None = None  # the cosine above which a short description holds (see load_clip)

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")


# --- loading --------------------------------------------------------------------------------------

def load_clip(spec: str = DEFAULT, device: str = "cpu") -> ClipModel:
    """``world-clip``, ``NAME:TAG`` or ``NAME:/path/to/weights`` -> :class:`ClipModel` on ``device``.

    Bad specs are one-line :class:`DiscoverError`s: an unknown NAME (with close names), an unknown
    TAG (with the known ones), a missing or corrupt weights file (named), a tag that cannot be
    downloaded (offline: fails at once and says how to point at a local file).
    """
    import open_clip

    spec = spec.strip()
    world_clip.register()
    if spec == DEFAULT:
        model, preprocess, tokenizer = world_clip.load(world_clip.WEIGHTS)
        name, weights = DEFAULT, world_clip.WEIGHTS
    else:
        name, sep, pretrained = spec.partition(":")
        models = open_clip.list_models()
        if name not in models:
            close = _close_names(name, models)
            raise DiscoverError(f"`clip` {spec}: open_clip has no model {name!r}"
                                + (f"; close names: {', '.join(close)}" if close else "")
                                + " (open_clip.list_models() lists them all)")
        if not sep or not pretrained:
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise DiscoverError(f"`clip` {spec}: give NAME:PRETRAINED, PRETRAINED a tag"
                                + (f" ({', '.join(tags[:6])})" if tags else "") + " or a weights file path")
        model, preprocess, tokenizer, weights = _load_open_clip(spec, name, pretrained)
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as e:  # cuda missing, a bad device string
        raise DiscoverError(f"`device` {device}: {str(e).splitlines()[0][:120]}") from e
    fingerprint = sha256_json(["clip", weights_sha256(weights), spec, str(preprocess)])
    return ClipModel(model.float().eval(), preprocess, tokenizer, name, fingerprint, spec, Path(weights),
                     truth_threshold(spec))


def truth_threshold(spec: str) -> float | None:
    """The image-text cosine above which the CLIP of ``spec`` holds a short description true of an
    image, where the CLIP was trained to have one: world-clip's truth loss learns it (the
    ``training.truth_bias`` of the manifest beside its weights: the shipped one, or one that
    ``world train-clip`` wrote for ``world-clip:/path/to/world-clip.safetensors``). None for other
    CLIPs (a contrastive CLIP's cosines have no absolute meaning), and then ``dissect`` labels
    without the gallery check."""
    name, _, path = spec.strip().partition(":")
    if name != world_clip.NAME:
        return None
    if path and not Path(path).is_file():
        return None
    manifest = world_clip.MANIFEST if not path else Path(path).with_name(world_clip.MANIFEST.name)
    if not manifest.is_file():
        return None
    try:
        info = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    if not path or info.get("sha256") == weights_sha256(Path(path)):  # the manifest of these very weights
        bias = info.get("training", {}).get("truth_bias")
        return None if bias is None else float(bias)
    return None


def _close_names(name: str, choices: Sequence[str], n: int = 5) -> list[str]:
    import difflib

    lower = {c.lower(): c for c in choices}
    return [lower[c] for c in difflib.get_close_matches(name.lower(), list(lower), n=n, cutoff=0.5)]


def _offline_error(spec: str, name: str, tag: str, why: str) -> DiscoverError:
    return DiscoverError(f"`clip` {spec}: the {name} weights {tag!r} could not be downloaded ({why}); "
                         f"copy the weights file to this machine and pass {name}:/path/to/weights")


def _load_open_clip(spec: str, name: str, pretrained: str) -> tuple[Any, Any, Any, Path]:
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg, has_hf_hub

    cfg = get_pretrained_cfg(name, pretrained)
    text_cfg = (open_clip.get_model_config(name) or {}).get("text_cfg", {})
    offline = False
    if cfg or any(str(k).startswith("hf_") for k in text_cfg):  # something may come from the HF hub
        # Offline, huggingface_hub retries for a while before failing: look in its cache only.
        offline = not reachable("huggingface.co", timeout=1.0)
    if cfg:
        if not (cfg.get("hf_hub") and has_hf_hub()) and cfg.get("url"):
            from urllib.parse import urlparse

            cached = Path("~/.cache/clip").expanduser() / os.path.basename(cfg["url"])
            host = urlparse(cfg["url"]).hostname or ""
            if not cached.is_file() and not reachable(host, timeout=1.0):
                raise _offline_error(spec, name, pretrained, f"offline: {host} cannot be reached "
                                     f"and {cached} does not exist")
        with hf_offline(offline):
            try:
                weights = Path(download_pretrained(cfg))
            except Exception as e:  # LocalEntryNotFoundError, FileNotFoundError, URLError, ...
                why = ("offline: huggingface.co cannot be reached and they are not in the Hugging Face "
                       "cache" if offline else type(e).__name__)
                raise _offline_error(spec, name, pretrained, why) from e
        source = pretrained
    else:
        weights = Path(pretrained).expanduser()
        if weights.is_dir():
            raise DiscoverError(f"`clip` {spec}: {weights} is a folder; give the weights file itself")
        if not weights.is_file():
            if os.sep in pretrained or "/" in pretrained or weights.suffix in WEIGHT_SUFFIXES:
                raise DiscoverError(f"`clip` {spec}: weights file {weights}: no such file")
            tags = open_clip.list_pretrained_tags_by_model(name)
            raise DiscoverError(f"`clip` {spec}: {name} has no pretrained tag {pretrained!r}"
                                + (f"; its tags: {', '.join(tags)}" if tags else "")
                                + f" (or give a weights file: {name}:/path/to/weights)")
        source = str(weights)
    with hf_offline(offline):
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=source)
        except Exception as e:  # corrupt file, foreign tensors, a tower that needs a download
            first = (str(e).splitlines() or [""])[0][:120]
            raise DiscoverError(f"`clip` {spec}: weights file {weights} cannot be loaded as {name} "
                                f"({type(e).__name__}{': ' + first if first else ''})") from e
        try:
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as e:
            raise DiscoverError(f"`clip` {spec}: the {name} tokenizer cannot be loaded ({type(e).__name__}"
                                + ("; offline" if offline else "") + ")") from e
    return model, preprocess, tokenizer, weights


def weights_sha256(path: str | os.PathLike) -> str:
    """sha256 of a weights file, memoised by (path, size, mtime): a ViT-L file is not re-read."""
    path = Path(path).resolve()
    st = path.stat()
    memo = cache_dir() / "clip" / "sha256" / sha256_json([str(path), st.st_size, st.st_mtime_ns])
    try:
        digest = memo.read_text().strip()
        if len(digest) == 64:
            return digest
    except OSError:
        pass
    digest = sha256_file(path)
    write_text_atomic(memo, digest + "\n")
    return digest


# --- embeddings -----------------------------------------------------------------------------------

def _cache_file(clip: ClipModel, what: Any) -> Path:
    return cache_dir() / "clip" / f"{sha256_json([clip.fingerprint, what])}.npy"


def _read_cache(path: Path, rows: int) -> np.ndarray | None:
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return None
    if arr.ndim != 2 or arr.shape[0] != rows or arr.dtype != np.float32:
        return None  # a stale or foreign file: recompute
    return arr


def _write_cache(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def _as_pil(item: Any):
    from PIL import Image

    if isinstance(item, Image.Image):
        return item
    arr = np.asarray(item)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise DiscoverError(f"embed_images: expected PIL images or uint8 H x W x 3 arrays, got "
                            f"{arr.dtype} {tuple(arr.shape)}")
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[2] == 1 else arr)


def _content_hash(images: Sequence[Any]) -> str:
    """sha256 over every image's mode, size and pixels: a list of images is keyed by what it shows."""
    h = hashlib.sha256()
    for img in images:
        h.update(f"{img.mode}:{img.size}\n".encode())
        h.update(img.tobytes())
    return h.hexdigest()


def embed_images(clip: ClipModel, images: Probe | Sequence[Any], *, key: str | None = None,
                 batch_size: int = 256, progress: bool = True, workers: int = 4) -> np.ndarray:
    """L2-normalised CLIP image embeddings, ``N x d`` float32, in probe (or list) order.

    ``images``: a :class:`probes.Probe` (keyed by its fingerprint) or a list of PIL images / uint8
    ``H x W x 3`` arrays (keyed by their pixels). ``key`` is an extra label mixed into the cache
    key. A cache hit returns without running the model; images are decoded and preprocessed by a
    thread pool (``workers``), each at its own size, through the CLIP's own transform.
    """
    if batch_size < 1:
        raise DiscoverError(f"`batch_size` must be at least 1, got {batch_size}")
    if isinstance(images, Probe):
        n, get = images.n, images.get_image
        what: Any = ["probe", images.fingerprint, key]
    else:
        items = [_as_pil(im) for im in images]
        if not items:
            raise DiscoverError("embed_images: no images")
        n, get = len(items), items.__getitem__
        what = ["images", n, _content_hash(items), key]
    path = _cache_file(clip, what)
    cached = _read_cache(path, n)
    if cached is not None:
        return cached
    device, chunks = clip.device, []
    bar = progress_bar(progress, note="images", transient=True, stderr=True)
    with bar, ThreadPoolExecutor(max(1, workers)) as pool, torch.inference_mode():
        task = bar.add_task(f"CLIP {clip.name}: embed images", total=n)
        for start in range(0, n, batch_size):
            idx = range(start, min(n, start + batch_size))
            x = torch.stack(list(pool.map(lambda i: clip.preprocess(get(i)), idx))).to(device)
            chunks.append(F.normalize(clip.model.encode_image(x).float(), dim=-1).cpu().numpy())
            bar.advance(task, len(idx))
    out = np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32)
    _write_cache(path, out)
    return out


TEXT_CHUNK = 1024  # texts per cache file: an interrupted encoding keeps every finished chunk


def embed_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 64, progress: bool = True,
                chunk: int = TEXT_CHUNK) -> np.ndarray:
    """L2-normalised CLIP text embeddings of ``texts``, ``M x d`` float32. Cached in chunks of
    ``chunk`` texts, each keyed by the CLIP and its own texts, so a run cut short (Ctrl-C, a crash)
    resumes from the chunks it finished; ``batch_size`` texts per forward."""
    texts = list(texts)
    if not texts:
        raise DiscoverError("embed_texts: no texts")
    if not all(isinstance(t, str) for t in texts):
        raise DiscoverError("embed_texts: every text must be a string")
    if batch_size < 1 or chunk < 1:
        raise DiscoverError(f"`batch_size` must be at least 1, got {min(batch_size, chunk)}")
    parts: list[np.ndarray | None] = []
    paths = []
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        digest = hashlib.sha256(json.dumps(part, ensure_ascii=False).encode()).hexdigest()
        paths.append(_cache_file(clip, ["texts", len(part), digest]))
        parts.append(_read_cache(paths[-1], len(part)))
    todo = sum(min(chunk, len(texts) - j * chunk) for j, p in enumerate(parts) if p is None)
    if todo:
        with progress_bar(progress, note="texts", stderr=True) as bar, torch.inference_mode():
            task = bar.add_task(f"CLIP {clip.name}: embed {todo} texts", total=todo)
            for j, p in enumerate(parts):
                if p is not None:
                    continue
                part, out = texts[j * chunk:(j + 1) * chunk], []
                for start in range(0, len(part), batch_size):
                    tokens = clip.tokenizer(part[start:start + batch_size]).to(clip.device)
                    out.append(F.normalize(clip.model.encode_text(tokens).float(), dim=-1).cpu().numpy())
                    bar.advance(task, min(batch_size, len(part) - start))
                parts[j] = np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
                _write_cache(paths[j], parts[j])
    return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)


def similarity_matrix(clip: ClipModel, probe: Probe | Sequence[Any], concepts: Sequence[str], *,
                      batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """CLIP-Dissect's concept activation matrix ``P[i, m] = I_i · T_m`` (SPEC §3 step 1), ``N x M``
    float32: cosines between probe image ``i`` and concept ``m``."""
    image = embed_images(clip, probe, batch_size=batch_size, progress=progress)
    text = embed_texts(clip, concepts, progress=progress)
    return np.ascontiguousarray(image @ text.T, dtype=np.float32)


# --- zero-shot on the synthetic world -------------------------------------------------------------

@torch.no_grad()
def prompt_ensemble(clip: ClipModel, attr: str, templates: Sequence[str]) -> torch.Tensor:
    """``world_clip.prompt_embeddings`` for any CLIP on any device: the L2-normalised mean of the
    normalised embeddings of every template, per value of ``attr`` (V x d)."""
    values = world_clip.attribute_values(attr)
    texts = [t.format(v) for t in templates for v in values]
    emb = clip.model.encode_text(clip.tokenizer(texts).to(clip.device)).float()
    emb = F.normalize(emb, dim=-1).view(len(templates), len(values), -1)
    return F.normalize(emb.mean(0), dim=-1)


@torch.no_grad()
def zeroshot(clip: ClipModel, n: int = 1000, seed: int = world_clip.EVAL_SEED, batch_size: int = 250) -> dict[str, float]:
    """Zero-shot accuracy (%) per attribute and on the 64-class object task, on ``n`` fresh world
    images of ``seed``: ``world_clip.zeroshot`` for world-clip on the CPU; for any other CLIP the same
    prompt ensembles (``world_clip.PROMPTS``), the images going through that CLIP's own transform."""
    if n < 1:
        raise DiscoverError(f"`n` must be at least 1, got {n}")
    if clip.name == world_clip.NAME and clip.device.type == "cpu":
        return world_clip.zeroshot(clip.model, clip.tokenizer, n=n, seed=seed, batch_size=batch_size)
    return _zeroshot_any(clip, n, seed, batch_size)


@torch.no_grad()
def _zeroshot_any(clip: ClipModel, n: int, seed: int, batch_size: int) -> dict[str, float]:
    from PIL import Image

    clip.model.eval()
    text = {a: prompt_ensemble(clip, a, world_clip.PROMPTS[a]) for a in world_clip.PROMPTS}

    def encode(images: np.ndarray) -> torch.Tensor:
        x = torch.stack([clip.preprocess(Image.fromarray(im)) for im in images]).to(clip.device)
        return clip.model.encode_image(x)

    return world_clip.zeroshot_scores(encode, text, n, seed, batch_size)
