"""Annotation sheets: one CSV per annotator, each holding its own failures plus a shared overlap
set that every annotator labels (for agreement). Rows are tied to their card files.

A sheets folder holds ``<annotator>.csv`` per annotator, ``assignment.json`` (who got which
failure, which ones are shared) and ``taxonomy.txt`` (the accepted label spellings).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xclip.io import atomic_write_csv, atomic_write_text
from xclip.retrieval.failures.extract import Failure
from xclip.retrieval.failures.taxonomy import accepted_spellings

LABEL_COLUMN = "label"
NOTE_COLUMN = "note"
SHEET_COLUMNS: tuple[str, ...] = (
    "failure_id",
    "text_index",
    "card",
    "caption",
    "gt_key",
    "retrieved_key",
    "gt_score",
    "retrieved_score",
    LABEL_COLUMN,
    NOTE_COLUMN,
)
ASSIGNMENT_FILE = "assignment.json"


@dataclass(frozen=True)
class SheetAssignment:
    """Which failures each annotator labels (`sheets`: name -> ids, in row order) and which of
    them every annotator labels (`overlap`)."""

    sheets: dict[str, list[str]]
    overlap: list[str]


def annotator_names(n_annotators: int) -> list[str]:
    """Default sheet names: ``annotator_1`` ... ``annotator_n``."""
    return [f"annotator_{k + 1}" for k in range(n_annotators)]


def feasible_counts(n_available: int, n_annotators: int, per_annotator: int, overlap: int) -> tuple[int, int]:
    """``(per_annotator, overlap)`` shrunk to fit `n_available` failures: the overlap set first
    (agreement needs it), then an equal share of the rest for each annotator."""
    overlap = min(overlap, n_available)
    return min(per_annotator, (n_available - overlap) // max(n_annotators, 1)), overlap


def assign_sheets(
    failure_ids: Sequence[str], n_annotators: int, per_annotator: int, overlap: int, seed: int
) -> SheetAssignment:
    """Split failures among annotators: `overlap` shared ones plus `per_annotator` own ones each
    (disjoint), drawn with `seed`; each sheet's rows are shuffled so shared rows are interleaved.

    Raises:
        ValueError: fewer than ``overlap + n_annotators * per_annotator`` failures.
    """
    if n_annotators < 1 or per_annotator < 0 or overlap < 0:
        raise ValueError(
            f"need n_annotators >= 1, per_annotator >= 0, overlap >= 0; got {n_annotators}, {per_annotator}, {overlap}"
        )
    needed = overlap + n_annotators * per_annotator
    if needed > len(failure_ids):
        raise ValueError(
            f"{n_annotators} annotators x {per_annotator} failures + {overlap} shared need {needed} "
            f"failures, only {len(failure_ids)} are available"
        )
    rng = np.random.default_rng(seed)
    order = [failure_ids[i] for i in rng.permutation(len(failure_ids))[:needed]]
    shared, own = order[:overlap], order[overlap:]
    sheets = {}
    for k, name in enumerate(annotator_names(n_annotators)):
        rows = shared + own[k * per_annotator : (k + 1) * per_annotator]
        sheets[name] = [rows[i] for i in rng.permutation(len(rows))]
    return SheetAssignment(sheets, shared)


def write_sheets(
    out_dir: str | Path,
    failures: Sequence[Failure],
    assignment: SheetAssignment,
    cards: Mapping[str, str | Path] | None = None,
) -> list[Path]:
    """Write one empty-label CSV per annotator (`SHEET_COLUMNS`), ``assignment.json`` and
    ``taxonomy.txt`` into `out_dir`. `cards` maps failure ids to card files, written relative to
    `out_dir` (blank without cards). Returns the sheet paths."""
    out_dir = Path(out_dir)
    by_id = {f.failure_id: f for f in failures}
    cards = dict(cards or {})
    paths = []
    for name, ids in assignment.sheets.items():
        rows = []
        for fid in ids:
            f = by_id[fid]
            card = os.path.relpath(cards[fid], out_dir) if fid in cards else ""
            rows.append(
                {
                    "failure_id": fid,
                    "text_index": f.text_index,
                    "card": card,
                    "caption": f.caption,
                    "gt_key": f.gt_key,
                    "retrieved_key": f.retrieved_key,
                    "gt_score": f"{f.gt_score:.4f}",
                    "retrieved_score": f"{f.retrieved_score:.4f}",
                    LABEL_COLUMN: "",
                    NOTE_COLUMN: "",
                }
            )
        paths.append(atomic_write_csv(out_dir / f"{name}.csv", SHEET_COLUMNS, rows))
    payload = {"sheets": assignment.sheets, "overlap": assignment.overlap}
    atomic_write_text(out_dir / ASSIGNMENT_FILE, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(out_dir / "taxonomy.txt", accepted_spellings())
    return paths


def fill_sheets(sheet_dir: str | Path, labels: Mapping[str, Mapping[str, str]], out_dir: str | Path) -> list[Path]:
    """Copies of the sheets in `sheet_dir` with their label column filled: `labels` maps an
    annotator (sheet name) to {failure id -> label}; unlisted rows keep their label. ``assignment.json``
    and ``taxonomy.txt`` are copied along. Returns the written sheet paths."""
    sheet_dir, out_dir = Path(sheet_dir), Path(out_dir)
    paths = []
    for sheet in sorted(sheet_dir.glob("*.csv")):
        with open(sheet, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            columns, rows = list(reader.fieldnames or []), list(reader)
        given = labels.get(sheet.stem, {})
        for row in rows:
            row[LABEL_COLUMN] = given.get(row["failure_id"], row.get(LABEL_COLUMN, ""))
            if row.get("card"):  # keep the card link valid from the new folder
                row["card"] = os.path.relpath(sheet_dir / row["card"], out_dir)
        paths.append(atomic_write_csv(out_dir / sheet.name, columns, rows))
    for name in (ASSIGNMENT_FILE, "taxonomy.txt"):
        if (sheet_dir / name).is_file():
            atomic_write_text(out_dir / name, (sheet_dir / name).read_text(encoding="utf-8"))
    return paths
