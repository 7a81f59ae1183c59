"""The offline demo: the whole DISCOVER story on the synthetic world, in resumable stages.

Stages (each reuses the output of an earlier run; an interrupted one resumes where it stopped):
    1. train    two CVN / twin pairs on the 64-class world task: deit_world --U 8 and its GELU twin
                (the main story), resnet18_world --U 2 and its ReLU twin (the shipped checkpoints,
                or trained here with ``from_scratch``)
    2. dissect  each model's last LWTA/activation layer and its output layer (world-clip,
                concepts/world.txt, 2 000 probe images of world seed 2; the default signal and
                similarity of ``dissect``)
    3. evaluate how true the labels are (the world's ground truth), how decided the competitions
                are, and how many listed concepts of an explained image fit that image
    4. explain  6 probe images with each model: the winning neurons and their concepts
    5. report   a static HTML site (``report.py``): figures, charts, neuron galleries, explanations
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import train
from common import DEMO_MARKER, REPO_DIR, DiscoverError, write_json_atomic
from schema import LABELS_FORMAT, Labels, ModelMeta

MARKER = DEMO_MARKER  # a demo output may be resumed into; a foreign directory is refused
SHIPPED = REPO_DIR / "checkpoints"  # small world checkpoints made by `discover.py train` (see meta.json)


@dataclass(frozen=True)
class DemoModel:
    """One model of the demo: ``name`` (its labels directory), an arch, ``U`` (a CVN) or ``act``
    (its twin), the two layers dissected (the last LWTA / activation layer, the output layer)."""

    name: str
    arch: str
    U: int | None
    act: str | None
    layers: tuple[str, str]

    @property
    def shipped(self) -> Path:
        return SHIPPED / f"{self.arch}_{'u' + str(self.U) if self.U else self.act}"

    @property
    def epochs(self) -> int:
        return train.resolve(train.TrainConfig(arch=self.arch, data="world:object", out="-", U=self.U,
                                               act=self.act)).epochs


def demo_models(U: int = 8) -> tuple[DemoModel, ...]:
    """deit_world tells the competition story: its class-token MLP layer has exactly K/U winners per
    image. resnet18_world shows it at every position of a conv map (a unit's spatial-mean signal is
    its win rate over the map)."""
    deit = ("blocks.3.mlp.act", "head")
    res = ("layer4.0.act2", "fc")
    return (DemoModel("cvn", "deit_world", U, None, deit), DemoModel("twin", "deit_world", None, "gelu", deit),
            DemoModel("r18_cvn", "resnet18_world", 2, None, res),
            DemoModel("r18_twin", "resnet18_world", None, "relu", res))


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    U: int = 8
    epochs: int | None = None  # None: each recipe's own (those of the shipped checkpoints)
    train_size: int = 12_000
    val_size: int = 1_000
    seed: int = 0
    probe: str = "world:2000"
    explain_n: int = 6
    from_scratch: bool = False

    @property
    def models(self) -> tuple[DemoModel, ...]:
        return demo_models(self.U)

    def epochs_of(self, m: DemoModel) -> int:
        return self.epochs or m.epochs


def _complete_meta(run: Path, epochs: int) -> dict[str, Any] | None:
    """The run's meta.json when it finished all ``epochs``, else None."""
    path = run / "meta.json"
    meta = ModelMeta.read(path).to_dict() if path.is_file() else {}
    return meta if meta.get("epoch") == epochs - 1 else None


def run_dir(cfg: DemoConfig, m: DemoModel) -> Path:
    """Where model ``m`` lives: the shipped checkpoint, or the demo's own run."""
    meta = _complete_meta(m.shipped, cfg.epochs_of(m)) if not cfg.from_scratch else None
    if meta and (m.shipped / "model.safetensors").is_file() \
            and meta.get("config", {}).get("train_size", cfg.train_size) == cfg.train_size:
        return m.shipped  # never trained into: another --epochs / --train-size gets a run of its own
    return cfg.out / "runs" / m.name


def train_models(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Stage 1: every model: the shipped checkpoint, or trained here (``from_scratch``, resumed
    from its last checkpoint if interrupted)."""
    metas = {}
    for m in cfg.models:
        run = run_dir(cfg, m)
        meta = _complete_meta(run, cfg.epochs_of(m))
        if meta is not None:
            metas[m.name] = meta
            continue
        tc = train.TrainConfig(arch=m.arch, data="world:object", out=str(run), epochs=cfg.epochs_of(m),
                               train_size=cfg.train_size, val_size=cfg.val_size, seed=cfg.seed, U=m.U, act=m.act)
        resume = train.latest_checkpoint(run) is not None
        metas[m.name] = train.train(tc, resume=resume, force=not resume)
    return metas


def dissect_models(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Stage 2: label each model's neurons (skipped when labels of the same run, probe and signal exist)."""
    import dissect
    import models

    results = {}
    defaults = dissect.DissectConfig(model="", layers=[])
    for m in cfg.models:
        run, out = run_dir(cfg, m), cfg.out / "labels" / m.name
        if (out / "labels.json").is_file():
            prov = Labels.read(out).provenance
            same = (prov.model_hash == models.model_hash(models.load_model(str(run))[0])
                    and prov.probe == cfg.probe and prov.signal == defaults.signal
                    and prov.similarity == defaults.similarity
                    and prov.gallery_share in (defaults.gallery_share, None)
                    and prov.format == LABELS_FORMAT
                    and prov.clip_fingerprint == _clip_fingerprint())
            if same:
                results[m.name] = {"out": str(out), "cached": True}
                continue
        results[m.name] = dissect.dissect(dissect.DissectConfig(model=str(run), layers=list(m.layers),
                                                                probe=cfg.probe, out=str(out), score=True))
    return results


@functools.cache
def _clip_fingerprint() -> str:
    """The default CLIP's fingerprint (loaded once per process, not once per model)."""
    import clip_backend

    return clip_backend.load_clip().fingerprint


def evaluate_models(cfg: DemoConfig) -> dict[str, Any]:
    """Stage 3: label quality, winner certainty and explanation precision of every model."""
    import evaluate

    res = evaluate.jsonable(evaluate.evaluate([str(cfg.out / "labels" / m.name) for m in cfg.models]))
    write_json_atomic(cfg.out / "evaluation.json", res)
    return res


def explain_images(cfg: DemoConfig) -> dict[str, list[dict[str, Any]]]:
    """Stage 4: the winners of each model's dissected hidden layer for ``explain_n`` probe images,
    with maps of where the first 7 of them act (``explain.write_maps``, in ``OUT/maps/MODEL``)."""
    import explain
    import models
    import probes

    seed = probes.load_probe(cfg.probe).world_seed
    out: dict[str, list[dict[str, Any]]] = {}
    for m in cfg.models:
        model, meta = models.load_model(str(run_dir(cfg, m)))
        labels = Labels.read(cfg.out / "labels" / m.name)
        out[m.name] = []
        for i in range(cfg.explain_n):
            image = f"world:{seed}:{i}"
            res = explain.explain_image(model, meta, labels, m.layers[0], image, seed=cfg.seed, samples=4)
            written = explain.write_maps(model, meta, res, image, cfg.out / "maps" / m.name, seed=cfg.seed)
            res["maps"] = {str(k): str(Path(v).relative_to(cfg.out)) for k, v in written.items()}
            out[m.name].append(res)
    write_json_atomic(cfg.out / "explanations.json", out)
    return out


def summarise(cfg: DemoConfig, metas: dict[str, dict[str, Any]], evaluation: dict[str, Any],
              explanations: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """One record per model: accuracy, and the label / competition figures of its two layers."""
    summary: dict[str, dict[str, Any]] = {}
    for m in cfg.models:
        meta = metas[m.name]
        s: dict[str, Any] = {"run": str(run_dir(cfg, m)), "arch": m.arch, "U": meta.get("U"), "act": meta.get("act"),
                             "val_top1": meta["metrics"]["val_top1"],
                             "val_top1_argmax": meta["metrics"]["val_top1_argmax"],
                             "test": meta.get("test"), "train_seconds": meta.get("train_seconds")}
        for r in (r for r in evaluation["runs"] if Path(r["labels"]).name == m.name):
            if r.get("output_layer"):
                s.update(output_layer=r["layer"], final_layer_accuracy=r["output_layer"].get("accuracy_percent"))
                continue
            w, ti, ex, ez, ec, eg, c = (r.get(k) or {} for k in ("world", "top_images", "explanations", "explanations_z",
                                                                  "explanations_confidence", "explanations_gain",
                                                                  "certainty"))
            s.update(hidden_layer=r["layer"], signal=r.get("signal"), similarity=r.get("similarity"),
                     hidden_layer_accuracy=w.get("hidden_accuracy_percent"), selective_neurons=w.get("selective"),
                     class_only_neurons=w.get("class_only"), class_units=w.get("class_units"),
                     class_aware_accuracy=w.get("class_aware_percent"),
                     selective_top=ti.get("selective"), named_right=ti.get("right_percent"),
                     names_world=ti.get("world_percent"), explanation_precision=ex.get("precision_percent"),
                     explanation_precision_z=ez.get("precision_percent"),
                     explanation_precision_confidence=ec.get("precision_percent"),
                     explanation_precision_gain=eg.get("precision_percent"),
                     max_pi=c.get("max_pi"), agree4=c.get("agree4"),
                     active_per_example=r["active_per_example"], K=r["K"])
        s["explained"] = [{"image": e["image"], "prediction": e["prediction"]["class"], "n_active": e["n_active"]}
                          for e in explanations[m.name]]
        summary[m.name] = s
    return summary


def run(cfg: DemoConfig, force: bool = False) -> dict[str, Any]:
    out = cfg.out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not force:
        raise DiscoverError(f"`out` {out} is not empty and not a demo directory; pass `force` to use it")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python discover.py demo\n")
    metas = train_models(cfg)
    dissect_models(cfg)
    evaluation = evaluate_models(cfg)
    explanations = explain_images(cfg)
    summary = summarise(cfg, metas, evaluation, explanations)
    write_json_atomic(out / "summary.json", summary)
    import report

    report.build(out, out / "report")
    return summary
