"""The offline demo: the whole DISCOVER story on the synthetic world, in resumable stages.

Stages (each reuses the output of an earlier run; an interrupted one resumes where it stopped):
    1. train   deit_world --U 8 and its GELU twin on the 64-class world task
    2. compare their accuracies (argmax and 4-sample posterior averaging)
Later stages (record, dissect, evaluate, explain, report) append to ``STAGES``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import train
from common import DiscoverError, write_json_atomic

MARKER = ".discover-demo"  # identifies a directory as a demo output (refuse foreign ones)


@dataclass(frozen=True)
class DemoConfig:
    out: Path
    U: int = 8
    epochs: int = 8
    train_size: int = 12_000
    val_size: int = 1_000
    seed: int = 0


def _run_is_complete(run: Path, epochs: int) -> bool:
    meta = run / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("epoch") == epochs - 1


def train_models(cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """Stage 1: the CVN and its twin (resumed from their last checkpoint if interrupted)."""
    metas = {}
    for name, kind in (("cvn", {"U": cfg.U}), ("twin", {"act": "gelu"})):
        run = cfg.out / "runs" / name
        if _run_is_complete(run, cfg.epochs):
            metas[name] = json.loads((run / "meta.json").read_text())
            continue
        tc = train.TrainConfig(arch="deit_world", data="world:object", out=str(run), epochs=cfg.epochs,
                               train_size=cfg.train_size, val_size=cfg.val_size, seed=cfg.seed, **kind)
        resume = train.latest_checkpoint(run) is not None
        metas[name] = train.train(tc, resume=resume, force=not resume)
    return metas


def run(cfg: DemoConfig, force: bool = False) -> dict[str, Any]:
    out = cfg.out
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists() and not force:
        raise DiscoverError(f"--out {out} is not empty and not a demo directory; pass --force to use it")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by python discover.py demo\n")
    metas = train_models(cfg)
    summary = {
        name: {"run": str(out / "runs" / name), "U": m.get("U"), "act": m.get("act"),
               "val_top1": m["metrics"]["val_top1"], "val_top1_argmax": m["metrics"]["val_top1_argmax"],
               "train_seconds": m.get("train_seconds")}
        for name, m in metas.items()
    }
    write_json_atomic(out / "summary.json", summary)
    return summary
