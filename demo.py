"""The offline demo: the whole DISCOVER story on the synthetic world, in resumable stages.

Stages (each reuses the output of an earlier run; an interrupted one resumes where it stopped):
    1. train   deit_world --U 8 and its GELU twin on the 64-class world task
    2. dissect  both models' last MLP layer and head with SoftWPMI (world-clip, concepts/world.txt,
                2 000 probe images of world seed 2)
    3. evaluate how true the labels are (final layer: class names; hidden layer: world attributes)
    4. explain  6 probe images with each model: the winning neurons and their concepts
    5. report   a static HTML site (``report.py``): figures, charts, neuron galleries, explanations
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import train
from common import DEMO_MARKER, REPO_DIR, DiscoverError, write_json_atomic

MARKER = DEMO_MARKER  # a demo output may be resumed into; a foreign directory is refused
SHIPPED = REPO_DIR / "checkpoints"  # small world checkpoints made by `discover.py train` (see meta.json)


@dataclass(frozen=True)
class DemoConfig:
    """The demo's models and data. deit_world tells the competition story: its MLP layer summarised by
    the CLS token has exactly K/U active neurons per image. (resnet18_world learns the task far better,
    96.7 % for its ReLU twin, but a ConvLWTA map averaged over positions has every unit active
    somewhere, so it cannot show a short list of winners.)"""

    out: Path
    arch: str = "deit_world"
    U: int = 8
    act: str = "gelu"  # the twin's activation
    epochs: int = train.RECIPES["deit_world"]["epochs"]
    train_size: int = 12_000
    val_size: int = 1_000
    seed: int = 0
    probe: str = "world:2000"
    layers: tuple[str, ...] = ("blocks.3.mlp.act", "head")
    from_scratch: bool = False


def _complete_meta(run: Path, epochs: int) -> dict[str, Any] | None:
    """The run's meta.json when it finished all ``epochs``, else None."""
    path = run / "meta.json"
    meta = json.loads(path.read_text()) if path.is_file() else {}
    return meta if meta.get("epoch") == epochs - 1 else None


def run_dir(cfg: DemoConfig, name: str) -> Path:
    """Where model ``name`` ("cvn" / "twin") lives: the shipped checkpoint, or the demo's own run."""
    shipped = SHIPPED / f"{cfg.arch}_{'u' + str(cfg.U) if name == 'cvn' else cfg.act}"
    meta = _complete_meta(shipped, cfg.epochs) if not cfg.from_scratch else None
    if meta and (shipped / "model.safetensors").is_file() \
            and meta.get("config", {}).get("train_size", cfg.train_size) == cfg.train_size:
        return shipped  # never trained into: another --epochs / --train-size gets a run of its own
    return cfg.out / "runs" / name


def train_models(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Stage 1: the CVN and its twin: the shipped checkpoints, or trained here (``from_scratch``,
    resumed from their last checkpoint if interrupted)."""
    metas = {}
    for name, kind in (("cvn", {"U": cfg.U}), ("twin", {"act": cfg.act})):
        run = run_dir(cfg, name)
        meta = _complete_meta(run, cfg.epochs)
        if meta is not None:
            metas[name] = meta
            continue
        tc = train.TrainConfig(arch=cfg.arch, data="world:object", out=str(run), epochs=cfg.epochs,
                               train_size=cfg.train_size, val_size=cfg.val_size, seed=cfg.seed, **kind)
        resume = train.latest_checkpoint(run) is not None
        metas[name] = train.train(tc, resume=resume, force=not resume)
    return metas


def dissect_models(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Stage 2: label both models' neurons (skipped when labels of the same run already exist)."""
    import dissect
    import record

    results = {}
    for name in ("cvn", "twin"):
        run, out = run_dir(cfg, name), cfg.out / "labels" / name
        labels = out / "labels.json"
        if labels.is_file():
            prov = dissect.read_labels(out)["provenance"]
            if prov["model_hash"] == record.model_hash(record.load_model(str(run))[0]) and prov["probe"] == cfg.probe:
                results[name] = {"out": str(out), "cached": True}
                continue
        results[name] = dissect.dissect(dissect.DissectConfig(model=str(run), layers=list(cfg.layers),
                                                              probe=cfg.probe, out=str(out)))
    return results


def evaluate_models(cfg: DemoConfig) -> dict[str, Any]:
    """Stage 3: label quality of both models, side by side (CLIP-Dissect Sec. 4.2 + world AUROC)."""
    import evaluate

    res = evaluate.jsonable(evaluate.evaluate([str(cfg.out / "labels" / n) for n in ("cvn", "twin")]))
    write_json_atomic(cfg.out / "evaluation.json", res)
    return res


def explain_images(cfg: DemoConfig, n: int = 6) -> dict[str, list[dict[str, Any]]]:
    """Stage 4: the active neurons of the last MLP layer for ``n`` probe images, per model."""
    import dissect
    import explain
    import record

    seed = int(cfg.probe.split(":")[2]) if cfg.probe.count(":") == 2 else 2
    out: dict[str, list[dict[str, Any]]] = {}
    for name in ("cvn", "twin"):
        model, meta = record.load_model(str(run_dir(cfg, name)))
        labels = dissect.read_labels(cfg.out / "labels" / name)
        out[name] = [explain.explain_image(model, meta, labels, cfg.layers[0], f"world:{seed}:{i}", seed=cfg.seed)
                     for i in range(n)]
    write_json_atomic(cfg.out / "explanations.json", out)
    return out


def run(cfg: DemoConfig, force: bool = False) -> dict[str, Any]:
    out = cfg.out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not force:
        raise DiscoverError(f"--out {out} is not empty and not a demo directory; pass --force to use it")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python discover.py demo\n")
    metas = train_models(cfg)
    dissect_models(cfg)
    evaluation = evaluate_models(cfg)
    explanations = explain_images(cfg)
    summary = {
        name: {"run": str(run_dir(cfg, name)), "U": m.get("U"), "act": m.get("act"),
               "val_top1": m["metrics"]["val_top1"], "val_top1_argmax": m["metrics"]["val_top1_argmax"],
               "test": m.get("test"), "train_seconds": m.get("train_seconds")}
        for name, m in metas.items()
    }
    for name in summary:
        rows = [r for r in evaluation["runs"] if r["labels"].endswith(f"labels/{name}")]
        for r in rows:
            key = "output" if r.get("output_layer") else "hidden"
            summary[name][f"{key}_layer"] = r["layer"]
            if r.get("output_layer"):
                summary[name]["final_layer_accuracy"] = r["output_layer"].get("accuracy_percent")
            else:
                summary[name]["hidden_layer_accuracy"] = (r.get("world") or {}).get("hidden_accuracy_percent")
                summary[name]["selective_neurons"] = (r.get("world") or {}).get("selective")
                summary[name]["active_per_example"] = r["active_per_example"]
                summary[name]["K"] = r["K"]
        summary[name]["explained"] = [{"image": e["image"], "prediction": e["prediction"]["class"],
                                       "n_active": e["n_active"]} for e in explanations[name]]
    write_json_atomic(out / "summary.json", summary)
    import report

    report.build(out, out / "report")
    return summary
