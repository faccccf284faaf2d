"""``xclip vocab wordnet --out data/wordnet``: NegLabel's candidate word lists from WordNet.

Writes, atomically, into ``--out``:
- ``noun.<lexname>.txt`` / ``adj.<lexname>.txt``: one file per lexicographer file (NegLabel's
  ``wordnet_database`` layout, readable by its own code);
- ``nouns.txt`` / ``adjectives.txt``: every noun / adjective once (what `NegAlignModule`'s
  ``nouns`` / ``adjectives`` read, e.g. in ``configs/ood_waterbirds.yaml``);
- ``counts.json``: lines per file and totals, next to NegLabel's 79,455.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xclip.io import atomic_write_text
from xclip.ood.wordnet import NEGLABEL_LINES, read_wordnet


def write_wordnet_lists(
    out: Path, source: str | None = None, single_words: bool = False, no_proper_nouns: bool = False
) -> dict:
    """Write the lists (see the module docstring) and return the counts."""
    lists = read_wordnet(source, single_words=single_words, no_proper_nouns=no_proper_nouns)
    for name, words in lists.files.items():
        atomic_write_text(out / f"{name}.txt", "".join(f"{w}\n" for w in words))
    nouns, adjectives = lists.merged("noun"), lists.merged("adj")
    atomic_write_text(out / "nouns.txt", "".join(f"{w}\n" for w in nouns))
    atomic_write_text(out / "adjectives.txt", "".join(f"{w}\n" for w in adjectives))
    counts = {
        "source": lists.source,
        "single_words": single_words,
        "no_proper_nouns": no_proper_nouns,
        "files": {name: len(words) for name, words in lists.files.items()},
        "lines": lists.lines(),
        "neglabel_lines": NEGLABEL_LINES,
        "nouns_unique": len(nouns),
        "adjectives_unique": len(adjectives),
    }
    atomic_write_text(out / "counts.json", json.dumps(counts, indent=2) + "\n")
    return counts


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="xclip vocab", description="Candidate word lists for NegLabel / NegAlign.")
    sub = parser.add_subparsers(dest="command", required=True)
    wn = sub.add_parser("wordnet", help="noun and adjective lemmas of WordNet 3.0, one file per lexicographer file")
    wn.add_argument("--out", type=Path, required=True, help="output folder (e.g. data/wordnet)")
    wn.add_argument(
        "--source",
        default=None,
        help="WordNet database folder or nltk wordnet.zip (default: /usr/share/wordnet, then ~/nltk_data)",
    )
    wn.add_argument("--single-words", action="store_true", help="drop multi-word lemmas")
    wn.add_argument("--no-proper-nouns", action="store_true", help="drop lemmas with a capital letter")
    args = parser.parse_args(argv)
    counts = write_wordnet_lists(args.out, args.source, args.single_words, args.no_proper_nouns)
    noun_lines = sum(n for name, n in counts["files"].items() if name.startswith("noun."))
    print(
        f"read {counts['source']}: {len(counts['files'])} lexicographer files, {counts['lines']:,} lines "
        f"({noun_lines:,} noun, {counts['lines'] - noun_lines:,} adjective; NegLabel's lists: "
        f"{NEGLABEL_LINES:,}); unique: {counts['nouns_unique']:,} nouns, {counts['adjectives_unique']:,} adjectives"
    )
    print(f"wrote {args.out}/{{noun,adj}}.*.txt, nouns.txt, adjectives.txt, counts.json")
    return 0
