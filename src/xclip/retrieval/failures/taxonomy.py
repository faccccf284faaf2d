"""The failure taxonomy for top-1 retrieval failures (Ambiguous, Attribute, Action, Count, Context,
Spatial, Object) and its spellings.

One label per failure. Canonical labels are the category names, with the Ambiguous subtypes
written ``Ambiguous/underspecified`` and ``Ambiguous/nearduplicate``; a bare ``Ambiguous`` (unsure,
no subtype) is accepted too. Every label also has a short code (``amb-u``, ``attr``, ...).
Parsing ignores case and every character that is not a letter or digit, so ``Ambiguous
(near-duplicate)``, ``ambiguous:nearduplicate`` and ``AMB_N`` all read as the same label.
"""

from __future__ import annotations

import re

AMBIGUOUS = "Ambiguous"
UNDERSPECIFIED = "Ambiguous/underspecified"
NEARDUPLICATE = "Ambiguous/nearduplicate"
ATTRIBUTE, ACTION, COUNT, CONTEXT, SPATIAL, OBJECT = "Attribute", "Action", "Count", "Context", "Spatial", "Object"

# canonical label -> short code, in taxonomy order (the order of tables and charts)
SHORT_CODES: dict[str, str] = {
    UNDERSPECIFIED: "amb-u",
    NEARDUPLICATE: "amb-n",
    AMBIGUOUS: "amb",
    ATTRIBUTE: "attr",
    ACTION: "act",
    COUNT: "cnt",
    CONTEXT: "ctx",
    SPATIAL: "spat",
    OBJECT: "obj",
}
LABELS: tuple[str, ...] = tuple(SHORT_CODES)
CATEGORIES: tuple[str, ...] = (AMBIGUOUS, ATTRIBUTE, ACTION, COUNT, CONTEXT, SPATIAL, OBJECT)

# further accepted spellings (before normalisation) of some labels
_ALIASES: dict[str, tuple[str, ...]] = {
    UNDERSPECIFIED: ("underspecified", "Ambiguous underspecified", "amb-underspecified"),
    NEARDUPLICATE: ("nearduplicate", "near duplicate", "Ambiguous near-duplicate", "amb-nearduplicate"),
    ATTRIBUTE: ("attributes",),
    ACTION: ("actions",),
    COUNT: ("counting",),
    CONTEXT: ("background",),
    SPATIAL: ("spatial relation", "position"),
    OBJECT: ("objects",),
}


def _key(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


_SPELLINGS: dict[str, str] = {
    _key(spelling): label for label, code in SHORT_CODES.items() for spelling in (label, code, *_ALIASES.get(label, ()))
}


def parse_label(text: str) -> str | None:
    """The canonical label of a spelling, or None when `text` is empty or not in the taxonomy."""
    return _SPELLINGS.get(_key(text or ""))


def category(label: str) -> str:
    """The top-level category of a canonical label (``Ambiguous/nearduplicate`` -> ``Ambiguous``)."""
    if label not in SHORT_CODES:
        raise ValueError(f"{label!r} is not a canonical label; canonical labels are {LABELS}")
    return label.split("/", 1)[0]


def is_ambiguous(label: str) -> bool:
    """Whether a canonical label is Ambiguous (any subtype)."""
    return category(label) == AMBIGUOUS


def accepted_spellings() -> str:
    """A human-readable list of the labels and their short codes (written next to the sheets)."""
    lines = ["label (long spelling)        short code", "-" * 40]
    lines += [f"{label:<28} {code}" for label, code in SHORT_CODES.items()]
    lines += [
        "",
        "Case, spaces and punctuation are ignored: 'Ambiguous (near-duplicate)' == 'amb_n'.",
        "One label per failure; unsure -> Ambiguous.",
    ]
    return "\n".join(lines) + "\n"
