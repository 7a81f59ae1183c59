"""The demo's choice between the shipped checkpoints and runs of its own, and `layers`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import demo

ROOT = Path(__file__).resolve().parent.parent


def test_demo_uses_shipped_checkpoints_unless_told_otherwise(tmp_path: Path) -> None:
    """Shipped when their recipe (epochs, training images) is the one asked for; the demo's own run
    directory with --from-scratch, another --epochs or another --train-size; never trains into the
    shipped directories."""
    models = demo.demo_models()
    assert [m.name for m in models] == ["cvn", "twin", "r18_cvn", "r18_twin"]
    for m in models:
        meta = json.loads((m.shipped / "meta.json").read_text())
        assert meta["epoch"] == m.epochs - 1  # each shipped model finished its recipe
        own = tmp_path / "runs" / m.name
        assert demo.run_dir(demo.DemoConfig(out=tmp_path), m) == m.shipped
        assert demo.run_dir(demo.DemoConfig(out=tmp_path, from_scratch=True), m) == own
        assert demo.run_dir(demo.DemoConfig(out=tmp_path, epochs=m.epochs + 1), m) == own
        assert demo.run_dir(demo.DemoConfig(out=tmp_path, train_size=500), m) == own


def test_layers_prints_the_parameter_count_and_the_lwta_layers() -> None:
    def run(*args: str) -> str:
        r = subprocess.run([sys.executable, str(ROOT / "discover.py"), "layers", *args], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    cvn, twin = run("--arch", "deit_world", "--U", "8"), run("--arch", "deit_world", "--act", "gelu")
    import timm

    ref = timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=8, num_classes=64, embed_dim=96,
                                                           depth=4, num_heads=4)
    n_stem = sum(p.numel() for p in demo.train.models.conv_stem(96, 8).parameters())
    n_linear_stem = sum(p.numel() for p in ref.patch_embed.parameters())
    expected = sum(p.numel() for p in ref.parameters()) - n_linear_stem + n_stem
    flat = [" ".join(t.split()) for t in (cvn, twin)]  # the title may wrap
    assert all(f"{expected:,} parameters" in t for t in flat)
    rows = [ln for ln in cvn.splitlines() if "mlp.act" in ln]
    assert len(rows) == 4 and all("LWTA" in r and r.rstrip(" │").endswith("8") for r in rows)
    assert "mlp.act" not in twin
