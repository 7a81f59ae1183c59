"""The CUDA paths in one short run: LWTA correctness under mixed precision, CVN cost against its twin,
record + dissect end to end, and torchrun training with --resume.

On a CUDA machine (a few minutes):
- winner frequencies against softmax (chi-square, 4 fixed logits, 10^6 draws) and the
  Straight-Through gradient against a float64 hand computation, in float32 and under bf16 / fp16
  autocast, in training and sampling mode;
- `deit_tiny --U 16` and its GELU twin at 224 px, batch 128, bf16 autocast: median step time of
  training and inference, the CVN / twin ratios (goals 1.10 / 1.05, the paper's overheads), peak memory;
- `record --device cuda` and `dissect` on a small exported world probe;
- `torchrun --nproc_per_node 1 discover.py train ... --stop-after 1`, then `--resume`.

Without CUDA it runs the same checks on the CPU at a small size (bf16 autocast only, `deit_world`
timings) and says which CUDA parts it skipped, so the script stays alive in CI
(`tests/test_gpu_check.py` runs `--quick`). Exit code 1 when a check fails.

    python -m benchmarks.gpu_check            # on the GPU machine
    python -m benchmarks.gpu_check --quick    # a smaller CPU run
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
import lwta
import models

CHI2_999_DF3 = 16.266  # upper 0.1 % point of chi-square with 3 degrees of freedom
LOGITS = (1.0, -0.5, 0.3, 2.0)
FAILED: list[str] = []


def report(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def chi2_check(device: torch.device, amp: torch.dtype | None, train: bool, n: int) -> None:
    """Linear(1 -> 4) -> LWTA(4) under autocast ``amp``: winners of n rows against softmax of the
    responses the LWTA actually saw (rounded to the autocast dtype)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(1, 4, bias=False).to(device)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(LOGITS).view(4, 1))
    layer = lwta.LWTA(4)
    model = torch.nn.Sequential(lin, layer).train(train)
    x = torch.ones(n, 1, device=device)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None), \
            torch.set_grad_enabled(train):
        y = model(x)
    seen = torch.tensor(LOGITS).to(y.dtype).double()
    p = torch.softmax(seen, 0).numpy()
    counts = np.bincount(lwta.winners(layer).reshape(-1).cpu().numpy(), minlength=4)
    chi2 = float(((counts - n * p) ** 2 / (n * p)).sum())
    name = f"winners {device.type} {str(amp).replace('torch.', '') if amp else 'float32'} {'train' if train else 'sample'}"
    report(name, chi2 < CHI2_999_DF3, f"chi-square {chi2:.1f} (< {CHI2_999_DF3}), output {str(y.dtype)[6:]}")


def gradient_check(device: torch.device, dtype: torch.dtype) -> None:
    """Eq. 6's Straight-Through gradient of a ``dtype`` input against float64 by hand."""
    torch.manual_seed(1)
    R, U, tau = 64, 4, 0.67
    h = torch.randn(R, U, 1, device=device).to(dtype).requires_grad_()
    g = -torch.log(-torch.log(torch.rand(R, U, 1, device=device)))
    w = torch.randn(R, U, 1, device=device).to(dtype)
    y, _, _ = lwta.compete(h, tau=tau, training=True, mode="sample", want_kl=False, gumbel=g, fused=False)
    (y.float() * w.float()).sum().backward()
    H, G, W = (t.detach().double().cpu().reshape(R, U).numpy() for t in (h, g, w))
    z = (H + G) / tau
    s = np.exp(z - z.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    hard = np.eye(U)[z.argmax(1)]
    ref = W * hard + s * ((W * H) - ((W * H) * s).sum(1, keepdims=True)) / tau
    got = h.grad.double().cpu().reshape(R, U).numpy()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    err = float(np.abs(got - ref).max())
    report(f"straight-through gradient {device.type} {str(dtype)[6:]}", err <= tol * (1 + np.abs(ref).max()),
           f"max error {err:.2e}")


def timing(device: torch.device, arch: str, U: int, batch: int, size: int, steps: int, amp: bool) -> None:
    """Median train-step and inference time of the CVN against its twin, interleaved, with peak memory."""
    def build(kind: dict) -> torch.nn.Module:
        torch.manual_seed(0)
        return models.build(arch, num_classes=1000 if arch.startswith("deit_t") else 64, img_size=size, **kind).to(device)

    nets = {"cvn": build({"U": U}), "twin": build({"act": "gelu"})}
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 64, (batch,), device=device)
    ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else \
        (lambda: torch.autocast(device.type, enabled=False))
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in nets.items()}

    def train_step(k: str) -> None:
        m = nets[k].train()
        opts[k].zero_grad(set_to_none=True)
        with ctx():
            loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opts[k].step()

    def infer(k: str) -> None:
        m = nets[k].eval()
        with torch.inference_mode(), ctx():
            m(x)

    def clock(fn, k: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(k)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    peak = {}
    for name, fn in (("train step", train_step), ("inference", infer)):
        for k in nets:  # warm-up
            for _ in range(2):
                fn(k)
        ratios = []
        for _ in range(steps):
            t = {k: clock(fn, k) for k in nets}
            ratios.append(t["cvn"] / t["twin"])
        goal = 1.10 if name == "train step" else 1.05
        print(f"      {arch}/{U} batch {batch} {size}px {'bf16' if amp else 'fp32'} {name}: "
              f"CVN / twin {statistics.median(ratios):.3f} (goal <= {goal}; {steps} pairs)", flush=True)
    if device.type == "cuda":
        for k in nets:
            torch.cuda.reset_peak_memory_stats()
            train_step(k)
            torch.cuda.synchronize()
            peak[k] = torch.cuda.max_memory_allocated() / 2**30
        print(f"      peak memory of a train step: CVN {peak['cvn']:.2f} GiB, twin {peak['twin']:.2f} GiB")


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, **kw)


def end_to_end(device: torch.device, tmp: Path, quick: bool) -> None:
    """world export -> record --device -> dissect, and torchrun training stopped and resumed."""
    r = run(["discover.py", "world", "export", str(tmp / "probe"), "--n", "32" if quick else "64", "--seed", "4"])
    report("world export", r.returncode == 0, r.stderr.strip()[-200:] if r.returncode else "probe images written")
    ckpt = str(ROOT / "checkpoints" / "deit_world_u8")
    r = run(["discover.py", "record", "--model", ckpt, "--layers", "blocks.3.mlp.act", "--probe", str(tmp / "probe"),
             "--out", str(tmp / "acts"), "--device", device.type])
    report(f"record --device {device.type}", r.returncode == 0, r.stderr.strip()[-200:] if r.returncode else "recorded")
    r = run(["discover.py", "dissect", "--model", ckpt, "--layers", "blocks.3.mlp.act,head", "--probe",
             str(tmp / "probe"), "--out", str(tmp / "labels")])
    report("dissect", r.returncode == 0 and (tmp / "labels" / "labels.json").is_file(),
           r.stderr.strip()[-200:] if r.returncode else "labels.json written")
    n = "64" if quick else "256"
    common = ["discover.py", "train", "--arch", "deit_world", "--U", "8", "--data", "world:object", "--train-size", n,
              "--val-size", "32", "--test-size", "32", "--epochs", "2", "--batch-size", "32", "--workers", "0",
              "--out", str(tmp / "run")]
    if device.type == "cuda":
        common += ["--amp", "bf16"]
    launch = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = run([*launch, *common, "--stop-after", "1"], env=env, timeout=600)
    second = run([*launch, *common, "--resume"], env=env, timeout=600)
    ok = first.returncode == 0 and second.returncode == 0 and (tmp / "run" / "meta.json").is_file()
    report("torchrun --nproc_per_node 1, --stop-after 1 then --resume", ok,
           (first.stderr + second.stderr).strip()[-300:] if not ok else "finished both epochs")


@click.command()
@click.option("--quick", is_flag=True, help="Smaller draws and timings (the CPU run CI makes).")
def main(quick: bool) -> None:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    print(f"device: {torch.cuda.get_device_name(0) if cuda else 'cpu (no CUDA: the CUDA-only parts are skipped)'}; "
          f"torch {torch.__version__}", flush=True)
    n = 200_000 if quick else 1_000_000
    amps = [None, torch.bfloat16, torch.float16] if cuda else [None, torch.bfloat16]
    for amp in amps:
        for train in (True, False):
            chi2_check(device, amp, train, n)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        gradient_check(device, dtype)
    if cuda:
        timing(device, "deit_tiny", 16, 128, 224, 10 if quick else 30, amp=True)
    else:
        print("skipped: deit_tiny/16 at 224 px, batch 128, bf16 (needs CUDA); a small CPU timing instead")
        timing(device, "deit_world", 8, 32, 64, 3 if quick else 9, amp=False)
    with tempfile.TemporaryDirectory() as tmp:
        end_to_end(device, Path(tmp), quick)
    if FAILED:
        print(f"{len(FAILED)} check(s) failed: {', '.join(FAILED)}")
        sys.exit(1)
    print("all checks passed")


if __name__ == "__main__":
    main()
