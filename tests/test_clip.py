"""The CLIP backend: loading specs and their errors, normalised embeddings that match a hand-run
encode, content-keyed caches, the P matrix, zero-shot, the world CLIP commands, and the shipped
world-clip's quality."""
from __future__ import annotations

import hashlib
import inspect
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clip_backend
import probes
import world
import world_clip
from common import DiscoverError


def _random_checkpoint(path: Path, seed: int) -> Path:
    """A randomly initialised world-clip saved like the shipped one (fp16 safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    world_clip.register()
    torch.manual_seed(seed)
    model = open_clip.create_model(world_clip.NAME)
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("world_clip")
    return _random_checkpoint(d / "a.safetensors", 0), _random_checkpoint(d / "b.safetensors", 1)


@pytest.fixture
def clip(ckpts) -> clip_backend.ClipModel:
    return clip_backend.load_clip(f"world-clip:{ckpts[0]}")


def _count_calls(monkeypatch, module: torch.nn.Module, method: str) -> list[int]:
    calls = [0]
    inner = getattr(module, method)

    def wrapper(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    monkeypatch.setattr(module, method, wrapper)
    return calls


# --- loading --------------------------------------------------------------------------------------

def test_random_checkpoint_loads_through_open_clip_front_door(ckpts) -> None:
    import open_clip
    from safetensors.torch import load_file

    world_clip.register()
    model, _, preprocess = open_clip.create_model_and_transforms("world-clip", pretrained=str(ckpts[0]))
    saved = load_file(str(ckpts[0]))
    for name, t in model.state_dict().items():
        assert torch.equal(t.half(), saved[name]), name
    assert "Resize(size=64" in str(preprocess)


def test_fingerprint_follows_weights_spec_and_preprocessing(ckpts, clip) -> None:
    again = clip_backend.load_clip(f"world-clip:{ckpts[0]}")
    other = clip_backend.load_clip(f"world-clip:{ckpts[1]}")
    assert clip.fingerprint == again.fingerprint != other.fingerprint
    assert clip.name == "world-clip" and clip.weights == ckpts[0] and not clip.model.training


@pytest.mark.parametrize("spec, message", [
    ("ViT-B-33:openai", "close names: ViT-B-32"),
    ("ViT-B-32:nonsense", "its tags: openai"),
    ("ViT-B-32:/nowhere/weights.pt", "weights file /nowhere/weights.pt: no such file"),
    ("ViT-B-32", "give NAME:PRETRAINED"),
])
def test_bad_specs_are_one_line_errors(spec, message) -> None:
    with pytest.raises(DiscoverError) as e:
        clip_backend.load_clip(spec)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_offline_tag_fails_fast_and_says_how_to_use_a_file(tmp_path, monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(clip_backend, "reachable", lambda host, timeout=1.0: False)  # offline, even in CI
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # and an empty cache
    t0 = time.perf_counter()
    with pytest.raises(DiscoverError) as e:
        clip_backend.load_clip("ViT-B-32:openai")
    assert time.perf_counter() - t0 < 10
    msg = str(e.value)
    assert "\n" not in msg and "could not be downloaded (offline" in msg and "ViT-B-32:/path/to/weights" in msg


def test_corrupt_weights_file_is_one_line_error_naming_it(ckpts, tmp_path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a checkpoint at all")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(ckpts[0].read_bytes()[:100_000])
    for path in (garbage, truncated):
        with pytest.raises(DiscoverError) as e:
            clip_backend.load_clip(f"world-clip:{path}")
        assert str(path) in str(e.value) and "cannot be loaded" in str(e.value) and "\n" not in str(e.value)


# --- embeddings -----------------------------------------------------------------------------------

def test_image_embeddings_are_normalised_and_match_a_manual_encode(clip) -> None:
    images, _ = world.render_batch(5, 0, 6)
    emb = clip_backend.embed_images(clip, list(images), key="manual", batch_size=4)
    assert emb.shape == (6, 128) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    with torch.no_grad():
        x = torch.stack([clip.preprocess(Image.fromarray(im)) for im in images])
        manual = F.normalize(clip.model.encode_image(x), dim=-1).numpy()
        # world-clip's preprocessing of a 64 px world image is world_clip.to_input, what it trained on
        assert torch.allclose(x, world_clip.to_input(images), atol=1e-6)
    np.testing.assert_allclose(emb, manual, atol=1e-5)
    # a probe embeds its own images, at any batch size
    probe = probes.load_probe("world:6:5")
    np.testing.assert_allclose(clip_backend.embed_images(clip, probe, batch_size=5), manual, atol=1e-5)


def test_text_embeddings_and_the_p_matrix(clip) -> None:
    concepts = ["red", "a striped object", "circle"]
    text = clip_backend.embed_texts(clip, concepts)
    with torch.no_grad():
        manual = F.normalize(clip.model.encode_text(clip.tokenizer(concepts)), dim=-1).numpy()
    np.testing.assert_allclose(text, manual, atol=1e-5)
    probe = probes.load_probe("world:4:5")
    P = clip_backend.similarity_matrix(clip, probe, concepts)
    assert P.shape == (4, 3) and P.dtype == np.float32
    np.testing.assert_allclose(P, clip_backend.embed_images(clip, probe) @ text.T, atol=1e-6)
    assert np.abs(P).max() <= 1 + 1e-5


def test_cache_is_reused_and_keyed_by_content(ckpts, clip, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DISCOVER_CACHE", str(tmp_path / "cache"))
    calls = _count_calls(monkeypatch, clip.model, "encode_image")
    probe = probes.load_probe("world:3:9")
    first = clip_backend.embed_images(clip, probe)
    assert calls[0] == 1 and len(list((tmp_path / "cache" / "clip").glob("*.npy"))) == 1
    np.testing.assert_array_equal(clip_backend.embed_images(clip, probe), first)
    assert calls[0] == 1  # a cache hit never runs the model
    clip_backend.embed_images(clip, probes.load_probe("world:3:10"))
    assert calls[0] == 2  # another probe
    images = [probe.get_image(i) for i in range(3)]
    clip_backend.embed_images(clip, images)
    clip_backend.embed_images(clip, images)
    assert calls[0] == 3
    images[1] = Image.fromarray(255 - np.asarray(images[1]))
    clip_backend.embed_images(clip, images)
    assert calls[0] == 4  # other pixels under the same (no) key
    other = clip_backend.load_clip(f"world-clip:{ckpts[1]}")
    other_calls = _count_calls(monkeypatch, other.model, "encode_image")
    clip_backend.embed_images(other, probe)
    assert other_calls[0] == 1  # other weights
    text_calls = _count_calls(monkeypatch, clip.model, "encode_text")
    clip_backend.embed_texts(clip, ["red", "blue"])
    clip_backend.embed_texts(clip, ["red", "blue"])
    clip_backend.embed_texts(clip, ["red", "green"])
    assert text_calls[0] == 2


# --- zero-shot and the commands -------------------------------------------------------------------

def test_zeroshot_of_any_clip_matches_world_clips_own(clip) -> None:
    ours = clip_backend._zeroshot_any(clip, n=24, seed=777, batch_size=10)
    assert ours == world_clip.zeroshot(clip.model, clip.tokenizer, n=24, seed=777)
    assert set(ours) == set(world_clip.PROMPTS)


def _cli(*args: str):
    from click.testing import CliRunner

    from discover import cli

    return CliRunner().invoke(cli, ["world", *args])


def test_cli_zeroshot_json(ckpts) -> None:
    res = _cli("zeroshot", "--clip", f"world-clip:{ckpts[0]}", "--n", "8", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["n"] == 8 and out["seed"] == 777 and set(out["accuracy_percent"]) == set(world_clip.PROMPTS)


@pytest.mark.parametrize("args, message", [
    (["zeroshot", "--n", "0"], "--n must be at least 1"),
    (["zeroshot", "--clip", "ViT-B-33:openai", "--n", "5"], "close names: ViT-B-32"),
    (["train-clip", "--out", "NONEMPTY"], "is not empty"),
    (["train-clip", "--out", "NEW", "--steps", "0"], "--steps must be at least 1"),
    (["train-clip", "--out", "NEW", "--batch-size", "1"], "--batch-size must be at least 2"),
    (["train-clip", "--out", "NEW", "--negatives", "-1"], "--negatives must be 0 or more"),
    (["train-clip", "--out", "NEW", "--init", "NEW/none.safetensors"], "no such weights file"),
    (["train-clip", "--out", "NEW", "--init", "CORRUPT"], "cannot be loaded"),
    (["train-clip", "--out", "NEW", "--claim-weights"], "--claim-weights needs --truth-weight"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, tmp_path) -> None:
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "x").write_text("x")
    (tmp_path / "corrupt.safetensors").write_text("not weights")
    paths = {"NONEMPTY": str(tmp_path / "nonempty"), "NEW": str(tmp_path / "new"),
             "CORRUPT": str(tmp_path / "corrupt.safetensors")}
    res = _cli(*[paths.get(a, a) for a in args])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and message in res.stderr
    assert not (tmp_path / "new").exists()


def test_cli_train_clip_defaults_are_train_clips() -> None:
    from discover import cli

    cmd = cli.commands["world"].commands["train-clip"]
    defaults = {p.name: p.default for p in cmd.params}
    signature = inspect.signature(world_clip.train_clip).parameters
    for name in ("steps", "batch_size", "lr", "seed", "pool"):
        assert defaults[name] == signature[name].default, name


def test_negative_vocabulary_never_names_the_world() -> None:
    import re

    vocab = world_clip.negative_vocabulary()
    assert len(vocab) > 10_000 and len(set(vocab)) == len(vocab)
    listed = Path(world_clip.REPO_DIR, "concepts", "world.txt").read_text().split("\n")
    assert not set(vocab) & {w.strip() for w in listed}  # world.txt's distractors stay unseen
    attribute_words = {w for values in world.ATTRIBUTES.values() for v in values for w in v.split()}
    attribute_words |= {"background", "object", "shape", "pattern", "photo", "size", "backdrop"}
    assert not {w for v in vocab for w in re.findall(r"[a-z]+", v)} & attribute_words


def test_train_clip_from_init_starts_at_those_weights(ckpts, tmp_path) -> None:
    """ckpts[1] has seed 1 and training seeds 0: only a loaded --init makes the weights equal."""
    from safetensors.torch import load_file

    manifest = world_clip.train_clip(tmp_path / "ft", steps=1, batch_size=4, lr=1e-12, pool=8, negatives=3,
                                     init=ckpts[1], progress=False)
    assert manifest["training"]["init_sha256"] == hashlib.sha256(ckpts[1].read_bytes()).hexdigest()
    assert manifest["training"]["negatives"] == 3
    before, after = load_file(str(ckpts[1])), load_file(str(tmp_path / "ft" / "world-clip.safetensors"))
    model = world_clip.load(ckpts[1])[0]
    params = {k for k, _ in model.named_parameters()}  # BatchNorm buffers move in one training step
    assert params and all(torch.equal(before[k], after[k]) for k in params)


# --- the shipped model ----------------------------------------------------------------------------

def test_shipped_world_clip_zero_shot_quality() -> None:
    clip = clip_backend.load_clip()
    acc = clip_backend.zeroshot(clip, n=300, seed=world_clip.EVAL_SEED)
    floors = {"color": 90, "size": 90, "background": 90, "shape": 85, "texture": 85, "object": 75}
    low = {a: f"{acc[a]:.1f} < {f}" for a, f in floors.items() if acc[a] < f}
    assert not low, f"zero-shot accuracy (%) below its floor: {low}"


def test_train_clip_resume_continues_the_same_run(tmp_path, monkeypatch) -> None:
    """Interrupted after its step-2 state, then resumed: the weights of an uninterrupted 4-step run
    (the same batches, captions, negatives and RNG streams)."""
    from safetensors.torch import load_file

    kw = dict(steps=4, batch_size=4, lr=1e-3, pool=16, negatives=3, progress=False, save_every=2)
    monkeypatch.setattr(world_clip, "zeroshot", lambda *a, **k: {})  # the manifest's 2 000-image score: not tested here
    world_clip.train_clip(tmp_path / "a", **kw)
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def interrupted(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:  # the state of step 2 is on disk
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        world_clip.train_clip(tmp_path / "b", **kw)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert torch.load(tmp_path / "b" / "train_state.pt", weights_only=False)["step"] == 2
    world_clip.train_clip(tmp_path / "b", resume=True, **kw)
    wa, wb = (load_file(str(tmp_path / d / world_clip.WEIGHTS.name)) for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_text_embeddings_resume_from_their_finished_chunks(clip, monkeypatch) -> None:
    """Encoding cut short after its first chunk keeps that chunk: the rerun encodes only the rest,
    and the result equals an uninterrupted encoding (and each text's own embedding)."""
    texts = [f"word{i} red" for i in range(10)]
    inner = clip.model.encode_text
    calls = {"n": 0}

    def flaky(tokens):
        calls["n"] += 1
        if calls["n"] == 3:  # the batches of chunk 1 (texts 0-3) went through: die in chunk 2
            raise KeyboardInterrupt
        return inner(tokens)

    monkeypatch.setattr(clip.model, "encode_text", flaky)
    with pytest.raises(KeyboardInterrupt):
        clip_backend.embed_texts(clip, texts, batch_size=2, chunk=4, progress=False)
    calls["n"] = -100  # no more interruptions; count the batches the rerun encodes
    got = clip_backend.embed_texts(clip, texts, batch_size=2, chunk=4, progress=False)
    assert calls["n"] == -100 + 3  # chunks 2 (4 texts) and 3 (2 texts) only: 2 + 1 batches
    monkeypatch.setattr(clip.model, "encode_text", inner)
    with torch.inference_mode():
        ref = torch.nn.functional.normalize(inner(clip.tokenizer(texts)).float(), dim=-1).numpy()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


# --- the truth stage ------------------------------------------------------------------------------

def test_claim_weights_give_every_claimed_attribute_set_the_same_weight() -> None:
    claims = [(("shape", "circle"),), (("shape", "square"),), (("color", "red"),),
              (("color", "red"), ("shape", "circle")), (("color", "red"), ("shape", "square")),
              (("color", "blue"), ("shape", "circle")), (("color", "blue"), ("shape", "square"))]
    w = world_clip.claim_weights_of(claims).numpy().astype(np.float64)
    # by hand: 3 sets (shape: 2 phrases, color: 1, color+shape: 4), each 1/3 of the total 7
    expected = np.array([7 / 3 / 2] * 2 + [7 / 3] + [7 / 3 / 4] * 4)
    np.testing.assert_allclose(w, expected, rtol=1e-6)
    assert abs(w.mean() - 1) < 1e-6


def test_train_clip_with_claim_weights_says_so_in_its_manifest(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(world_clip, "zeroshot", lambda *a, **k: {})  # the manifest's 2 000-image score: not tested here
    manifest = world_clip.train_clip(tmp_path / "cw", steps=1, batch_size=4, lr=1e-12, pool=8, negatives=3,
                                     truth_weight=1.0, claim_weights=True, progress=False)
    assert manifest["training"]["claim_weights"] is True and manifest["training"]["truth_weight"] == 1.0


def test_truth_loss_matches_a_float64_transcription() -> None:
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    phrases = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    null = F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    truth = (torch.rand(5, 4, generator=g) > 0.5).float()
    bias, scale, w = torch.tensor(0.2), 10.0, torch.tensor([0.5, 1.5, 1.0, 1.0])
    got = float(world_clip.truth_loss(img, phrases, truth, null, bias, scale, weights=w))

    def bce(z: np.ndarray, y: np.ndarray) -> np.ndarray:  # -y log s(z) - (1 - y) log(1 - s(z))
        s = 1 / (1 + np.exp(-z))
        return -(y * np.log(s) + (1 - y) * np.log(1 - s))

    I, Ph, N = (t.double().numpy() for t in (img, phrases, null))
    z = scale * (I @ Ph.T - 0.2)
    want = (bce(z, truth.double().numpy()) * w.double().numpy()[None, :]).mean() \
        + bce(scale * (I @ N.T - 0.2), np.zeros((5, 3))).mean()
    assert abs(got - want) < 1e-5


def test_truth_threshold_is_the_manifest_of_those_very_weights(ckpts, tmp_path) -> None:
    import shutil

    w = tmp_path / "world-clip.safetensors"
    shutil.copy(ckpts[0], w)
    spec = f"world-clip:{w}"
    assert clip_backend.truth_threshold(spec) is None  # no manifest beside it
    manifest = {"sha256": hashlib.sha256(w.read_bytes()).hexdigest(), "training": {"truth_bias": 0.31}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert clip_backend.truth_threshold(spec) == 0.31
    assert clip_backend.load_clip(spec).truth_threshold == 0.31
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "sha256": "0" * 64}))
    assert clip_backend.truth_threshold(spec) is None  # a manifest of other weights is not used
    assert clip_backend.truth_threshold(f"ViT-B-32:{w}") is None


def test_shipped_world_clip_holds_world_words_where_true_and_unseen_words_nowhere() -> None:
    """Over 300 world images: each attribute value's bare word ("red", "star", "noisy") scores
    above the truth threshold on most images that have the value and on almost none of the others;
    500 non-world words the CLIP never saw in training score below it on almost every image."""
    clip = clip_backend.load_clip()
    th = clip.truth_threshold
    images, attrs = world.render_batch(world_clip.EVAL_SEED, 0, 300)
    words = [v for a in world.ATTRIBUTES for v in world.ATTRIBUTES[a]]
    T = clip_backend.similarity_matrix(clip, list(images), words, progress=False) > th
    recall, fpr = {}, {}
    for j, w in enumerate(words):
        has = np.array([w in a.values() for a in attrs])
        recall[w], fpr[w] = T[has, j].mean(), T[~has, j].mean()
    assert np.mean(list(recall.values())) >= 0.85, recall
    assert max(fpr.values()) <= 0.03, fpr
    unseen = clip_backend.similarity_matrix(clip, list(images), world_clip.heldout_vocabulary()[:500], progress=False)
    assert (unseen > th).mean() <= 0.01
