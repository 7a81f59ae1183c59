"""Click's own usage errors are one line on stderr with exit code 2, and a mistyped choice names
the closest one."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "discover.py"), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("args, expected", [
    (["dissect", "--model", "m", "--layers", "l", "--out", "OUT", "--similarity", "softwpmi"],
     "did you mean 'soft_wpmi'?"),
    (["explain", "world:2:0", "--model", "m", "--labels", "l", "--sort", "activations"], "did you mean 'activation'?"),
    (["train", "--arch", "deit_world", "--U", "8", "--out", "OUT"], "Missing option '--data'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["layers", "--arch", "deit_world", "--U", "eight"], "'eight' is not a valid integer"),
    (["layers", "--arch", "deit_world", "--U", "8", "--num-classes", "-5"], "--num-classes must be an integer >= 1"),
    (["layers", "--arch", "deit_world", "--U", "8", "--num-classes", "0"], "--num-classes must be an integer >= 1"),
    pytest.param(["dissect", "--model", "checkpoints/deit_world_u8", "--layers", "head", "--out", "OUT", "--device",
                  "cuda:0"], "--device cuda:0: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")),
    (["explain", "world:2:0", "--model", "checkpoints/deit_world_u8", "--labels", "nowhere", "--device", "gpu"],
     "--device gpu: not a torch device"),
    (["evaluate", "nowhere", "--device", "tpu0"], "--device tpu0: not a torch device"),
])
def test_usage_errors_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    r = _cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    usage = "must be" not in expected and "--device" not in expected  # Click's own errors point to --help
    assert expected in lines[0] and ("--help" in lines[0]) == usage
    assert not (tmp_path / "out").exists() and r.stdout == ""


@pytest.mark.parametrize("args, expected", [
    (["world", "export", "OUT", "--n", "2", "--seed", "-1"], "'--seed': -1 is not in the range x>=0"),
    (["world", "train-clip", "--out", "OUT", "--steps", "1", "--seed", "-1"], "'--seed': -1 is not in the range"),
    (["dissect", "--model", "checkpoints/deit_world_u8", "--layers", "head", "--probe", "world:10:-1", "--out", "OUT"],
     "--probe world:10:-1: SEED must be 0 or more"),
    (["train", "--arch", "deit_world", "--U", "5", "--data", "world:object", "--out", "OUT"], "not divisible by U=5"),
    (["train", "--arch", "deit_world", "--U", "8", "--data", "world:bogus", "--out", "OUT"],
     "--data world:bogus: unknown task"),
    (["layers", "--arch", "deit_world"], "give --U N (a CVN) or --act gelu|relu"),
    (["world", "zeroshot", "--n", "3", "--device", "bogus"], "--device bogus: not a torch device"),
    (["dissect", "--model", "checkpoints/deit_world_u8", "--layers", "nope", "--out", "OUT"],
     "python discover.py record --list-layers --model MODEL"),
    (["report", "RESULTS", "--out", "OUT"], "RESULTS {results}: labels.json lacks layers/neurons"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, args: list[str], expected: str) -> None:
    """Negative seeds (flags and a probe's), a run's options checked before its folder is made,
    errors that name the user's own argument (RESULTS, not a flag the command lacks)."""
    results = tmp_path / "results"
    results.mkdir()
    (results / "labels.json").write_text("{}")
    args = [str(tmp_path / "out") if a == "OUT" else str(results) if a == "RESULTS" else a for a in args]
    r = _cli(*args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected.format(results=results) in lines[0], lines[0]
    assert not (tmp_path / "out").exists() and "Traceback" not in r.stderr


def test_a_weights_file_takes_arch_and_class_names_in_dissect_explain_and_evaluate(tmp_path: Path) -> None:
    """A bare weights file works in every command that runs a model, given --arch/--U, and a
    --class-names file (ImageFolder spelling, underscores) names the outputs for the output-layer
    accuracy; evaluate reloads the file with the dissection's own arguments."""
    import csv
    import json

    import world

    weights = ROOT / "checkpoints" / "deit_world_u8" / "model.safetensors"
    names = tmp_path / "classes.txt"
    classes = [c.replace(" ", "_") for c in world.TASKS["object"]]
    names.write_text("\n".join(classes) + "\n")
    out = tmp_path / "labels"
    common = ["--arch", "deit_world", "--U", "8"]
    r = _cli("dissect", "--model", str(weights), *common, "--class-names", str(names), "--layers",
             "head,blocks.3.mlp.act", "--probe", "world:300:4", "--out", str(out))
    assert r.returncode == 0, r.stderr
    prov = json.loads((out / "labels.json").read_text())["provenance"]
    assert prov["model_args"] == {"arch": "deit_world", "U": 8, "class_names": str(names.resolve())}
    assert prov["classes"] == classes
    r = _cli("explain", "world:4:0", "--model", str(weights), *common, "--labels", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["layer"] == "blocks.3.mlp.act"
    r = _cli("evaluate", str(out), "--explain-images", "0", "--json")
    assert r.returncode == 0, r.stderr
    (head,) = [row for row in json.loads(r.stdout)["runs"] if row["layer"] == "head"]
    acc = head["output_layer"]["accuracy_percent"]
    # the labels of head against the class names, compared by hand: "red circle" is class red_circle
    with open(out / "descriptions.csv", newline="") as f:
        labels = {int(row["unit"]): row["description"] for row in csv.DictReader(f) if row["layer"] == "head"}
    want = 100 * sum(labels[i].replace(" ", "_") == c for i, c in enumerate(classes)) / len(classes)
    assert acc == pytest.approx(want) and acc > 50
    # a file with the wrong number of names: one line naming the flag
    names.write_text("red_circle\nblue_square\n")
    r = _cli("explain", "world:4:0", "--model", str(weights), *common, "--labels", str(out), "--class-names", str(names))
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: --class-names {names}: 2 class names for a model with 64 outputs"]


def test_synset_class_names_read_as_their_first_lemma() -> None:
    """ImageNet folder names (WordNet synset ids) become words by timm's own lemma table, read here
    directly; other names are kept."""
    import timm.data
    import concepts

    table = Path(timm.data.__file__).parent / "_info" / "imagenet_synset_to_lemma.txt"
    lemma = dict(line.split("\t") for line in table.read_text().splitlines())
    ids = ["n01440764", "n02102040", "n04592741"]
    got = concepts.readable_class_names(ids + ["my_class", "n123"])
    assert got == [lemma[i].split(",")[0].strip() for i in ids] + ["my_class", "n123"]
    assert got[0] == "tench" and concepts.readable_class_names(["a", "b"]) == ["a", "b"]


def test_dissect_gallery_share_default_is_the_library_s() -> None:
    import dissect
    from discover import cli

    (option,) = [p for p in cli.commands["dissect"].params if p.name == "gallery_share"]
    assert option.default == dissect.GALLERY_SHARE
