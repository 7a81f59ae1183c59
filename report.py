"""`discover report DIR`: a static HTML site of dissection results, galleries and charts.

Usage::

    python discover.py report demo_out            # -> demo_out/report/index.html
    python discover.py report dissect_cvn8 --out site

DIR is a demo output directory (``summary.json``, ``evaluation.json``, ``explanations.json``,
``labels/*/``), one ``discover dissect`` output (``labels.json``) or a folder of them. The site opens
from the file system (no server, no network: every image, chart and script is a local file):

- ``index.html``: the models, the figures of ``evaluate`` (computed here when DIR has no
  ``evaluation.json``), the CVN-vs-twin comparison as charts (active neurons per example, label
  accuracy, similarity-score histograms against the interpretability cutoff) and the explained images;
- ``layers/RUN--LAYER.html``: one card per neuron (concept, score, interpretable or not,
  block/competitor, active rate, its top-activating probe images: the galleries of CLIP-Dissect
  Fig. 1 and DISCOVER Fig. 3), searchable by concept and sortable by unit, score, concept, activity;
- ``explain/RUN-I.html``: one explained image, its prediction and its active neurons (DISCOVER
  Table 4 as a page: the highest and lowest activations, each with its concept and gallery).

The whole site is built in a temporary directory and renamed into place (atomic); HTML comes from
the Jinja2 templates in ``templates/``, charts from matplotlib.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import DEMO_MARKER, REPO_DIR, DiscoverError, atomic_dir, progress_bar, sha256_file, sha256_json, slug
from schema import Labels

TEMPLATES = REPO_DIR / "templates"
MARKER = ".discover-report"  # identifies a directory as a report (safe to replace)
DEMO_FILES = ("summary.json", "evaluation.json", "explanations.json")
GALLERY = 8  # top-activating probe images per neuron card
EXPLAIN_GALLERY = 6  # per neuron row of an explanation page
TOP, BOTTOM = 7, 6  # DISCOVER Table 4: the 7 highest and 6 lowest activations
THUMB = 96  # largest side of a probe thumbnail (world images stay 64 x 64)


@dataclass
class Source:
    """One dissection output: its directory, a short name for links, and its labels."""

    name: str
    path: Path
    labels: Labels
    explanations: list[dict[str, Any]] = field(default_factory=list)
    root: Path = Path(".")  # the results directory its explanations' map paths are relative to


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiscoverError(f"{path}: cannot read ({e})") from e


def collect(root: Path) -> tuple[list[Source], dict[str, Any] | None, dict[str, Any] | None]:
    """``(sources, summary, evaluation)`` of a results directory; one-line errors for a directory
    without results or a half-finished demo run (naming what is missing)."""
    root = Path(root)
    if not root.is_dir():
        raise DiscoverError(f"report: {root} is not a directory")
    if (root / DEMO_MARKER).exists():
        missing = [f for f in DEMO_FILES if not (root / f).is_file()]
        missing += [f"labels/{n}/labels.json" for n in ("cvn", "twin") if not (root / "labels" / n / "labels.json").is_file()]
        if missing:
            raise DiscoverError(f"report: {root} is a half-finished demo run, missing {', '.join(missing)}; "
                                f"run `python discover.py demo --out {root}` to finish it")
    if (root / "labels.json").is_file():
        dirs = [root]
    else:
        dirs = sorted({p.parent for pattern in ("*/labels.json", "labels/*/labels.json") for p in root.glob(pattern)})
    if not dirs:
        raise DiscoverError(f"report: {root} holds no results (no labels.json of `discover dissect`, "
                            "no demo output)")
    names: list[str] = []
    for d in dirs:  # unique short names: the directory name, or its path below root
        name = slug(d.name if d != root else root.resolve().name)
        names.append(name if name not in names else slug(str(d.relative_to(root))))
    sources = [Source(n, d, Labels.read(d, where="RESULTS")) for n, d in zip(names, dirs)]
    summary = _read_json(root / "summary.json") if (root / "summary.json").is_file() else None
    evaluation = _read_json(root / "evaluation.json") if (root / "evaluation.json").is_file() else None
    if (root / "explanations.json").is_file():
        expl = _read_json(root / "explanations.json")
        for s in sources:
            s.explanations = expl.get(s.name, []) if isinstance(expl, dict) else []
            s.root = root
    return sources, summary, evaluation


def _evaluate(sources: list[Source]) -> tuple[dict[str, Any] | None, str | None]:
    """``evaluate`` of every source (activations from the cache; recorded again if needed)."""
    import evaluate

    try:
        return evaluate.jsonable(evaluate.evaluate([str(s.path) for s in sources], explain_images=0)), None
    except DiscoverError as e:
        return None, f"evaluation unavailable: {e}"


# --- thumbnails -----------------------------------------------------------------------------------

class Thumbnails:
    """Probe images written once each as small PNGs under ``img/PROBE/``, shared by every page."""

    def __init__(self, site: Path) -> None:
        self.site = site
        self.probes: dict[str, Any] = {}
        self.written: set[str] = set()

    def probe(self, labels: Labels) -> Any:
        import probes

        prov = labels.provenance
        key = prov.probe_fingerprint
        if key not in self.probes:
            probe = probes.load_probe(prov.probe, skip_bad=prov.skip_bad)
            if probe.fingerprint != key:
                raise DiscoverError(f"report: probe {prov.probe} changed since the dissection "
                                    "(its fingerprint differs); dissect again to get its galleries")
            self.probes[key] = probe
        return self.probes[key]

    def probe_image(self, labels: Labels, index: int) -> str:
        """Relative URL of probe image ``index`` of the labels' probe (written on first use)."""
        probe = self.probe(labels)
        rel = f"img/{probe.fingerprint[:12]}/{index}.png"
        if rel not in self.written:
            img = probe.get_image(index)
            img.thumbnail((THUMB, THUMB))
            (self.site / rel).parent.mkdir(parents=True, exist_ok=True)
            img.save(self.site / rel, optimize=True)
            self.written.add(rel)
        return rel

    def copy(self, path: Path, key: str) -> str:
        """Relative URL of a picture file copied into the site (e.g. a winner map)."""
        import shutil

        rel = f"img/maps/{slug(key)}{path.suffix}"
        if rel not in self.written:
            (self.site / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, self.site / rel)
            self.written.add(rel)
        return rel

    def image(self, ref: str, key: str, size: int = 192) -> str:
        """An explained image (a file or ``world:SEED:INDEX``) at ``size`` pixels."""
        import explain
        from PIL import Image

        rel = f"img/explain/{slug(key)}.png"
        if rel not in self.written:
            pixels, _ = explain.load_image(ref, size)
            (self.site / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(self.site / rel, optimize=True)
            self.written.add(rel)
        return rel


# --- charts ---------------------------------------------------------------------------------------

def _figure(width: float, height: float):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.spines[["top", "right"]].set_visible(False)
    return plt, fig, ax


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def chart_active(rows: list[dict[str, Any]], path: Path) -> None:
    """Active neurons per example of each (run, layer), as a fraction of K (labels give the counts)."""
    plt, fig, ax = _figure(7, 0.45 * len(rows) + 1.2)
    names = [f"{r['run']} · {r['layer']}" for r in rows]
    frac = [100 * r["active_per_example"] / r["K"] for r in rows]
    colors = ["#c2410c" if r.get("U") else "#1d4ed8" for r in rows]
    bars = ax.barh(names, frac, color=colors)
    for b, r in zip(bars, rows):
        ax.text(b.get_width() + 1, b.get_y() + b.get_height() / 2,
                f"{r['active_per_example']:.0f} of {r['K']}", va="center", fontsize=9)
    ax.set_xlim(0, 115)
    ax.invert_yaxis()
    ax.set_xlabel("active neurons per example (% of the layer)")
    ax.set_title("Competition: CVN (LWTA, orange) vs plain twin (blue)", fontsize=10)
    _save(plt, fig, path)


def chart_accuracy(rows: list[dict[str, Any]], path: Path) -> None:
    """Label accuracy of each (run, layer): final layer (class names) or hidden (world attributes)."""
    import numpy as np

    plt, fig, ax = _figure(7, 0.45 * len(rows) + 1.2)
    names = [f"{r['run']} · {r['layer']}" for r in rows]
    acc = [r["accuracy"] if r["accuracy"] is not None else 0.0 for r in rows]
    colors = ["#059669" if r["kind"] == "final" else "#7c3aed" for r in rows]
    bars = ax.barh(names, acc, color=colors)
    for b, r in zip(bars, rows):
        text = "n/a (no selective neuron)" if r["accuracy"] is None else f"{r['accuracy']:.1f}%"
        ax.text(b.get_width() + 1, b.get_y() + b.get_height() / 2, text, va="center", fontsize=9)
    ax.set_xlim(0, 125)
    ax.set_xticks(np.arange(0, 101, 20))
    ax.invert_yaxis()
    ax.set_xlabel("label accuracy (%)")
    ax.set_title("Final layer: label = class name (green); hidden: label names the attribute (violet)",
                 fontsize=9)
    _save(plt, fig, path)


def chart_scores(layer: str, series: list[tuple[str, list[float]]], cutoff: float | None, path: Path) -> None:
    """Histogram of the similarity scores of one layer's neurons, one outline per run."""
    import numpy as np

    plt, fig, ax = _figure(5.5, 3)
    values = [v for _, vs in series for v in vs]
    bins = np.linspace(min(values), max(values), 31) if values and min(values) < max(values) else 30
    for (name, vs), color in zip(series, ["#c2410c", "#1d4ed8", "#059669", "#7c3aed", "#be185d"] * 4):
        ax.hist(vs, bins=bins, histtype="step", linewidth=1.8, color=color, label=f"{name} ({len(vs)})")
    if cutoff is not None:
        ax.axvline(cutoff, color="#444", linestyle="--", linewidth=1, label=f"cutoff {cutoff:g}")
    ax.set_xlabel("similarity of the neuron's label")
    ax.set_ylabel("neurons")
    ax.set_title(layer, fontsize=10)
    ax.legend(fontsize=8, frameon=False)
    _save(plt, fig, path)


# --- pages ----------------------------------------------------------------------------------------

def _env() -> Any:
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = lambda v, spec=".3g": "n/a" if v is None else format(v, spec)
    return env


def _layer_page(src: Source, layer: str) -> str:
    return f"layers/{slug(src.name)}--{slug(layer)}.html"


def _eval_rows(evaluation: dict[str, Any] | None, sources: list[Source]) -> list[dict[str, Any]]:
    """One row per (source, layer) of the evaluation, with the source's short name."""
    if not evaluation:
        return []

    def source_of(labels: str) -> Source | None:  # by path; by name when the results were moved
        path = Path(labels)
        for s in sources:
            if path.resolve() == s.path.resolve():
                return s
        tails = [s for s in sources if path.name == s.path.name]
        return tails[0] if len(tails) == 1 else None

    rows = []
    for r in evaluation.get("runs", []):
        src = source_of(r["labels"])
        if src is None:
            continue
        world = r.get("world") or {}
        out = r.get("output_layer") or {}
        rows.append(dict(r, run=src.name, final_accuracy=out.get("accuracy_percent"), clip_cos=out.get("clip_cos"),
                         sentence_cos=out.get("sentence_cos"),
                         hidden_accuracy=world.get("hidden_accuracy_percent"),
                         selective=world.get("selective"), class_only=world.get("class_only"),
                         class_units=world.get("class_units"), class_aware=world.get("class_aware_percent"),
                         silent=world.get("silent"),
                         mean_best_auroc=world.get("mean_best_auroc")))
    return rows


def _neuron_cards(src: Source, layer: str, thumbs: Thumbnails, row: dict[str, Any] | None) -> list[dict[str, Any]]:
    """A card per neuron: its label record, top images and simulation correlation, truth correlation
    and precision (the dissection's own with ``--score``, else the evaluation's)."""
    per_neuron = ((row or {}).get("simulation") or {}).get("per_neuron") or {}
    corr, scored = per_neuron.get("corr") or [], per_neuron.get("label") or []
    precision, truth = per_neuron.get("precision") or [], per_neuron.get("corr_truth") or []
    loc = (row or {}).get("localisation") or {}
    ious = loc.get("iou_win") or loc.get("iou_top") or []  # where a CVN unit wins; else its top 0.5 %
    cards = []
    for n in src.labels.neurons_of(layer):
        k, own = n.unit, n.simulation
        sim = own.corr if own else (corr[k] if k < len(corr) else None)
        label = own.label if own else (scored[k] if k < len(scored) else None)
        prec = own.precision if own else (precision[k] if k < len(precision) else None)
        tr = own.corr_truth if own else (truth[k] if k < len(truth) else None)
        cards.append(dict(n.to_dict(), sim_corr=sim, sim_label=label if label and label != n.description else None,
                          sim_precision=prec if prec is not None and math.isfinite(prec) else None,
                          sim_truth=tr if tr is not None and math.isfinite(tr) else None,
                          iou=ious[k] if k < len(ious) else None,
                          images=[thumbs.probe_image(src.labels, i) for i in n.top_images[:GALLERY]]))
    return cards


def _explanation(src: Source, j: int, e: dict[str, Any], thumbs: Thumbnails) -> dict[str, Any]:
    """One explained image: its active neurons split as DISCOVER Table 4 (highest / lowest)."""
    by_unit = {n.unit: n for n in src.labels.neurons_of(e["layer"])}
    maps = e.get("maps") or {}  # unit -> a picture relative to the demo output (explain.write_maps)
    rows = []
    for n in e["neurons"]:
        top = by_unit[n["unit"]].top_images if n["unit"] in by_unit else []
        where = src.root / maps[str(n["unit"])] if str(n["unit"]) in maps else None
        rows.append(dict(n, images=[thumbs.probe_image(src.labels, i) for i in top[:EXPLAIN_GALLERY]],
                         map=thumbs.copy(where, f"{src.name}-{j}-{n['unit']}") if where and where.is_file() else None))
    top = rows[:TOP]
    bottom = rows[TOP:][-BOTTOM:] if len(rows) > TOP else []
    return dict(e, index=j, page=f"explain/{slug(src.name)}-{j}.html", run=src.name,
                image_url=thumbs.image(e["image"], f"{src.name}-{j}"), top=top, bottom=bottom, all=rows,
                layer_page=_layer_page(src, e["layer"]))


SITE_FORMAT = 5  # bump when the pages a report writes change for the same inputs


def _inputs_digest(root: Path, sources: list[Source]) -> str:
    """Content hash of everything a site is made of: the results, the winner maps they name, the
    templates, and :data:`SITE_FORMAT`."""
    files = [root / f for f in DEMO_FILES if (root / f).is_file()]
    files += [s.path / "labels.json" for s in sources] + sorted(TEMPLATES.glob("*.html"))
    files += sorted({s.root / m for s in sources for e in s.explanations for m in (e.get("maps") or {}).values()
                     if (s.root / m).is_file()})
    return sha256_json([SITE_FORMAT] + [[str(f.relative_to(root) if f.is_relative_to(root) else f.name),
                                         sha256_file(f)] for f in files])


def build(root: str | Path, out: str | Path | None = None, force: bool = False,
          progress: bool = True) -> dict[str, Any]:
    """Write the site of ``root``'s results to ``out`` (default ``root/report``); returns
    ``{"index": path, "pages": n, "images": n, "note": str | None, "cached": bool}``. A site made
    from the same inputs (content hash in its marker file) is kept as it is."""
    root = Path(root)
    sources, summary, evaluation = collect(root)
    out = Path(out) if out is not None else root / "report"
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())) and not force:
        raise DiscoverError(f"`out` {out} exists and is not a report directory; pass `force` to replace it")
    digest = _inputs_digest(root, sources)
    marker = out / MARKER
    if (out / "index.html").is_file() and marker.is_file():
        try:
            done = json.loads(marker.read_text())
        except ValueError:
            done = {}
        if done.get("inputs") == digest:
            return dict(done["result"], cached=True)
    note = None
    if evaluation is None:
        evaluation, note = _evaluate(sources)
    env = _env()
    rows = _eval_rows(evaluation, sources)
    with atomic_dir(out) as site, progress_bar(progress, note="pages", transient=True, stderr=True) as bar:
        thumbs = Thumbnails(site)
        layers = [(s, layer) for s in sources for layer in s.labels.layers]
        task = bar.add_task("report", total=len(layers) + sum(len(s.explanations) for s in sources) + 1)
        pages = 0
        layer_links = []
        for src, layer in layers:
            info = src.labels.layers[layer]
            row = next((r for r in rows if r["run"] == src.name and r["layer"] == layer), None)
            cards = _neuron_cards(src, layer, thumbs, row)
            html = env.get_template("layer.html").render(
                root="../", src=src, layer=layer, info=info, cards=cards, row=row,
                prov=src.labels.provenance, gallery=GALLERY)
            (site / _layer_page(src, layer)).parent.mkdir(parents=True, exist_ok=True)
            (site / _layer_page(src, layer)).write_text(html)
            layer_links.append(dict(run=src.name, layer=layer, page=_layer_page(src, layer), K=info.K,
                                    U=info.U, dead=info.dead, interpretable=info.interpretable,
                                    row=row))
            pages += 1
            bar.advance(task)
        explained = []
        for src in sources:
            for j, e in enumerate(src.explanations):
                ex = _explanation(src, j, e, thumbs)
                html = env.get_template("explain.html").render(root="../", ex=ex, src=src, top_n=TOP, bottom_n=BOTTOM)
                (site / ex["page"]).parent.mkdir(parents=True, exist_ok=True)
                (site / ex["page"]).write_text(html)
                explained.append(ex)
                pages += 1
                bar.advance(task)
        charts = _charts(site, sources, rows)
        models = _models(summary, sources)
        html = env.get_template("index.html").render(
            root="", sources=sources, layers=layer_links, charts=charts, models=models,
            explained=explained, note=note, title=f"DISCOVER report: {root.resolve().name}",
            selective_auroc=(evaluation or {}).get("selective_auroc"))
        (site / "index.html").write_text(html)
        pages += 1
        bar.advance(task)
        result = {"index": str(out / "index.html"), "pages": pages, "images": len(thumbs.written), "note": note}
        (site / MARKER).write_text(json.dumps({"written_by": "python discover.py report", "inputs": digest,
                                               "result": result}) + "\n")
    return dict(result, cached=False)


def _models(summary: dict[str, Any] | None, sources: list[Source]) -> list[dict[str, Any]]:
    """The models of the run: from the demo's summary.json, else from the labels' provenance."""
    if summary:
        return [dict(v, name=k) for k, v in summary.items()]
    seen: dict[str, dict[str, Any]] = {}
    for s in sources:
        p = s.labels.provenance
        units = [info.U for info in s.labels.layers.values() if info.U]
        model = p.model or s.name
        seen.setdefault(model, {"name": model, "arch": p.arch, "U": units[0] if units else None, "act": None,
                                "test": None, "run": model})
    return list(seen.values())


def _charts(site: Path, sources: list[Source], rows: list[dict[str, Any]]) -> dict[str, Any]:
    charts: dict[str, Any] = {"scores": [], "active": None, "accuracy": None}
    active = [r for r in rows if r.get("active_per_example") is not None and not r.get("output_layer")]
    if active:
        chart_active(active, site / "charts" / "active.png")
        charts["active"] = "charts/active.png"
    acc = []
    for r in rows:
        if r.get("output_layer"):
            acc.append(dict(run=r["run"], layer=r["layer"], accuracy=r["final_accuracy"], kind="final"))
        elif r.get("world"):
            acc.append(dict(run=r["run"], layer=r["layer"], accuracy=r["hidden_accuracy"], kind="hidden"))
    if acc:
        chart_accuracy(acc, site / "charts" / "accuracy.png")
        charts["accuracy"] = "charts/accuracy.png"
    layer_names = list(dict.fromkeys(layer for s in sources for layer in s.labels.layers))
    for i, layer in enumerate(layer_names):
        series = [(s.name, [n.similarity for n in s.labels.neurons_of(layer) if not n.dead and not math.isnan(n.similarity)])
                  for s in sources if layer in s.labels.layers]
        series = [(n, v) for n, v in series if v]
        if not series:
            continue
        cutoffs = {s.labels.layers[layer].cutoff for s in sources if layer in s.labels.layers}
        cutoff = cutoffs.pop() if len(cutoffs) == 1 else None  # one line only where every source has the same
        path = f"charts/scores-{i}.png"
        chart_scores(layer, series, cutoff, site / path)
        charts["scores"].append(dict(layer=layer, path=path))
    return charts
