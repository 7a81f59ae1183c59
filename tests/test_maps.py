"""Winner maps and their localisation IoU against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import lwta
import maps


def test_the_win_and_pi_maps_of_a_2x2_conv_lwta_by_hand() -> None:
    h = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]],
                       [[0.0, 1.0], [0.5, 4.0]],
                       [[2.0, 2.0], [-1.0, -1.0]],
                       [[1.0, 3.0], [0.0, -3.0]]]])  # 1 x 4 x 2 x 2: blocks (0, 1) and (2, 3), U = 2
    model = nn.Sequential(lwta.ConvLWTA(2, mode="argmax")).eval()
    m = maps.layer_maps(model, model[0], h)
    hn = h.numpy()[0].astype(np.float64)
    for b in (0, 1):
        a, c = hn[2 * b], hn[2 * b + 1]
        pa = np.exp(a) / (np.exp(a) + np.exp(c))
        np.testing.assert_allclose(m["pi"][0, 2 * b], pa, rtol=1e-6)
        np.testing.assert_allclose(m["pi"][0, 2 * b + 1], 1 - pa, rtol=1e-5)
        np.testing.assert_array_equal(m["win"][0, 2 * b], (a >= c).astype(np.float32))  # ties: the first
        np.testing.assert_array_equal(m["win"][0, 2 * b + 1], (c > a).astype(np.float32))
    np.testing.assert_allclose(m["act"][0], hn * m["win"][0])


class _Tokens(nn.Module):
    """A stand-in ViT: one class token and a 2 x 2 grid of patch tokens, then an LWTA."""

    num_prefix_tokens = 1

    def __init__(self) -> None:
        super().__init__()
        self.act = lwta.LWTA(2, mode="argmax")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)


def test_token_maps_drop_the_class_token_and_keep_the_patch_grid() -> None:
    t = torch.arange(5 * 4, dtype=torch.float32).reshape(1, 5, 4) * torch.tensor([1.0, -1.0, 1.0, -1.0])
    model = _Tokens().eval()
    m = maps.layer_maps(model, model.act, t)
    assert m["act"].shape == (1, 4, 2, 2)
    # patch token p (row-major) of unit k is token p + 1 of the input
    for k in range(4):
        np.testing.assert_array_equal(m["win"][0, k].reshape(-1), (t[0, 1:, k] > 0).float().numpy())
    seq = nn.Sequential(nn.Identity())
    with pytest.raises(Exception, match="no spatial map"):
        maps.layer_maps(seq, seq[0], torch.zeros(2, 3))


def _iou_reference(unit_maps, objects, thresholds) -> list[float]:
    """Explicit nearest upsampling by np.kron, then |A & B| / |A | B| over every image."""
    N, K, h, w = unit_maps.shape
    S = objects.shape[-1]
    out = []
    for k in range(K):
        inter = union = 0
        for i in range(N):
            cov = unit_maps[i, k] > thresholds[k]
            if S % h == 0:
                up = np.kron(cov, np.ones((S // h, S // w), bool))
            else:  # nearest: pixel (y, x) reads cell (floor(y h / S), floor(x w / S))
                ys, xs = (np.arange(S) * h) // S, (np.arange(S) * w) // S
                up = cov[np.ix_(ys, xs)]
            inter += np.logical_and(up, objects[i]).sum()
            union += np.logical_or(up, objects[i]).sum()
        out.append(inter / union if union else math.nan)
    return out


@pytest.mark.parametrize("S", [8, 9])
def test_localisation_iou_against_a_reference(S: int) -> None:
    rng = np.random.default_rng(0)
    unit_maps = rng.normal(size=(6, 5, 4, 4)).astype(np.float32)
    objects = rng.random((6, S, S)) < 0.3
    thr = np.quantile(unit_maps.transpose(1, 0, 2, 3).reshape(5, -1), 0.8, axis=1)
    np.testing.assert_allclose(maps.localisation(unit_maps, objects, thr), _iou_reference(unit_maps, objects, thr),
                               rtol=1e-12)


def test_iou_of_a_hand_made_map_and_mask() -> None:
    unit = np.zeros((1, 1, 2, 2), np.float32)
    unit[0, 0, 0, 0] = 1.0  # covers the top-left 2 x 2 pixels of a 4 x 4 image
    obj = np.zeros((1, 4, 4), bool)
    obj[0, 1:3, 1:3] = True  # 4 pixels, one of them in the covered cell
    assert maps.localisation(unit, obj)[0] == pytest.approx(1 / 7)  # 1 shared of 4 + 4 - 1
    assert maps.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool)) != maps.iou(np.zeros((2, 2), bool), np.zeros((2, 2), bool))


def test_overlay_blends_the_map_colour_where_the_map_is_one() -> None:
    img = np.full((4, 4, 3), 100, np.uint8)
    m = np.array([[1.0, 0.0], [0.0, 0.5]], np.float32)
    out = maps.overlay(img, m, color=(200, 0, 0), alpha=0.5)
    assert out[0, 0].tolist() == [150, 50, 50] and out[0, 3].tolist() == [100, 100, 100]
    assert out[3, 3].tolist() == [125, 75, 75]


def test_a_saturated_top_quantile_still_covers_the_maximum() -> None:
    """A decisive unit's pi is exactly 1 on many positions: its 99.5 % quantile is 1.0, and the
    positions at that maximum are what it covers (a strict > would cover nothing)."""
    unit = np.zeros((10, 1, 2, 2), np.float32)
    unit[:, 0, 0, 0] = 1.0  # saturated on a quarter of all positions, always the top-left cell
    obj = np.zeros((10, 4, 4), bool)
    obj[:, :2, :2] = True  # the object is that cell
    thr = maps.top_thresholds(unit)
    assert thr[0] == 1.0 and maps.localisation(unit, obj, thr)[0] == pytest.approx(1.0)
