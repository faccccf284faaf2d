"""NegLabel's candidate words from the WordNet 3.0 database: the lemmas of every noun and adjective
synset, grouped by lexicographer file (``noun.artifact``, ``adj.all``, ...).

Sources, in the WordNet database format (``data.noun`` / ``data.adj``: each synset line carries
its lexicographer file number and its lemmas):
- Debian's ``wordnet-base`` package (``/usr/share/wordnet``);
- nltk_data (``<nltk_data>/corpora/wordnet/`` or the ``wordnet.zip`` nltk downloads).

Lemmas are written as text: underscores become spaces (``ice_cream`` -> ``ice cream``) and the
adjective position markers ``(a)``, ``(p)``, ``(ip)`` are dropped. Each lexicographer file keeps
its lemmas once, in database order; NegLabel's own reader then drops repeats across files.
"""

from __future__ import annotations

import io
import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# lexicographer file numbers -> names (WordNet's lexnames(5WN); a ``lexnames`` file, when present,
# takes precedence)
LEXNAMES: tuple[str, ...] = (
    "adj.all",
    "adj.pert",
    "adv.all",
    "noun.Tops",
    "noun.act",
    "noun.animal",
    "noun.artifact",
    "noun.attribute",
    "noun.body",
    "noun.cognition",
    "noun.communication",
    "noun.event",
    "noun.feeling",
    "noun.food",
    "noun.group",
    "noun.location",
    "noun.motive",
    "noun.object",
    "noun.person",
    "noun.phenomenon",
    "noun.plant",
    "noun.possession",
    "noun.process",
    "noun.quantity",
    "noun.relation",
    "noun.shape",
    "noun.state",
    "noun.substance",
    "noun.time",
    "verb.body",
    "verb.change",
    "verb.cognition",
    "verb.communication",
    "verb.competition",
    "verb.consumption",
    "verb.contact",
    "verb.creation",
    "verb.emotion",
    "verb.motion",
    "verb.perception",
    "verb.possession",
    "verb.social",
    "verb.stative",
    "verb.weather",
    "adj.ppl",
)
DEFAULT_SOURCES = (
    Path("/usr/share/wordnet"),
    Path.home() / "nltk_data" / "corpora" / "wordnet",
    Path.home() / "nltk_data" / "corpora" / "wordnet.zip",
    Path("/usr/share/nltk_data/corpora/wordnet"),
    Path("/usr/share/nltk_data/corpora/wordnet.zip"),
)
NEGLABEL_LINES = 79_455  # lines of NegLabel's own noun.* + adj.* files before de-duplication (NegLabel, ICLR 2024)
_MARKER = re.compile(r"\((a|p|ip)\)$")


class WordNetError(FileNotFoundError):
    """No readable WordNet database where one was looked for."""


@dataclass
class WordNetLists:
    """Lemmas per lexicographer file (``{"noun.artifact": [...], "adj.all": [...]}``), in file order."""

    files: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    def lines(self) -> int:
        """Lines over all files (NegLabel counts its lists this way, before de-duplication)."""
        return sum(len(words) for words in self.files.values())

    def merged(self, pos: str) -> list[str]:
        """Every `pos` (``noun`` / ``adj``) lemma once, in lexicographer-file order (what NegLabel's
        reader builds from the per-file lists)."""
        words = (w for name, ws in self.files.items() if name.split(".")[0] == pos for w in ws)
        return list(dict.fromkeys(words))


class _Database:
    """The files of a WordNet database folder or nltk's ``wordnet.zip``."""

    def __init__(self, root: Path):
        self.root = root
        self.zip = zipfile.ZipFile(root) if root.suffix == ".zip" else None

    def _member(self, name: str) -> str | None:
        names = [n for n in self.zip.namelist() if n.rsplit("/", 1)[-1] == name] if self.zip else []
        return names[0] if names else None

    def exists(self, name: str) -> bool:
        return self._member(name) is not None if self.zip else (self.root / name).is_file()

    def lines(self, name: str) -> Iterator[str]:
        if self.zip:
            member = self._member(name)
            if member is None:
                raise WordNetError(f"{self.root} has no {name}")
            with self.zip.open(member) as fh:
                yield from io.TextIOWrapper(fh, encoding="latin-1")
        else:
            with (self.root / name).open(encoding="latin-1") as fh:
                yield from fh


def find_wordnet(source: str | Path | None = None) -> Path:
    """The WordNet database folder (or nltk zip) to read: `source`, else the first default that
    has ``data.noun`` and ``data.adj``."""
    candidates = [Path(source).expanduser()] if source is not None else list(DEFAULT_SOURCES)
    for root in candidates:
        if root.exists() and all(_Database(root).exists(f"data.{pos}") for pos in ("noun", "adj")):
            return root
    looked = ", ".join(str(c) for c in candidates)
    raise WordNetError(
        f"no WordNet 3.0 database (data.noun + data.adj) in {looked}. Install it with "
        "`apt-get install wordnet-base` (Debian/Ubuntu: /usr/share/wordnet) or "
        "`python -m nltk.downloader wordnet` (~/nltk_data/corpora/wordnet.zip), or pass --source"
    )


def read_wordnet(
    source: str | Path | None = None, single_words: bool = False, no_proper_nouns: bool = False
) -> WordNetLists:
    """Noun and adjective lemmas per lexicographer file.

    Args:
        source: a WordNet database folder or nltk ``wordnet.zip`` (None: the default places).
        single_words: drop multi-word lemmas (``ice cream``).
        no_proper_nouns: drop lemmas with a capital letter (names, places).
    """
    root = find_wordnet(source)
    db = _Database(root)
    lexnames = LEXNAMES
    if db.exists("lexnames"):
        parsed = {int(n): name for n, name, _ in (line.split() for line in db.lines("lexnames") if line.strip())}
        lexnames = tuple(parsed.get(i, f"lex{i}") for i in range(max(parsed) + 1))
    files: dict[str, dict[str, None]] = {}
    for pos in ("noun", "adj"):
        for line in db.lines(f"data.{pos}"):
            if line.startswith(" "):  # the licence header
                continue
            parts = line.split()
            lexname, n_words = lexnames[int(parts[1])], int(parts[3], 16)
            bucket = files.setdefault(lexname, {})
            for j in range(n_words):
                word = _MARKER.sub("", parts[4 + 2 * j]).replace("_", " ")
                if single_words and " " in word:
                    continue
                if no_proper_nouns and any(c.isupper() for c in word):
                    continue
                bucket[word] = None
    return WordNetLists(
        {name: list(words) for name, words in sorted(files.items(), key=lambda kv: lexnames.index(kv[0])) if words},
        str(root),
    )
