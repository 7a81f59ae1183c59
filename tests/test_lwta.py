"""LWTA layers against hand-computed references (DISCOVER Eq. 1-2, 6; Sec. 3.1 KL)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import lwta
import models
from common import DiscoverError

# Upper 0.1 % points of the chi-square distribution (statistics tables), by degrees of freedom.
CHI2_999 = {1: 10.828, 3: 16.266, 7: 24.322}


def _blocks(y: torch.Tensor, U: int, conv: bool) -> torch.Tensor:
    """Output regrouped as (..., U) blocks, by plain indexing."""
    if conv:
        N, C, H, W = y.shape
        return y.reshape(N, C // U, U, H, W).permute(0, 1, 3, 4, 2)
    return y.reshape(*y.shape[:-1], y.shape[-1] // U, U)


@pytest.mark.parametrize("U", [2, 4, 8])
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("state", ["train", "sample", "argmax"])
def test_one_winner_per_block_passes_its_input(U: int, conv: bool, state: str) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 2 * U, 5, 4) if conv else torch.randn(3, 7, 3 * U)
    layer = (lwta.ConvLWTA if conv else lwta.LWTA)(U)
    layer.train(state == "train")
    layer.mode = "argmax" if state == "argmax" else "sample"
    y = layer(x)
    assert y.shape == x.shape
    nz = _blocks(y != 0, U, conv).sum(-1)
    assert torch.all(nz == 1)  # exactly one winner per block and position
    assert (y != 0).float().mean().item() == pytest.approx(1 / U, abs=0)
    mask = y != 0
    assert torch.equal(y[mask], x[mask])  # the winner passes its linear response
    # winners() agrees with the support of the output
    w = lwta.winners(layer)
    support = _blocks(mask, U, conv).float().argmax(-1)
    assert torch.equal(w.reshape(support.shape), support)


def test_argmax_mode_is_deterministic_and_picks_the_max() -> None:
    layer = lwta.LWTA(4).eval()
    layer.mode = "argmax"
    x = torch.randn(16, 32)
    y1, y2 = layer(x), layer(x)
    assert torch.equal(y1, y2)
    ref = x.reshape(16, 8, 4)
    keep = ref == ref.max(-1, keepdim=True).values
    assert torch.equal(y1, (ref * keep).reshape(16, 32))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("as_maps", [False, True])
@pytest.mark.parametrize("U", [4, 2])
def test_ties_pick_the_first_unit_and_nan_blocks_stay_in_range(training: bool, fused: bool, as_maps: bool,
                                                               U: int) -> None:
    """Exact ties go to the lowest unit, as torch.argmax does; an all-NaN block gives unit 0 (the
    fused kernels choose branch-free, so this is where an out-of-range index would show).
    Training runs without noise (its winner is then the argmax too); evaluation in argmax mode.
    U = 2 covers the fused training kernel's special case."""
    h = torch.zeros(6, U, 1)
    h[:, U - 2] = 1.0
    h[:, U - 1] = 1.0  # the last two units tie at the maximum
    h[4:] = float("nan")
    if as_maps:  # the six blocks as six positions of one block of channels
        h = h.permute(2, 1, 0).contiguous()
    if training:
        _, idx, _ = lwta.compete(h.clone().requires_grad_(), tau=0.67, training=True, mode="sample",
                                 gumbel=torch.zeros_like(h), fused=fused)
    else:
        _, idx, _ = lwta.compete(h, tau=0.67, training=False, mode="argmax", fused=fused)
    assert idx.reshape(-1).tolist() == [U - 2] * 4 + [0, 0]


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("groups, positions", [(20_000, 1), (19_999, 1), (200, 100)])
@pytest.mark.parametrize("h", [(1.0, -0.5, 0.3, 2.0), (0.4, -0.9)], ids=["U4", "U2"])
def test_winner_frequencies_match_softmax(training: bool, fused: bool, groups: int, positions: int,
                                          h: tuple) -> None:
    """Over 20 000 draws the winner frequencies follow pi = softmax(h) (Eq. 2): chi-square test,
    for the fused CPU kernels and the torch path alike, as token blocks (one position per block;
    the fused path transposes 20 000 to 32 groups of positions, an odd 19 999 to a single
    group) and as conv maps (100 positions per block of channels). U = 2 runs the fused
    kernel's logistic-noise special case in training."""
    torch.manual_seed(1234)
    U = len(h)
    n = groups * positions
    maps = torch.tensor(h).view(1, U, 1).expand(groups, U, positions).contiguous()
    _, idx, _ = lwta.compete(maps, tau=0.67, training=training, mode="sample", fused=fused)
    counts = np.bincount(idx.reshape(-1).numpy(), minlength=U)
    p = np.exp(np.array(h, np.float64))
    p /= p.sum()
    chi2 = ((counts - n * p) ** 2 / (n * p)).sum()
    assert chi2 < CHI2_999[U - 1], (counts, n * p)


def _hand_st_gradient(H: np.ndarray, G: np.ndarray, Wt: np.ndarray, tau: float):
    """Eq. 6 by hand, float64, blocks along axis 1 of (R, U): returns (y, dL/dh) for L = sum(w*y)."""
    z = (H + G) / tau
    s = np.exp(z - z.max(1, keepdims=True))
    s /= s.sum(1, keepdims=True)
    hard = np.eye(H.shape[1])[z.argmax(1)]
    grad = np.zeros_like(H)
    for r in range(H.shape[0]):
        J = (np.diag(s[r]) - np.outer(s[r], s[r])) / tau  # d soft / d h
        grad[r] = Wt[r] * hard[r] + J.T @ (Wt[r] * H[r])
    return hard * H, grad


@pytest.mark.parametrize("tau", [0.67, 1.3])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("shape", [(10, 3, 1), (9, 3, 1), (2, 3, 5), (10, 2, 1), (2, 2, 5)])
def test_straight_through_gradient_matches_hand_derivation(tau: float, fused: bool, shape: tuple) -> None:
    """Backward = gradient of the soft Gumbel sample (Eq. 6): y = xi_hard * h forward;
    dL/dh = w*xi_hard + J_soft^T (w*h) / tau with J = diag(s) - s s^T. Blocks of U=3 as tokens
    (the fused path transposes 10 blocks to 2 groups of positions, an odd 9 to a single group)
    or as conv maps (2 groups x 5 positions); U=2 (the fused kernel's logistic special case)
    likewise."""
    dtype = torch.float32 if fused else torch.float64
    torch.manual_seed(0)
    R, U = shape[0] * shape[2], shape[1]
    h = torch.randn(*shape, dtype=dtype, requires_grad=True)
    g = -torch.log(-torch.log(torch.rand(*shape, dtype=dtype)))
    w = torch.randn(*shape, dtype=dtype)
    y, idx, _ = lwta.compete(h, tau=tau, training=True, mode="sample", want_kl=False, gumbel=g, fused=fused)
    (y * w).sum().backward()

    def rows(t: torch.Tensor) -> np.ndarray:  # (G, U, S) -> one row of U per block
        return t.detach().double().permute(0, 2, 1).reshape(R, U).numpy()

    ref_y, ref_grad = _hand_st_gradient(rows(h), rows(g), rows(w), tau)
    tol = 1e-5 if fused else 1e-12
    np.testing.assert_allclose(rows(h.grad), ref_grad, rtol=tol, atol=tol)
    np.testing.assert_allclose(rows(y), ref_y, rtol=0, atol=0)
    assert torch.equal(idx.reshape(-1).long(), torch.as_tensor(ref_y != 0).float().argmax(1))


@pytest.mark.parametrize("U", [2, 4])
def test_fused_kl_gradient_matches_torch_autograd(U: int) -> None:
    """The fused kernel's KL and its gradient equal torch autograd on log_softmax (float64)."""
    torch.manual_seed(3)
    h32 = torch.randn(12, U, 5, requires_grad=True)  # conv-like: 5 positions per group
    h32.data[0, :, 0] = torch.tensor([30.0, -40.0] + [-45.0] * (U - 2))  # pi = 1 - 1e-30: saturated
    g = -torch.log(-torch.log(torch.rand(12, U, 5)))
    _, _, kl = lwta.compete(h32, tau=0.67, training=True, mode="sample", gumbel=g, fused=True)
    (2.5 * kl).backward()
    h64 = h32.detach().double().requires_grad_(True)
    logp = h64.log_softmax(1)
    ref = (logp.exp() * (logp + np.log(U))).sum()
    (2.5 * ref).backward()
    assert kl.item() == pytest.approx(ref.item(), rel=1e-5)
    np.testing.assert_allclose(h32.grad.numpy(), h64.grad.numpy(), rtol=1e-4, atol=1e-6)


def test_kl_closed_form_and_batch_average() -> None:
    """U=2: KL = p log(2p) + (1-p) log(2(1-p)), p = sigmoid(a-b); summed over blocks, averaged
    over examples."""
    x = torch.tensor([[0.0, 1.0, 2.0, 2.0], [3.0, -1.0, 0.5, 0.0]])
    layer = lwta.LWTA(2).train()
    layer(x)

    def kl2(a: float, b: float) -> float:
        p = 1 / (1 + np.exp(b - a))
        return p * np.log(2 * p) + (1 - p) * np.log(2 * (1 - p))

    expected = (kl2(0, 1) + kl2(2, 2) + kl2(3, -1) + kl2(0.5, 0)) / 2
    assert lwta.kl_divergence(layer).item() == pytest.approx(expected, rel=1e-6)
    layer(torch.full((3, 8), 0.7))  # uniform responses: q equals the prior
    assert lwta.kl_divergence(layer).item() == pytest.approx(0.0, abs=1e-6)


def test_kl_is_differentiable_and_sums_layers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), lwta.LWTA(4), torch.nn.Linear(8, 8), lwta.LWTA(2))
    model.train()
    model(torch.randn(6, 4))
    kl = lwta.kl_divergence(model)
    parts = [m.last_kl for m in lwta.lwta_modules(model).values()]
    assert kl.item() == pytest.approx(sum(p.item() for p in parts))
    kl.backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("U", [8, 16, 24])
@pytest.mark.parametrize("blocks", [1, 517, 1030])
def test_fused_token_tiles_match_the_torch_path(U: int, blocks: int) -> None:
    """Token blocks go through tiles of 512 transposed in cache, 8 x 8 at a time when U is a
    multiple of 8: partial tiles and remainders must give exactly the torch path's winners and
    outputs (training with the same noise, and argmax inference), and its gradient."""
    torch.manual_seed(blocks + U)
    h = torch.randn(blocks, U, 1)
    g = -torch.log(-torch.log(torch.rand(blocks, U, 1)))
    w = torch.randn(blocks, U, 1)
    res = {}
    for fused in (True, False):
        x = h.clone().requires_grad_()
        y, idx, kl = lwta.compete(x, tau=0.67, training=True, mode="sample", gumbel=g, fused=fused)
        ((y * w).sum() + 0.3 * kl).backward()
        _, eidx, _ = lwta.compete(h, tau=0.67, training=False, mode="argmax", fused=fused)
        res[fused] = (y.detach(), idx.long(), x.grad, eidx.long(), kl.item())
    (y1, i1, g1, e1, k1), (y0, i0, g0, e0, k0) = res[True], res[False]
    assert torch.equal(i1, i0) and torch.equal(y1, y0) and torch.equal(e1, e0)
    np.testing.assert_allclose(g1.numpy(), g0.numpy(), rtol=1e-4, atol=1e-5)
    assert k1 == pytest.approx(k0, rel=1e-4)


def test_conv_competition_is_per_position() -> None:
    """Hand-built 2x2 example: channels (0,1) and (2,3) compete separately at each pixel."""
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]],
                       [[2.0, -3.0], [0.1, 4.0]],
                       [[0.0, 9.0], [-1.0, -5.0]],
                       [[1.0, 8.0], [-2.0, -4.0]]]])
    expected = torch.tensor([[[[0.0, -2.0], [0.5, 0.0]],
                              [[2.0, 0.0], [0.0, 4.0]],
                              [[0.0, 9.0], [-1.0, 0.0]],
                              [[1.0, 0.0], [0.0, -4.0]]]])
    layer = lwta.ConvLWTA(2).eval()
    layer.mode = "argmax"
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("arch,U,reference", [
    ("deit_tiny", 16, "timm"),
    ("resnet18", 2, "torchvision"),
])
def test_cvn_has_its_twins_parameter_count(arch: str, U: int, reference: str) -> None:
    cvn, twin = models.build(arch, U=U), models.build(arch)
    if reference == "timm":
        import timm
        stock = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    else:
        import torchvision
        stock = torchvision.models.resnet18(num_classes=365)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(cvn) == count(twin) == count(stock)
    assert set(cvn.state_dict()) == set(stock.state_dict())
    n_lwta = len(lwta.lwta_modules(cvn))
    assert n_lwta == (12 if arch == "deit_tiny" else 17)


def test_resnet_sites_fire_once_each() -> None:
    model = models.build("resnet18_world", U=2).eval()
    calls: dict[str, int] = {}
    for name, m in lwta.lwta_modules(model).items():
        m.register_forward_hook(lambda mod, i, o, n=name: calls.__setitem__(n, calls.get(n, 0) + 1))
    model(torch.randn(2, 3, 64, 64))
    assert len(calls) == 9 and set(calls.values()) == {1}


def test_set_mode_and_bad_arguments() -> None:
    model = models.build("deit_world", U=4)
    lwta.set_mode(model, "argmax")
    assert {m.mode for m in lwta.lwta_modules(model).values()} == {"argmax"}
    with pytest.raises(DiscoverError, match="mode"):
        lwta.set_mode(model, "greedy")
    with pytest.raises(DiscoverError, match=r"blocks\.0\.mlp\.act.*K=384.*U=5"):
        models.build("deit_world", U=5)
    with pytest.raises(DiscoverError, match="`U` must be"):
        models.build("deit_world", U=1)
    with pytest.raises(DiscoverError, match="unknown arch"):
        models.build("vgg16", U=2)


# --- checkpoints ---------------------------------------------------------------------------------

def _outputs_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    lwta.set_mode(a, "argmax"), lwta.set_mode(b, "argmax")
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def test_save_load_roundtrip(tmp_path) -> None:
    model = models.build("deit_world", U=8, num_classes=10)
    models.save(model, tmp_path / "run", {"arch": "deit_world", "U": 8, "num_classes": 10, "classes": list("abcdefghij")})
    loaded, meta = models.load(tmp_path / "run")
    assert meta.U == 8 and meta.classes[0] == "a" and meta.img_size == 64  # the arch's own size
    assert _outputs_equal(model, loaded)
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "module_prefix"])
def test_third_party_pth_variants(tmp_path, wrap: str) -> None:
    model = models.build("resnet18_world", act="relu", num_classes=5)
    sd = model.state_dict()
    obj = {"plain": sd, "model": {"model": sd, "epoch": 3}, "state_dict": {"state_dict": sd},
           "module_prefix": {f"module.{k}": v for k, v in sd.items()}}[wrap]
    torch.save(obj, tmp_path / "w.pth")
    loaded, _ = models.load(tmp_path / "w.pth", arch="resnet18_world", act="relu", num_classes=5)
    assert _outputs_equal(model, loaded)


def test_mismatched_and_corrupt_checkpoints(tmp_path) -> None:
    model = models.build("resnet18_world", act="relu", num_classes=5)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    with pytest.raises(DiscoverError, match=r"shape mismatch: fc\.weight \(5, 128\) vs \(7, 128\)"):
        models.load(tmp_path / "w.pth", arch="resnet18_world", act="relu", num_classes=7)
    sd = model.state_dict()
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "m.pth")
    with pytest.raises(DiscoverError, match=r"missing: fc\.bias; unexpected: extra\.weight"):
        models.load(tmp_path / "m.pth", arch="resnet18_world", act="relu", num_classes=5)
    (tmp_path / "bad.pth").write_bytes(b"\x80\x04 not a checkpoint")
    with pytest.raises(DiscoverError, match="cannot be read"):
        models.load(tmp_path / "bad.pth", arch="resnet18_world")
    (tmp_path / "run").mkdir()
    with pytest.raises(DiscoverError, match="missing meta.json"):
        models.load(tmp_path / "run")


# --- half precision: the noise and the competition run in float32 ------------------------------------

H4 = (1.0, -0.5, 0.3, 2.0)


def _chi2(idx: torch.Tensor, logits: torch.Tensor) -> float:
    """Chi-square of winner counts against softmax(logits) in float64."""
    n = idx.numel()
    p = torch.softmax(logits.double(), 0).numpy()
    counts = np.bincount(idx.reshape(-1).long().numpy(), minlength=len(p))
    return float(((counts - n * p) ** 2 / (n * p)).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("training", [False, True])
def test_half_precision_winners_follow_softmax(dtype: torch.dtype, training: bool) -> None:
    """10^6 draws of one block of 4 fixed logits given in bfloat16 / float16 (a bfloat16 uniform
    drawn in the input's dtype gave chi-square 31-83 here): winners follow softmax of the rounded
    logits, the output keeps the input's dtype, the KL is float32."""
    torch.manual_seed(7)
    h = torch.tensor(H4).to(dtype)
    maps = h.view(1, 4, 1).expand(1_000_000, 4, 1).contiguous()
    y, idx, kl = lwta.compete(maps, tau=0.67, training=training, mode="sample", fused=False)
    assert y.dtype == dtype and _chi2(idx, h.float()) < CHI2_999[3]
    if training:
        assert kl.dtype == torch.float32
        p = torch.softmax(h.double(), 0)
        ref = 1_000_000 * float((p * (p.log() + np.log(4))).sum())
        assert float(kl) == pytest.approx(ref, rel=1e-3)


@pytest.mark.parametrize("train", [False, True])
def test_winners_under_cpu_autocast_follow_softmax(train: bool) -> None:
    """Linear -> LWTA under torch.autocast("cpu", bfloat16): the Linear's output is bfloat16, the
    winners still follow softmax of those (rounded) responses, in both modes."""
    torch.manual_seed(11)
    lin = torch.nn.Linear(1, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(H4).view(4, 1))
    layer = lwta.LWTA(4)
    model = torch.nn.Sequential(lin, layer).train(train)
    x = torch.ones(500_000, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(train):
        y = model(x)
    assert y.dtype == torch.bfloat16
    logits = torch.tensor(H4).to(torch.bfloat16).float()
    assert _chi2(lwta.winners(layer).reshape(-1), logits) < CHI2_999[3]


def test_straight_through_gradient_in_bfloat16_matches_hand_derivation() -> None:
    """The Straight-Through gradient of a bfloat16 input against the float64 hand derivation on the
    same (rounded) values; the gradient comes back in bfloat16 (tolerance of its 8-bit mantissa)."""
    torch.manual_seed(3)
    h = torch.randn(40, 4, 1).to(torch.bfloat16).requires_grad_()
    g = -torch.log(-torch.log(torch.rand(40, 4, 1)))
    w = torch.randn(40, 4, 1).to(torch.bfloat16)
    y, _, _ = lwta.compete(h, tau=0.67, training=True, mode="sample", want_kl=False, gumbel=g, fused=False)
    (y.float() * w.float()).sum().backward()
    rows = lambda t: t.detach().double().reshape(40, 4).numpy()  # noqa: E731
    ref_y, ref_grad = _hand_st_gradient(rows(h), rows(g), rows(w), 0.67)
    assert h.grad.dtype == torch.bfloat16
    np.testing.assert_array_equal(rows(y), ref_y)
    np.testing.assert_allclose(rows(h.grad), ref_grad, rtol=2e-2, atol=2e-2)


def test_inference_sets_and_restores_modes_and_the_train_flag() -> None:
    model = models.build("deit_world", U=8, num_classes=64).train()
    list(lwta.lwta_modules(model).values())[1].mode = "argmax"  # mixed modes come back as they were
    before = {n: m.mode for n, m in lwta.lwta_modules(model).items()}
    with pytest.raises(RuntimeError), lwta.inference(model, "argmax"):
        assert not model.training and {m.mode for m in lwta.lwta_modules(model).values()} == {"argmax"}
        raise RuntimeError("inside")
    assert model.training and {n: m.mode for n, m in lwta.lwta_modules(model).items()} == before
