"""Where a unit wins: spatial maps of a layer's units, and how well they localise the object.

A ConvLWTA layer draws a winner at every position of its map, a ViT LWTA layer at every token:
the positions where unit (b, u) won *are* a segmentation of the image (the DISCOVER paper's
limitations paragraph: CLIP-Dissect "disregards the spatial information"). For a plain layer the
map is the unit's activation.

- :func:`layer_maps`: for a batch of images, each unit's map (``K x h x w`` per image): its output
  (``act``), and for an LWTA layer its winning probability (``pi``) and where it won (``win``).
- :func:`localisation`: Network Dissection's score on a probe with object masks: the dataset-level
  IoU between a unit's thresholded maps (upsampled to the image) and the object masks,
  sum_i |M_i & O_i| / sum_i |M_i | O_i|; a unit "localises the object" at IoU >= 0.04 (Network
  Dissection's detector threshold). Thresholds: where the unit won (CVN units), or the top 0.5 %
  of the unit's map values over the probe (any unit; Network Dissection's quantile). Where the
  object is large, chance alone passes 0.04 (a unit that wins on 1/8 of the positions at random
  scores about 0.07 against an object covering 15 % of the image), so each IoU is also compared
  with the IoU of the same maps against the objects of other images (a seeded permutation): the
  unit localises *above chance* when its IoU is at least 1.5 times that.
- :func:`overlay`: a map over its image as an RGB picture (for ``explain --maps``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import lwta
from common import DiscoverError
from schema import ModelMeta

TOP_QUANTILE = 0.995  # Network Dissection: a unit's map is thresholded at its top 0.5 % over the probe
IOU_DETECTOR = 0.04  # Network Dissection: IoU above which a unit detects (localises) the concept
LIFT = 1.5  # above chance: the IoU is at least this multiple of the IoU with another image's object


def _prefix_tokens(model: nn.Module) -> int:
    n = getattr(model, "num_prefix_tokens", None)
    return int(n) if n is not None else int(getattr(model, "cls_token", None) is not None)


def _grid(t: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """``(B, T, K)`` tokens -> ``(B, K, h, w)`` over the patch tokens (prefix tokens dropped)."""
    t = t[:, _prefix_tokens(model):]
    side = math.isqrt(t.shape[1])
    if side * side != t.shape[1]:
        raise DiscoverError(f"a layer of {t.shape[1]} patch tokens is not a square grid: no spatial map")
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)


def layer_maps(model: nn.Module, module: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Run ``x`` (B x 3 x S x S) through ``model`` and return ``module``'s unit maps, each
    ``B x K x h x w`` float32: ``act`` (the layer's output) and, for an LWTA layer, ``pi`` (each
    unit's winning probability in its block, Eq. 2) and ``win`` (1 where the unit won this
    forward's draw, else 0). A conv map is taken as it is; ViT tokens as their patch-token grid."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_m, inp, out):
        captured["out"] = out.detach().float()
        captured["in"] = inp[0].detach().float()

    handle = module.register_forward_hook(hook)
    try:
        with torch.inference_mode():
            model(x)
    finally:
        handle.remove()
    if "out" not in captured:
        raise DiscoverError("the layer did not run in the forward pass")
    out, h = captured["out"], captured["in"]
    if out.dim() not in (3, 4):
        raise DiscoverError(f"the layer's output has shape {tuple(out.shape)}: no spatial map (a conv map "
                            "N x C x H x W or ViT tokens N x T x K)")
    spatial = (lambda t: t) if out.dim() == 4 else (lambda t: _grid(t, model))
    maps = {"act": spatial(out)}
    if isinstance(module, lwta.LWTABase):
        import record

        dim = 1 if isinstance(module, lwta.ConvLWTA) else -1
        maps["pi"] = spatial(lwta.block_probabilities(h, module.U, dim))
        maps["win"] = spatial(record.winner_mask(module, h, "sample"))
    return {k: v.cpu().numpy().astype(np.float32) for k, v in maps.items()}


def upsample(maps: np.ndarray, size: int) -> np.ndarray:
    """``(..., h, w)`` maps to ``(..., size, size)`` by nearest neighbour (a position covers its
    patch or receptive-field cell)."""
    t = torch.from_numpy(np.ascontiguousarray(maps, np.float32))
    lead = t.shape[:-2]
    t = F.interpolate(t.reshape(-1, 1, *t.shape[-2:]), size=(size, size), mode="nearest")
    return t.reshape(*lead, size, size).numpy()


def iou(masks_a: np.ndarray, masks_b: np.ndarray) -> float:
    """Dataset-level IoU of two stacks of boolean masks: sum |a & b| / sum |a | b| (NaN if both empty)."""
    a, b = np.asarray(masks_a, bool), np.asarray(masks_b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else math.nan


def localisation(unit_maps: np.ndarray, objects: np.ndarray, thresholds: np.ndarray | None = None) -> np.ndarray:
    """Per unit, the dataset-level IoU of its thresholded maps and the object masks.

    ``unit_maps`` (N x K x h x w), ``objects`` (N x S x S bool). ``thresholds`` (K): a unit covers
    the positions where its map exceeds its threshold; None: where the map is positive (a win
    map). A map position covers its cell of the image (the map upsampled to S x S by nearest
    neighbour) before the IoU."""
    N, K, h, w = unit_maps.shape
    S = objects.shape[-1]
    thr = np.zeros(K) if thresholds is None else np.asarray(thresholds, np.float64)
    covered = unit_maps > thr[None, :, None, None]
    if thresholds is not None:  # a quantile at the map's maximum (a saturated pi of exactly 1): the maximum covers
        at_max = thr >= unit_maps.max(axis=(0, 2, 3))
        covered |= (unit_maps >= thr[None, :, None, None]) & at_max[None, :, None, None]
    obj = np.asarray(objects, bool)
    if S % h or S % w:  # cells of unequal size: upsample each unit's maps
        return np.array([iou(upsample(covered[:, k].astype(np.float32), S) > 0.5, obj) for k in range(K)])
    fy, fx = S // h, S // w
    cells = obj.reshape(N, h, fy, w, fx).sum((2, 4)).astype(np.float64)  # object pixels in each cell
    inter = np.einsum("nkhw,nhw->k", covered.astype(np.float64), cells)
    union = covered.sum((0, 2, 3)) * float(fy * fx) + obj.sum() - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1), math.nan)


def top_thresholds(unit_maps: np.ndarray, q: float = TOP_QUANTILE) -> np.ndarray:
    """Each unit's ``q`` quantile of its map values over every image and position (K)."""
    K = unit_maps.shape[1]
    return np.quantile(np.moveaxis(unit_maps, 1, 0).reshape(K, -1), q, axis=1)


def probe_localisation(model: nn.Module, meta: ModelMeta, layer: str, images: np.ndarray, objects: np.ndarray,
                       batch_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """:func:`localisation` of every unit of ``layer`` on probe ``images`` (N x S x S x 3 uint8)
    with object masks ``objects`` (N x S x S): ``iou_top`` (top 0.5 % quantile of the unit's
    activation map, or of its pi map for an LWTA layer) and, for an LWTA layer, ``iou_win``
    (where it won, drawn with ``seed``); the share of units with IoU >= 0.04 for each."""
    import record
    import models

    module = record.resolve_layers(model, [layer])[layer]
    device = models.device_of(model)
    parts: dict[str, list[np.ndarray]] = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(images), batch_size):
            x = models.to_input(images[start:start + batch_size], meta, device)
            for key, value in layer_maps(model, module, x).items():
                parts.setdefault(key, []).append(value)
    maps = {k: np.concatenate(v) for k, v in parts.items()}
    competitive = "pi" in maps
    signal = maps["pi"] if competitive else maps["act"]
    shuffled = objects[np.random.default_rng(seed).permutation(len(objects))]
    res: dict[str, Any] = {"map": "pi" if competitive else "activation", "images": len(images)}
    kinds = {"top": (signal, top_thresholds(signal))} | ({"win": (maps["win"], None)} if competitive else {})
    for kind, (m, thr) in kinds.items():
        v, chance = localisation(m, objects, thr), localisation(m, shuffled, thr)
        with np.errstate(invalid="ignore", divide="ignore"):
            lift = v / chance
        res[f"iou_{kind}"], res[f"chance_iou_{kind}"] = v, chance
        res[f"localising_percent_{kind}"] = float(100 * np.mean(np.nan_to_num(v) >= IOU_DETECTOR))
        res[f"above_chance_percent_{kind}"] = float(100 * np.mean(np.nan_to_num(lift) >= LIFT))
        res[f"mean_iou_{kind}"], res[f"mean_chance_iou_{kind}"] = float(np.nanmean(v)), float(np.nanmean(chance))
    return res


def overlay(image: np.ndarray, unit_map: np.ndarray, color: tuple[int, int, int] = (255, 40, 40),
            alpha: float = 0.6) -> np.ndarray:
    """``image`` (S x S x 3 uint8) with ``unit_map`` (h x w, values in [0, 1]) upsampled over it in
    ``color``: alpha-blended in proportion to the map value. uint8 RGB."""
    S = image.shape[0]
    m = np.clip(upsample(unit_map[None], S)[0], 0.0, 1.0)[..., None] * alpha
    out = image.astype(np.float32) * (1 - m) + np.array(color, np.float32) * m
    return out.round().astype(np.uint8)
