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
    model = lwta.build("deit_world", U=4, num_classes=64)
    lwta.save(model, tmp / "run", {"arch": "deit_world", "U": 4, "num_classes": 64, "img_size": 64,
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
    model, _ = lwta.load(setup / "run")
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
    res = dissect.dissect(_cfg(setup))
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
