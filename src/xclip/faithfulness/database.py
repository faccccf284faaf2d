"""The TiPAI database: one SQLite file with the prompts, images, scores (with their patch grids)
and chosen/rejected pairs of a scoring run.

Tables (schema version `SCHEMA_VERSION`, also in ``PRAGMA user_version``; ``PRAGMA
application_id`` = `APPLICATION_ID` marks the file as xclip's):

- ``meta(key, value)``: ``schema_version``, ``created_by``, ``scoring_config`` (canonical JSON);
- ``prompts(prompt_id, prompt, root, n_images, complete)``: ``root`` is the resolved absolute
  folder the prompt's images were read from (NULL for generated images);
- ``images(image_id, prompt_id, seed, source, path, sha256, png, height, width, error, faithful)``:
  a folder image by its resolved absolute path (inside its prompt's ``root``), a generated
  (ShapesWorld) image as PNG bytes; ``sha256`` is the hash of the content that was scored (the
  file's bytes, or the generated pixels); ``error``/``faithful`` are known for ShapesWorld only
  (NULL otherwise);
- ``scores(image_id, method, global_score, grid_size, patch_grid)``: ``method`` ``clip`` (the
  global cosine, no grid), ``crops`` / ``dense`` / ``dense_gradeclip`` (goodness per cell) or
  ``head`` (the TSPO head's reward and its per-patch error probability); ``patch_grid`` is
  float32 little-endian, row-major [grid_size, grid_size];
- ``pairs(prompt_id, chosen_id, rejected_id, chosen_score, rejected_score, rule)``.

Writes: `FaithfulnessDatabase.write` stores a batch of prompts in ONE transaction (all their rows,
then ``complete = 1``): a run killed mid-batch leaves the earlier batches complete and nothing of
the interrupted one, and writing a prompt again replaces its rows (idempotent: no duplicates). A
database is bound to one scoring configuration; a run with another one is refused instead of
mixing scores. A file that is not an SQLite database, is damaged, belongs to another application
or has another schema version is refused with a message naming it (and saying what to do).

Stored scores are reused only for the same content: a reader (`prompt_states`) gets each stored
image's path and hash, and the writer re-scores an image whose file changed (`TiPAIModule`).
Schema version 1 (before xclip stored hashes and absolute paths) cannot be checked that way and
is refused with the command to re-score.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from typing_extensions import Self

SCHEMA_VERSION = 2
APPLICATION_ID = 0x58435446  # "XCTF": xclip TiPAI faithfulness
SQLITE_HEADER = b"SQLite format 3\x00"
TABLES = ("meta", "prompts", "images", "scores", "pairs")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS prompts (
    prompt_id TEXT PRIMARY KEY, prompt TEXT NOT NULL, root TEXT, n_images INTEGER NOT NULL,
    complete INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS images (
    image_id TEXT PRIMARY KEY, prompt_id TEXT NOT NULL REFERENCES prompts(prompt_id), seed INTEGER NOT NULL,
    source TEXT NOT NULL, path TEXT, sha256 TEXT NOT NULL, png BLOB, height INTEGER NOT NULL, width INTEGER NOT NULL,
    error TEXT, faithful INTEGER);
CREATE INDEX IF NOT EXISTS images_by_prompt ON images(prompt_id);
CREATE TABLE IF NOT EXISTS scores (
    image_id TEXT NOT NULL REFERENCES images(image_id), method TEXT NOT NULL, global_score REAL,
    grid_size INTEGER, patch_grid BLOB, PRIMARY KEY (image_id, method));
CREATE TABLE IF NOT EXISTS pairs (
    prompt_id TEXT NOT NULL REFERENCES prompts(prompt_id), chosen_id TEXT NOT NULL REFERENCES images(image_id),
    rejected_id TEXT NOT NULL REFERENCES images(image_id), chosen_score REAL NOT NULL, rejected_score REAL NOT NULL,
    rule TEXT NOT NULL, PRIMARY KEY (chosen_id, rejected_id));
CREATE INDEX IF NOT EXISTS pairs_by_prompt ON pairs(prompt_id);
"""


class FaithfulnessDatabaseError(ValueError):
    """A database file xclip will not read or write; the message names the file and why."""


def sha256_hex(data: bytes) -> str:
    """The SHA-256 of `data` as 64 hex digits (how images are keyed by content)."""
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def in_root(path: str, root: str | None) -> bool:
    """Whether `path` names a file directly inside the folder `root` (both absolute; compared
    after removing ``..`` and ``.``, without following links: a crafted ``root/../x`` is outside)."""
    if root is None or not Path(path).is_absolute() or not Path(root).is_absolute():
        return False
    return Path(os.path.normpath(path)).parent == Path(os.path.normpath(root))


@dataclass
class ImageRecord:
    """One image of a prompt: a file (`path`, resolved and absolute) or generated pixels (`png`
    bytes); `sha256` is the hash of the scored content (required for a file; a generated image
    without one is keyed by its PNG bytes)."""

    image_id: str
    prompt_id: str
    seed: int
    source: str
    height: int
    width: int
    path: str | None = None
    png: bytes | None = None
    error: str | None = None
    faithful: bool | None = None
    sha256: str | None = None


@dataclass
class StoredPrompt:
    """What the database holds of a prompt, to decide what a run may reuse: its text, folder,
    whether it is complete, and image_id -> (path, sha256) of its images."""

    prompt: str
    root: str | None
    complete: bool
    images: dict[str, tuple[str | None, str]]


@dataclass
class ScoreRecord:
    """One method's score of an image: a global score and/or a [G, G] patch grid."""

    image_id: str
    method: str
    global_score: float | None = None
    grid: np.ndarray | None = None


@dataclass
class PairRecord:
    prompt_id: str
    chosen_id: str
    rejected_id: str
    chosen_score: float
    rejected_score: float
    rule: str


@dataclass
class PromptRecord:
    """Everything a prompt contributes to the database; written in one go."""

    prompt_id: str
    prompt: str
    images: list[ImageRecord] = field(default_factory=list)
    scores: list[ScoreRecord] = field(default_factory=list)
    pairs: list[PairRecord] = field(default_factory=list)
    root: str | None = None


def grid_to_blob(grid: np.ndarray) -> tuple[int, bytes]:
    """A square patch grid -> (G, float32 little-endian bytes)."""
    arr = np.ascontiguousarray(np.asarray(grid, dtype="<f4"))
    if arr.ndim != 2 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"a patch grid must be square [G, G], got shape {arr.shape}")
    return int(arr.shape[0]), arr.tobytes()


def blob_to_grid(size: int, blob: bytes) -> np.ndarray:
    """The inverse of `grid_to_blob`: float32 [G, G]."""
    return np.frombuffer(blob, dtype="<f4").reshape(size, size).copy()


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


class FaithfulnessDatabase:
    """Open (or create) a TiPAI database.

    Args:
        path: the SQLite file (created with its folder when missing, unless `readonly`).
        config: the scoring configuration of the run writing it (stored on first write; a later
            writer with another configuration is refused). None: any (readers).
        readonly: open for reading only (the app).
        timeout: seconds to wait for another process's write lock (several DDP processes write).
    """

    def __init__(
        self, path: str | Path, config: dict[str, Any] | None = None, readonly: bool = False, timeout: float = 60.0
    ):
        self.path, self.readonly = Path(path), readonly
        self.config = None if config is None else json.loads(canonical_json(config))
        exists = self.path.is_file() and self.path.stat().st_size > 0
        if readonly and not exists:
            raise FileNotFoundError(
                f"{self.path}: no such TiPAI database (run `xclip validate --config "
                "configs/tipai_shapes.yaml` to make one)"
            )
        if exists:
            with open(self.path, "rb") as fh:
                header = fh.read(len(SQLITE_HEADER))
            if header != SQLITE_HEADER:
                raise FaithfulnessDatabaseError(
                    f"{self.path} is not an SQLite database (corrupt, or another kind of file): refusing to use it; "
                    "pass another db_path or move the file away"
                )
        elif not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # the URI form is what opens read-only; the path is quoted so '%', '#' and '?' in folder names
        # stay part of the file name (unquoted, 'run%41' would open 'runA')
        uri = f"file:{urllib.parse.quote(str(self.path.resolve()))}?mode=ro" if readonly else str(self.path)
        self._conn = sqlite3.connect(uri, uri=readonly, timeout=timeout, isolation_level=None, check_same_thread=False)
        try:
            self._check_or_create()
        except BaseException:
            self._conn.close()
            raise

    # ---- opening ----------------------------------------------------------------------------
    def _refuse(self, why: str) -> FaithfulnessDatabaseError:
        return FaithfulnessDatabaseError(
            f"{self.path}: {why}: refusing to use it; pass another db_path or move the file away"
        )

    def _check_or_create(self) -> None:
        conn = self._conn
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        except sqlite3.DatabaseError as err:
            raise self._refuse(f"not a readable SQLite database ({err})") from None
        if not tables and app_id == 0:
            if self.readonly:
                raise self._refuse("an empty SQLite file, not a TiPAI database")
            self._create()
        elif app_id != APPLICATION_ID:
            raise self._refuse(
                f"an SQLite database of another application (application_id {app_id:#x}, tables "
                f"{tables}), not an xclip TiPAI database"
            )
        elif version < SCHEMA_VERSION:
            raise FaithfulnessDatabaseError(
                f"{self.path}: TiPAI schema version {version}, written by an older xclip that keyed images "
                f"by name only "
                f"(its stored scores cannot be checked against the files); this xclip reads and writes version "
                f"{SCHEMA_VERSION}: score the images again into a new database (delete or move {self.path}, or pass "
                "another db_path, then run the same `xclip validate` command)"
            )
        elif version != SCHEMA_VERSION:
            raise self._refuse(
                f"TiPAI schema version {version}, written by a newer xclip; this xclip reads and writes "
                f"version {SCHEMA_VERSION} (upgrade xclip to read it)"
            )
        try:
            check = [r[0] for r in conn.execute("PRAGMA quick_check")]
        except sqlite3.DatabaseError as err:
            raise self._refuse(f"damaged ({err})") from None
        if check != ["ok"]:
            raise self._refuse(f"damaged (integrity check: {'; '.join(check[:3])})")
        missing = [t for t in TABLES if t not in self._tables()]
        if missing:
            raise self._refuse(f"a TiPAI database without the tables {missing}")
        if not self.readonly:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            self._bind_config()

    def _tables(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}

    def _create(self) -> None:
        with self.transaction() as conn:
            # another process may have created it between our check and this lock
            if conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
                return
            for statement in _SCHEMA.strip().split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("created_by", "xclip.faithfulness")],
            )

    def _bind_config(self) -> None:
        if self.config is None:
            return
        with self.transaction() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'scoring_config'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('scoring_config', ?)", (canonical_json(self.config),))
                return
        stored = json.loads(row[0])
        if stored != self.config:
            keys = sorted(k for k in set(stored) | set(self.config) if stored.get(k) != self.config.get(k))
            detail = ", ".join(f"{k}: {stored.get(k)!r} there, {self.config.get(k)!r} now" for k in keys)
            raise FaithfulnessDatabaseError(
                f"{self.path} holds scores of another configuration ({detail}): pass another db_path (or delete "
                "the file) instead of mixing scores"
            )

    # ---- writing ----------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on any error, also a KeyboardInterrupt)."""
        if self.readonly:
            raise FaithfulnessDatabaseError(f"{self.path} was opened read-only")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._conn.execute("COMMIT")

    def write(self, records: Iterable[PromptRecord]) -> int:
        """Store prompts (replacing any earlier rows of the same prompts) and mark them complete,
        all in one transaction; a prompt without images is removed. Returns the number of rows
        written."""
        rows = 0
        with self.transaction() as conn:
            for rec in records:
                outside = [im.path for im in rec.images if im.path is not None and not in_root(im.path, rec.root)]
                if outside:
                    raise ValueError(
                        f"{self.path}: prompt {rec.prompt_id!r}: image paths must be absolute paths of "
                        f"files directly inside the prompt's root {rec.root!r}, got {outside[:3]}"
                    )
                pid = (rec.prompt_id,)
                conn.execute("DELETE FROM pairs WHERE prompt_id = ?", pid)
                conn.execute(
                    "DELETE FROM scores WHERE image_id IN (SELECT image_id FROM images WHERE prompt_id = ?)", pid
                )
                conn.execute("DELETE FROM images WHERE prompt_id = ?", pid)
                if not rec.images:  # a prompt without (readable) images leaves the database
                    conn.execute("DELETE FROM prompts WHERE prompt_id = ?", pid)
                    continue
                conn.execute(
                    "INSERT OR REPLACE INTO prompts VALUES (?, ?, ?, ?, 0)",
                    (rec.prompt_id, rec.prompt, rec.root, len(rec.images)),
                )
                conn.executemany(
                    "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            im.image_id,
                            im.prompt_id,
                            int(im.seed),
                            im.source,
                            im.path,
                            self._content_key(im),
                            im.png,
                            int(im.height),
                            int(im.width),
                            im.error,
                            None if im.faithful is None else int(bool(im.faithful)),
                        )
                        for im in rec.images
                    ],
                )
                conn.executemany(
                    "INSERT INTO scores VALUES (?, ?, ?, ?, ?)",
                    [
                        (
                            s.image_id,
                            s.method,
                            None if s.global_score is None else float(s.global_score),
                            *((None, None) if s.grid is None else grid_to_blob(s.grid)),
                        )
                        for s in rec.scores
                    ],
                )
                conn.executemany(
                    "INSERT INTO pairs VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (
                            p.prompt_id,
                            p.chosen_id,
                            p.rejected_id,
                            float(p.chosen_score),
                            float(p.rejected_score),
                            p.rule,
                        )
                        for p in rec.pairs
                    ],
                )
                conn.execute("UPDATE prompts SET complete = 1 WHERE prompt_id = ?", pid)
                rows += 1 + len(rec.images) + len(rec.scores) + len(rec.pairs)
        return rows

    def _content_key(self, image: ImageRecord) -> str:
        if image.sha256:
            return image.sha256
        if image.png is None:
            raise ValueError(
                f"{self.path}: image {image.image_id!r} ({image.path}) has no sha256 of its content: "
                "a file image is stored with the hash of the bytes that were scored"
            )
        return sha256_hex(image.png)

    # ---- reading ----------------------------------------------------------------------------
    def prompt_states(self, prompt_ids: Iterable[str]) -> dict[str, StoredPrompt]:
        """The stored prompts among `prompt_ids` (complete or not) with their images' paths and hashes."""
        out: dict[str, StoredPrompt] = {}
        for pid in dict.fromkeys(prompt_ids):
            row = self._conn.execute(
                "SELECT prompt, root, complete FROM prompts WHERE prompt_id = ?", (pid,)
            ).fetchone()
            if row is None:
                continue
            images = {
                r[0]: (r[1], r[2])
                for r in self._conn.execute("SELECT image_id, path, sha256 FROM images WHERE prompt_id = ?", (pid,))
            }
            out[pid] = StoredPrompt(row[0], row[1], bool(row[2]), images)
        return out

    def roots(self) -> list[str]:
        """The folders the database's images were read from (resolved, absolute), sorted."""
        return [
            r[0] for r in self._conn.execute("SELECT DISTINCT root FROM prompts WHERE root IS NOT NULL ORDER BY root")
        ]

    def prompt_root(self, prompt_id: str) -> str | None:
        row = self._conn.execute("SELECT root FROM prompts WHERE prompt_id = ?", (prompt_id,)).fetchone()
        return None if row is None else row[0]

    def complete_prompts(self) -> set[str]:
        return {r[0] for r in self._conn.execute("SELECT prompt_id FROM prompts WHERE complete = 1")}

    def stored_config(self) -> dict[str, Any] | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'scoring_config'").fetchone()
        return None if row is None else json.loads(row[0])

    def counts(self) -> dict[str, int]:
        """Rows per table."""
        return {t: self._conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}

    def prompts(self) -> list[tuple[str, str]]:
        """(prompt_id, prompt) of every complete prompt, by id."""
        return list(self._conn.execute("SELECT prompt_id, prompt FROM prompts WHERE complete = 1 ORDER BY prompt_id"))

    def images(self, prompt_id: str) -> list[ImageRecord]:
        rows = self._conn.execute(
            "SELECT image_id, prompt_id, seed, source, height, width, path, png, error, faithful, "
            "sha256 FROM images WHERE prompt_id = ? ORDER BY seed, image_id",
            (prompt_id,),
        )
        return [
            ImageRecord(
                image_id,
                pid,
                seed,
                source,
                height,
                width,
                path,
                png,
                error,
                faithful=None if faithful is None else bool(faithful),
                sha256=sha256,
            )
            for image_id, pid, seed, source, height, width, path, png, error, faithful, sha256 in rows
        ]

    def scores(self, prompt_id: str) -> dict[str, dict[str, ScoreRecord]]:
        """image_id -> method -> `ScoreRecord` for every image of a prompt."""
        out: dict[str, dict[str, ScoreRecord]] = {}
        rows = self._conn.execute(
            "SELECT s.image_id, s.method, s.global_score, s.grid_size, s.patch_grid FROM scores s "
            "JOIN images i ON i.image_id = s.image_id WHERE i.prompt_id = ?",
            (prompt_id,),
        )
        for image_id, method, global_score, size, blob in rows:
            grid = None if blob is None else blob_to_grid(size, blob)
            out.setdefault(image_id, {})[method] = ScoreRecord(image_id, method, global_score, grid)
        return out

    def pairs(self, prompt_id: str) -> list[PairRecord]:
        rows = self._conn.execute(
            "SELECT prompt_id, chosen_id, rejected_id, chosen_score, rejected_score, rule FROM pairs "
            "WHERE prompt_id = ? ORDER BY chosen_id, rejected_id",
            (prompt_id,),
        )
        return [PairRecord(*r) for r in rows]

    def dump(self) -> dict[str, list[tuple]]:
        """Every row of every table except meta, sorted (for comparing two databases)."""
        return {t: sorted(self._conn.execute(f"SELECT * FROM {t}").fetchall(), key=repr) for t in TABLES if t != "meta"}

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
