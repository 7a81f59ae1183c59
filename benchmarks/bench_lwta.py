"""CVN vs its GELU/ReLU twin: one training step and one inference pass, same process, same input.

DISCOVER reports up to 10 % training overhead and comparable inference cost. Goals here:
training step <= 1.10x, inference <= 1.05x the twin's time. Runs are interleaved (A B A B ...) and
the median of the per-pair ratios is printed, so drift of a noisy machine cancels.

    python -m benchmarks.bench_lwta                  # deit_tiny@224, deit_world, resnet18_world
    python -m benchmarks.bench_lwta --quick          # fewer repetitions
    python -m benchmarks.bench_lwta --models resnet18_world,deit_world
"""
from __future__ import annotations

import statistics
import time

import click
import torch
from rich.console import Console
from rich.table import Table

import lwta
import models

CASES = [  # arch, U, twin activation, batch
    ("deit_tiny", 16, "gelu", 16),
    ("deit_world", 8, "gelu", 64),
    ("resnet18_world", 2, "relu", 64),
]


def _step_fn(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, train: bool):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    ce = torch.nn.CrossEntropyLoss()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = ce(model(x), y) + lwta.kl_divergence(model)
        loss.backward()
        opt.step()

    @torch.inference_mode()
    def infer() -> None:
        model(x)

    model.train(train)
    return train_step if train else infer


def _paired(fa, fb, reps: int) -> tuple[float, float, float]:
    fa(), fb()  # warm-up
    ta, tb, ratios = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter(); fa(); t1 = time.perf_counter(); fb(); t2 = time.perf_counter()
        ta.append(t1 - t0), tb.append(t2 - t1), ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


@click.command()
@click.option("--quick", is_flag=True, help="3 repetitions instead of 9.")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--models", "archs", default=",".join(c[0] for c in CASES), show_default=True,
              help="Comma-separated archs to run.")
def main(quick: bool, threads: int, archs: str) -> None:
    torch.set_num_threads(threads)
    reps = 3 if quick else 9
    table = Table(title=f"CVN vs twin, CPU, {threads} threads, median of {reps} interleaved pairs")
    for col in ("model", "batch", "pass", "CVN s", "twin s", "ratio", "goal"):
        table.add_column(col, justify="right" if col not in ("model", "pass") else "left")
    chosen = [m for m in archs.split(",") if m]
    if unknown := set(chosen) - {c[0] for c in CASES}:
        raise click.BadParameter(f"unknown models {sorted(unknown)}", param_hint="--models")
    for arch, U, act, batch in [c for c in CASES if c[0] in chosen]:
        spec = models.ARCHS[arch]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, 3, spec.img_size, spec.img_size, generator=g)
        y = torch.randint(0, spec.num_classes, (batch,), generator=g)
        torch.manual_seed(0)
        cvn, twin = models.build(arch, U=U), models.build(arch, act=act)
        twin.load_state_dict(cvn.state_dict())
        for train, goal in ((True, 1.10), (False, 1.05)):
            a, b, r = _paired(_step_fn(cvn, x, y, train), _step_fn(twin, x, y, train), reps)
            ok = "[green]ok[/]" if r <= goal else "[red]over[/]"
            table.add_row(f"{arch}/{U} vs {act}", str(batch), "train step" if train else "inference",
                          f"{a:.3f}", f"{b:.3f}", f"{r:.3f}", f"<= {goal:.2f} {ok}")
    Console().print(table)


if __name__ == "__main__":
    main()
