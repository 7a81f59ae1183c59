"""Explain one image by the neurons it activates: DISCOVER Sec. 3.2 (end) and Table 4; SPEC §4.

For a CVN only the B block winners of a layer are active for an image (DeiT-T/16: 48 of 768), so the
explanation is a short list of concepts instead of the ~98 % of neurons a GELU layer activates.

    image --preprocess (record.py's)--> model (LWTA: seeded samples or argmax) --hook--> layer output
          --summary (the dissection's: class token, spatial mean, ...)--> K values for the image
          --active set (LWTA: the block winners; GELU/ReLU: the positive neurons)--> each neuron's
          concept and score from labels.json, sorted by confidence (or gain, activation, pi, z)

Usage::

    python discover.py explain world:2:17 photo.jpg --model runs/cvn8 --labels dissect_out [--samples 16]

From Python::

    model, meta = models.load_model("runs/cvn8")
    labels = schema.Labels.read("dissect_out")
    res = explain.explain_image(model, meta, labels, None, "world:2:17", samples=16, mode="sample", seed=0)
    res["neurons"][0]          # {"unit", "block", "competitor", "concept", "score", "activation", "win_rate", ...}

With ``samples`` S > 1 the image is run through S independent posterior draws (in a batch of S copies);
a neuron's ``win_rate`` is the fraction of draws in which it was active. For an LWTA layer with one
competition per block per image (a class token) the list shows each block's winner with its ``pi``
(softmax of the block's responses, Eq. 2: how sure the competition was) and its ``activation``, the
linear response it passes on when it wins (Eq. 1); elsewhere ``activation`` is the mean output over
the draws. Sorted by confidence (how often the CLIP finds a row's concept in the probe images that
move the unit about as much), by gain (that share minus how often it finds the concept in any probe
image), by activation (Table 4: top 7, bottom 6), by pi or by z. The class prediction averages
the S draws' logits (the paper's Bayesian averaging).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

import lwta
from common import DiscoverError
from schema import Labels, ModelMeta, Neuron

DRAW_BATCH = 32  # posterior draws per forward pass


# --- inputs ---------------------------------------------------------------------------------------

def load_image(image: Any, size: int, interpolation: str = "bilinear") -> tuple[np.ndarray, str]:
    """``(uint8 size x size x 3, name)`` of an image file, a ``world:SEED:INDEX`` reference, a PIL
    image or an ``H x W x 3`` uint8 array, preprocessed as ``record.py`` preprocesses probe images
    (world images rendered at ``size``; files: shorter side to ``size``, centre crop)."""
    import probes

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise DiscoverError(f"image array: expected H x W x 3 uint8, got {image.shape} {image.dtype}")
        from PIL import Image

        image = Image.fromarray(image)
    if not isinstance(image, (str, Path)):  # a PIL image
        from PIL import ImageOps

        pil = image.convert("RGB")
        if pil.size != (size, size):
            pil = ImageOps.fit(pil, (size, size), method=_resample(interpolation))
        return np.asarray(pil, dtype=np.uint8), "<image>"
    name = str(image)
    if name.startswith("world:"):
        import world

        seed, index = _world_ref(name)
        return world.render_batch(seed, index, 1, size=size)[0][0], name
    path = Path(name).expanduser()
    if not path.exists():
        raise DiscoverError(f"IMG {name}: no such file (give an image file or world:SEED:INDEX)")
    if not path.is_file():
        raise DiscoverError(f"IMG {name}: not a file (give an image file or world:SEED:INDEX)")
    if path.suffix.lower() not in probes.IMAGE_EXTS:
        raise DiscoverError(f"IMG {name}: not an image file name ({', '.join(e[1:] for e in probes.IMAGE_EXTS)})")
    why = probes.check_image(path)
    if why:
        raise DiscoverError(f"IMG {name}: not a readable image ({why})")
    probe = probes.Probe(spec=name, names=[path.name], fingerprint="", root=path.parent)
    return probe.images(0, 1, size, interpolation)[0], name


def _world_ref(name: str) -> tuple[int, int]:
    parts = name.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        seed, index = int(parts[1]), int(parts[2])
        if seed < 0 or index < 0:
            raise ValueError
    except ValueError as exc:
        raise DiscoverError(f"IMG {name}: expected world:SEED:INDEX (non-negative integers)") from exc
    return seed, index


def _resample(interpolation: str):
    from PIL import Image

    return {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}.get(
        interpolation, Image.BILINEAR)


# --- labels ---------------------------------------------------------------------------------------

def check_labels(model: nn.Module, labels: Labels, where: str = "`labels`") -> None:
    """A :class:`DiscoverError` unless ``labels`` were computed for exactly this model."""
    import models

    want = labels.provenance.model_hash
    if not want:
        raise DiscoverError(f"{where}: labels.json has no provenance model_hash (not a dissection?)")
    if want != models.model_hash(model):
        raise DiscoverError(f"{where}: these labels come from another model ({labels.provenance.model}, "
                            f"hash {want[:12]}); dissect this model first or pass the matching `model`")


def default_layer(model: nn.Module, labels: Labels) -> str:
    """The last LWTA layer (in the model's module order) that the labels cover, else their first layer."""
    layers = list(labels.layers)
    if not layers:
        raise DiscoverError("`labels`: labels.json lists no layer")
    competitive = [n for n in lwta.lwta_modules(model) if n in layers]
    return competitive[-1] if competitive else layers[0]


def check_layer(labels: Labels, layer: str) -> None:
    layers = list(labels.layers)
    if layer not in layers:
        raise DiscoverError(f"`layer` {layer}: not in the labels (they cover {', '.join(layers) or 'no layer'})")


# --- the explanation ------------------------------------------------------------------------------

def _has_cls(model: nn.Module) -> bool:
    """As record.py decides it: a ViT token tensor's summary is its class token when there is one."""
    return getattr(model, "cls_token", None) is not None or not hasattr(model, "num_prefix_tokens")


def _first_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    for t in out if isinstance(out, (tuple, list)) else ():
        if isinstance(t, torch.Tensor):
            return t
    raise DiscoverError(f"the model returns a {type(out).__name__}, not logits")


def _draws(model: nn.Module, module: nn.Module, x: torch.Tensor, n: int, summary: str,
           signal: str = "pi") -> dict[str, np.ndarray]:
    """Run ``n`` copies of input ``x`` (1 x 3 x S x S) through the model. Returns, each with one
    row per draw, ``values`` (n x K: the layer's output under the dissection's ``summary``),
    ``active`` (n x K: the block winners of an LWTA layer, the positive neurons of any other),
    ``logits`` (n x C) and, for an LWTA layer, ``pi`` (n x K: each unit's winning probability,
    summarised the same way), ``h`` (n x K: its linear response, summarised) and ``signal`` (n x K:
    the LWTA ``signal`` the layer was dissected with, ``record.neuron_signal``, summarised)."""
    import record

    has_cls = _has_cls(model)
    captured: dict[str, Any] = {}

    def hook(_m, inp, out):
        if not isinstance(out, torch.Tensor):
            raise DiscoverError("the explained layer outputs a "
                                f"{type(out).__name__}, not a tensor; explain one of its submodules")
        captured["out"] = out.detach().float()
        captured["in"] = inp[0].detach().float() if inp and isinstance(inp[0], torch.Tensor) else None

    competitive = isinstance(module, lwta.LWTABase)
    rows: dict[str, list[torch.Tensor]] = {k: [] for k in ("values", "active", "logits", "pi", "h", "signal")}
    handle = module.register_forward_hook(hook)
    try:
        for start in range(0, n, DRAW_BATCH):
            b = min(DRAW_BATCH, n - start)
            captured.clear()
            rows["logits"].append(_first_tensor(model(x.expand(b, *x.shape[1:]))).float().reshape(b, -1).cpu())
            if "out" not in captured:
                raise DiscoverError("the explained layer did not run in the forward pass")
            out = captured["out"]
            v, applied, _ = record.summarise(out, summary, has_cls)
            if competitive:
                h = captured["in"]
                pi = record.summarise(record.neuron_signal(module, h, out, "pi"), summary, has_cls)[0].cpu()
                rows["pi"].append(pi)
                rows["h"].append(record.summarise(h, summary, has_cls)[0].cpu())
                rows["signal"].append(pi if signal == "pi" else record.summarise(
                    record.neuron_signal(module, h, out, signal), summary, has_cls)[0].cpu())
                # exactly the block winners (a winner whose response is exactly 0 still counts)
                m = record.summarise(record.winner_mask(module, h, "sample"), summary, has_cls)[0] > 0
            else:
                m = v > 0  # GELU / ReLU / linear: the positive neurons
            rows["values"].append(v.cpu())
            rows["active"].append(m.cpu())
    finally:
        handle.remove()
    return {k: torch.cat(r).numpy() for k, r in rows.items() if r}


SORTS = ("auto", "confidence", "gain", "activation", "pi", "z")  # auto: confidence where the labels have curves


def sort_neurons(neurons: list[dict[str, Any]], sort: str) -> list[dict[str, Any]]:
    """An explanation's neuron rows in ``sort`` order (:data:`SORTS`), descending: by ``activation``,
    by ``pi`` (by activation where a layer has none), by ``z``, or by ``gain`` / ``confidence`` (rows
    without one last), then by z; ties by unit."""
    def key(n: dict[str, Any]) -> tuple[float, float]:
        if sort in ("gain", "confidence"):
            c = n.get(sort)
            return (-math.inf if c is None else c, n["z"])
        return (n["activation"] if sort == "activation" or (sort == "pi" and n["pi"] is None) else n[sort], 0.0)
    return sorted(neurons, key=lambda n: (*(-v for v in key(n)), n["unit"]))


def z_score(rec: Neuron, signal: float) -> float:
    """How far ``signal`` lies above the unit's mean over the probe, in its probe standard
    deviations (the label record's ``signal_mean`` / ``signal_std``; 0 without them)."""
    sd = _num(rec.signal_std)
    return (signal - (_num(rec.signal_mean) or 0.0)) / sd if sd else 0.0


def gain_of(confidence: float | None, base_rate: float | None) -> float | None:
    """How much more often a unit's label holds at its signal on this image than on any probe
    image: its ``confidence`` there minus the label's ``base_rate`` (None without either). A label
    true of half the probe ("large") at 55 % says less about an image than one true of an eighth
    ("heart") at 50 %."""
    return None if confidence is None or base_rate is None else confidence - base_rate


def confidence_at(curve: list[list[float]] | None, signal: float) -> float | None:
    """A unit's label confidence at ``signal`` (its ``confidence`` curve, ``dissect.confidence_curve``):
    how often the CLIP finds the label in the probe images that move the unit about as much, linear
    between the curve's points, its end values beyond them; None without a curve."""
    if not curve:
        return None
    t, p = np.asarray(curve, np.float64).T
    return float(np.interp(signal, t, p))


def explain_image(model: nn.Module, meta: ModelMeta, labels: Labels, layer: str | None,
                  image: Any, samples: int = 1, mode: str = "sample", seed: int = 0,
                  sort: str = "auto") -> dict[str, Any]:
    """The active neurons of ``layer`` for one image, with their concepts.

    ``image``: a file path, ``world:SEED:INDEX``, a PIL image or a uint8 array. ``layer`` None: the
    last LWTA layer of the labels (else their first). ``mode``: LWTA winners sampled from the
    posterior (seeded with ``seed``; ``samples`` draws) or the argmax. ``labels`` must come from
    this model (its hash).

    For an LWTA layer whose summary leaves one competition per block (a class token, a vector), the
    list has one row per block: its winner (the unit that won most of the draws; ties to the
    larger pi), the winner's pi (how sure the competition was; mean over draws), ``win_rate`` (the
    share of draws it won) and ``activation`` (its linear response h when it won, Eq. 1). For a
    conv map or a token mean, every unit that won somewhere, with its mean pi. For any other layer,
    the positive neurons. Each row also has ``signal``, the unit's dissected signal on this image;
    ``z``, how far it lies above the unit's mean over the probe, in standard deviations (the
    labels' per-unit ``signal_mean`` / ``signal_std``); and ``confidence``, the share of the probe
    images that move the unit about as much in which the CLIP finds its label (:func:`confidence_at`;
    None without a curve); and ``gain``, that confidence minus the label's share of all probe images
    (:func:`gain_of`). Sorted by ``sort``: "activation" (descending, signed: DISCOVER Table 4
    shows the top 7 and the bottom 6), "pi", "z" (the units this image moves most, whatever their
    scale), "confidence" (the rows whose concept is most likely in the image, then by z), "gain"
    (the rows whose concept this image makes likelier than any probe image, then by z) or "auto":
    confidence where the layer's labels have curves, else activation.
    Returns a JSON-ready dict.
    """
    import record
    import models

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise DiscoverError(f"`samples` must be at least 1, got {samples}")
    if mode not in lwta.MODES:
        raise DiscoverError(f"`mode` must be one of {', '.join(lwta.MODES)}, got {mode!r}")
    if sort not in SORTS:
        raise DiscoverError(f"`sort` must be one of {', '.join(SORTS)}, got {sort!r}")
    check_labels(model, labels)
    layer = layer or default_layer(model, labels)
    check_layer(labels, layer)
    module = record.resolve_layers(model, [layer])[layer]
    linfo = labels.layers[layer]
    summary = linfo.summary or labels.provenance.summary or "auto"
    pixels, name = load_image(image, meta.img_size, meta.interpolation)
    device = models.device_of(model)
    x = models.to_input(pixels[None], meta, device)

    stochastic = mode == "sample" and bool(lwta.lwta_modules(model))
    n_draws = samples if stochastic else 1  # argmax / no LWTA: every draw is the same
    with lwta.inference(model, mode), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
            torch.inference_mode():
        torch.manual_seed(seed)
        signal = linfo.signal or labels.provenance.signal
        d = _draws(model, module, x, n_draws, summary, signal if signal in record.SIGNALS else "sample")

    values, mask, logits = d["values"], d["active"], d["logits"]
    K = values.shape[1]
    if linfo.K != K:
        raise DiscoverError(f"`layer` {layer}: the labels have {linfo.K} neurons, the model's layer {K}")
    by_unit = {n.unit: n for n in labels.neurons_of(layer)}
    U = getattr(module, "U", None) if isinstance(module, lwta.LWTABase) else None
    wins = mask.sum(0)
    pi = d["pi"].mean(0) if "pi" in d else None
    per_block = U is not None and bool((mask.sum(1) == K // U).all())  # one winner per block, each draw
    if per_block:
        B = K // U
        w = wins.reshape(B, U).astype(np.float64) + 1e-9 * pi.reshape(B, U)  # ties: the larger pi
        shown = np.arange(B) * U + w.argmax(1)
        act = np.where(mask, d["h"], 0.0).sum(0) / np.maximum(wins, 1)  # h when it won
    else:
        shown = np.flatnonzero(wins > 0)
        act = np.where(mask, values, 0.0).mean(0)  # the mean output over the draws
    when_active = np.where(wins > 0, np.where(mask, values, 0.0).sum(0) / np.maximum(wins, 1), 0.0)
    if sort == "z" and not any(n.signal_std is not None for n in by_unit.values()):
        raise DiscoverError(f"`sort` z: the labels of {layer} have no per-neuron signal statistics "
                            "(made before labels.json format 2); run dissect again")
    has_curves = any(n.confidence for n in by_unit.values())
    has_rates = any(n.confidence and n.base_rate is not None for n in by_unit.values())
    if sort == "confidence" and not has_curves:
        raise DiscoverError(f"`sort` confidence: the labels of {layer} have no confidence curves (a CLIP "
                            "without a truth threshold, or labels before format 4)")
    if sort == "gain" and not has_rates:
        raise DiscoverError(f"`sort` gain: the labels of {layer} have no base rates (a CLIP without a truth "
                            "threshold, or labels before format 5)")
    if sort == "auto":
        sort = "confidence" if has_curves else "activation"
    sig = d["signal"].mean(0) if "signal" in d else values.mean(0)  # the dissected signal on this image
    neurons = []
    for k in shown:
        rec = by_unit.get(int(k), Neuron(layer=layer, unit=int(k)))
        conf = confidence_at(rec.confidence, float(sig[k]))
        neurons.append({
            "unit": int(k), "block": int(k) // U if U else None, "competitor": int(k) % U if U else None,
            "concept": rec.description, "score": _num(rec.similarity), "interpretable": rec.interpretable,
            "activation": float(act[k]), "activation_when_active": float(when_active[k]),
            "pi": None if pi is None else float(pi[k]), "signal": float(sig[k]), "z": z_score(rec, float(sig[k])),
            "confidence": conf, "gain": gain_of(conf, rec.base_rate),
            "win_rate": float(wins[k]) / n_draws, "top_concepts": rec.top_concepts[:3]})
    neurons = sort_neurons(neurons, sort)

    mean_logits = logits.mean(0)
    probs = torch.softmax(torch.from_numpy(mean_logits), 0).numpy()
    classes = meta.classes or labels.provenance.classes
    top_classes = np.argsort(-probs, kind="stable")[:5]

    def cname(i: int) -> str:
        return classes[i] if classes and i < len(classes) else f"class {i}"

    return {
        "image": name, "layer": layer, "K": K, "U": U, "summary": summary, "mode": mode,
        "samples": samples, "draws": n_draws, "seed": seed if stochastic else None, "sort": sort,
        "per_block": per_block, "signal": linfo.signal,
        "prediction": {"index": int(top_classes[0]), "class": cname(int(top_classes[0])),
                       "probability": float(probs[top_classes[0]])},
        "top_classes": [{"index": int(i), "class": cname(int(i)), "probability": float(probs[i])}
                        for i in top_classes],
        "n_active": int((wins > 0).sum()), "active_fraction": float((wins > 0).sum()) / K,
        "mean_active_per_draw": float(mask.sum(1).mean()),
        "neurons": neurons,
    }


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if np.isfinite(f) else None


# --- rich output ----------------------------------------------------------------------------------

def table(res: dict[str, Any], top: int = 7, bottom: int = 6):
    """Table 4 of the paper for one image: the ``top`` highest and ``bottom`` lowest active neurons."""
    from rich.markup import escape
    from rich.table import Table

    p = res["prediction"]
    K, n = res["K"], res["n_active"]
    if res["mode"] == "argmax":
        how = "LWTA argmax"
    elif res["seed"] is None:
        how = "deterministic"
    else:
        how = f"{res['draws']} sampled draw{'s' * (res['draws'] > 1)}, seed {res['seed']}"
    if res["draws"] > 1:
        per = res["mean_active_per_draw"]
        active = f"{per:g}/{K} active per draw ({100 * per / K:.2f}%)"
        how += f"; {n} neurons active in some draw"
    else:
        active = f"{n}/{K} active ({100 * n / K:.2f}%)"
    title = f"{escape(str(res['image']))}: [bold]{escape(p['class'])}[/] ({100 * p['probability']:.1f}%)\n{res['layer']}: {active}"
    if res.get("per_block"):
        how += f"; one row per block, its winner, sorted by {res.get('sort', 'activation')}"
    t = Table(title=title, caption=how)
    sampled, blocks = res["draws"] > 1, res["U"] is not None
    conf = any(r.get("confidence") is not None for r in res["neurons"])
    gain = any(r.get("gain") is not None for r in res["neurons"])
    for col in ("#", "neuron", *(["block/comp", "pi"] if blocks else []), "concept", *(["confidence"] if conf else []),
                *(["gain"] if gain else []),
                "score", "activation", *(["wins"] if sampled else [])):
        t.add_column(col, justify="left" if col == "concept" else "right")
    neurons = res["neurons"]
    top, bottom = max(0, top), max(0, bottom)
    if len(neurons) <= top + bottom:
        shown = list(enumerate(neurons))
        gap = None
    else:
        shown = list(enumerate(neurons[:top])) + [(len(neurons) - bottom + i, r)
                                                   for i, r in enumerate(neurons[len(neurons) - bottom:])]
        gap = top
    for j, (i, r) in enumerate(shown):
        if gap is not None and j == gap:
            t.add_row("…", "", *(["", ""] if blocks else []), f"[dim]{len(neurons) - top - bottom} more[/]",
                      *([""] if conf else []), *([""] if gain else []), "", "", *([""] if sampled else []))
        concept = escape(r["concept"]) if r["concept"] else "[dim](dead)[/]"
        if r["concept"] and r["interpretable"] is False:
            concept = f"[dim]{concept}[/]"
        score = "-" if r["score"] is None else f"{r['score']:.3f}"
        pi = "-" if r.get("pi") is None else f"{r['pi']:.2f}"
        c, g = r.get("confidence"), r.get("gain")
        t.add_row(str(i + 1), str(r["unit"]), *([f"{r['block']}/{r['competitor']}", pi] if blocks else []), concept,
                  *(["-" if c is None else f"{100 * c:.0f}%"] if conf else []),
                  *(["-" if g is None else f"{100 * g:+.0f}"] if gain else []), score, f"{r['activation']:+.3f}",
                  *([f"{100 * r['win_rate']:.0f}%"] if sampled else []))
    return t


def map_stems(names: list[str]) -> list[str]:
    """The file-name stem of each image's maps (:func:`write_maps`): its file name, ``:`` as ``-``
    (``world:2:17`` -> ``world-2-17``), with ``-2``, ``-3`` ... after a stem that an earlier image
    has already taken (two files called ``a.png`` in different folders), so none overwrites another's."""
    from common import slug

    stems: list[str] = []
    for name in names:
        base = slug(Path(str(name)).name.replace(":", "-"))
        stem, i = base, 1
        while stem in stems:
            i += 1
            stem = f"{base}-{i}"
        stems.append(stem)
    return stems


def write_maps(model: nn.Module, meta: ModelMeta, res: dict[str, Any], image: Any, out_dir: str | Path,
               n_units: int = 7, seed: int = 0, mode: str = "sample", stem: str | None = None) -> dict[int, str]:
    """Where the first ``n_units`` neurons of explanation ``res`` act on ``image``, as PNG overlays
    in ``out_dir`` (``maps.py``): for an LWTA layer, where the unit won (red) beside its winning
    probability pi (blue), over the positions of the layer's map or patch tokens (winners drawn in
    ``mode``, seeded with ``seed``); for any other layer its activation, scaled to its maximum on
    the image. Files ``STEM-LAYER-UNIT.png`` (``stem``: the image's :func:`map_stems` alone).
    Returns unit -> file path."""
    from PIL import Image

    import maps
    import record
    import models
    from common import atomic_path

    module = record.resolve_layers(model, [res["layer"]])[res["layer"]]
    pixels, name = load_image(image, meta.img_size, meta.interpolation)
    device = models.device_of(model)
    with lwta.inference(model, mode), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        m = maps.layer_maps(model, module, models.to_input(pixels[None], meta, device))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = stem or map_stems([name])[0]
    written = {}
    for n in res["neurons"][:n_units]:
        k = n["unit"]
        if "pi" in m:
            panels = [maps.overlay(pixels, m["win"][0, k]), maps.overlay(pixels, m["pi"][0, k], color=(40, 90, 255))]
        else:
            a = np.maximum(m["act"][0, k], 0)
            panels = [maps.overlay(pixels, a / a.max() if a.max() > 0 else a)]
        pic = np.concatenate([pixels, *panels], axis=1)
        path = out / f"{stem}-{res['layer']}-{k}.png"
        with atomic_path(path) as tmp:
            Image.fromarray(pic).save(tmp, format="PNG")
        written[k] = str(path)
    return written
