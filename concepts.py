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

import re
from pathlib import Path
from typing import Any, Iterable, Sequence

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


def read_lines(path: str | Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a one-line DiscoverError starting with ``what`` (the flag or
    spec that named the file) when it cannot be read."""
    try:
        return Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DiscoverError(f"{what}: file not found") from exc
    except IsADirectoryError as exc:
        raise DiscoverError(f"{what}: is a directory, not a file") from exc
    except UnicodeDecodeError as exc:
        raise DiscoverError(f"{what}: not UTF-8 text") from exc
    except OSError as exc:
        raise DiscoverError(f"{what}: cannot read ({exc.strerror})") from exc


def _read(path: Path, source: str) -> list[str]:
    return clean_concepts(read_lines(path, f"concept set {source}"), source)


def imagenet_categories() -> list[str]:
    """torchvision's 1000 ImageNet class names, in the order of its classifiers' outputs."""
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
        return clean_concepts(imagenet_categories(), "'imagenet'")
    if spec == "places365":
        raise DiscoverError("concept set 'places365': its 365 category names ship with no installed "
                            "package and cannot be downloaded here; save them one per line in a file "
                            "and pass its path instead")
    path = Path(spec).expanduser()
    if not path.exists():
        raise DiscoverError(f"concept set '{spec}': not a built-in set ({', '.join(SPECS)}) "
                            "and no such file")
    return _read(path, f"file {str(path)!r}")


# --- class names of a classifier's outputs ---------------------------------------------------------

SYNSET = re.compile(r"n\d{8}")  # a WordNet synset id, as ImageNet folders are named (n01440764)


def _first_lemma(description: str) -> str:
    return description.split(",")[0].strip()


def readable_class_names(classes: Sequence[str] | None) -> list[str] | None:
    """Class names as words: a WordNet synset id (``n01440764``, an ImageNet folder name) becomes
    its first lemma ("tench") from the ImageNet tables timm ships; other names are kept as they are."""
    if not classes:
        return None
    if not any(SYNSET.fullmatch(c) for c in classes):
        return list(classes)
    from timm.data import ImageNetInfo

    info = ImageNetInfo()  # its lemma table covers every ImageNet-21k synset
    out = []
    for c in classes:
        try:
            out.append(_first_lemma(info.label_name_to_description(c)) if SYNSET.fullmatch(c) else c)
        except KeyError:
            out.append(c)
    return out


def imagenet_class_names(model: Any) -> list[str] | None:
    """The class names of a timm model whose head is an ImageNet subset's (1k, 12k, 21k, ...), as
    first lemmas in output order; None for any other head."""
    from timm.data import ImageNetInfo, infer_imagenet_subset

    try:
        subset = infer_imagenet_subset(model)
    except Exception:  # a model without a pretrained_cfg
        subset = None
    return [_first_lemma(d) for d in ImageNetInfo(subset).label_descriptions()] if subset else None


def read_class_names(path: str | Path, n: int | None, flag: str = "`class_names`") -> list[str]:
    """Class names from a file, one per line in the order of the model's outputs (blank lines
    dropped); there must be exactly ``n`` of them when the output width ``n`` is known."""
    names = [line.strip() for line in read_lines(path, f"{flag} {path}")]
    names = [name for name in names if name]
    if not names:
        raise DiscoverError(f"{flag} {path}: no class names (empty or blank lines only)")
    if n is not None and len(names) != n:
        raise DiscoverError(f"{flag} {path}: {len(names)} class names for a model with {n} outputs")
    return names
