"""concepts.load_concepts: built-in sets, files, cleaning rules and one-line errors."""
from __future__ import annotations

import pytest

import concepts
from common import DiscoverError


def one_line_error(spec: str, *needles: str) -> None:
    with pytest.raises(DiscoverError) as info:
        concepts.load_concepts(spec)
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg


def test_word_lists_nest_and_are_clean() -> None:
    w20, w10, w3 = (concepts.load_concepts(s) for s in ("20k", "10k", "3k"))
    assert (len(w20), len(w10), len(w3)) == (20_000, 10_000, 3_000)
    assert w10 == w20[:10_000] and w3 == w20[:3_000]
    assert all(w.isascii() and w.isalpha() and w.islower() and len(w) >= 2 for w in w20)
    assert not {"the", "and", "of", "to", "is", "you"} & set(w20)  # stop words dropped
    assert {"dog", "car", "water", "red", "house"} <= set(w3)


def test_imagenet_class_names_offline() -> None:
    words = concepts.load_concepts("imagenet")
    assert words[:3] == ["tench", "goldfish", "great white shark"]
    assert len(words) == 999  # "Cardigan" (dog) and "cardigan" (sweater): one case-insensitive concept


def test_places365_explains_itself() -> None:
    one_line_error("places365", "places365", "file")


def test_file_cleaning(tmp_path) -> None:
    path = tmp_path / "c.txt"
    path.write_text("  red \n\nblue\nRed\nred\n\n  green circle\nBLUE\n")
    assert concepts.load_concepts(str(path)) == ["red", "blue", "green circle"]


def test_world_from_concept_dir(tmp_path, monkeypatch) -> None:
    (tmp_path / "world.txt").write_text("circle\nsquare\ncircle\n")
    monkeypatch.setattr(concepts, "CONCEPT_DIR", tmp_path)
    assert concepts.load_concepts("world") == ["circle", "square"]


def test_missing_builtin_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(concepts, "CONCEPT_DIR", tmp_path)
    one_line_error("world", "'world'", "missing")


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_an_error(tmp_path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    one_line_error(str(path), "empty.txt", "no concepts")


def test_bad_specs(tmp_path) -> None:
    one_line_error("no_such_set", "'no_such_set'", "no such file")
    one_line_error(str(tmp_path), str(tmp_path), "directory")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    one_line_error(str(bad), "latin1.txt", "UTF-8")
