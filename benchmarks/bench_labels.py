"""The ground-truth table of labels: model x signal x similarity, judged on the world.

For every model (default: the demo's four shipped checkpoints), probe and concept set, the model's
dissected hidden layer (the demo's: the last LWTA / activation layer; ``--all-layers``: every LWTA /
GELU / ReLU layer, one row each) and output layer are labelled with every LWTA signal and similarity
asked (hidden layers summarised per image by ``--summary``; the CLIP: ``--clip``, world-clip or a
world-clip trained with ``world train-clip``), and judged:

- final-layer accuracy: % of the output neurons labelled exactly with their class name
  (CLIP-Dissect Sec. 4.2);
- selective / named right / names the world: units whose top 20 probe images share an attribute
  value (>= 80 % of them), the % of those whose label names only values their top images share,
  and the % of labels that name something of the world at all (``evaluate.top_image_metrics``);
- AUROC selective / hidden acc.: the AUROC measure of ``evaluate`` (best attribute AUROC >= 0.85
  among the units with a label, label names that value); class-selective only: the labelled units
  it leaves out that separate a class (colour and shape) at AUROC >= 0.85 (``class_only``); silent:
  the units a value or a class separates that never fire on the probe (no label); class units:
  the selective units that their best class separates better than any value; class-aware acc.:
  the % of selective units named with their value or, for a class unit, a value of its class
  (``class_aware_percent``);
- explanation precision: of the 7 first concepts listed for each of ``--explain`` world images held
  out of the probe (4 posterior draws), the % that fit the image (``evaluate.explanation_precision``),
  the list sorted by activation (DISCOVER Table 4), by confidence (``explain``'s default) and by gain.

    python -m benchmarks.bench_labels                                  # the full table (minutes)
    python -m benchmarks.bench_labels --signals pi --similarities auto --probes world:2000:4
    python -m benchmarks.bench_labels --markdown docs/labels_table.md  # also write the table
    python -m benchmarks.bench_labels --all-layers --signals expected --similarities auto
    python -m benchmarks.bench_labels --signals expected --similarities auto --gallery-share 0.8,0.5,0

``--gallery-share`` takes one or more shares of dissect's gallery check (0: off), one row each.
"""
from __future__ import annotations

import itertools
from typing import Any

import click
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

import clip_backend
import common
import concepts
import demo
import dissect
import dissect_kernels as dk
import evaluate
import explain
import lwta
import record
import models
import probes
import schema
import world

SIMILARITIES = ("auto", "soft_wpmi", "wpmi", "cos3", "cos")


def _labels(A: np.ndarray, P: np.ndarray, words: list[str], similarity: str, allowed: np.ndarray | None = None,
            top: np.ndarray | None = None, wins: np.ndarray | None = None,
            threshold: float | None = None, fit: np.ndarray | None = None) -> list[schema.Neuron]:
    """Each neuron's label record as ``dissect`` makes it (``dissect.neuron_rows``, the gallery's
    concepts ranked by their ``fit``, ``dissect.gallery_fit``; no label for a dead one), with its
    confidence curve and base rate (``dissect.add_confidence``) given the CLIP's truth ``threshold``."""
    S = dissect.scores(similarity, A, P)
    rows = dissect.neuron_rows("-", A, S, words, None, None, wins, allowed, top, fit)
    if threshold is not None:
        dissect.add_confidence(rows, A, P, words, threshold)
    return rows


def _explanations(model: Any, meta: schema.ModelMeta, layer: str, probe: probes.Probe, n: int,
                  signal: str, summary: str = "auto") -> list[dict[str, Any]]:
    """The winners of ``layer`` and their ``signal`` for ``n`` world images held out of the probe (the
    probe seed's images N, N+1, ...; labels filled in later)."""
    dims = [int(d) for d in next(r for r in record.describe_layers(model, meta) if r["layer"] == layer)["shape"].split("x")]
    K = dims[1] if len(dims) == 4 else dims[-1]  # a conv map's channels, else the last axis
    stub = schema.Labels(schema.Provenance(model_hash=models.model_hash(model), summary=summary),
                         {layer: schema.LayerInfo(K=K, summary=summary, signal=signal)}, [])
    return [explain.explain_image(model, meta, stub, layer, f"world:{probe.world_seed}:{probe.n + i}", samples=4,
                                  sort="activation")
            for i in range(n)]


def _precision(exs: list[dict[str, Any]], rows: list[schema.Neuron], attrs: list[dict[str, str]], values,
               sort: str) -> float | None:
    """Explanation precision of ``exs`` relabelled with ``rows``, the list in ``sort`` order
    (z, confidence and gain from the rows' signal statistics, curves and base rates, as ``explain``
    computes them)."""
    if sort in ("confidence", "gain") and not any(r.confidence for r in rows):
        return None

    def row(n: dict[str, Any]) -> dict[str, Any]:
        r = rows[n["unit"]]
        c = explain.confidence_at(r.confidence, n["signal"])
        return dict(n, concept=r.description, z=explain.z_score(r, n["signal"]), confidence=c,
                    gain=explain.gain_of(c, r.base_rate))

    relabelled = [dict(e, neurons=explain.sort_neurons([row(n) for n in e["neurons"]], sort)) for e in exs]
    return evaluate.explanation_precision(relabelled, attrs, values)["precision_percent"]


def activation_layers(model: Any) -> list[str]:
    """Every LWTA module of a CVN, or every GELU / ReLU module of a twin (the same paths)."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (lwta.LWTABase, torch.nn.GELU, torch.nn.ReLU))]


def run(specs: dict[str, str], probe_specs: list[str], concept_sets: list[str], signals: list[str],
        similarities: list[str], n_explain: int, gallery_shares: list[float],
        all_layers: bool = False, summary: str = "auto", clip_spec: str = clip_backend.DEFAULT) -> list[dict[str, Any]]:
    clip = clip_backend.load_clip(clip_spec)
    shares = list(dict.fromkeys(s if s > 0 and clip.truth_threshold is not None else 0.0
                                for s in gallery_shares))  # 0: the check off; each share once
    by_name = {m.name: m for m in demo.demo_models()}
    words = {c: concepts.load_concepts(c) for c in concept_sets}
    runs = list(itertools.product(shares, concept_sets, similarities))
    rows = []
    for probe_spec in probe_specs:
        probe = probes.load_probe(probe_spec)
        values, Y, _ = evaluate.world_attributes(probe_spec)
        _, attrs = world.render_batch(probe.world_seed, probe.n, n_explain, size=16)
        Ps = {c: clip_backend.similarity_matrix(clip, probe, words[c], progress=False) for c in concept_sets}
        for name, spec in specs.items():
            model, meta = models.load_model(spec)
            hidden, output = by_name[name].layers if name in by_name else (
                activation_layers(model)[-1], dissect.output_layer(model))
            hiddens = activation_layers(model) if all_layers else [hidden]
            competitive = bool(lwta.lwta_modules(model))
            for signal in (signals if competitive else ["output"]):
                sig = signal if competitive else "pi"  # a plain layer records its output whatever is asked
                cache = record.activation_cache(models.model_hash(model), probe, signal=sig, mode="sample", seed=0)
                paths = record.record_layers(model, meta, [*hiddens, output], probe, cache, signal=sig, progress=False,
                                             summary={h: summary for h in hiddens})
                Ao, _ = record.read_activations(paths[output])
                final = {(c, sim): evaluate.final_layer_metrics(
                    [r.description for r in _labels(Ao, Ps[c], words[c], dissect.layer_similarity(sim, output, output))],
                    meta.classes)["accuracy_percent"] for c, sim in itertools.product(concept_sets, similarities)}
                for hidden in hiddens:
                    exs = _explanations(model, meta, hidden, probe, n_explain, sig, summary) if n_explain else []
                    Ah, _ = record.read_activations(paths[hidden])
                    wins, top = record.read_wins(paths[hidden]), dk.top_images(Ah, dissect.TOP_IMAGES)
                    holds = {c: dissect.verdicts(Ps[c], clip.truth_threshold) for c in concept_sets} \
                        if any(shares) else {}
                    allowed = {(g, c): dissect.gallery_mask(holds[c], top, g) if g else None
                               for g, c in itertools.product(shares, concept_sets)}
                    fit = {k: dissect.gallery_fit(Ah, holds[k[1]], a) if a is not None else None
                           for k, a in allowed.items()}  # the gallery's order: one per share and concept set, whatever the similarity
                    for share, cset, sim in runs:
                        nh = _labels(Ah, Ps[cset], words[cset], dissect.layer_similarity(sim, hidden, output),
                                     allowed[share, cset], top, wins, clip.truth_threshold, fit[share, cset])
                        lh = [r.description for r in nh]
                        ti = evaluate.top_image_metrics(top, lh, values, Y)
                        wm = evaluate.world_metrics(Ah, lh, values, Y)
                        rows.append({
                            "probe": probe_spec, "concepts": cset, "model": name, "layer": hidden, "summary": summary,
                            "signal": signal, "similarity": sim, "gallery": share,
                            "final_accuracy": final[cset, sim], "selective": ti["selective"],
                            "named_right": ti["right_percent"], "names_world": ti["world_percent"],
                            "auroc_selective": wm["selective"], "class_only": wm["class_only"], "silent": wm["silent"],
                            "hidden_accuracy": wm["hidden_accuracy_percent"], "class_units": wm["class_units"],
                            "class_aware": wm["class_aware_percent"],
                            **{f"explanation_precision_{s}": _precision(exs, nh, attrs, values, s) if exs else None
                               for s in ("activation", "confidence", "gain")}})
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


COLUMNS = [("probe", "probe"), ("concepts", "concepts"), ("model", "model"), ("layer", "layer"), ("summary", "summary"), ("signal", "signal"),
           ("similarity", "similarity"), ("gallery", "gallery share"), ("final_accuracy", "final-layer acc. %"), ("selective", "selective"),
           ("named_right", "named right %"), ("names_world", "names the world %"),
           ("auroc_selective", "AUROC selective"), ("class_only", "class-selective only"), ("silent", "silent"),
           ("hidden_accuracy", "AUROC hidden acc. %"), ("class_units", "class units"),
           ("class_aware", "class-aware acc. %"),
           ("explanation_precision_activation", "explanation precision, by activation %"),
           ("explanation_precision_confidence", "by confidence %"), ("explanation_precision_gain", "by gain %")]


def _cell(row: dict[str, Any], key: str) -> str:
    v = row[key]
    return _pct(v) if isinstance(v, float) or v is None else str(v)


@click.command()
@click.option("--models", default=None, help="NAME=RUN,... (default: the demo's shipped checkpoints).")
@click.option("--probes", default="world:2000:2,world:2000:4", show_default=True)
@click.option("--concepts", "concept_sets", default="world,world_heldout", show_default=True)
@click.option("--signals", default="pi,expected,sample,argmax", show_default=True)
@click.option("--similarities", default=",".join(SIMILARITIES), show_default=True)
@click.option("--explain", "n_explain", type=int, default=100, show_default=True,
              help="Held-out images explained for the explanation precision (0: skip).")
@click.option("--gallery-share", "gallery_shares", default=str(dissect.GALLERY_SHARE), show_default=True,
              help="dissect's gallery check of hidden-layer labels, one or more shares S,S,... (0: off).")
@click.option("--all-layers", is_flag=True, help="Every LWTA / activation layer, not only the demo's hidden layer.")
@click.option("--summary", type=click.Choice(record.SUMMARIES), default="auto", show_default=True,
              help="How the hidden layers are summarised per image (record.summarise).")
@click.option("--clip", "clip_spec", default=clip_backend.DEFAULT, show_default=True,
              help="world-clip, or world-clip:/path/to/weights of a world-clip trained with world train-clip.")
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="Also write the table as Markdown.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None, help="Also write the rows as JSON.")
def main(models: str | None, probes: str, concept_sets: str, signals: str, similarities: str, n_explain: int,
         gallery_shares: str, all_layers: bool, summary: str, clip_spec: str, markdown: str | None, json_out: str | None) -> None:
    specs = dict(kv.split("=", 1) for kv in models.split(",")) if models else \
        {m.name: str(m.shipped) for m in demo.demo_models()}
    sims = [s for s in similarities.split(",") if s]
    bad = [s for s in sims if s not in dissect.SIMILARITY_NAMES]
    if bad:
        raise click.BadParameter(f"unknown {', '.join(bad)}; choose from {', '.join(dissect.SIMILARITY_NAMES)}",
                                 param_hint="--similarities")
    bad = [s for s in signals.split(",") if s not in record.SIGNALS]
    if bad:
        raise click.BadParameter(f"unknown {', '.join(bad)}; choose from {', '.join(record.SIGNALS)}",
                                 param_hint="--signals")
    try:
        shares = [float(g) for g in gallery_shares.split(",") if g]
    except ValueError:
        shares = []
    if not shares or not all(0 <= g <= 1 for g in shares):
        raise click.BadParameter(f"{gallery_shares!r}: give numbers in [0, 1], e.g. 0.8,0.5", param_hint="--gallery-share")
    try:
        rows = run(specs, probes.split(","), concept_sets.split(","), signals.split(","), sims, n_explain, shares, all_layers,
                   summary, clip_spec)
    except common.DiscoverError as e:  # a bad probe, word list, model or CLIP: one line, no traceback
        raise click.ClickException(str(e)) from None
    table = Table(title="Labels against the world's ground truth")
    for _, title in COLUMNS:
        table.add_column(title, justify="right" if "%" in title or title in ("selective", "AUROC selective", "class-selective only", "silent", "class units") else "left")
    for r in rows:
        table.add_row(*[_cell(r, k) for k, _ in COLUMNS])
    Console(width=250).print(table)
    if markdown:
        lines = ["| " + " | ".join(t for _, t in COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        lines += ["| " + " | ".join(_cell(r, k) for k, _ in COLUMNS) + " |" for r in rows]
        common.write_text_atomic(markdown, "\n".join(lines) + "\n")
    if json_out:
        common.write_json_atomic(json_out, rows)


if __name__ == "__main__":
    main()
