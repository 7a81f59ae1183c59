"""schema.py: labels.json and meta.json read and written in one place, old formats read with the
defaults their writers implied, and nothing lost on a round trip."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import schema
from common import DiscoverError


def _labels_json() -> dict:
    """A format-5 labels.json as dissect writes it (hand-written here), with a key no record knows."""
    prov = {"format": 5, "model": "runs/x", "model_args": {"arch": "deit_world"}, "model_hash": "ab" * 32,
            "arch": "deit_world", "classes": ["red circle"], "probe": "world:10:4", "probe_fingerprint": "f" * 16,
            "probe_n": 10, "probe_names": [f"{i}.png" for i in range(10)], "concepts": "world", "n_concepts": 99,
            "clip": "world-clip", "clip_fingerprint": "c" * 16, "similarity": "auto", "cutoff": "random",
            "mode": "sample", "signal": "pi", "seed": 0, "summary": "auto", "skip_bad": False,
            "gallery_share": 0.8, "truth_threshold": 0.1, "future_key": [1, 2]}
    layers = {"blocks.3.mlp.act": {"K": 2, "U": 2, "summary": "cls", "signal": "pi", "similarity": "wpmi", "dead": 1,
                                   "gallery_share": 0.8, "cutoff": 0.05, "cutoff_from": "random copy",
                                   "interpretable": 1, "simulation": {"corr_mean": 0.3}, "activations": "/tmp/a"}}
    neurons = [{"layer": "blocks.3.mlp.act", "unit": 0, "block": 0, "competitor": 0, "active_rate": 0.5,
                "dead": False, "top_images": [3, 1], "signal_mean": 0.4, "signal_std": 0.2, "description": "red",
                "similarity": 0.12, "top_concepts": [["red", 0.12], ["blue", 0.01]], "interpretable": True,
                "gallery_checked": True, "confidence": [[0.1, 0.3], [0.9, 0.8]], "base_rate": 0.25,
                "simulation": {"label": "red", "corr": 0.5, "auprc": 0.7, "p": 0.01, "precision": 0.9,
                               "corr_truth": 0.6, "future": 1}},
               {"layer": "blocks.3.mlp.act", "unit": 1, "block": 0, "competitor": 1, "active_rate": 0.0,
                "dead": True, "top_images": [0, 2], "signal_mean": 0.0, "signal_std": 0.0, "description": "",
                "similarity": None, "top_concepts": [], "interpretable": False, "simulation": None,
                "confidence": None, "base_rate": None}]
    return {"provenance": prov, "layers": layers, "neurons": neurons}


def test_a_labels_file_reads_into_records_and_writes_back_unchanged(tmp_path: Path) -> None:
    d = _labels_json()
    (tmp_path / "labels.json").write_text(json.dumps(d))
    lab = schema.Labels.read(tmp_path)
    assert lab.provenance.signal == "pi" and lab.provenance.extra == {"future_key": [1, 2]}
    info = lab.layers["blocks.3.mlp.act"]
    assert (info.K, info.U, info.cutoff, info.cutoff_from) == (2, 2, 0.05, "random copy")
    n0, n1 = lab.neurons_of("blocks.3.mlp.act")
    assert n0.simulation == schema.Simulation("red", 0.5, 0.7, 0.01, 0.9, corr_truth=0.6, extra={"future": 1})
    assert n0.top_concepts[0] == ["red", 0.12] and n0.confidence == [[0.1, 0.3], [0.9, 0.8]] and n0.base_rate == 0.25
    assert n1.dead and math.isnan(n1.similarity) and n1.simulation is None
    back = json.loads(lab.to_json())
    d["neurons"][1]["similarity"] = math.nan  # a dead unit's score is NaN in memory and in the file
    d["neurons"][1]["gallery_checked"] = None  # a field the writer leaves out reads as None
    assert json.dumps(back, sort_keys=True) == json.dumps(d, sort_keys=True)


def test_old_formats_read_with_the_defaults_their_writers_implied() -> None:
    """Before format 3 a layer had no cutoff of its own: SoftWPMI layers used the provenance's fixed
    cutoff (0.16 when it names none), other layers none; before the signal option, LWTA layers
    recorded sampled outputs and a layer's signal was the provenance's."""
    old = {"provenance": {"model_hash": "ab", "similarity": "soft_wpmi"},
           "layers": {"act": {"K": 4, "U": 2}, "head": {"K": 3, "similarity": "cos3"}},
           "neurons": [{"layer": "act", "unit": 0, "description": "red", "similarity": 0.2}]}
    lab = schema.Labels.from_dict(old)
    assert lab.provenance.signal == "sample" and lab.provenance.mode == "sample" and lab.provenance.seed == 0
    assert lab.layers["act"].cutoff == 0.16 and lab.layers["act"].signal == "sample"
    assert lab.layers["act"].similarity == "soft_wpmi"
    assert lab.layers["head"].cutoff is None and lab.layers["head"].signal == "output"
    assert lab.neurons[0].signal_std is None and lab.neurons[0].top_images == []
    nulls = schema.Neuron.from_dict({"layer": "act", "unit": 1, "description": None, "top_images": None,
                                     "dead": None, "similarity": None, "interpretable": None})
    assert (nulls.description, nulls.top_images, nulls.dead, nulls.interpretable) == ("", [], False, None)
    assert math.isnan(nulls.similarity)
    fixed = schema.Labels.from_dict({**old, "provenance": {**old["provenance"], "cutoff": 0.3}})
    assert fixed.layers["act"].cutoff == 0.3


@pytest.mark.parametrize("text, message", [
    (None, "`labels` .*: no labels.json"),
    ("{", "not valid JSON"),
    ('{"layers": {}}', "lacks layers/neurons"),
    ('{"provenance": {}, "layers": {"a": {"U": 2}}, "neurons": []}', "does not match the labels format"),
])
def test_a_bad_labels_file_is_a_one_line_error(tmp_path: Path, text: str | None, message: str) -> None:
    if text is not None:
        (tmp_path / "labels.json").write_text(text)
    with pytest.raises(DiscoverError, match=message) as e:
        schema.Labels.read(tmp_path)
    assert "\n" not in str(e.value)


def test_model_meta_keeps_the_training_record(tmp_path: Path) -> None:
    d = {"arch": "deit_world", "U": 8, "act": None, "num_classes": 64, "img_size": 64, "classes": ["a"],
         "mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2], "epoch": 29, "metrics": {"val_top1": 92.1},
         "reproduce": "python discover.py train --arch deit_world"}
    (tmp_path / "meta.json").write_text(json.dumps(d))
    meta = schema.ModelMeta.read(tmp_path / "meta.json")
    assert (meta.arch, meta.U, meta.img_size, meta.interpolation) == ("deit_world", 8, 64, "bilinear")
    assert meta.extra == {"epoch": 29, "metrics": {"val_top1": 92.1}, "reproduce": d["reproduce"]}
    meta.write(tmp_path / "again.json")
    back = json.loads((tmp_path / "again.json").read_text())
    assert back == {**d, "interpolation": "bilinear", "spec": None}
    bare = schema.ModelMeta(arch="x")  # ImageNet normalisation unless told otherwise
    assert bare.mean == list(schema.IMAGENET_MEAN) and bare.std == list(schema.IMAGENET_STD)
    (tmp_path / "bad.json").write_text('{"U": 8}')
    with pytest.raises(DiscoverError, match="names no arch"):
        schema.ModelMeta.read(tmp_path / "bad.json")
