"""explain: the active neurons of one image, with their concepts, sorted by activation (SPEC §4).

A hand-built network whose unit responses are known on paper: 2 x 2 images, normalisation off
(x = pixel / 255), fc1 row k = c_k * mean(x) + b_k, an LWTA(U=2) (or its GELU twin), a 3-class head.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner
from PIL import Image

import explain
import lwta
import models
import probes
import schema
from common import DiscoverError

ROOT = Path(__file__).resolve().parent.parent
C = np.array([2.0, -1.0, 1.0, 3.0])
B = np.array([-2.0, -0.5, -0.3, -1.0])
CONCEPTS = ["red", "blue", "striped", "circle"]
SCORES = [0.5, 0.1, 0.3, 0.2]
META = schema.ModelMeta(arch="tiny", img_size=2, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0], classes=["a", "b", "c"])


def tiny(act: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(flat=nn.Flatten(), fc1=nn.Linear(12, 4), act=act, head=nn.Linear(4, 3)))
    with torch.no_grad():
        model.fc1.weight.copy_(torch.tensor(C, dtype=torch.float32)[:, None].expand(4, 12) / 12)
        model.fc1.bias.copy_(torch.tensor(B, dtype=torch.float32))
    return model.eval()


def labels_for(model: nn.Module, layers=("act", "head")) -> schema.Labels:
    neurons = [{"layer": "act", "unit": k, "description": CONCEPTS[k], "similarity": SCORES[k],
                "top_concepts": [[CONCEPTS[k], SCORES[k]]], "interpretable": SCORES[k] > 0.16, "dead": False}
               for k in range(4)]
    neurons += [{"layer": "head", "unit": k, "description": c, "similarity": 0.9, "dead": False}
                for k, c in enumerate(META.classes)]
    return schema.Labels.from_dict(
        {"provenance": {"model": "tiny", "model_hash": models.model_hash(model), "classes": META.classes,
                        "summary": "auto", "cutoff": 0.16},
         "layers": {name: {"K": 4 if name == "act" else 3, "summary": "auto"} for name in layers},
         "neurons": neurons})


def grey(tmp_path: Path, value: int) -> Path:
    path = tmp_path / f"grey{value}.png"
    Image.fromarray(np.full((2, 2, 3), value, np.uint8)).save(path)
    return path


# pixel 204 -> mean(x) 0.8 -> h = [-0.4, -1.3, 0.5, 1.4]: block winners 0 (-0.4) and 3 (1.4)
# pixel  51 -> mean(x) 0.2 -> h = [-1.6, -0.7, -0.1, -0.4]: block winners 1 (-0.7) and 2 (-0.1)
@pytest.mark.parametrize("pixel, units, acts", [(204, [3, 0], [1.4, -0.4]), (51, [2, 1], [-0.1, -0.7])])
def test_cvn_lists_exactly_the_block_winners_sorted(tmp_path: Path, pixel: int, units, acts) -> None:
    h = C * pixel / 255 + B
    winners = [int(np.argmax(h[b * 2:b * 2 + 2])) + b * 2 for b in range(2)]
    assert sorted(winners) == sorted(units)  # the hand computation above
    model = tiny(lwta.LWTA(2))
    res = explain.explain_image(model, META, labels_for(model), None, grey(tmp_path, pixel), 1, "argmax", 0)
    assert res["layer"] == "act"  # default: the last LWTA layer of the labels
    assert [n["unit"] for n in res["neurons"]] == units
    np.testing.assert_allclose([n["activation"] for n in res["neurons"]], acts, atol=1e-5)
    assert [n["concept"] for n in res["neurons"]] == [CONCEPTS[k] for k in units]
    assert [n["score"] for n in res["neurons"]] == [SCORES[k] for k in units]
    assert [(n["block"], n["competitor"]) for n in res["neurons"]] == [(k // 2, k % 2) for k in units]
    assert res["n_active"] == 2 and res["K"] == 4 and res["U"] == 2
    with torch.no_grad():
        y = lwta.set_mode(model, "argmax")(torch.full((1, 3, 2, 2), pixel / 255))[0]
    assert res["prediction"]["class"] == META.classes[int(y.argmax())]
    assert res["prediction"]["probability"] == pytest.approx(float(torch.softmax(y, 0).max()), abs=1e-5)


@pytest.mark.parametrize("pixel, units", [(204, [3, 2]), (51, [])])  # GELU(h) > 0 iff h > 0
def test_gelu_twin_lists_every_positive_neuron(tmp_path: Path, pixel: int, units) -> None:
    model = tiny(nn.GELU())
    res = explain.explain_image(model, META, labels_for(model), "act", grey(tmp_path, pixel), 1, "sample", 0)
    h = torch.tensor(C * pixel / 255 + B)
    assert [n["unit"] for n in res["neurons"]] == units
    np.testing.assert_allclose([n["activation"] for n in res["neurons"]],
                               nn.functional.gelu(h)[units].numpy(), atol=1e-5)
    assert all(n["block"] is None for n in res["neurons"]) and res["U"] is None
    assert res["draws"] == 1  # no LWTA: nothing to sample


def test_sampled_win_rates(tmp_path: Path) -> None:
    model = tiny(lwta.LWTA(2))
    labels, img = labels_for(model), grey(tmp_path, 204)
    res = explain.explain_image(model, META, labels, "act", img, samples=400, mode="sample", seed=3)
    again = explain.explain_image(model, META, labels, "act", img, samples=400, mode="sample", seed=3)
    assert res == again  # seeded
    assert res["per_block"] and res["mean_active_per_draw"] == 2.0  # one winner per block and draw
    # x = 0.8: h = c * 0.8 + b = (-0.4, -1.3 | 0.5, 1.4); pi = softmax per block (Eq. 2)
    h = C * 0.8 + B
    p_first = 1 / (1 + math.exp(-(h[0] - h[1])))
    p_last = 1 / (1 + math.exp(-(h[3] - h[2])))
    rows = {n["unit"]: n for n in res["neurons"]}
    assert sorted(rows) == [0, 3]  # one row per block: the unit that won most draws
    assert rows[0]["pi"] == pytest.approx(p_first, abs=1e-5) and rows[3]["pi"] == pytest.approx(p_last, abs=1e-5)
    assert rows[0]["win_rate"] == pytest.approx(p_first, abs=0.08)  # 400 draws: 3.5 standard errors
    assert rows[3]["win_rate"] == pytest.approx(p_last, abs=0.08)
    for k, n in rows.items():  # a winner passes its linear response (Eq. 1)
        assert n["activation"] == pytest.approx(h[k], abs=1e-5) and n["block"] == k // 2
    assert [n["unit"] for n in res["neurons"]] == [3, 0]  # by signed activation, descending
    by_pi = explain.explain_image(model, META, labels, "act", img, samples=400, mode="sample", seed=3, sort="pi")
    assert [n["pi"] for n in by_pi["neurons"]] == sorted([n["pi"] for n in by_pi["neurons"]], reverse=True)


def test_world_reference_and_errors(tmp_path: Path) -> None:
    model = tiny(lwta.LWTA(2))
    labels = labels_for(model)
    res = explain.explain_image(model, META, labels, "act", "world:2:5", 1, "argmax", 0)
    assert res["image"] == "world:2:5" and res["n_active"] == 2
    for bad, match in [("world:2", "world:SEED:INDEX"), (tmp_path / "none.png", "no such file")]:
        with pytest.raises(DiscoverError, match=match):
            explain.explain_image(model, META, labels, "act", bad, 1, "argmax", 0)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(DiscoverError, match="not a readable image"):
        explain.explain_image(model, META, labels, "act", tmp_path / "notes.png", 1, "argmax", 0)
    with pytest.raises(DiscoverError, match="samples"):
        explain.explain_image(model, META, labels, "act", "world:2:5", 0, "argmax", 0)
    with pytest.raises(DiscoverError, match="not in the labels"):
        explain.explain_image(model, META, labels, "fc1", "world:2:5", 1, "argmax", 0)
    twin = tiny(nn.GELU())  # same parameters, other structure: other hash
    with pytest.raises(DiscoverError, match="another model"):
        explain.explain_image(twin, META, labels, "act", "world:2:5", 1, "argmax", 0)
    assert explain.default_layer(twin, labels_for(twin, layers=("head", "act"))) == "head"  # no LWTA: first


# --- the CLI on a tiny DeiT CVN: class-token winners, one-line errors -----------------------------

@pytest.fixture(scope="module")
def deit(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    torch.manual_seed(0)
    model = models.build("deit_world", U=4, num_classes=64)
    models.save(model, tmp / "run", {"arch": "deit_world", "U": 4, "num_classes": 64, "img_size": 64})
    model, meta = models.load_model(str(tmp / "run"))
    layer = "blocks.3.mlp.act"
    neurons = [{"layer": layer, "unit": k, "description": f"concept {k}", "similarity": 0.2, "dead": False,
                "interpretable": True} for k in range(384)]
    good = {"provenance": {"model": str(tmp / "run"), "model_hash": models.model_hash(model)},
            "layers": {layer: {"K": 384, "U": 4, "summary": "auto"}}, "neurons": neurons}
    for name, lab in (("labels", good), ("other", {**good, "provenance": {"model_hash": "0" * 64}})):
        (tmp / name).mkdir()
        (tmp / name / "labels.json").write_text(json.dumps(lab))
    return tmp, model, meta


def _cli(*args: str):
    import discover

    return CliRunner().invoke(discover.cli, list(args))


def test_cli_explains_the_class_token_winners(deit) -> None:
    tmp, model, meta = deit
    r = _cli("explain", "world:2:0", "world:2:1", "--model", str(tmp / "run"), "--labels", str(tmp / "labels"),
             "--mode", "argmax", "--json")
    assert r.exit_code == 0, r.output
    results = json.loads(r.stdout)
    assert len(results) == 2
    seen = {}
    model.blocks[3].mlp.act.register_forward_hook(lambda m, i, o: seen.__setitem__("cls", o[0, 0]))
    lwta.set_mode(model, "argmax")
    for i, res in enumerate(results):
        with torch.no_grad():
            model(models.to_input(explain.load_image(f"world:2:{i}", 64)[0][None], meta, torch.device("cpu")))
        cls = seen["cls"].numpy()
        expected = np.flatnonzero(cls)
        assert len(expected) == 96  # one winner per block of 4
        assert sorted(n["unit"] for n in res["neurons"]) == sorted(expected.tolist())
        assert [n["unit"] for n in res["neurons"]] == expected[np.argsort(-cls[expected], kind="stable")].tolist()
        assert len({n["block"] for n in res["neurons"]}) == 96
    r = _cli("explain", "world:2:0", "--model", str(tmp / "run"), "--labels", str(tmp / "labels"), "--samples", "3")
    assert r.exit_code == 0 and "active" in r.stdout and "wins" in r.stdout


def test_cli_bad_input_is_one_line(deit, tmp_path: Path) -> None:
    tmp, _, _ = deit
    (tmp_path / "text.jpg").write_text("hello")
    base = ["--model", str(tmp / "run"), "--labels", str(tmp / "labels")]
    for args, expected in [
        (["explain", str(tmp_path / "missing.png"), *base], "missing.png"),
        (["explain", str(tmp_path / "text.jpg"), *base], "text.jpg"),
        (["explain", "world:2:0", "--model", str(tmp / "run"), "--labels", str(tmp / "other")], "another model"),
        (["explain", "world:2:0", *base, "--layer", "blocks.2.mlp.act"], "not in the labels"),
        (["explain", "world:2:0", *base, "--samples", "0"], "--samples"),
        (["explain", "world:2:0", "--model", str(tmp / "run"), "--labels", str(tmp_path)], "labels.json"),
    ]:
        r = _cli(*args)
        assert r.exit_code == 2, (args, r.output)
        assert len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr, r.stderr


def test_cli_prints_paths_as_typed_and_keeps_every_images_maps(deit, tmp_path: Path) -> None:
    """Rich markup ([red]) and emoji codes (:smile:) in an image path reach the output unchanged,
    and two images of one file name in different folders get maps of their own (explain.map_stems)."""
    from PIL import Image

    import world

    tmp, _, _ = deit
    base = ["--model", str(tmp / "run"), "--labels", str(tmp / "labels")]
    odd = tmp_path / "[red]x:smile:.png"
    Image.fromarray(world.render(2, 5, 64).image).save(odd)
    r = subprocess.run([sys.executable, str(ROOT / "discover.py"), "explain", str(odd), *base, "--top", "1",
                        "--bottom", "0"], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "COLUMNS": "400"}, timeout=300)
    assert r.returncode == 0 and str(odd) in "".join(r.stdout.split()), r.stdout  # the title wraps
    r = _cli("explain", str(tmp_path / "none:smile:.png"), *base)
    assert r.exit_code == 2 and "none:smile:.png" in r.stderr, r.stderr
    for i, sub in enumerate(("a", "b")):
        (tmp_path / sub).mkdir()
        Image.fromarray(world.render(2, i, 64).image).save(tmp_path / sub / "img.png")
    r = _cli("explain", str(tmp_path / "a" / "img.png"), str(tmp_path / "b" / "img.png"), *base, "--top", "2",
             "--bottom", "0", "--maps", str(tmp_path / "maps"), "--json")
    assert r.exit_code == 0, r.output
    written = [set(res["maps"].values()) for res in json.loads(r.stdout)]
    assert len(written[0]) == len(written[1]) == 2 and not written[0] & written[1]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == sorted(Path(p).name for w in written for p in w)
    assert explain.map_stems(["a/img.png", "b/img.png", "world:2:17", "c/img.png"]) == \
        ["img.png", "img.png-2", "world-2-17", "img.png-3"]


def test_cli_subprocess_exit_code(deit) -> None:
    tmp, _, _ = deit
    r = subprocess.run([sys.executable, str(ROOT / "discover.py"), "explain", "nowhere.png", "--model",
                        str(tmp / "run"), "--labels", str(tmp / "labels")], capture_output=True, text=True,
                       cwd=ROOT, env={**os.environ}, timeout=300)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "nowhere.png" in r.stderr


def test_z_sort_ranks_units_by_their_signal_above_the_probe_mean(tmp_path: Path) -> None:
    """sort="z": (signal on this image - the unit's probe mean) / its probe std, with the labels'
    signal (pi for this CVN: softmax of the block's responses, Eq. 2; the output for a twin)."""
    img = grey(tmp_path, 204)  # h = [-0.4, -1.3, 0.5, 1.4]: argmax winners 0 and 3
    h = C * 0.8 + B
    pi = np.array([1 / (1 + math.exp(h[1] - h[0])), 0, 0, 1 / (1 + math.exp(h[2] - h[3]))])
    mean, std = [0.5, 0.2, 0.3, 0.7], [0.1, 0.2, 0.3, 0.01]
    model = tiny(lwta.LWTA(2))
    labels = labels_for(model)
    labels.layers["act"].signal = "pi"
    for n in labels.neurons[:4]:
        n.signal_mean, n.signal_std = mean[n.unit], std[n.unit]
    by_act = explain.explain_image(model, META, labels, "act", img, 1, "argmax", 0)
    by_z = explain.explain_image(model, META, labels, "act", img, 1, "argmax", 0, sort="z")
    assert [n["unit"] for n in by_act["neurons"]] == [3, 0]
    z = {k: (pi[k] - mean[k]) / std[k] for k in (0, 3)}  # 2.11 and 1.09
    assert [n["unit"] for n in by_z["neurons"]] == sorted(z, key=lambda k: -z[k]) == [0, 3]
    for n in by_z["neurons"]:
        assert n["z"] == pytest.approx(z[n["unit"]], rel=1e-4)
    twin = tiny(nn.GELU())
    tl = labels_for(twin)
    for n in tl.neurons[:4]:
        n.signal_mean, n.signal_std = mean[n.unit], std[n.unit]
    res = explain.explain_image(twin, META, tl, "act", img, 1, "sample", 0, sort="z")
    g = nn.functional.gelu(torch.tensor(h)).numpy()
    zt = {k: (g[k] - mean[k]) / std[k] for k in (2, 3)}  # the positive units
    assert [n["unit"] for n in res["neurons"]] == sorted(zt, key=lambda k: -zt[k])
    with pytest.raises(DiscoverError, match="`sort` must be one of"):
        explain.explain_image(model, META, labels, "act", img, 1, "argmax", 0, sort="rank")
    with pytest.raises(DiscoverError, match="no per-neuron signal statistics"):
        explain.explain_image(model, META, labels_for(model), "act", img, 1, "argmax", 0, sort="z")


def test_confidence_sort_reads_each_units_curve_at_its_signal(tmp_path: Path) -> None:
    """confidence = the unit's curve, linear between its points, at the unit's signal on the image
    (pi here); sort "confidence" (and "auto" when the labels have curves) orders by it."""
    img = grey(tmp_path, 204)  # h = [-0.4, -1.3, 0.5, 1.4]: argmax winners 0 and 3
    h = C * 0.8 + B
    pi0 = 1 / (1 + math.exp(h[1] - h[0]))  # 0.711
    pi3 = 1 / (1 + math.exp(h[2] - h[3]))  # 0.711 too: the two blocks' gaps are both 0.9
    model = tiny(lwta.LWTA(2))
    labels = labels_for(model)
    labels.layers["act"].signal = "pi"
    curves = {0: [[0.5, 0.2], [1.0, 0.6]], 3: [[0.0, 0.9], [0.6, 0.95], [0.8, 0.7]]}
    for n in labels.neurons[:4]:
        n.confidence = curves.get(n.unit)
    res = explain.explain_image(model, META, labels, "act", img, 1, "argmax", 0)  # sort "auto"
    assert res["sort"] == "confidence"
    want = {0: 0.2 + (pi0 - 0.5) / 0.5 * 0.4, 3: 0.95 + (pi3 - 0.6) / 0.2 * (0.7 - 0.95)}
    assert [n["unit"] for n in res["neurons"]] == sorted(want, key=lambda k: -want[k]) == [3, 0]
    for n in res["neurons"]:
        assert n["confidence"] == pytest.approx(want[n["unit"]], rel=1e-5)
        assert n["signal"] == pytest.approx(pi0 if n["unit"] == 0 else pi3, rel=1e-5)
    assert explain.confidence_at([[0.5, 0.2], [1.0, 0.6]], 2.0) == pytest.approx(0.6)  # beyond the ends: the ends
    assert explain.confidence_at([[0.5, 0.2], [1.0, 0.6]], 0.0) == pytest.approx(0.2)
    assert explain.confidence_at(None, 0.3) is None
    plain = explain.explain_image(model, META, labels_for(model), "act", img, 1, "argmax", 0)
    assert plain["sort"] == "activation" and all(n["confidence"] is None for n in plain["neurons"])
    with pytest.raises(DiscoverError, match="no confidence curves"):
        explain.explain_image(model, META, labels_for(model), "act", img, 1, "argmax", 0, sort="confidence")
    # gain = confidence minus the label's base rate; "auto" stays confidence
    rates = {0: 0.1, 3: 0.9}
    for n in labels.neurons[:4]:
        n.base_rate = rates.get(n.unit)
    assert explain.explain_image(model, META, labels, "act", img, 1, "argmax", 0)["sort"] == "confidence"
    res = explain.explain_image(model, META, labels, "act", img, 1, "argmax", 0, sort="gain")
    gain = {k: want[k] - rates[k] for k in want}
    assert [n["unit"] for n in res["neurons"]] == sorted(gain, key=lambda k: -gain[k]) == [0, 3]
    for n in res["neurons"]:
        assert n["gain"] == pytest.approx(gain[n["unit"]], rel=1e-5)
    with pytest.raises(DiscoverError, match="no base rates"):
        explain.explain_image(model, META, labels_for(model), "act", img, 1, "argmax", 0, sort="gain")


def test_one_rule_for_image_files(tmp_path: Path) -> None:
    """A probe folder and explain accept the same file names: a .gif is a probe image and an IMG;
    a .txt is neither."""
    folder = tmp_path / "probe"
    folder.mkdir()
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(folder / "a.gif")
    Image.fromarray(np.full((4, 4, 3), 100, np.uint8)).save(folder / "b.png")
    (folder / "notes.txt").write_text("x")
    assert probes.load_probe(str(folder)).names == ["a.gif", "b.png"]
    pixels, _ = explain.load_image(folder / "a.gif", 2)
    assert pixels.shape == (2, 2, 3)
    with pytest.raises(DiscoverError, match="not an image file name"):
        explain.load_image(folder / "notes.txt", 2)
