"""The tiny CLIP shipped with the project: an open_clip model trained on the synthetic world.

``world_clip/world-clip.json`` is an ordinary open_clip model config (ModifiedResNet image tower,
small transformer text tower); ``world_clip/world-clip.safetensors`` its fp16 weights;
``world_clip/manifest.json`` how they were made and what they score. It loads like any open_clip
model::

    import open_clip, world_clip
    world_clip.register()
    model, _, preprocess = open_clip.create_model_and_transforms(
        "world-clip", pretrained="world_clip/world-clip.safetensors")

Training (``python discover.py world train-clip --out DIR``): CLIP's symmetric InfoNCE on
(image, caption) pairs of fresh world images (seeds >= 1000), plus an auxiliary loss that contrasts
each image with every value of each attribute through short prompts ("a striped object" vs "a
checkered object" ...): the hard negatives that random caption batches almost never contain.
With ``negatives`` > 0, each step also contrasts every image with that many words drawn from
:func:`negative_vocabulary` (common English words that say nothing about the world): a CLIP that
never saw such words otherwise scores them at random, and the arbitrary ones that land near a
cluster of images then win neuron labels in dissection. The vocabulary is disjoint from
``concepts/world.txt``, so that list's distractors stay an honest test of the trained model.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

import world
from common import REPO_DIR, DiscoverError, atomic_path, progress_bar, sha256_file, write_json_atomic

NAME = "world-clip"
DIR = REPO_DIR / "world_clip"
CONFIG = DIR / f"{NAME}.json"
WEIGHTS = DIR / f"{NAME}.safetensors"
MANIFEST = DIR / "manifest.json"
TRAIN_SEED = world.SEEDS["clip_train"]  # world seed of CLIP training images
EVAL_SEED = world.SEEDS["clip_eval"]
TRUTH_SCALE = 10.0  # logit scale of the truth and null losses (WPMI's a is of this order)
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # open_clip's

# Prompt templates per attribute: averaged at zero-shot time, one drawn per step in training.
PROMPTS: dict[str, list[str]] = {
    "shape": ["a {}", "a photo of a {}", "{}", "a {} shape"],
    "color": ["a {} object", "{}", "something {}", "a photo of a {} thing"],
    "texture": ["a {} object", "{}", "a {} pattern", "something {}"],
    "size": ["a {} object", "{}", "a {} thing"],
    "background": ["a {} background", "{} background", "{}"],
    "object": ["a {}", "a photo of a {}", "{}"],
}


class WorldConvNet(torch.nn.Module):
    """world-clip's image trunk: six 3x3 conv-BN-ReLU layers (64 -> 4 px), flattened so the
    projection sees where things are (shape), not only what (colour, texture). Far fewer ops than
    a ResNet of the same FLOPs, which is what costs on a CPU at this size."""

    def __init__(self, widths: tuple[int, ...] = (32, 32, 64, 64, 128, 256),
                 strides: tuple[int, ...] = (1, 2, 2, 1, 2, 2), img_size: int = 64, **_: Any) -> None:
        super().__init__()
        layers, c_in = [], 3
        for w, s in zip(widths, strides):
            layers += [torch.nn.Conv2d(c_in, w, 3, s, 1, bias=False), torch.nn.BatchNorm2d(w), torch.nn.ReLU(inplace=True)]
            c_in = w
        self.features = torch.nn.Sequential(*layers)
        side = img_size
        for s in strides:
            side //= s
        self.num_features = c_in * side * side
        self.default_cfg = self.pretrained_cfg = {"pool_size": None}

    def reset_classifier(self, num_classes: int = 0, **_: Any) -> None:  # timm API: no classifier here
        assert num_classes == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


def register() -> None:
    """Make ``world-clip`` (and its timm image trunk ``world_convnet``) known to open_clip (idempotent)."""
    import open_clip
    from timm.models import is_model, register_model

    if not is_model("world_convnet"):
        @register_model
        def world_convnet(pretrained: bool = False, **kwargs: Any) -> WorldConvNet:  # noqa: ARG001
            return WorldConvNet(**{k: v for k, v in kwargs.items() if k in ("widths", "strides", "img_size")})
    if NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG)


def attribute_values(attr: str) -> list[str]:
    return world.TASKS["object"] if attr == "object" else world.ATTRIBUTES[attr]


def attribute_index(attrs: dict[str, str], attr: str) -> int:
    return world.label(attrs, "object") if attr == "object" else world.ATTRIBUTES[attr].index(attrs[attr])


def to_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> open_clip-normalised (N, 3, H, W) float32."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def prompt_embeddings(model: torch.nn.Module, tokenizer: Any, attr: str, templates: list[str]) -> torch.Tensor:
    """L2-normalised text embedding of every value of ``attr``, averaged over ``templates``."""
    values = attribute_values(attr)
    texts = [t.format(v) for t in templates for v in values]
    emb = F.normalize(model.encode_text(tokenizer(texts)), dim=-1).view(len(templates), len(values), -1)
    return F.normalize(emb.mean(0), dim=-1)


@torch.no_grad()
@torch.no_grad()
def zeroshot_scores(encode: Callable[[np.ndarray], torch.Tensor], text: dict[str, torch.Tensor], n: int = 1000,
                    seed: int = EVAL_SEED, batch_size: int = 250) -> dict[str, float]:
    """Zero-shot accuracy (%) per attribute and on the 64-class object task, on ``n`` fresh world
    images of ``seed``: each image's class is its nearest text embedding (``text[task]``, one row
    per class, L2-normalised). ``encode`` maps a uint8 batch ``(B, 64, 64, 3)`` to image embeddings."""
    correct = {a: 0 for a in text}
    for start in range(0, n, batch_size):
        images, attrs = world.render_batch(seed, start, min(batch_size, n - start))
        img = F.normalize(encode(images).float(), dim=-1)
        for a, t in text.items():
            pred = (img @ t.to(img.device).T).argmax(1).cpu().numpy()
            correct[a] += int(sum(p == attribute_index(at, a) for p, at in zip(pred, attrs)))
    return {a: 100.0 * c / n for a, c in correct.items()}


def zeroshot(model: torch.nn.Module, tokenizer: Any, n: int = 1000, seed: int = EVAL_SEED,
             batch_size: int = 250) -> dict[str, float]:
    """:func:`zeroshot_scores` of world-clip ``model`` with the prompt ensembles of :data:`PROMPTS`."""
    model.eval()
    text = {a: prompt_embeddings(model, tokenizer, a, PROMPTS[a]) for a in PROMPTS}
    return zeroshot_scores(lambda images: model.encode_image(to_input(images)), text, n, seed, batch_size)


HOLDOUT_SEED = 12345  # which non-world words world-clip never trains on (see heldout_vocabulary)
HOLDOUT_FRACTION = 0.25


def _non_world_words() -> list[str]:
    """Words of ``concepts/20k.txt`` that say nothing of the world: none of ``concepts/world.txt``
    (whose distractors test the dissection), no word of the world's attributes, captions, prompts."""
    import re

    import concepts

    world_words = set(concepts.load_concepts("world"))
    texts = [*world.CAPTIONS, *(t for ts in PROMPTS.values() for t in ts)]
    texts += [v for values in world.ATTRIBUTES.values() for v in values]
    banned = {w for t in texts for w in re.findall(r"[a-z]+", t.lower())}
    return [w for w in concepts.load_concepts("20k")
            if w not in world_words and not (set(re.findall(r"[a-z]+", w)) & banned)]


def _holdout_mask(n: int) -> np.ndarray:
    return np.random.default_rng(HOLDOUT_SEED).random(n) < HOLDOUT_FRACTION


def negative_vocabulary() -> list[str]:
    """The non-world words world-clip trains against (negatives, "describes nothing here"): the
    words of :func:`_non_world_words` outside the seeded held-out quarter."""
    words = _non_world_words()
    return [w for w, out in zip(words, _holdout_mask(len(words))) if not out]


def heldout_vocabulary() -> list[str]:
    """Non-world words world-clip never saw in training (a seeded quarter of them): an honest
    test of how it scores words it has not learned, like ``concepts/world.txt``'s distractors."""
    words = _non_world_words()
    return [w for w, out in zip(words, _holdout_mask(len(words))) if out]


def write_heldout_concepts(path: Path | str = REPO_DIR / "concepts" / "world_heldout.txt", n: int = 445,
                           seed: int = 2026) -> Path:
    """Write a concept list of the world's 99 concepts (the head of ``concepts/world.txt``) and
    ``n`` words drawn (seeded) from :func:`heldout_vocabulary`: labels judged on words the
    null-word training never used."""
    import concepts

    held = heldout_vocabulary()
    pick = sorted(np.random.default_rng(seed).choice(len(held), n, replace=False))
    words = concepts.load_concepts("world")[:99] + [held[i] for i in pick]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(words) + "\n")
    return Path(path)


# Short descriptions of an image (what a concept list holds): one or two attribute values in the
# forms the prompts use. Each phrase is true of an image when every value it names holds.
PHRASE_FORMS: list[tuple[tuple[str, ...], str]] = [
    (("shape",), "{shape}"), (("shape",), "a {shape}"), (("color",), "{color}"), (("color",), "a {color} object"),
    (("texture",), "{texture}"), (("texture",), "{texture} pattern"), (("size",), "{size}"),
    (("size",), "{size} object"), (("background",), "{background}"), (("background",), "{background} background"),
    (("color", "shape"), "{color} {shape}"), (("size", "shape"), "{size} {shape}"),
    (("texture", "shape"), "{texture} {shape}"), (("size", "color"), "{size} {color} object"),
    (("color", "texture"), "{color} {texture} object"), (("shape", "background"), "{shape} on a {background} background"),
]


def phrase_bank() -> tuple[list[str], list[tuple[tuple[str, str], ...]]]:
    """Every short world description of :data:`PHRASE_FORMS` and the (attribute, value) pairs each
    one claims."""
    import itertools

    texts, claims = [], []
    for attrs, form in PHRASE_FORMS:
        for combo in itertools.product(*(world.ATTRIBUTES[a] for a in attrs)):
            texts.append(form.format(**dict(zip(attrs, combo))))
            claims.append(tuple(zip(attrs, combo)))
    return texts, claims


def phrase_truth(claims: list[tuple[tuple[str, str], ...]], attrs: list[dict[str, str]]) -> torch.Tensor:
    """``(len(attrs), len(claims))`` float: 1 where every value a phrase claims holds on the image."""
    return torch.tensor([[float(all(a[k] == v for k, v in c)) for c in claims] for a in attrs])


def _caption(attrs: dict[str, str], rng: np.random.Generator) -> str:
    return world.CAPTIONS[rng.integers(len(world.CAPTIONS))].format(**attrs)


def claim_weights_of(claims: list[tuple[tuple[str, str], ...]]) -> torch.Tensor:
    """One weight per phrase such that every set of claimed attributes (shape; colour; colour and
    shape; ...) weighs the same in :func:`truth_loss` however many phrases it has: mean 1."""
    import collections

    keys = [tuple(a for a, _ in c) for c in claims]
    count = collections.Counter(keys)
    w = torch.tensor([1.0 / count[k] for k in keys])
    return w * len(w) / w.sum()


def truth_loss(img: torch.Tensor, phrases: torch.Tensor, truth: torch.Tensor, null: torch.Tensor | None,
               bias: torch.Tensor, scale: float = TRUTH_SCALE, weights: torch.Tensor | None = None) -> torch.Tensor:
    """What a concept list asks of a CLIP: each short description scores above ``bias`` on the
    images it is true of and below it on the others (a per-pair logistic loss, as SigLIP's, on
    ``scale * (cos - bias)``), and a word that names nothing of the world (``null``) scores below it
    on every image. Embeddings L2-normalised; ``truth`` (images x phrases) in {0, 1}; ``weights``
    (one per phrase, mean 1; None: all 1) weigh the phrases' pairs."""
    logits = scale * (img @ phrases.T - bias)
    loss = F.binary_cross_entropy_with_logits(logits, truth, weight=None if weights is None else weights[None, :])
    if null is not None:
        loss = loss + F.binary_cross_entropy_with_logits(scale * (img @ null.T - bias), torch.zeros(len(img), len(null)))
    return loss


def null_uniformity(img: torch.Tensor, null: torch.Tensor, scale: float = TRUTH_SCALE) -> torch.Tensor:
    """How much a null word prefers some images of the batch to others: the mean over words of
    KL(uniform || softmax over images of ``scale * cos``), 0 when it scores every image alike."""
    z = scale * null @ img.T  # words x images
    return (torch.logsumexp(z, 1) - z.mean(1) - math.log(z.shape[1])).mean()


def train_clip(out: Path, steps: int = 1800, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
               pool: int = 20_000, aux_weight: float = 1.0, negatives: int = 0, init: Path | str | None = None,
               truth_weight: float = 0.0, null_weight: float = 0.0, claim_weights: bool = False,
               resume: bool = False, progress: bool = True, save_every: int = 200) -> dict:
    """Train world-clip into ``out``, from scratch or from the weights ``init``; resumable from
    ``out/train_state.pt`` (written every ``save_every`` steps and at the end).

    Images come from a pool of ``pool`` fresh world images of seed TRAIN_SEED (rendered once,
    flipped at random); each step draws a batch and a new caption template per image, and
    ``negatives`` words of :func:`negative_vocabulary` as extra image-to-text negatives. With
    ``truth_weight`` > 0, :func:`truth_loss` on every phrase of :func:`phrase_bank` (and the
    step's negative words as null words; ``claim_weights``: each set of claimed attributes weighs the
    same, :func:`claim_weights_of`); with ``null_weight`` > 0, :func:`null_uniformity` of those words.
    """
    import open_clip

    register()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state.pt"
    torch.manual_seed(seed)
    # fine-tuning loads the fp16 weights as shipped through open_clip into a float32 model
    model = open_clip.create_model(NAME) if init is None else load(init)[0]
    init_sha = None if init is None else sha256_file(init)
    tokenizer = open_clip.get_tokenizer(NAME)
    vocab = negative_vocabulary() if negatives > 0 else []
    bank, claims = phrase_bank()
    bank_tokens = tokenizer(bank) if truth_weight > 0 else None
    bank_weights = claim_weights_of(claims) if claim_weights else None
    bias = torch.nn.Parameter(torch.tensor(0.2))  # the truth threshold on the cosine (training only)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    opt.add_param_group({"params": [bias], "weight_decay": 0.0})
    step, elapsed, np_state = 0, 0.0, None
    if resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(st["model"])
        with torch.no_grad():
            bias.copy_(st.get("bias", bias))
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        torch.set_rng_state(st["rng"])
        np_state = st["np_rng"]
    t_render = time.perf_counter()
    images, attrs = world.render_batch(TRAIN_SEED, 0, pool)
    render_s = time.perf_counter() - t_render
    rng = np.random.default_rng(seed)
    if np_state is not None:  # continue the very same stream of batches and captions
        rng.bit_generator.state = np_state
    warmup = max(1, steps // 20)
    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task("train world-clip", total=steps, completed=step)
        while step < steps:
            model.train()
            cur = lr * min(1.0, (step + 1) / warmup) * (0.5 * (1 + math.cos(math.pi * step / steps)))
            for g in opt.param_groups:
                g["lr"] = cur
            idx = rng.choice(pool, batch_size, replace=False)
            batch = images[idx]
            flip = rng.random(batch_size) < 0.5
            batch[flip] = batch[flip, :, ::-1]
            x = to_input(np.ascontiguousarray(batch))
            texts = tokenizer([_caption(attrs[i], rng) for i in idx])
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(texts), dim=-1)
            scale = model.logit_scale.exp().clamp(max=100)
            logits = scale * img @ txt.T
            target = torch.arange(batch_size)
            i2t = logits
            neg = None
            if vocab:
                words = [vocab[j] for j in rng.choice(len(vocab), negatives, replace=False)]
                neg = F.normalize(model.encode_text(tokenizer(words)), dim=-1)
                i2t = torch.cat([logits, scale * img @ neg.T], dim=1)
            loss = (F.cross_entropy(i2t, target) + F.cross_entropy(logits.T, target)) / 2
            extra = torch.zeros(())
            if bank_tokens is not None:
                phrases = F.normalize(model.encode_text(bank_tokens), dim=-1)
                extra = extra + truth_weight * truth_loss(img, phrases, phrase_truth(claims, [attrs[i] for i in idx]),
                                                          neg, bias, weights=bank_weights)
            if null_weight > 0 and neg is not None:
                extra = extra + null_weight * null_uniformity(img, neg)
            aux = 0.0
            for a, templates in PROMPTS.items():
                t = prompt_embeddings(model, tokenizer, a, [templates[rng.integers(len(templates))]])
                y = torch.tensor([attribute_index(attrs[i], a) for i in idx])
                aux = aux + F.cross_entropy(scale * img @ t.T, y)
            total = loss + aux_weight * aux / len(PROMPTS) + extra
            opt.zero_grad(set_to_none=True)
            total.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            step += 1
            bar.update(task, advance=1, description=f"train world-clip loss {loss.item():.3f} aux {aux.item() / len(PROMPTS):.3f}")
            if step % save_every == 0 or step == steps:
                st = {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                      "elapsed": elapsed + time.perf_counter() - t0, "rng": torch.get_rng_state(),
                      "np_rng": rng.bit_generator.state, "bias": bias.detach().clone()}
                with atomic_path(state_path) as tmp:
                    torch.save(st, tmp)
    elapsed += time.perf_counter() - t0
    return export(model, tokenizer, out, {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
                                          "pool": pool, "train_world_seed": TRAIN_SEED, "aux_weight": aux_weight,
                                          "negatives": negatives, "negative_vocabulary": len(vocab),
                                          "truth_weight": truth_weight, "null_weight": null_weight,
                                          "claim_weights": claim_weights,
                                          "heldout_words": len(heldout_vocabulary()) if vocab else 0,
                                          "truth_bias": round(float(bias.detach()), 4),
                                          "init_sha256": init_sha,
                                          "train_seconds": round(elapsed, 1), "render_seconds": round(render_s, 1)})


def export(model: torch.nn.Module, tokenizer: Any, out: Path, training: dict) -> dict:
    """Write fp16 weights, the config and a manifest (training, zero-shot on seed 777, sha256)."""
    from safetensors.torch import save_file

    out = Path(out)
    weights = out / f"{NAME}.safetensors"
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp))
    with atomic_path(out / CONFIG.name) as tmp:
        tmp.write_text(CONFIG.read_text())
    model = load(weights)[0]  # score what was written (fp16 weights, as shipped)
    acc = zeroshot(model, tokenizer, n=2000)
    manifest = {"name": NAME, "config": CONFIG.name, "weights": weights.name, "sha256": sha256_file(weights),
                "bytes": weights.stat().st_size, "training": training,
                "zeroshot": {"seed": EVAL_SEED, "n": 2000, "accuracy_percent": acc}}
    write_json_atomic(out / MANIFEST.name, manifest)
    return manifest


def load(weights: Path | str = WEIGHTS) -> tuple[torch.nn.Module, Any, Any]:
    """(model, preprocess, tokenizer) of world-clip through open_clip's own front door."""
    import open_clip

    register()
    weights = Path(weights)
    if not weights.is_file():
        raise DiscoverError(f"world-clip weights {weights}: no such file (python discover.py world train-clip)")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=str(weights))
    except Exception as e:  # corrupt file, wrong tensors
        raise DiscoverError(f"world-clip weights {weights}: cannot be loaded ({type(e).__name__})") from e
    return model.float().eval(), preprocess, open_clip.get_tokenizer(NAME)
