"""Simulation scores on the world, where the truth is known (simulate.py).

1. Per model (the demo's four shipped checkpoints) and layer (hidden, output): the mean and median
   held-out correlation, mean AUPRC, share of neurons beating the permutation baseline, mean
   held-out precision (world-clip holds the label on the neuron's top 5 % of held-out images), mean
   truth correlation (with world-clip's 0/1 verdict on the label), and how well the correlation, the
   truth correlation and the precision tell right labels from wrong ones on the scoring half (AUROC;
   the mean correlation of right and of wrong labels), each label judged by its unit's top images
   there (the top-image measure) and by the AUROC measure there. The sanity tests' "corr" column is also the truth correlation's: on
   a 0/1 concept vector the two are one score.
2. The sanity tests of "Evaluating Neuron Explanations" (ICML 2025) on each hidden layer: the
   selective units' activations against the ground-truth vector of the attribute value their top
   images share, with half its positives removed ("missing labels") or as many false positives
   added ("extra labels"); the share of units for which each score falls (1.0: the score passes).
3. Cost of the scores for K = 768 neurons, N = 10 000 images, M = 20 000 concepts, against a plain
   per-neuron NumPy loop (np.corrcoef, sklearn-style AP) run in the same process; and of the label
   rule's fit (``dissect.gallery_fit``, 20 gallery concepts per neuron) against np.corrcoef per pair.

    python -m benchmarks.bench_simulation [--probe world:2000:4] [--concepts world] [--markdown FILE]
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
from rich.console import Console
from rich.table import Table

import demo
import dissect
import evaluate
import simulate

console = Console(width=None if Console().is_terminal else 160)


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f} %"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def scores_table(probe: str, concepts: str, work: Path) -> tuple[Table, Table, list[tuple[str, Path, str]]]:
    """The layers' simulation figures, and how well each score tells right labels from wrong ones
    on the hidden layers by each ground-truth judge (``evaluate.held_out_judgement``)."""
    t = Table(title=f"simulation scores, probe {probe}, concepts {concepts} (labels chosen on one half, scored on the other)")
    for col in ("model", "layer", "corr mean", "corr median", "AUPRC", "p < 0.05", "precision", "truth corr"):
        t.add_column(col, justify="left" if col in ("model", "layer") else "right")
    sep = Table(title="right vs wrong labels on the scoring half: AUROC of each score, by each judge "
                      "(gallery: the unit's top 20 images share what the label names; auroc: the unit separates "
                      "a value at AUROC >= 0.85 and the label names it)")
    for col in ("model", "layer", "judge", "judged right", "corr", "corr right / wrong", "truth corr", "precision"):
        sep.add_column(col, justify="left" if col in ("model", "layer", "judge") else "right")
    dirs = []
    for m in demo.demo_models():
        out = work / m.name
        dissect.dissect(dissect.DissectConfig(model=str(m.shipped), layers=list(m.layers), probe=probe,
                                              concepts=concepts, out=str(out), score=True), log=lambda *_: None)
        dirs.append((m.name, out, m.layers[0]))
    res = evaluate.evaluate([str(d) for _, d, _ in dirs], explain_images=0)
    names = {str(d): n for n, d, _ in dirs}
    for row in res["runs"]:
        s = row["simulation"]
        t.add_row(names[row["labels"]], row["layer"], _num(s["corr_mean"]), _num(s["corr_median"]),
                  _num(s["auprc_mean"]), simulate.significant_text(s, _pct),
                  _pct(None if s.get("precision_mean") is None else 100 * s["precision_mean"]),
                  _num(s.get("corr_truth_mean")))
        for judge, f in (("gallery", s), ("auroc", s.get("by_auroc"))):
            j = (f or {}).get("judged")
            if j:
                sep.add_row(names[row["labels"]], row["layer"], judge, f"{j['right']} of {j['units']}",
                            _num(f["right_auroc"]), f"{_num(f['corr_right'])} / {_num(f['corr_wrong'])}",
                            _num(f.get("right_auroc_truth")), _num(f.get("right_auroc_precision")))
    return t, sep, dirs


def sanity_table(dirs: list[tuple[str, Path, str]]) -> Table:
    t = Table(title="sanity tests (ICML 2025): share of selective units whose score falls with missing / extra labels")
    for col in ("model", "layer", "units", "corr", "AUPRC", "precision", "WPMI", "SoftWPMI", "cos3"):
        t.add_column(col, justify="left" if col in ("model", "layer") else "right")
    for name, d, layer in dirs:
        run = evaluate.LabelsRun(str(d), None)
        A, _ = run.activations(layer)
        neurons = run.labels.neurons_of(layer)
        values, Y, _ = evaluate.world_attributes(run.prov.probe)
        ti = evaluate.top_image_metrics([n.top_images for n in neurons], [n.description for n in neurons], values, Y)
        index = {v: j for j, (_, v) in enumerate(values)}
        units = [u for u in ti["units"]]
        As = A[:, [u["unit"] for u in units]].astype(np.float64)
        C = Y[:, [index[u["best_value"]] for u in units]].astype(np.float64)
        fns = {"corr": simulate.correlations, "AUPRC": simulate.auprcs,
               "precision": lambda a, c: simulate.top_precisions(a, c > 0)}
        for sim in ("wpmi", "soft_wpmi", "cos3"):  # the diagonal: unit k's score for its own concept column
            fns[sim] = lambda a, c, sim=sim: np.diag(dissect.scores(sim, a.astype(np.float32), c.astype(np.float32)))
        cells = []
        for fn in fns.values():
            r = simulate.sanity(fn, As, C)
            cells.append(f"{r['missing']:.2f} / {r['extra']:.2f}")
        t.add_row(name, layer, str(len(units)), *cells)
    return t


def best_time(fn, reps: int) -> float:
    """The fastest of ``reps`` runs of ``fn``, in seconds."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def cost(K: int = 768, N: int = 10_000, M: int = 20_000, reps: int = 3) -> str:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((N, K)).astype(np.float32)
    P = rng.standard_normal((N, M)).astype(np.float32)
    labels = rng.integers(0, M, K)
    choose = lambda a, p: labels  # noqa: E731 - the label rule is dissect's cost, not the scores'

    def baseline() -> None:
        ch, sc = simulate.probe_split(N)
        for k in range(K):
            a, b = A[sc, k].astype(np.float64), P[sc, labels[k]].astype(np.float64)
            np.corrcoef(a, b)
            pos = np.zeros(len(sc), bool)
            pos[np.argsort(-a)[: max(1, round(0.05 * len(sc)))]] = True
            order = np.argsort(-b, kind="stable")
            hits = pos[order]
            (np.cumsum(hits) / np.arange(1, len(hits) + 1))[hits].mean()

    t_base = best_time(baseline, reps)
    t_ours = best_time(lambda: simulate.held_out_scores(A, P, choose), reps)
    return (f"simulation scores, K={K} N={N} M={M}: {t_ours:.2f} s (with the permutation p-values), "
            f"per-neuron NumPy loop without p-values {t_base:.2f} s: ratio {t_base / t_ours:.2f}x")


def fit_cost(K: int = 768, N: int = 10_000, M: int = 20_000, per: int = 20, reps: int = 3) -> str:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((N, K)).astype(np.float32)
    P = rng.standard_normal((N, M)).astype(np.float32)
    allowed = np.zeros((K, M), bool)
    for k in range(K):
        allowed[k, rng.choice(M, per, replace=False)] = True

    def baseline() -> None:
        for k in range(K):
            for m in np.flatnonzero(allowed[k]):
                np.corrcoef(A[:, k].astype(np.float64), (P[:, m] > 0.5).astype(np.float64))

    t_base = best_time(baseline, reps)
    t_ours = best_time(lambda: dissect.gallery_fit(A, dissect.verdicts(P, 0.5), allowed), reps)
    return (f"gallery fit, K={K} N={N} M={M}, {per} concepts per neuron: {t_ours:.2f} s, "
            f"np.corrcoef per pair {t_base:.2f} s: ratio {t_base / t_ours:.2f}x")


@click.command()
@click.option("--probe", default="world:2000:4", show_default=True)
@click.option("--concepts", default="world", show_default=True)
@click.option("--markdown", type=click.Path(dir_okay=False), default=None, help="Also write the tables here.")
@click.option("--skip-cost", is_flag=True)
def main(probe: str, concepts: str, markdown: str | None, skip_cost: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scores, separation, dirs = scores_table(probe, concepts, Path(tmp))
        console.print(scores)
        console.print(separation)
        sanity = sanity_table(dirs)
        console.print(sanity)
    line = None if skip_cost else cost() + "\n" + fit_cost()
    if line:
        console.print(line)
    if markdown:
        rec = Console(record=True, width=200, file=open("/dev/null", "w"))
        rec.print(scores)
        rec.print(separation)
        rec.print(sanity)
        if line:
            rec.print(line)
        Path(markdown).write_text("```\n" + rec.export_text() + "```\n")


if __name__ == "__main__":
    main()
