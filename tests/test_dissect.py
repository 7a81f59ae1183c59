"""The dissect pipeline end to end on a tiny CVN, a random-init world-clip and a small concept list."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import dissect
import dissect_kernels
import lwta
import models
import schema
import world
import world_clip
from common import DiscoverError

ROOT = Path(__file__).resolve().parent.parent
CONCEPTS = ["red", "blue", "green", "circle", "square", "star", "striped", "dotted", "dark background",
            "light background", "small", "large"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import open_clip
    from safetensors.torch import save_file

    tmp = tmp_path_factory.mktemp("dissect")
    torch.manual_seed(0)
    model = models.build("deit_world", U=4, num_classes=64)
    models.save(model, tmp / "run", {"arch": "deit_world", "U": 4, "num_classes": 64, "img_size": 64,
                                   "classes": world.TASKS["object"], "mean": [0.485, 0.456, 0.406],
                                   "std": [0.229, 0.224, 0.225]})
    world_clip.register()
    clip = open_clip.create_model("world-clip")
    save_file({k: v.half().contiguous() for k, v in clip.state_dict().items()}, str(tmp / "clip.safetensors"))
    (tmp / "concepts.txt").write_text("\n".join(CONCEPTS) + "\n")
    return tmp


def _cfg(setup: Path, **kw) -> dissect.DissectConfig:
    base = dict(model=str(setup / "run"), layers=["blocks.3.mlp.act", "head"], probe="world:48",
                concepts=str(setup / "concepts.txt"), clip=f"world-clip:{setup / 'clip.safetensors'}",
                out=str(setup / "out"), mode="argmax", batch_size=16)
    base.update(kw)
    return dissect.DissectConfig(**base)


def _reference_scores(setup: Path) -> dict[str, np.ndarray]:
    """A and P computed by hand (plain forward hooks; the CLIP's own encoders), then SoftWPMI."""
    model, _ = models.load(setup / "run")
    lwta.set_mode(model, "argmax")
    images, _ = world.render_batch(2, 0, 48)  # world:48 = seed 2
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    acts = {}
    model.blocks[3].mlp.act.register_forward_hook(lambda m, i, o: acts.__setitem__("blocks.3.mlp.act", o[:, 0]))
    with torch.no_grad():
        acts["head"] = model(x)
    clip, _, tok = world_clip.load(setup / "clip.safetensors")
    with torch.no_grad():
        img = torch.nn.functional.normalize(clip.encode_image(world_clip.to_input(images)), dim=-1)
        txt = torch.nn.functional.normalize(clip.encode_text(tok(CONCEPTS)), dim=-1)
    P = (img @ txt.T).numpy().astype(np.float32)
    return {k: dissect_kernels.soft_wpmi(v.numpy().astype(np.float32), P) for k, v in acts.items()}


def test_labels_are_the_argmax_of_independently_computed_scores(setup: Path) -> None:
    res = dissect.dissect(_cfg(setup, similarity="soft_wpmi", signal="argmax"))  # the reference's choices
    assert res["neurons"] == 384 + 64
    with open(setup / "out" / "descriptions.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["layer", "unit", "description", "similarity"]
    assert {"block", "competitor", "active_rate", "top_images"} <= set(rows[0])
    ref = _reference_scores(setup)
    checked = 0
    for r in rows:
        S = ref[r["layer"]][int(r["unit"])]
        if not np.isfinite(S).any():
            assert r["description"] == "" and math.isnan(float(r["similarity"]))
            continue
        best = np.flatnonzero(S == S.max())
        assert r["description"] in [CONCEPTS[m] for m in best]
        assert float(r["similarity"]) == pytest.approx(float(S.max()), rel=1e-4, abs=1e-5)
        checked += 1
    assert checked > 100
    lw = [r for r in rows if r["layer"] == "blocks.3.mlp.act"]
    assert all(int(r["block"]) == int(r["unit"]) // 4 and int(r["competitor"]) == int(r["unit"]) % 4 for r in lw)
    # CLS-token LWTA units are sparse: each image activates exactly 1 of 4 per block
    rates = np.array([float(r["active_rate"]) for r in lw]).reshape(-1, 4)
    np.testing.assert_allclose(rates.sum(1), 1.0, atol=1e-6)
    labels = json.loads((setup / "out" / "labels.json").read_text())
    assert labels["provenance"]["similarity"] == "soft_wpmi" and labels["provenance"]["probe_n"] == 48
    n0 = next(n for n in labels["neurons"] if not n["dead"])
    assert len(n0["top_concepts"]) == 5 and len(n0["top_images"]) == 20


def test_dead_neurons_get_no_concept(setup: Path, monkeypatch) -> None:
    import record
    real = record.read_activations

    def with_dead_unit(path):
        A, info = real(path)
        A = A.copy()
        A[:, 5] = 0.0
        return A, info

    monkeypatch.setattr(record, "read_activations", with_dead_unit)
    dissect.dissect(_cfg(setup, out=str(setup / "dead"), layers=["head"]))
    n = json.loads((setup / "dead" / "labels.json").read_text())["neurons"][5]
    assert n["dead"] and n["description"] == "" and n["top_concepts"] == []


def test_mismatched_probe_and_bad_input(setup: Path, monkeypatch) -> None:
    import clip_backend
    real = clip_backend.similarity_matrix
    monkeypatch.setattr(clip_backend, "similarity_matrix", lambda *a, **k: real(*a, **k)[:40])
    with pytest.raises(DiscoverError, match="different probes"):
        dissect.dissect(_cfg(setup, out=str(setup / "mismatch")))
    assert not (setup / "mismatch").exists()  # nothing half-written
    monkeypatch.undo()
    with pytest.raises(DiscoverError, match="unknown 'jaccard'"):
        dissect.dissect(_cfg(setup, similarity="jaccard"))
    with pytest.raises(DiscoverError, match="blocks.3.mlp.act"):
        dissect.dissect(_cfg(setup, layers=["blocks.3.mlp.actt"]))
    (setup / "empty.txt").write_text("\n\n")
    with pytest.raises(DiscoverError):
        dissect.dissect(_cfg(setup, concepts=str(setup / "empty.txt")))


def test_cli_one_line_errors(setup: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(ROOT / "discover.py"), "dissect", *args], capture_output=True,
                              text=True, cwd=ROOT, env={**os.environ}, timeout=300)

    base = ["--model", str(setup / "run"), "--probe", "world:48", "--clip", f"world-clip:{setup / 'clip.safetensors'}",
            "--concepts", str(setup / "concepts.txt")]
    for args, expected in [
        ([*base, "--layers", "blocks.9.mlp.act", "--out", str(setup / "c1")], "blocks.9.mlp.act"),
        ([*base, "--layers", "head", "--concepts", "klingon", "--out", str(setup / "c2")], "klingon"),
        ([*base, "--layers", "head", "--probe", str(setup / "nowhere"), "--out", str(setup / "c3")], "nowhere"),
    ]:
        r = run(*args)
        assert r.returncode == 2, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr, r.stderr


def test_gallery_check_chooses_the_best_concept_that_holds_on_the_top_images() -> None:
    """dissect.gallery_mask / neuron_rows against a plain loop: a concept is allowed for a unit when
    P > threshold on at least `share` of the unit's top images; the label is the best-scoring
    allowed concept, or the best overall when none is allowed."""
    rng = np.random.default_rng(0)
    N, M, K, T = 30, 5, 4, 20
    P = rng.uniform(-0.5, 0.5, (N, M)).astype(np.float32)
    A = rng.random((N, K)).astype(np.float32)
    top = dissect_kernels.top_images(A, T)
    thr, share = 0.1, 0.8
    P[top[0], 2] = 0.3  # concept 2 holds on every top image of unit 0
    P[top[1][:15], 3] = 0.3  # concept 3 holds on 15 of unit 1's 20 top images (< 80 %)
    P[top[1][15:], 3] = -0.3
    P[:, 4] = np.where(np.isin(np.arange(N), top[2][:16]), 0.2, -0.2)  # 16 of 20 for unit 2: exactly 80 %
    S = rng.normal(size=(K, M))
    S[:, 0] = 10.0  # concept 0 scores best everywhere but holds nowhere it is checked
    P[:, 0] = -0.4
    mask = dissect.gallery_mask(dissect.verdicts(P, thr), top, share)
    ref = np.zeros((K, M), bool)
    for k in range(K):
        for m in range(M):
            ref[k, m] = sum(float(P[i, m]) > thr for i in top[k]) >= share * T
    np.testing.assert_array_equal(mask, ref)
    assert ref[0, 2] and not ref[1, 3] and ref[2, 4]
    words = ["zero", "one", "two", "three", "four"]
    rows = dissect.neuron_rows("l", A, S, words, None, None, None, mask)
    for k, r in enumerate(rows):
        allowed = [m for m in range(M) if ref[k, m]]
        best = max(allowed, key=lambda m: S[k, m]) if allowed else int(np.argmax(S[k]))
        assert r.description == words[best] and r.gallery_checked == bool(allowed)
        assert r.similarity == pytest.approx(S[k, best])
        assert [c for c, _ in r.top_concepts[:len(allowed)]] == \
            [words[m] for m in sorted(allowed, key=lambda m: -S[k, m])][:5]
    plain = dissect.neuron_rows("l", A, S, words, None, None, None, None)
    assert all(r.description == "zero" and r.gallery_checked is None for r in plain)


def test_gallery_fit_picks_the_shared_concept_that_follows_the_unit() -> None:
    """dissect.gallery_fit against np.corrcoef of the unit and the 0/1 verdict; the label (neuron_rows,
    label_indices, choose_labels) is the allowed concept of highest fit, whatever the scores say;
    a verdict constant over the probe fits 0, a concept not allowed -inf."""
    rng = np.random.default_rng(1)
    N, K = 200, 3
    heart = rng.random(N) < 0.25  # planted attributes of the images
    large = rng.random(N) < 0.5
    A = np.stack([3.0 * heart + 1.0 * large + 0.3 * rng.random(N),  # a heart unit whose top images are large hearts
                  1.0 * large + 0.1 * rng.random(N),  # a size unit
                  rng.random(N)], 1).astype(np.float32)
    thr = 0.0
    P = np.stack([np.where(heart, 0.5, -0.5), np.where(large, 0.5, -0.5), np.full(N, 0.5),  # "everything" holds everywhere
                  rng.uniform(-0.5, 0.5, N)], 1).astype(np.float32)
    words = ["heart", "large", "everything", "noise"]
    top = dissect_kernels.top_images(A, 20)
    holds = dissect.verdicts(P, thr)
    allowed = dissect.gallery_mask(holds, top, 0.8)
    assert allowed[0, :3].all() and allowed[1, 1:3].all() and not allowed[1, 0]
    fit = dissect.gallery_fit(A, holds, allowed)
    for k in range(K):
        for m in range(P.shape[1]):
            if not allowed[k, m]:
                assert fit[k, m] == -np.inf
            elif len(set((P[:, m] > thr).tolist())) == 1:
                assert fit[k, m] == 0.0
            else:
                ref = np.corrcoef(A[:, k].astype(np.float64), (P[:, m] > thr).astype(np.float64))[0, 1]
                assert fit[k, m] == pytest.approx(ref, abs=1e-9)
    S = np.zeros((K, P.shape[1]))
    S[:, 1] = 5.0  # "large" scores best everywhere: the old rule's label for unit 0
    S[:, 2] = 4.0
    rows = dissect.neuron_rows("l", A, S, words, None, None, None, allowed, top, fit)
    assert [r.description for r in rows[:2]] == ["heart", "large"]
    for k, r in enumerate(rows):  # allowed concepts first, by fit (then score), then the rest by score
        ok = [m for m in range(len(words)) if allowed[k, m]]
        ref = sorted(ok, key=lambda m: (-fit[k, m], -S[k, m], m)) + sorted(set(range(len(words))) - set(ok),
                                                                          key=lambda m: (-S[k, m], m))
        assert [c for c, _ in r.top_concepts] == [words[m] for m in ref][:dissect.TOP_CONCEPTS]
    assert [r.description for r in dissect.neuron_rows("l", A, S, words, None, None, None, allowed, top)][:2] == \
        ["large", "large"]  # without the fit: the best-scoring allowed concept
    idx = dissect.label_indices(S, allowed, fit)
    assert [words[m] for m in idx] == [r.description for r in rows]


def test_truth_threshold_comes_from_the_clip_manifest_only() -> None:
    import clip_backend

    manifest = json.loads(world_clip.MANIFEST.read_text())
    assert clip_backend.truth_threshold("world-clip") == manifest["training"]["truth_bias"]
    assert clip_backend.truth_threshold("ViT-B-32:/tmp/weights.bin") is None


def test_the_gallery_check_applies_to_hidden_layers_only(setup: Path, monkeypatch) -> None:
    import clip_backend

    monkeypatch.setattr(clip_backend, "truth_threshold", lambda spec: -1.0)  # every concept holds
    dissect.dissect(_cfg(setup, out=str(setup / "gallery"), similarity="soft_wpmi", signal="argmax"))
    lab = json.loads((setup / "gallery" / "labels.json").read_text())
    assert lab["provenance"]["gallery_share"] == dissect.GALLERY_SHARE and lab["provenance"]["truth_threshold"] == -1.0
    assert lab["layers"]["blocks.3.mlp.act"]["gallery_share"] == dissect.GALLERY_SHARE
    assert lab["layers"]["head"]["gallery_share"] is None
    hidden = [n for n in lab["neurons"] if n["layer"] == "blocks.3.mlp.act" and not n["dead"]]
    assert hidden and all(n["gallery_checked"] for n in hidden)
    # every concept holds on every image, so every point of every confidence curve is 1, as is the base rate
    live = [n for n in lab["neurons"] if not n["dead"]]
    assert live and all(n["confidence"] and all(p == 1.0 for _, p in n["confidence"]) for n in live)
    assert all(n["base_rate"] == 1.0 for n in live)
    assert all(n["confidence"] is None and n["base_rate"] is None for n in lab["neurons"] if n["dead"])
    with pytest.raises(DiscoverError, match="`gallery_share` must be in"):
        dissect.dissect(_cfg(setup, out=str(setup / "bad"), gallery_share=1.5))


def test_confidence_curve_by_hand() -> None:
    """N = 4, min_rank 1: ranks 1, 2, 3, 4; rank r's share is over the images whose signal lies
    between those ranked r/2 + 1 and 2r (ties included)."""
    a = np.array([0.9, 0.5, 0.7, 0.1])  # descending: images 0, 2, 1, 3
    truth = np.array([True, False, True, False])
    # r=1: images 0, 2 -> 1; r=2: 2, 1, 3 -> 1/3; r=3: 2, 1, 3 -> 1/3; r=4: 1, 3 -> 0
    expected = [[0.1, 0.0], [0.5, 1 / 3], [0.7, 1 / 3], [0.9, 1.0]]
    got = dissect.confidence_curve(a, truth, min_rank=1)
    assert np.allclose(got, expected)
    assert dissect.confidence_curve(np.zeros(0), np.zeros(0, bool)) == []
    # a saturated signal: 30 images tie at 1, 10 of them true; the top band is the whole tie
    sat = np.concatenate([np.ones(30), np.linspace(0.9, 0.0, 70)])
    held = np.concatenate([np.arange(30) % 3 == 0, np.zeros(70, bool)])
    assert dissect.confidence_curve(sat, held)[-1] == [1.0, pytest.approx(1 / 3)]


@pytest.mark.parametrize("seed", [0, 1])
def test_confidence_curve_against_a_float64_transcription(seed: int) -> None:
    rng = np.random.default_rng(seed)
    N = 300
    a = rng.normal(size=N).astype(np.float32)
    a[:40] = 0.0  # ties (a ReLU's zeros): one point per distinct signal, its highest-ranked
    truth = rng.random(N) < 1 / (1 + np.exp(-2 * a))
    ranks, r = [], 10.0
    while r < N:
        ranks.append(int(round(r)))
        r *= 2 ** 0.5
    ranks.append(N)
    ref: dict[float, float] = {}
    desc = np.sort(a.astype(np.float64))[::-1]
    for r in sorted(set(ranks)):
        hi, lo = desc[r // 2], desc[min(N, 2 * r) - 1]  # ranks r/2 + 1 and 2r (1-based)
        band = (a >= lo) & (a <= hi)  # ties with either end included
        ref.setdefault(float(desc[r - 1]), float(truth[band].mean()))
    got = dissect.confidence_curve(a, truth)
    assert [t for t, _ in got] == sorted(ref)
    assert np.allclose([p for _, p in got], [ref[t] for t in sorted(ref)])


def test_skip_bad_leaves_unreadable_probe_images_out(setup: Path, tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "probe"
    folder.mkdir()
    images, _ = world.render_batch(9, 0, 6)
    for i, im in enumerate(images):
        Image.fromarray(im).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DiscoverError, match="`skip_bad`"):
        dissect.dissect(_cfg(setup, probe=str(folder), out=str(tmp_path / "a"), layers=["head"]))
    assert not (tmp_path / "a").exists()
    dissect.dissect(_cfg(setup, probe=str(folder), out=str(tmp_path / "b"), layers=["head"], skip_bad=True))
    prov = json.loads((tmp_path / "b" / "labels.json").read_text())["provenance"]
    assert prov["probe_n"] == 6 and prov["skip_bad"] is True and "broken.png" not in prov["probe_names"]


def test_a_bad_clip_fails_before_any_recording(setup: Path, tmp_path: Path, monkeypatch) -> None:
    import record

    calls = []
    monkeypatch.setattr(record, "record_layers", lambda *a, **k: calls.append(1))
    (tmp_path / "bad.safetensors").write_bytes(b"not weights")
    with pytest.raises(DiscoverError, match="bad.safetensors"):
        dissect.dissect(_cfg(setup, out=str(tmp_path / "o"), clip=f"world-clip:{tmp_path / 'bad.safetensors'}"))
    assert calls == [] and not (tmp_path / "o").exists()


def test_a_random_network_gets_few_interpretable_units(setup: Path, tmp_path: Path) -> None:
    """The interpretability cutoff is calibrated per layer on an untrained copy (seed 0) of the
    model: the 95th percentile of its neurons' best scores. An untrained network of another seed
    (the fixture's) then has few interpretable units on every layer and similarity, where the fixed
    SoftWPMI cutoff 0.16 of CLIP-Dissect marks most of them interpretable."""
    cfg = dict(layers=["blocks.3.mlp.act", "head"], probe="world:400:4", concepts="world", clip="world-clip",
               mode="sample")
    for sim in ("auto", "cos3"):
        res = dissect.dissect(_cfg(setup, **cfg, similarity=sim, out=str(tmp_path / sim)))
        for layer, info in res["layers"].items():
            assert info.cutoff_from == "random copy"
            assert info.interpretable <= 0.15 * info.K, (sim, layer, info.interpretable)
            lab = schema.Labels.read(tmp_path / sim)
            scores = np.array([n.similarity for n in lab.neurons_of(layer)], float)
            assert info.interpretable == int(np.sum(scores > info.cutoff))
    # CLIP-Dissect's own rule for its cutoff: each neuron's best-scoring concept (no gallery check)
    fixed = dissect.dissect(_cfg(setup, **cfg, similarity="soft_wpmi", cutoff=0.16, gallery_share=0.0,
                                 out=str(tmp_path / "fixed")))
    assert all(i.interpretable > 0.5 * i.K and i.cutoff_from == "fixed" for i in fixed["layers"].values())


def test_random_cutoff_is_the_quantile_of_the_best_scores() -> None:
    rng = np.random.default_rng(0)
    S = rng.normal(size=(50, 7))
    S[3] = np.nan  # a dead neuron: no score
    best = [max(row) for row in S.tolist() if not any(math.isnan(v) for v in row)]
    assert dissect.random_cutoff(S) == pytest.approx(float(np.quantile(best, 0.95)))
    assert dissect.random_cutoff(S, 0.5) == pytest.approx(float(np.median(best)))
    assert dissect.random_cutoff(np.full((4, 3), np.nan)) == math.inf


def test_random_copy_is_an_untrained_seeded_twin_of_the_architecture() -> None:
    import models

    torch.manual_seed(5)
    model = models.build("resnet18_world", U=2, num_classes=64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.fill_(3.0)
                m.running_var.fill_(7.0)
    a, b = models.random_copy(model), models.random_copy(model)
    assert [n for n, _ in a.named_modules()] == [n for n, _ in model.named_modules()]
    assert models.model_hash(a) == models.model_hash(b) != models.model_hash(model)
    assert models.model_hash(models.random_copy(model, seed=1)) != models.model_hash(a)
    bn = next(m for m in a.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert float(bn.running_mean.abs().max()) == 0 and float((bn.running_var - 1).abs().max()) == 0
    assert not a.training and model.conv1.weight.data_ptr() != a.conv1.weight.data_ptr()
    vit = models.build("deit_world", U=8, num_classes=64)
    with torch.no_grad():
        vit.cls_token.fill_(1.0)
    r = models.random_copy(vit)
    assert 0 < float(r.cls_token.abs().max()) <= 0.04 and float(r.cls_token.std()) > 0.005
