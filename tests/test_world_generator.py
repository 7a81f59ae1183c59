"""The world generator: determinism, and labels that agree with the pixels."""
from __future__ import annotations

import numpy as np
import pytest

import world
from common import DiscoverError


def test_pure_function_of_seed_and_index() -> None:
    a, b = world.render(3, 17), world.render(3, 17)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.attrs == b.attrs and a.caption == b.caption
    batch, attrs = world.render_batch(3, 15, 4)
    assert np.array_equal(batch[2], a.image) and attrs[2] == a.attrs
    assert not np.array_equal(world.render(4, 17).image, a.image)


@pytest.mark.parametrize("index", range(40))
def test_mask_pixels_carry_the_object_colour(index: int) -> None:
    s = world.render(11, index)
    rgb = np.array(world.COLORS[s.attrs["color"]], float)
    pix = s.image[s.mask].astype(float)
    # every object pixel is the colour or its darker pattern tone (up to shading jitter and noise)
    bright, dark = rgb, rgb * world.TEXTURE_SHADE
    d = np.minimum(np.linalg.norm(pix - bright, axis=1) / np.linalg.norm(bright),
                   np.linalg.norm(pix - dark, axis=1) / np.linalg.norm(bright))
    assert np.mean(d < 0.2) > 0.95
    # the nearest palette colour of the object's brightest pixels is the labelled one
    top = pix[pix.sum(1) >= np.quantile(pix.sum(1), 0.5)].mean(0)
    names = list(world.COLORS)
    nearest = names[int(np.argmin([np.linalg.norm(top / np.linalg.norm(top) - np.array(c) / np.linalg.norm(c))
                                   for c in world.COLORS.values()]))]
    assert nearest == s.attrs["color"]


def test_size_agrees_with_mask_area() -> None:
    areas = {"small": [], "large": []}
    for i in range(120):
        s = world.render(12, i)
        areas[s.attrs["size"]].append(s.mask.mean())
    assert max(areas["small"]) < min(areas["large"])


def test_texture_agrees_with_pixels() -> None:
    """Plain objects have one tone; patterned ones show a substantial share of the dark tone."""
    for i in range(80):
        s = world.render(13, i)
        rgb = np.array(world.COLORS[s.attrs["color"]], float)
        pix = s.image[s.mask].astype(float)
        dark_share = np.mean(np.linalg.norm(pix - rgb * world.TEXTURE_SHADE, axis=1)
                             < np.linalg.norm(pix - rgb, axis=1))
        if s.attrs["texture"] == "plain":
            assert dark_share < 0.02
        else:
            assert dark_share > 0.08, (s.attrs, dark_share)


def test_captions_mention_every_attribute() -> None:
    for i in range(50):
        s = world.render(14, i)
        for value in s.attrs.values():
            assert value in s.caption, (s.caption, s.attrs)


def test_attribute_balance_and_tasks() -> None:
    _, attrs = world.render_batch(15, 0, 800)
    for key, values in world.ATTRIBUTES.items():
        counts = np.array([sum(a[key] == v for a in attrs) for v in values])
        assert counts.min() > 0.5 * 800 / len(values)
    assert len(world.TASKS["object"]) == 64 and world.TASKS["object"][0] == "red circle"
    a = {"shape": "star", "color": "blue", "texture": "plain", "size": "small", "background": "dark"}
    assert world.TASKS["object"][world.label(a, "object")] == "blue star"
    assert world.TASKS["shape"][world.label(a, "shape")] == "star"
    with pytest.raises(DiscoverError, match="unknown task"):
        world.label(a, "mood")


def test_world_export_tree_labels_and_determinism(tmp_path) -> None:
    """`world export`: OUT/<class>/<index>.png for each image, labels.csv rows with the generator's
    attributes, the same bytes on a second export, and a count of the classes covered."""
    import csv
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from PIL import Image

    root = Path(__file__).resolve().parent.parent
    runs = []
    for name in ("a", "b"):
        r = subprocess.run([sys.executable, str(root / "discover.py"), "world", "export", str(tmp_path / name),
                            "--n", "12", "--seed", "9"], cwd=root, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        runs.append(r.stdout)
    rows = list(csv.DictReader(open(tmp_path / "a" / "labels.csv")))
    assert len(rows) == 12
    for i, row in enumerate(rows):
        s = world.render(9, i, 64)
        assert row["file"] == f"{world.class_name(s.attrs, 'object').replace(' ', '_')}/{i:06d}.png"
        assert {k: row[k] for k in world.ATTRIBUTES} == s.attrs and row["caption"] == s.caption
        assert np.array_equal(np.asarray(Image.open(tmp_path / "a" / row["file"]).convert("RGB")), s.image)
        assert (tmp_path / "a" / row["file"]).read_bytes() == (tmp_path / "b" / row["file"]).read_bytes()
    covered = len({r["class"] for r in rows})
    assert f"{covered} of 64 classes" in " ".join(runs[0].split())
