"""Generate concepts/20k.txt, 10k.txt and 3k.txt: the most frequent English words, one per line.

CLIP-Dissect's default concept set is "the 20,000 most common English words" (paper 001, Sec. 4,
with 10k and 3k variants in Table 1). Its release ships a ready-made list; this script rebuilds
ours once, reproducibly, from the ``wordfreq`` package's English frequencies, and the lists are
committed, so nothing here runs at dissection time.

Rules, in frequency order (most frequent first):
* lower-case alphabetic ASCII words only (no digits, apostrophes, hyphens or accents);
* at least two letters;
* no stop words: the function words in ``STOP_WORDS`` below (articles, pronouns, prepositions,
  conjunctions, auxiliaries, a few fillers) -- they never name a visual concept;
* 3k is the first 3 000 of the 10k list, which is the first 10 000 of the 20k list.

Install the generator's only dependency (not needed by the project at runtime) and run::

    pip install wordfreq==3.1.1
    python concepts/make_wordlists.py            # writes concepts/{20k,10k,3k}.txt
"""
from __future__ import annotations

from pathlib import Path

STOP_WORDS = frozenset("""
a about above after again against all am an and any are aren as at be because been before being
below between both but by can cannot could couldn did didn do does doesn doing don down during
each few for from further had hadn has hasn have haven having he her here hers herself him himself
his how i if in into is isn it its itself just let ll me more most mustn my myself no nor not now of
off on once only or other ought our ours ourselves out over own re same shan she should shouldn so
some such than that the their theirs them themselves then there these they this those through to
too under until up ve very was wasn we were weren what when where which while who whom why will
with won would wouldn you your yours yourself yourselves also yet may might must shall us whose
upon within without toward towards onto via per thus hence whether either neither although though
unless since till whereas among amongst across along around behind beside besides beyond despite
except inside outside near than via etc ok okay oh yeah yes hey
""".split())

SIZES = (20_000, 10_000, 3_000)


def frequent_words(n: int) -> list[str]:
    """The n most frequent English words that pass the rules above, most frequent first."""
    from wordfreq import top_n_list  # generator-only dependency

    words: list[str] = []
    for w in top_n_list("en", 4 * n, wordlist="large"):
        if w.isascii() and w.isalpha() and len(w) >= 2 and w not in STOP_WORDS:
            words.append(w)
            if len(words) == n:
                return words
    raise RuntimeError(f"wordfreq gave only {len(words)} usable words, wanted {n}")


def main() -> None:
    here = Path(__file__).resolve().parent
    words = frequent_words(max(SIZES))
    for size in SIZES:
        path = here / f"{size // 1000}k.txt"
        path.write_text("\n".join(words[:size]) + "\n")
        print(f"wrote {path} ({size} words)")


if __name__ == "__main__":
    main()
