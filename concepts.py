"""Concept sets S for dissection (CLIP-Dissect Sec. 3; SPEC.md section 3): a spec in, a word list out.

    import concepts
    words = concepts.load_concepts("20k")          # the paper's default concept set
    words = concepts.load_concepts("my_words.txt")  # any file, one concept per line

Specs:
    world       concepts/world.txt, the synthetic world's 99 concepts and 445 distractor words
    world_heldout  the same 99 concepts and 445 other words of 20k.txt outside the words world-clip's
                last training stage used (world_clip.heldout_vocabulary; world_clip.write_heldout_concepts)
    20k 10k 3k  the most frequent English words (concepts/make_wordlists.py made them, once)
    imagenet    the 1000 ImageNet class names shipped with torchvision (999 after cleaning:
                "Cardigan" the dog and "cardigan" the sweater are one concept)
    places365   not available offline: raises DiscoverError saying how to supply it as a file
    PATH        a text file, one concept per line

Every list is cleaned the same way: surrounding whitespace stripped, blank lines dropped, and
duplicates, case variants included, removed keeping the first occurrence (so the order, which
breaks ties between equal scores, is the file's). An empty result is an error. Every error is a
one-line DiscoverError naming the spec or file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from common import REPO_DIR, DiscoverError

CONCEPT_DIR = REPO_DIR / "concepts"
FILES = {"world": "world.txt", "world_heldout": "world_heldout.txt", "20k": "20k.txt", "10k": "10k.txt",
         "3k": "3k.txt"}
SPECS = (*FILES, "imagenet", "places365")


def clean_concepts(lines: Iterable[str], source: str) -> list[str]:
    """Strip, drop blanks, drop duplicates and case variants (first occurrence wins)."""
    seen: set[str] = set()
    out: list[str] = []
    for line in lines:
        word = line.strip()
        if word and word.casefold() not in seen:
            seen.add(word.casefold())
            out.append(word)
    if not out:
        raise DiscoverError(f"concept set {source}: no concepts (empty or blank lines only)")
    return out


def _read(path: Path, source: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DiscoverError(f"concept set {source}: file not found") from None
    except IsADirectoryError:
        raise DiscoverError(f"concept set {source}: is a directory, not a file") from None
    except UnicodeDecodeError:
        raise DiscoverError(f"concept set {source}: not UTF-8 text") from None
    except OSError as e:
        raise DiscoverError(f"concept set {source}: cannot read ({e.strerror})") from None
    return clean_concepts(text.splitlines(), source)


def _imagenet() -> list[str]:
    from torchvision.models import ResNet18_Weights  # the class names ship inside torchvision
    return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])


def load_concepts(spec: str) -> list[str]:
    """The concept list for ``spec``: a built-in name (see module doc) or a file path."""
    if spec in FILES:
        path = CONCEPT_DIR / FILES[spec]
        if not path.is_file():
            raise DiscoverError(f"concept set '{spec}': {path} is missing from this checkout")
        return _read(path, f"'{spec}' ({path})")
    if spec == "imagenet":
        return clean_concepts(_imagenet(), "'imagenet'")
    if spec == "places365":
        raise DiscoverError("concept set 'places365': its 365 category names ship with no installed "
                            "package and cannot be downloaded here; save them one per line in a file "
                            "and pass its path instead")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DiscoverError(f"concept set '{spec}': not a built-in set ({', '.join(SPECS)}) "
                            "and no such file")
    return _read(path, f"file {str(path)!r}")
