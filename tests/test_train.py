"""Training: ELBO, S-sample evaluation, bit-exact resume, DDP equivalence, bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lwta
import models
import train
from common import DiscoverError
import world

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--arch", "deit_world", "--data", "world:object", "--train-size", "96", "--val-size", "32",
        "--test-size", "50", "--batch-size", "32", "--seed", "3"]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "discover.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=300)


def test_elbo_is_ce_plus_kl_by_hand() -> None:
    """Eq. 3 per example: mean CE + w * (sum over blocks of KL(pi_b || 1/U)) / batch."""
    model = torch.nn.Sequential(torch.nn.Linear(2, 4, bias=False), lwta.LWTA(2), torch.nn.Linear(4, 3, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -1.0], [0.5, 0.5]]))
        model[2].weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 1.0, 0], [0, 0, 0, 1.0]]))
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]])
    y = torch.tensor([2, 0])
    model.train()
    logits = model(x)
    loss, ce, kl = train.elbo_loss(model, logits, y, kl_weight=0.5)

    L = logits.detach().double().numpy()
    ref_ce = np.mean([np.log(np.exp(L[i]).sum()) - L[i, y[i]] for i in range(2)])
    h = x.double().numpy() @ model[0].weight.detach().double().numpy().T  # responses (2, 4)

    def kl2(a: float, b: float) -> float:
        p = 1 / (1 + np.exp(b - a))
        return p * np.log(2 * p) + (1 - p) * np.log(2 * (1 - p))

    ref_kl = sum(kl2(h[i, 0], h[i, 1]) + kl2(h[i, 2], h[i, 3]) for i in range(2)) / 2
    assert ce.item() == pytest.approx(ref_ce, rel=1e-6)
    assert kl.item() == pytest.approx(ref_kl, rel=1e-5)
    assert loss.item() == pytest.approx(ref_ce + 0.5 * ref_kl, rel=1e-5)


def test_evaluate_averages_the_logits_of_s_samples() -> None:
    """val_top1 = accuracy of the mean logits of S posterior samples; argmax mode separately."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), lwta.LWTA(4), torch.nn.Linear(8, 3))
    x, y = torch.randn(40, 3), torch.randint(0, 3, (40,))
    ds = torch.utils.data.TensorDataset(x, y)
    data = train.Data(ds, ds, ["a", "b", "c"], on_gpu_augment=False)
    cfg = train.resolve(train.TrainConfig(arch="deit_world", data="world:object", out="-", samples=3))
    loader = torch.utils.data.DataLoader(ds, batch_size=40)
    torch.manual_seed(7)
    got = train.evaluate(model, loader, cfg, data, torch.device("cpu"), train.Dist())

    torch.manual_seed(7)  # the same draws, by hand: one argmax pass, then S sampled passes
    x, y = next(iter(loader))  # (creating a loader iterator draws a seed from the global RNG)
    model.eval()
    with torch.no_grad():
        lwta.set_mode(model, "argmax")
        arg = model(x)
        lwta.set_mode(model, "sample")
        draws = [model(x) for _ in range(3)]
    mean = (draws[0] + draws[1] + draws[2]) / 3
    assert got["val_top1"] == pytest.approx(100 * (mean.argmax(1) == y).float().mean().item())
    assert got["val_top1_argmax"] == pytest.approx(100 * (arg.argmax(1) == y).float().mean().item())
    assert any(not torch.equal(draws[0], d) for d in draws[1:])  # the samples do differ


def test_schedules() -> None:
    cfg = train.resolve(train.TrainConfig(arch="deit_tiny", data="x", out="-", batch_size=1024))
    assert cfg.lr == pytest.approx(5e-4 * 1024 / 512) and cfg.weight_decay == 0.02
    assert train.get_lr(0, cfg, 10) == pytest.approx(1e-6)
    assert train.get_lr(50, cfg, 10) == pytest.approx(cfg.lr)  # end of 5 warm-up epochs
    assert train.get_lr(3000, cfg, 10) == pytest.approx(cfg.min_lr)
    r = train.resolve(train.TrainConfig(arch="resnet18", data="x", out="-"))
    assert (r.optimizer, r.lr, r.weight_decay, r.epochs) == ("sgd", 0.1, 1e-4, 90)
    assert train.get_lr(29 * 10 + 9, r, 10) == pytest.approx(0.1)
    assert train.get_lr(30 * 10, r, 10) == pytest.approx(0.01)
    assert train.get_lr(60 * 10, r, 10) == pytest.approx(0.001)


def test_world_recipe_epochs_for_cvn_and_twin() -> None:
    """deit_world: a CVN trains 40 epochs, its twin 30; a given --epochs wins; resnet_world: 24 both."""
    def epochs(arch: str, **kw) -> int:
        return train.resolve(train.TrainConfig(arch=arch, data="world:object", out="-", **kw)).epochs
    assert (epochs("deit_world", U=8), epochs("deit_world", act="gelu"), epochs("deit_world", U=8, epochs=3)) == (40, 30, 3)
    assert (epochs("resnet18_world", U=2), epochs("resnet18_world", act="relu")) == (24, 24)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    """3 epochs straight == 2 epochs, stop, resume 1 (CPU, fixed seed): identical weights."""
    common = [*TINY, "--U", "8", "--epochs", "3"]
    a = _cli("train", *common, "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    vals = [json.loads(ln)["val_top1"] for ln in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    best = vals.index(max(vals))  # kept: the newest epoch (to resume) and the best one
    assert sorted(p.name for p in (tmp_path / "a" / "checkpoints").iterdir()) == sorted(
        {"epoch_0002.pt", f"epoch_{best:04d}.pt"})
    b1 = _cli("train", *common, "--out", str(tmp_path / "b"), "--stop-after", "2")
    assert b1.returncode == 0, b1.stderr
    assert train.latest_checkpoint(tmp_path / "b").name == "epoch_0001.pt"
    assert "test" not in json.loads((tmp_path / "b" / "meta.json").read_text())  # not finished yet
    b2 = _cli("train", *common, "--out", str(tmp_path / "b"), "--resume")
    assert b2.returncode == 0, b2.stderr
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert (tmp_path / "a" / "metrics.jsonl").read_text() .splitlines()[2].split('"lr"')[0] == lines[2].split('"lr"')[0]
    # the held-out test score comes once the last epoch is done (same weights: same argmax score)
    ma, mb = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("a", "b"))
    assert ma["test"]["top1_argmax"] == mb["test"]["top1_argmax"]
    assert "--test-size 50" in ma["reproduce"]


def test_held_out_test_score_matches_a_manual_count(tmp_path: Path) -> None:
    """meta['test'] (argmax mode, deterministic) against the saved model run by hand on the 50
    images of the test seed, normalised as record does; the standard error is the binomial one."""
    r = _cli("train", *TINY, "--act", "gelu", "--epochs", "1", "--out", str(tmp_path / "t"))
    assert r.returncode == 0, r.stderr
    assert "test top-1 on 50 held-out world images" in r.stdout
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    model = models.load(tmp_path / "t")[0].eval()
    images, attrs = world.render_batch(train.WORLD_TEST_SEED, 0, 50)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(meta["mean"]).view(1, 3, 1, 1)) / torch.tensor(meta["std"]).view(1, 3, 1, 1)
    y = torch.tensor([world.label(a, "object") for a in attrs])  # class index
    with torch.no_grad():
        hits = int((model(x).argmax(1) == y).sum())
    t = meta["test"]
    assert (t["images"], t["seed"]) == (50, 3) and train.WORLD_TEST_SEED not in (0, 1, 2)
    assert t["top1_argmax"] == pytest.approx(100 * hits / 50)
    assert t["top1"] == t["top1_argmax"]  # a plain twin has no posterior to sample
    p = hits / 50
    assert t["top1_argmax_se"] == pytest.approx(100 * (p * (1 - p) / 50) ** 0.5)


def test_torchrun_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    """One optimisation step on 2 ranks x 32 images == one process on the combined 64. deit_tiny at
    64 px (a linear patch embedding): deit_world's conv stem has BatchNorm, whose batch statistics
    are per rank under DDP on CPU (SyncBatchNorm needs a GPU), so there the two differ by design."""
    args = ["--arch", "deit_tiny", "--img-size", "64", "--act", "gelu", "--data", "world:object", "--train-size", "64",
            "--val-size", "16", "--test-size", "40", "--batch-size", "64", "--epochs", "1", "--seed", "5",
            "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "discover.py", "train", *args, "--out", str(tmp_path / "one")], cwd=ROOT,
                         capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "discover.py", "train", *args, "--out", str(tmp_path / "ddp")], cwd=ROOT, capture_output=True,
                         text=True, env=env, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "ddp")
    init = models.build("deit_tiny", act="gelu", num_classes=64, img_size=64).state_dict()
    moved = 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(w1[k], init[k]))
    assert moved > 10  # the step did change the weights


def test_bad_input_is_one_line(tmp_path: Path) -> None:
    cases = [
        (["train", "--arch", "vgg", "--U", "2", "--data", "world:object", "--out", str(tmp_path / "x")], "unknown"),
        (["train", *TINY, "--U", "7", "--out", str(tmp_path / "y")], "not divisible by U=7"),
        (["train", "--arch", "deit_world", "--U", "8", "--data", "world:nope", "--out", str(tmp_path / "z")], "unknown task"),
        (["train", "--arch", "deit_world", "--U", "8", "--data", str(tmp_path), "--out", str(tmp_path / "w")], "train/"),
        (["train", *TINY, "--U", "8", "--out", str(tmp_path / "v"), "--resume"], "no checkpoint"),
        (["train", *TINY, "--out", str(tmp_path / "u")], "--U N"),
        (["train", *TINY, "--U", "8", "--test-size", "-1", "--out", str(tmp_path / "t")], "--test-size must be >= 0"),
    ]
    for args, expected in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], r.stderr
        assert "Traceback" not in r.stderr
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    r = _cli("train", *TINY, "--U", "8", "--out", str(occupied))
    assert r.returncode == 2 and "not empty" in r.stderr and (occupied / "notes.txt").read_text() == "mine"


def _hashes(images: np.ndarray) -> set[bytes]:
    import hashlib

    return {hashlib.sha256(np.ascontiguousarray(im).tobytes()).digest() for im in images}


def test_fresh_epochs_never_share_an_image_nor_meet_the_other_splits() -> None:
    """FreshWorld: epoch e item i is image e*n + i of the train seed; the arrays themselves (hashed)
    are all distinct across two epochs and from the validation, probe, test and CLIP images."""
    import probes
    import world_clip

    n, size = 300, 64
    ds = train.FreshWorld("object", n, train.WORLD_TRAIN_SEED, size)
    epochs = []
    for e in (0, 1):
        ds.set_epoch(e)
        items = [ds[i] for i in range(n)]
        assert [it[2] for it in items] == list(range(e * n, (e + 1) * n))
        epochs.append(_hashes(np.stack([it[0].numpy() for it in items])))
    assert len(epochs[0]) == len(epochs[1]) == n and not epochs[0] & epochs[1]
    train_h = epochs[0] | epochs[1]
    others = {name: _hashes(world.render_batch(seed, 0, n, size=size)[0])
              for name, seed in [("val", train.WORLD_VAL_SEED), ("probe", probes.WORLD_PROBE_SEED),
                                 ("test", train.WORLD_TEST_SEED), ("clip", world_clip.TRAIN_SEED),
                                 ("clip-eval", world_clip.EVAL_SEED)]}
    seen = {"train": train_h}
    for name, h in others.items():
        assert len(h) == n, name
        for other, h2 in seen.items():
            assert not h & h2, f"{name} meets {other}"
        seen[name] = h


def test_resume_after_a_killed_epoch_is_bit_exact(tmp_path: Path) -> None:
    """A run killed (SIGKILL) in its second epoch, then resumed, ends with the weights of an
    uninterrupted run: the resume restarts that epoch from the last checkpoint."""
    import signal
    import time

    common = [*TINY, "--U", "4", "--epochs", "3", "--train-size", "640", "--test-size", "0"]
    a = _cli("train", *common, "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, str(ROOT / "discover.py"), "train", *common, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (out / "checkpoints" / "epoch_0000.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    latest = train.latest_checkpoint(out)
    assert latest is not None
    r = _cli("train", *common, "--out", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    wa, wb = _weights(tmp_path / "a"), _weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_decisiveness_figures_by_hand() -> None:
    """CertaintyMeter on a one-layer model with known responses against NumPy float64: mean over
    blocks of max pi, entropy and sum pi^4 (4 independent draws agree), pi = softmax per block (Eq. 2)."""
    torch.manual_seed(0)
    U, K = 4, 8
    fc = torch.nn.Linear(3, K)
    model = torch.nn.Sequential(fc, lwta.LWTA(U)).eval()
    x = torch.randn(5, 3)
    with lwta.CertaintyMeter(model) as meter, torch.no_grad():
        model(x[:2])
        model(x[2:])
    (got,) = meter.means().values()
    w, b = fc.weight.detach().double().numpy(), fc.bias.detach().double().numpy()
    h = (x.double().numpy() @ w.T + b).reshape(5, K // U, U)
    pi = np.exp(h - h.max(-1, keepdims=True))
    pi /= pi.sum(-1, keepdims=True)
    assert got["max_pi"] == pytest.approx(pi.max(-1).mean(), abs=1e-6)
    assert got["entropy"] == pytest.approx((-(pi * np.log(pi)).sum(-1)).mean(), abs=1e-6)
    assert got["agree4"] == pytest.approx((pi ** 4).sum(-1).mean(), abs=1e-6)
    # the 4-draw agreement is what 4 draws do: an empirical check on one block
    g = torch.distributions.Categorical(torch.from_numpy(pi[0, 0])).sample((20000, 4))
    assert (g == g[:, :1]).all(1).double().mean().item() == pytest.approx((pi[0, 0] ** 4).sum(), abs=0.01)


def test_response_init_and_its_parameter_groups() -> None:
    """--response-std: every fc1 feeding an LWTA is re-drawn N(0, s^2/fan_in) (so h has std ~s on
    unit-variance inputs) and its fc2 divided by the same scale (so fc2 reads winners of the default
    size); each changed parameter trains in a group whose lr is multiplied and weight decay divided
    by its scale; every parameter is in exactly one group."""
    torch.manual_seed(0)
    model = models.build("deit_world", U=8, num_classes=64)
    old = {i: (float(b.mlp.fc1.weight.std()), b.mlp.fc2.weight.detach().clone()) for i, b in enumerate(model.blocks)}
    changed = train.init_responses(model, 6.0)
    want = [p for b in model.blocks for p in (b.mlp.fc1.weight, b.mlp.fc1.bias, b.mlp.fc2.weight)]
    assert [p for p, _ in changed] == want
    for i, b in enumerate(model.blocks):
        w1, s1 = changed[3 * i]
        assert float(w1.std()) == pytest.approx(6.0 / 96 ** 0.5, rel=0.02) and not b.mlp.fc1.bias.any()
        assert s1 == pytest.approx(float(w1.std()) / old[i][0]) and changed[3 * i + 1][1] == s1
        assert changed[3 * i + 2][1] == pytest.approx(1 / s1)
        np.testing.assert_allclose(b.mlp.fc2.weight.detach().numpy(), old[i][1].numpy() / s1, rtol=1e-6)
    x = torch.nn.functional.layer_norm(torch.randn(4096, 96), (96,))
    assert float(model.blocks[0].mlp.fc1(x).std()) == pytest.approx(6.0, rel=0.05)
    groups = train.param_groups(model, 0.02, changed)
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    for p, scale in changed:
        (g,) = [g for g in groups if len(g["params"]) == 1 and g["params"][0] is p]
        assert g["lr_scale"] == scale
        assert g["weight_decay"] == (pytest.approx(0.02 / scale) if p.ndim >= 2 else 0.0)
    assert all(g["lr_scale"] == 1.0 for g in groups[:2])
    twin = models.build("deit_world", act="gelu", num_classes=64)
    assert train.init_responses(twin, 6.0) == []  # nothing competes in a twin


def test_response_init_of_a_resnet_cvn() -> None:
    """--response-std for ConvLWTA: the input of every LWTA (a BatchNorm output, or a sum of two, in
    training mode) has std ~s per channel at initialisation, against ~1 (or ~sqrt(2) for a sum) by
    default; the classifier reading the last winners is divided by s; with SGD (power 2) each group's
    lr is multiplied, and weight decay divided, by scale^2."""
    torch.manual_seed(0)
    model = models.build("resnet18_world", U=2, num_classes=64)
    fc_old = model.fc.weight.detach().clone()
    inputs: dict[str, list[float]] = {}

    def hook(mod, args, _out) -> None:
        inputs.setdefault(mod.name, []).append(float(args[0].std(dim=(0, 2, 3)).mean()))

    acts = lwta.lwta_modules(model)
    handles = [m.register_forward_hook(hook) for m in acts.values()]
    x = torch.randn(32, 3, 64, 64)
    model.train()
    with torch.no_grad():
        model(x)
    before = {k: v[-1] for k, v in inputs.items()}
    changed = train.init_responses(model, 3.0)
    with torch.no_grad():
        model(x)
    after = {k: v[-1] for k, v in inputs.items()}
    for h in handles:
        h.remove()
    assert len(acts) == 9 and set(after) == set(acts)
    for name in acts:  # BatchNorm outputs (or sums of them) scaled by exactly s
        assert after[name] == pytest.approx(3.0 * before[name], rel=0.02), name
    np.testing.assert_allclose(model.fc.weight.detach().numpy(), fc_old.numpy() / 3.0, rtol=1e-6)
    bns = [model.bn1] + [m for b in model.modules() if isinstance(b, models.CompetitiveBasicBlock)
                         for m in (b.bn1, b.bn2, *(b.downsample[1:2] if b.downsample is not None else ()))]
    assert {id(p) for p, _ in changed} == {id(p) for bn in bns for p in (bn.weight, bn.bias)} | {id(model.fc.weight)}
    groups = train.param_groups(model, 1e-4, changed, power=2)
    for p, scale in changed:
        (g,) = [g for g in groups if len(g["params"]) == 1 and g["params"][0] is p]
        assert g["lr_scale"] == pytest.approx(scale ** 2)
        assert g["weight_decay"] == (pytest.approx(1e-4 / scale ** 2) if p.ndim >= 2 else 0.0)
    assert train.init_responses(models.build("resnet18_world", act="relu", num_classes=64), 3.0) == []


def _image_folder(root: Path, n_train: int, n_val: int) -> Path:
    """A tiny ImageFolder root (train/ and val/) of world images by shape."""
    from PIL import Image

    for split, seed, n in (("train", 20, n_train), ("val", 21, n_val)):
        images, attrs = world.render_batch(seed, 0, n)
        for i, (im, a) in enumerate(zip(images, attrs)):
            d = root / split / a["shape"]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im).save(d / f"{i}.png")
    return root


def test_imagefolder_resume_is_bit_exact_with_workers(tmp_path: Path) -> None:
    """A ResNet CVN on an ImageFolder root: 2 epochs straight (2 workers) == 1 epoch (2 workers),
    stop, resume with 0 workers: the augmentation is seeded per (seed, epoch, image)."""
    data = _image_folder(tmp_path / "data", 128, 32)
    common = ["--arch", "resnet18_world", "--U", "4", "--data", str(data), "--epochs", "2", "--batch-size", "32",
              "--img-size", "64", "--seed", "1"]
    a = _cli("train", *common, "--workers", "2", "--out", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    b1 = _cli("train", *common, "--workers", "2", "--stop-after", "1", "--out", str(tmp_path / "b"))
    assert b1.returncode == 0, b1.stderr
    b2 = _cli("train", *common, "--workers", "0", "--resume", "--out", str(tmp_path / "b"))
    assert b2.returncode == 0, b2.stderr
    assert "resuming" in b2.stdout and "epoch_0000.pt" in b2.stdout
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    again = _cli("train", *common, "--resume", "--out", str(tmp_path / "b"))
    assert again.returncode == 0 and "already trained all 2 epochs" in again.stdout
    bad = _cli("train", *common[:-2], "--seed", "2", "--resume", "--out", str(tmp_path / "b"))
    assert bad.returncode == 2 and "--seed 1 -> 2" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    more = _cli("train", *[c if c != "2" or common[i - 1] != "--epochs" else "3" for i, c in enumerate(common)],
                "--resume", "--out", str(tmp_path / "b"))
    assert more.returncode == 0, more.stderr
    assert "--epochs 2 -> 3" in more.stdout and json.loads((tmp_path / "b" / "meta.json").read_text())["epoch"] == 2


def test_a_class_mismatch_names_the_folders(tmp_path: Path) -> None:
    import shutil

    data = _image_folder(tmp_path / "data", 24, 24)
    shared = sorted({p.name for p in (data / "train").iterdir()} & {p.name for p in (data / "val").iterdir()})
    shutil.rmtree(data / "val" / shared[0])  # now only in train/
    extra = data / "val" / "zzz_extra"  # only in val/
    extra.mkdir()
    shutil.copy(next((data / "val" / shared[1]).iterdir()), extra / "x.png")
    r = _cli("train", "--arch", "resnet18_world", "--U", "2", "--data", str(data), "--out", str(tmp_path / "o"))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert f"only in train/: {shared[0]}" in r.stderr and "only in val/: zzz_extra" in r.stderr


def test_a_resnet_run_from_before_the_option_resumes_and_a_mismatch_is_one_line(tmp_path: Path, monkeypatch) -> None:
    """A resnet18_world CVN checkpoint whose config has no response_std key (made before the option)
    resumes with the default initialisation's groups, though the recipe now defaults to 2; a
    checkpoint whose optimizer groups do not match this code's is a one-line error, not torch's."""
    args = dict(arch="resnet18_world", U=2, data="world:object", out=str(tmp_path / "old"), epochs=2,
                train_size=64, val_size=16, test_size=0, batch_size=32, workers=0)
    monkeypatch.setitem(train.RECIPES["resnet_world"], "response_std", None)
    train.train(train.TrainConfig(**args, stop_after=1), progress=False)
    monkeypatch.undo()
    (ckpt_path,) = (tmp_path / "old" / "checkpoints").glob("*.pt")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    del ckpt["config"]["response_std"]
    torch.save(ckpt, ckpt_path)
    meta = train.train(train.TrainConfig(**args), resume=True, progress=False)
    assert meta["epoch"] == 1 and "--response-std" not in meta["reproduce"]
    last = train.latest_checkpoint(tmp_path / "old")
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    ckpt["config"]["response_std"] = 2.0  # stored as if scaled, yet its optimizer has the default groups
    torch.save(ckpt, last)
    with pytest.raises(DiscoverError, match="optimizer groups"):
        train.train(train.TrainConfig(**{**args, "epochs": 3}), resume=True, progress=False)


def test_a_run_from_before_a_recipe_default_changed_resumes_with_its_own(tmp_path: Path, monkeypatch) -> None:
    """A deit_world CVN checkpointed when the recipe had no --response-std (stored as None) resumes
    with None, though the recipe now defaults to 4: same optimizer groups, no options mismatch."""
    args = dict(arch="deit_world", U=8, data="world:object", out=str(tmp_path / "old"), epochs=2, train_size=64,
                val_size=16, test_size=0, batch_size=32, workers=0)
    monkeypatch.setitem(train.RECIPES["deit_world"], "response_std", None)
    train.train(train.TrainConfig(**args, stop_after=1), progress=False)
    monkeypatch.undo()
    assert train.RECIPES["deit_world"]["response_std"] == 4.0
    meta = train.train(train.TrainConfig(**args), resume=True, progress=False)
    assert meta["epoch"] == 1 and "--response-std" not in meta["reproduce"]
    with pytest.raises(DiscoverError, match="`response_std` None -> 2.0"):
        train.train(train.TrainConfig(**{**args, "epochs": 3}, response_std=2.0), resume=True, progress=False)
