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
import sys

import click
from rich.console import Console

from common import DiscoverError

console = Console()
err_console = Console(stderr=True)


class DiscoverGroup(click.Group):
    """A Click group whose commands turn :class:`DiscoverError` into a one-line error."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except DiscoverError as e:
            if os.environ.get("DISCOVER_DEBUG"):
                raise
            err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            sys.exit(2)


@click.group(cls=DiscoverGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """DISCOVER: Competitive Vision Networks (stochastic LWTA), dissected with CLIP."""


# --- models: LWTA networks ------------------------------------------------------------------------

@cli.command("layers")
@click.option("--arch", required=True, help="Architecture name (see lwta.ARCHS).")
@click.option("--U", "U", type=int, default=None, help="Competitors per LWTA block (a CVN).")
@click.option("--act", type=click.Choice(["gelu", "relu"]), default=None, help="Plain twin.")
@click.option("--num-classes", type=int, default=None, help="Output classes (arch default).")
def layers_cmd(arch: str, U: int | None, act: str | None, num_classes: int | None) -> None:
    """Build ARCH and print its parameter count and its LWTA layers."""
    import lwta
    from rich.table import Table

    model = lwta.build(arch, U=U, act=act, num_classes=num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    table = Table(title=f"{arch} ({'U=' + str(U) if U else act or 'default act'}): "
                        f"{n_params:,} parameters")
    table.add_column("layer")
    table.add_column("type")
    table.add_column("U", justify="right")
    for name, m in model.named_modules():
        if isinstance(m, lwta.LWTABase):
            table.add_row(name, type(m).__name__, str(m.U))
    console.print(table)


if __name__ == "__main__":
    cli()
