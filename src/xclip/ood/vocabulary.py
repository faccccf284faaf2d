"""Word lists for negative-label mining: plain text files, one word per line.

Lines starting with ``#`` and blank lines are ignored; duplicates are dropped (first kept). The
package ships ShapesWorld's lists under ``xclip/ood/wordlists/`` (``nouns.txt``,
``adjectives.txt``), object-like and scene-like words without the default ID class names.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

BUILTIN_WORDLISTS = ("nouns", "adjectives")


def builtin_wordlist(name: str) -> Path:
    """Path of a shipped word list (``nouns`` or ``adjectives``)."""
    if name not in BUILTIN_WORDLISTS:
        raise ValueError(f"unknown shipped word list {name!r}; choose from {BUILTIN_WORDLISTS}")
    return Path(str(resources.files("xclip.ood") / "wordlists" / f"{name}.txt"))


def read_words(path: str | Path) -> list[str]:
    """The words of a word-list file, in file order, without comments, blanks and duplicates."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"word list {path}: no such file")
    words = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return list(dict.fromkeys(w for w in words if w and not w.startswith("#")))


def resolve_words(value: str | list[str] | None, field: str, default: str) -> list[str]:
    """Words from a file path, an explicit list, or (None) the shipped list `default`.

    A file that holds no word is an error naming `field`; an explicit empty list means none.
    """
    if value is None:
        value = str(builtin_wordlist(default))
    if isinstance(value, str):
        words = read_words(value)
        if not words:
            raise ValueError(f"`{field}` ({value}) holds no words: the negative vocabulary would be empty")
        return words
    return list(dict.fromkeys(w.strip() for w in value if w.strip()))
