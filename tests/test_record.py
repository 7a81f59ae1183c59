"""Activation recording: hooked layers against hand-run forwards, LWTA sparsity, content caching,
model specs, probes and their errors, the CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import lwta
import record
import models
import probes
import schema
from common import DiscoverError

N_IMAGES = 12


def _images(folder: Path, n: int = N_IMAGES, seed: int = 0) -> Path:
    """``n`` noise images of assorted sizes and types (one in a sub-folder, one not square)."""
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (64, 64) if i % 3 else (48, 80)
        path = folder / ("sub" if i == 0 else "") / f"img{i:02d}.{'jpg' if i % 4 == 1 else 'png'}"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return folder


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory) -> Path:
    return _images(tmp_path_factory.mktemp("probe"))


def _save_run(path: Path, model: nn.Module, arch: str, **meta) -> Path:
    models.save(model, path, {"arch": arch, "num_classes": 10, "img_size": 64, "classes": list("abcdefghij"),
                            "mean": list(models.IMAGENET_MEAN), "std": list(models.IMAGENET_STD), **meta})
    return path


@pytest.fixture(scope="module")
def deit_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _save_run(tmp_path_factory.mktemp("deit") / "run", models.build("deit_world", U=4, num_classes=10),
                     "deit_world", U=4)


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return _save_run(tmp_path_factory.mktemp("resnet") / "run",
                     models.build("resnet18_world", act="relu", num_classes=10), "resnet18_world", act="relu")


def _record(model, meta, layers, probe, out, **kw) -> tuple[dict[str, np.ndarray], list[str]]:
    logs: list[str] = []
    paths = record.record_layers(model, meta, layers, probe, out, progress=False, log=logs.append, **kw)
    return {k: record.read_activations(p)[0] for k, p in paths.items()}, logs


def _input(probe: probes.Probe, meta: schema.ModelMeta) -> torch.Tensor:
    return models.to_input(probe.images(0, probe.n, meta.img_size), meta, torch.device("cpu"))


# --- hooked layers against forwards run by hand ---------------------------------------------------

def test_deit_mlp_activation_matches_a_hand_run_forward(deit_run, image_dir, tmp_path) -> None:
    model, meta = models.load_model(str(deit_run))
    probe = probes.load_probe(str(image_dir))
    k, U = 3, 4
    acts, _ = _record(model, meta, [f"blocks.{k}.mlp.act", "head"], probe, tmp_path, mode="argmax", batch_size=5,
                      signal="sample")
    lwta.set_mode(model, "argmax")
    with torch.no_grad():
        x = _input(probe, meta)
        logits = model(x)
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        for blk in model.blocks[:k]:
            t = blk(t)
        blk = model.blocks[k]
        t = t + blk.ls1(blk.attn(blk.norm1(t)))
        h = blk.mlp.fc1(blk.norm2(t))[:, 0].reshape(probe.n, -1, U)  # class token, blocks of U
        ref = (h * (h == h.amax(-1, keepdim=True))).reshape(probe.n, -1)  # argmax winner keeps h
    np.testing.assert_allclose(acts[f"blocks.{k}.mlp.act"], ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(acts["head"], logits.numpy(), rtol=1e-4, atol=1e-5)


def test_resnet_block_activation_matches_a_hand_run_forward(resnet_run, image_dir, tmp_path) -> None:
    model, meta = models.load_model(str(resnet_run))
    probe = probes.load_probe(str(image_dir))
    acts, _ = _record(model, meta, ["layer3.0.act2", "fc", "layer2"], probe, tmp_path, summary="auto", batch_size=8)
    maxed, _ = _record(model, meta, ["layer3.0.act2"], probe, tmp_path / "max", summary="max")
    with torch.no_grad():
        x = _input(probe, meta)
        logits = model(x)
        t = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        t2 = model.layer2(model.layer1(t))
        blk = model.layer3[0]
        out = torch.relu(blk.bn2(blk.conv2(blk.act1(blk.bn1(blk.conv1(t2))))) + blk.downsample(t2))
    np.testing.assert_allclose(acts["layer3.0.act2"], out.mean((2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maxed["layer3.0.act2"], out.amax((2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(acts["layer2"], t2.mean((2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(acts["fc"], logits.numpy(), rtol=1e-4, atol=1e-5)


def test_preprocessing_resizes_crops_and_normalises(image_dir) -> None:
    probe = probes.load_probe(str(image_dir))
    wide = probe.names.index("img03.png")  # 80 x 48: centre 48 x 48, resized to 32
    img = probe.get_image(wide)
    assert img.size == (80, 48) and img.mode == "RGB"
    arr = probe.images(wide, wide + 1, 32)[0]
    assert arr.shape == (32, 32, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, np.asarray(img.resize((32, 32), Image.BILINEAR, box=(16, 0, 64, 48))))
    meta = schema.ModelMeta(arch="-", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.5])
    x = models.to_input(arr[None], meta, torch.device("cpu"))
    assert x.shape == (1, 3, 32, 32)
    assert x[0, 2, 5, 7].item() == pytest.approx((arr[5, 7, 2] / 255 - 0.3) / 0.5, abs=1e-6)


# --- LWTA: sparsity, modes, seeds -----------------------------------------------------------------

@pytest.mark.parametrize("U", [2, 4])
def test_lwta_class_token_has_one_winner_per_block(U, image_dir, tmp_path) -> None:
    torch.manual_seed(1)
    model = models.build("deit_world", U=U, num_classes=10).eval()
    meta = schema.ModelMeta(arch="-", img_size=64)
    probe = probes.load_probe(str(image_dir))
    last = len(model.blocks) - 1
    acts, _ = _record(model, meta, ["blocks.1.mlp.act", f"blocks.{last}.mlp.act"], probe, tmp_path, signal="sample")
    for a in acts.values():
        assert a.shape == (probe.n, model.blocks[0].mlp.fc1.out_features)
        assert np.all((a.reshape(probe.n, -1, U) != 0).sum(-1) == 1)  # per block and example
        assert (a != 0).mean() == pytest.approx(1 / U, abs=0)


def test_lwta_conv_spatial_mean_is_not_sparse(image_dir, tmp_path) -> None:
    torch.manual_seed(0)
    model = models.build("resnet18_world", U=2, num_classes=10).eval()
    meta = schema.ModelMeta(arch="-", img_size=64)
    acts, _ = _record(model, meta, ["layer1.0.act1"], probes.load_probe(str(image_dir)), tmp_path, signal="sample")
    assert (acts["layer1.0.act1"] != 0).mean() > 0.9  # every position has its own winner


def test_sample_mode_is_seeded_and_independent_of_the_other_layers(deit_run, image_dir, tmp_path) -> None:
    model, meta = models.load_model(str(deit_run))
    probe = probes.load_probe(str(image_dir))
    kw = {"batch_size": 5, "signal": "sample"}
    a, _ = _record(model, meta, ["blocks.1.mlp.act"], probe, tmp_path / "a", seed=3, **kw)
    b, _ = _record(model, meta, ["blocks.1.mlp.act", "blocks.3.mlp.act"], probe, tmp_path / "b", seed=3, **kw)
    c, _ = _record(model, meta, ["blocks.1.mlp.act"], probe, tmp_path / "c", seed=4, **kw)
    assert np.array_equal(a["blocks.1.mlp.act"], b["blocks.1.mlp.act"])
    assert not np.array_equal(a["blocks.1.mlp.act"], c["blocks.1.mlp.act"])
    assert all(m.mode == "sample" for m in lwta.lwta_modules(model).values())  # restored after argmax runs


# --- LWTA neuron signals against hand computations -------------------------------------------------

class _Tiny(nn.Module):
    """A linear map into one LWTA layer: the layer's responses h are the input itself."""

    def __init__(self, U: int, conv: bool = False) -> None:
        super().__init__()
        self.act = lwta.ConvLWTA(U) if conv else lwta.LWTA(U)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


def _signal(module: nn.Module, h: torch.Tensor, signal: str) -> np.ndarray:
    out = module(h)
    return record.neuron_signal(module, h, out, signal).numpy()


def test_pi_of_a_hand_built_block() -> None:
    h = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0, 3.0, 0.0, -2.0]])  # two blocks of 4
    layer = lwta.LWTA(4).eval()
    pi = _signal(layer, h, "pi")
    for b in range(2):
        e = np.exp(h[0, 4 * b:4 * b + 4].double().numpy())
        np.testing.assert_allclose(pi[0, 4 * b:4 * b + 4], e / e.sum(), rtol=1e-6)
    assert np.allclose(pi.reshape(2, 4).sum(1), 1.0)


def test_expected_and_argmax_signals_by_hand() -> None:
    h = torch.tensor([[0.3, -1.2, 2.0, 1.5], [-0.5, -0.25, 4.0, 4.0]])  # U = 2: four blocks per row
    layer = lwta.LWTA(2).eval()
    exp_ = _signal(layer, h, "expected")
    arg = _signal(layer, h, "argmax")
    ref_exp = np.zeros((2, 4))
    ref_arg = np.zeros((2, 4))
    for i in range(2):
        for b in range(2):
            a, c = float(h[i, 2 * b]), float(h[i, 2 * b + 1])
            p0 = 1 / (1 + np.exp(c - a))
            ref_exp[i, 2 * b], ref_exp[i, 2 * b + 1] = p0 * a, (1 - p0) * c
            w = 0 if a >= c else 1  # first maximum on a tie
            ref_arg[i, 2 * b + w] = (a, c)[w]
    np.testing.assert_allclose(exp_, ref_exp, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(arg, ref_arg)


def test_win_rate_of_a_2x2_conv_map(tmp_path) -> None:
    """ConvLWTA U = 2 on one block and a 2 x 2 map: the spatial mean of pi is the unit's mean winning
    probability; the recorded winner indicators (argmax) are the share of positions it wins."""
    h = torch.tensor([[[[1.0, 0.0], [2.0, -1.0]], [[0.0, 3.0], [1.0, -1.5]]]])  # (1, 2, 2, 2)
    layer = lwta.ConvLWTA(2).eval()
    pi = record.summarise(torch.from_numpy(_signal(layer, h, "pi")), "mean")[0].numpy()
    p0 = [1 / (1 + np.exp(b - a)) for a, b in zip([1.0, 0.0, 2.0, -1.0], [0.0, 3.0, 1.0, -1.5])]
    np.testing.assert_allclose(pi[0], [np.mean(p0), 1 - np.mean(p0)], rtol=1e-6)
    wins = record.summarise(record.winner_mask(layer, h, "argmax"), "mean")[0].numpy()
    np.testing.assert_array_equal(wins[0], [0.75, 0.25])  # unit 0 wins 3 of the 4 positions


def test_signals_are_recorded_with_their_winners_and_never_share_a_cache_entry(deit_run, image_dir, tmp_path) -> None:
    model, meta = models.load_model(str(deit_run))
    probe = probes.load_probe(str(image_dir))
    layer, U = "blocks.3.mlp.act", 4
    got, infos, wins = {}, {}, {}
    for sig in ("pi", "expected", "sample", "argmax"):
        logs: list[str] = []
        paths = record.record_layers(model, meta, [layer, "head"], probe, tmp_path, progress=False, log=logs.append,
                                     signal=sig)
        assert f"{layer}: recorded" in logs  # the file of the previous signal is not reused
        got[sig], infos[sig] = record.read_activations(paths[layer])
        wins[sig] = record.read_wins(paths[layer])
        assert record.read_wins(paths["head"]) is None  # a plain layer records its output only
        assert record.read_metadata(paths["head"])["signal"] == "output"
    assert len({i["key"] for i in infos.values()}) == 4 and all(i["signal"] == s for s, i in infos.items())
    pi = got["pi"].reshape(probe.n, -1, U)
    assert np.allclose(pi.sum(-1), 1.0, atol=1e-5)
    assert np.array_equal(wins["pi"], (pi == pi.max(-1, keepdims=True)).reshape(probe.n, -1).astype(np.float32))
    assert np.array_equal(wins["sample"], (got["sample"] != 0).astype(np.float32))
    again = record.record_layers(model, meta, [layer], probe, tmp_path, progress=False, signal="sample")
    assert np.array_equal(record.read_activations(again[layer])[0], got["sample"])  # the same file again
    with pytest.raises(DiscoverError, match="`signal` must be one of"):
        record.record_layers(model, meta, [layer], probe, tmp_path / "bad", progress=False, signal="probability")
    assert not (tmp_path / "bad").exists()


# --- the content cache ----------------------------------------------------------------------------

def test_cache_is_reused_and_invalidated(resnet_run, tmp_path) -> None:
    folder = _images(tmp_path / "imgs", n=6)
    model, meta = models.load_model(str(resnet_run))
    probe = probes.load_probe(str(folder))
    out = tmp_path / "acts"
    first, logs = _record(model, meta, ["layer4.0.act2", "fc"], probe, out)
    assert logs == ["layer4.0.act2: recorded", "fc: recorded"]
    stamp = (out / "fc.safetensors").stat().st_mtime_ns
    again, logs = _record(model, meta, ["fc", "layer4.0.act2"], probe, out, mode="argmax", seed=9)
    assert logs == ["fc: cached", "layer4.0.act2: cached"]  # no LWTA: mode and seed do not matter
    assert (out / "fc.safetensors").stat().st_mtime_ns == stamp
    _, logs = _record(model, meta, ["fc"], probe, out, summary="max")  # another key (same result)
    assert logs == ["fc: recorded"]
    # changed weights: recomputed
    with torch.no_grad():
        model.fc.bias += 1.0
    _save_run(tmp_path / "run2", model, "resnet18_world", act="relu")
    model2, meta2 = models.load_model(str(tmp_path / "run2"))
    changed, logs = _record(model2, meta2, ["fc"], probe, out)
    assert logs == ["fc: recorded"]
    np.testing.assert_allclose(changed["fc"], first["fc"] + 1.0, atol=1e-5)
    # a changed probe (one more image): recomputed; the record lists the images
    Image.new("RGB", (64, 64), (9, 9, 9)).save(folder / "zz.png")
    bigger = probes.load_probe(str(folder))
    assert bigger.fingerprint != probe.fingerprint
    acts, logs = _record(model2, meta2, ["fc"], bigger, out)
    assert logs == ["fc: recorded"] and acts["fc"].shape == (7, 10)
    rec = json.loads((out / "record.json").read_text())
    assert rec["names"] == bigger.names and rec["n"] == 7 and list(rec["layers"]) == ["fc"]
    info = record.read_metadata(out / "fc.safetensors")
    assert info["probe_fingerprint"] == bigger.fingerprint and info["U"] == "none"
    assert info["shape"] == "7x10" and info["summary"] == "auto"


def test_cvn_and_twin_never_share_an_entry() -> None:
    torch.manual_seed(0)
    cvn = models.build("deit_world", U=4, num_classes=10)
    twin = models.build("deit_world", act="gelu", num_classes=10)
    twin.load_state_dict(cvn.state_dict())
    assert models.model_hash(cvn) != models.model_hash(twin)
    assert models.model_hash(cvn) == models.model_hash(cvn)


def test_activation_file_is_plain_safetensors(deit_run, image_dir, tmp_path) -> None:
    from safetensors.numpy import load_file

    model, meta = models.load_model(str(deit_run))
    paths = record.record_layers(model, meta, ["blocks.0.mlp.fc2"], probes.load_probe(str(image_dir)),
                                 tmp_path, summary="mean", progress=False)
    a, info = record.read_activations(paths["blocks.0.mlp.fc2"])
    assert np.array_equal(load_file(str(paths["blocks.0.mlp.fc2"]))["activations"], a)
    assert a.dtype == np.float32 and a.shape == (N_IMAGES, model.embed_dim)
    assert info["summary_applied"] == "mean" and "mean over the T tokens" in info["shape_meaning"]
    assert info["lwta_mode"] == "sample" and info["seed"] == "0" and len(info["model_hash"]) == 64


# --- model specs ----------------------------------------------------------------------------------

def test_pth_with_module_prefix_loads(deit_run, tmp_path) -> None:
    model, _ = models.load_model(str(deit_run))
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}, path)
    loaded, meta = models.load_model(str(path), arch="deit_world", U=4)  # head width read from the file
    assert meta.num_classes == 10 and meta.U == 4 and meta.img_size == 64
    assert models.model_hash(loaded) == models.model_hash(model)
    with pytest.raises(DiscoverError, match="needs its architecture"):
        models.load_model(str(path))


def test_timm_and_torchvision_specs(tmp_path, monkeypatch) -> None:
    import timm
    import torchvision

    vit = timm.create_model("test_vit", num_classes=5)
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    model, meta = models.load_model(f"timm:test_vit:{tmp_path / 'vit.pth'}")
    assert meta.img_size == 160 and meta.mean == [0.5, 0.5, 0.5] and meta.num_classes == 5
    assert models.model_hash(model) == models.model_hash(vit)
    net = torchvision.models.get_model("mobilenet_v3_small", num_classes=7)
    torch.save(net.state_dict(), tmp_path / "mnv3.pth")
    model, meta = models.load_model(f"torchvision:mobilenet_v3_small:{tmp_path / 'mnv3.pth'}")
    assert meta.img_size == 224 and meta.num_classes == 7
    # offline: one-line errors, no download attempt
    monkeypatch.setattr(models, "reachable", lambda host, timeout=3.0: False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(DiscoverError, match="torch hub cache"):
        models.load_model("torchvision:mobilenet_v3_small:IMAGENET1K_V1")
    with pytest.raises(DiscoverError, match="pretrained weights"):
        models.load_model("timm:test_vit:pretrained")
    with pytest.raises(DiscoverError, match="close names: test_vit"):
        models.load_model("timm:test_vitt")
    with pytest.raises(DiscoverError, match="no such run directory"):
        models.load_model(str(tmp_path / "nothing"))


# --- layers ---------------------------------------------------------------------------------------

def test_unknown_layer_lists_close_names(deit_run) -> None:
    model, _ = models.load_model(str(deit_run))
    with pytest.raises(DiscoverError, match=r"unknown layer 'blocks\.2\.mlp\.actt'; close names: blocks\.2\.mlp\.act"):
        record.resolve_layers(model, ["blocks.2.mlp.actt"])
    assert list(record.resolve_layers(model, ["lwta"])) == [f"blocks.{i}.mlp.act" for i in range(len(model.blocks))]


def test_shared_module_and_bad_summary_are_errors(image_dir, tmp_path) -> None:
    class Shared(nn.Module):  # one ReLU module at two sites, as torchvision's ResNet blocks do
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.fc = nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.relu(self.relu(self.conv(x))).mean((2, 3)))

    meta = schema.ModelMeta(arch="-", img_size=16, mean=[0.5] * 3, std=[0.5] * 3)
    probe = probes.load_probe(str(image_dir))
    with pytest.raises(DiscoverError, match="layer relu runs 2 times per forward"):
        record.record_layers(Shared(), meta, ["relu"], probe, tmp_path, progress=False)
    with pytest.raises(DiscoverError, match="does not apply"):
        record.record_layers(Shared(), meta, ["conv"], probe, tmp_path, summary="cls", progress=False)
    assert not list(tmp_path.glob("*.safetensors")) and not list(tmp_path.glob(".*.tmp"))  # nothing half-written
    rows = {r["layer"]: r for r in record.describe_layers(Shared(), meta, probe)}
    assert rows["relu"]["calls"] == 2 and rows["conv"]["shape"] == "1x4x14x14"


# --- probes ---------------------------------------------------------------------------------------

def test_folder_probe_names_and_fingerprint(tmp_path) -> None:
    folder = _images(tmp_path / "p", n=5)
    (folder / ".hidden.png").write_bytes((folder / "img01.jpg").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    probe = probes.load_probe(str(folder))
    assert probe.names == ["img01.jpg", "img02.png", "img03.png", "img04.png", "sub/img00.png"]
    assert probe.n == 5 and probe.get_image(4).size == (80, 48)
    assert probes.load_probe(str(folder)).fingerprint == probe.fingerprint
    os.utime(folder / "img02.png", ns=(1, 1))
    assert probes.load_probe(str(folder)).fingerprint != probe.fingerprint


def test_empty_and_corrupt_probes(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiscoverError, match="no images"):
        probes.load_probe(str(tmp_path / "empty"))
    with pytest.raises(DiscoverError, match="no such folder"):
        probes.load_probe(str(tmp_path / "missing"))
    folder = _images(tmp_path / "bad", n=4)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    data = (folder / "img01.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG: header fine
    with pytest.raises(DiscoverError, match=r"corrupt image broken\.png .*\(and 1 more\); pass `skip_bad`"):
        probes.load_probe(str(folder))
    probe = probes.load_probe(str(folder), skip_bad=True)
    assert probe.skipped == ["broken.png", "cut.jpg"] and probe.n == 4
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "x.jpg").write_bytes(b"nope")
    with pytest.raises(DiscoverError, match="none of its 1 images"):
        probes.load_probe(str(tmp_path / "only"), skip_bad=True)


def test_world_probe(tmp_path, deit_run) -> None:
    world = pytest.importorskip("world")
    probe = probes.load_probe("world:16")
    assert probe.n == 16 and probe.names[3] == "world:2:3"
    assert probes.load_probe("world:16:5").fingerprint != probe.fingerprint
    batch = np.concatenate(list(probe.batches(6, 64)))
    assert batch.shape == (16, 64, 64, 3) and batch.dtype == np.uint8
    assert np.array_equal(batch, world.render_batch(2, 0, 16, size=64)[0])
    assert np.array_equal(np.asarray(probe.get_image(5)), batch[5])  # image i does not depend on its batch
    model, meta = models.load_model(str(deit_run))
    acts, _ = _record(model, meta, ["blocks.1.mlp.act"], probe, tmp_path)
    assert acts["blocks.1.mlp.act"].shape == (16, model.blocks[1].mlp.fc1.out_features)
    for bad in ("world:x", "world:0", "world:1:2:3"):
        with pytest.raises(DiscoverError, match="world:"):
            probes.load_probe(bad)


# --- the command line -----------------------------------------------------------------------------

def _cli(*args: str):
    from click.testing import CliRunner

    from discover import cli

    return CliRunner().invoke(cli, ["record", *args])


def test_cli_records_and_lists(deit_run, image_dir, tmp_path) -> None:
    out = tmp_path / "acts"
    res = _cli("--model", str(deit_run), "--layers", "blocks.2.mlp.act,head", "--probe", str(image_dir),
               "--out", str(out), "--batch-size", "5", "--mode", "argmax")
    assert res.exit_code == 0, res.output
    assert (out / "blocks.2.mlp.act.safetensors").is_file() and (out / "head.safetensors").is_file()
    assert json.loads((out / "record.json").read_text())["layers"]["blocks.2.mlp.act"]["U"] == "4"
    res = _cli("--model", str(deit_run), "--layers", "head", "--probe", str(image_dir), "--out", str(out),
               "--batch-size", "5", "--mode", "argmax")
    assert res.exit_code == 0 and "head: cached" in res.stdout
    res = _cli("--model", str(deit_run), "--list-layers")
    assert res.exit_code == 0 and "blocks.1.mlp.act" in res.stdout and "LWTA 4" in res.stdout


@pytest.mark.parametrize("args, message", [
    (["--layers", "blocks.1.mlp.actt"], "close names: blocks.1.mlp.act"),
    (["--layers", "head", "--probe", "EMPTY"], "no images"),
    (["--layers", "head", "--probe", "CORRUPT"], "corrupt image x.png"),
    (["--layers", "head", "--out", None], "missing --out"),
])
def test_cli_bad_input_is_one_line_exit_2(args, message, deit_run, image_dir, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "x.png").write_bytes(b"not a png")
    opts = {"--model": str(deit_run), "--probe": str(image_dir), "--out": str(tmp_path / "o")}
    opts.update(dict(zip(args[::2], args[1::2])))
    opts = {k: {"EMPTY": str(tmp_path / "empty"), "CORRUPT": str(tmp_path / "corrupt")}.get(v, v)
            for k, v in opts.items() if v is not None}
    res = _cli(*[s for kv in opts.items() for s in kv])
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and message in res.stderr


def test_hub_models_without_weights_are_seeded_and_said_to_be_random(capsys) -> None:
    """timm:NAME / torchvision:NAME without weights: the same network (and hash) on every load, a
    note on stderr that it is random, and torch's global generator left as it was."""
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    hashes = []
    for spec in ("timm:test_vit", "timm:test_vit", "torchvision:mobilenet_v3_small", "torchvision:mobilenet_v3_small"):
        model, _ = models.load_model(spec)
        hashes.append(models.model_hash(model))
        assert "randomly initialised network (seed 0)" in capsys.readouterr().err
    assert hashes[0] == hashes[1] and hashes[2] == hashes[3] and hashes[0] != hashes[2]
    assert torch.equal(torch.rand(3), before)  # the loads drew nothing from the global generator


def test_timm_weights_in_a_foreign_layout_go_through_timms_filter(tmp_path) -> None:
    """A ViT state dict whose position embedding has another grid (224 px) loads into timm:test_vit
    (160 px) through the family's checkpoint_filter_fn, which resamples it; a file that no filter
    fixes is a one-line error naming it."""
    import timm
    from timm.layers import resample_abs_pos_embed

    big = timm.create_model("test_vit", img_size=224)
    state = big.state_dict()
    torch.save(state, tmp_path / "vit224.pth")
    model, _ = models.load_model(f"timm:test_vit:{tmp_path / 'vit224.pth'}")
    small = timm.create_model("test_vit")
    assert model.pos_embed.shape == small.pos_embed.shape != big.pos_embed.shape
    npt = getattr(small, "num_prefix_tokens", 1)
    ref = resample_abs_pos_embed(state["pos_embed"], new_size=small.patch_embed.grid_size, num_prefix_tokens=npt)
    torch.testing.assert_close(model.pos_embed.detach(), ref)
    got = model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in state.items() if k != "pos_embed")
    torch.save({"nothing": torch.zeros(3)}, tmp_path / "junk.pth")
    with pytest.raises(DiscoverError, match="junk.pth"):
        models.load_model(f"timm:test_vit:{tmp_path / 'junk.pth'}")
