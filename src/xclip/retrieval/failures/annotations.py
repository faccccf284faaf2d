"""Read, validate and merge filled annotation sheets.

Validation collects every problem in every sheet first (unknown or empty label, missing column,
duplicate failure id, assigned rows missing and rows not assigned to that annotator against
``assignment.json``) and then raises one `SheetError` that lists them all with file, row and
value. Merging never invents agreement: when annotators tie, the failure is a tie (its tied labels
are reported), not resolved by the taxonomy's order. Row numbers are line numbers of
the CSV file, as a spreadsheet shows them: the header is row 1, the first data row is row 2.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from xclip.io import atomic_write_csv
from xclip.retrieval.failures.sheets import ASSIGNMENT_FILE, LABEL_COLUMN, NOTE_COLUMN, SHEET_COLUMNS
from xclip.retrieval.failures.taxonomy import LABELS, category, parse_label

REQUIRED_COLUMNS: tuple[str, ...] = ("failure_id", LABEL_COLUMN)
# sheet columns carried into the merged table (whichever a sheet has)
META_COLUMNS: tuple[str, ...] = tuple(c for c in SHEET_COLUMNS if c not in ("failure_id", LABEL_COLUMN, NOTE_COLUMN))


@dataclass(frozen=True)
class AnnotationIssue:
    """One problem in one sheet: where (file, row, column), the offending value, what is wrong."""

    file: str
    row: int
    column: str
    value: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}, row {self.row}, column {self.column!r}, value {self.value!r}: {self.problem}"


class SheetError(ValueError):
    """Annotation sheets that do not validate; `issues` lists every problem found (the COCO loaders'
    malformed annotation *files* raise `xclip.retrieval.coco.AnnotationError` instead)."""

    def __init__(self, issues: Sequence[AnnotationIssue]):
        self.issues = list(issues)
        lines = "\n  ".join(str(i) for i in self.issues)
        super().__init__(
            f"{len(self.issues)} problem(s) in the annotation sheets:\n  {lines}\n"
            f"Accepted labels: {', '.join(LABELS)} (or their short codes, see taxonomy.txt)"
        )


@dataclass(frozen=True)
class Annotation:
    """One validated row: an annotator's canonical label for a failure, with the sheet's metadata."""

    annotator: str
    failure_id: str
    label: str
    note: str = ""
    meta: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SheetContents:
    """One parsed sheet: its valid rows, its issues and every failure id it has a row for (with
    the row's line number)."""

    annotations: list[Annotation]
    issues: list[AnnotationIssue]
    failure_ids: dict[str, int]


def read_sheet(path: str | Path) -> SheetContents:
    """Parse one sheet; the annotator is the file's stem."""
    path = Path(path)
    issues: list[AnnotationIssue] = []
    annotations: list[Annotation] = []
    first_row: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        missing = [c for c in REQUIRED_COLUMNS if c not in columns]
        for column in missing:
            issues.append(AnnotationIssue(str(path), 1, column, "", f"missing column (the header has {columns})"))
        if missing:
            return SheetContents([], issues, {})
        for row in reader:
            line = reader.line_num
            fid = (row.get("failure_id") or "").strip()
            raw = (row.get(LABEL_COLUMN) or "").strip()
            if not fid:
                issues.append(AnnotationIssue(str(path), line, "failure_id", fid, "empty failure id"))
                continue
            if fid in first_row:
                issues.append(
                    AnnotationIssue(
                        str(path), line, "failure_id", fid, f"duplicate failure id (first at row {first_row[fid]})"
                    )
                )
                continue
            first_row[fid] = line
            label = parse_label(raw)
            if label is None:
                problem = "missing label" if not raw else "unknown label"
                issues.append(AnnotationIssue(str(path), line, LABEL_COLUMN, raw, problem))
                continue
            meta = {c: row[c] for c in META_COLUMNS if row.get(c) is not None}
            if meta.get("card"):  # sheets link cards relative to themselves; keep an absolute path
                meta["card"] = os.path.normpath(path.parent.absolute() / meta["card"])
            annotations.append(Annotation(path.stem, fid, label, (row.get(NOTE_COLUMN) or "").strip(), meta))
    return SheetContents(annotations, issues, dict(first_row))


def read_sheets(paths: Sequence[str | Path], assignment: Mapping[str, Sequence[str]] | None = None) -> list[Annotation]:
    """Parse and validate sheets; with `assignment` (annotator -> assigned failure ids, as in
    ``assignment.json``) also report sheets and rows that are missing (row 0: not in the file) and
    rows whose failure id is not assigned to that sheet's annotator (they would count as extra
    failures).

    Raises:
        SheetError: listing every issue of every sheet.
    """
    sheets = {Path(p).stem: (Path(p), read_sheet(p)) for p in paths}
    annotations = [a for _, contents in sheets.values() for a in contents.annotations]
    issues = [i for _, contents in sheets.values() for i in contents.issues]
    for annotator, ids in (assignment or {}).items():
        if annotator not in sheets:
            issues.append(AnnotationIssue(f"{annotator}.csv", 0, "", "", "sheet missing (listed in the assignment)"))
            continue
        path, contents = sheets[annotator]
        header_ok = not any(i.row == 1 for i in contents.issues)
        issues += [
            AnnotationIssue(str(path), 0, "failure_id", fid, "assigned failure has no row in this sheet")
            for fid in ids
            if header_ok and fid not in contents.failure_ids
        ]
        assigned = set(ids)
        issues += [
            AnnotationIssue(
                str(path), row, "failure_id", fid, f"failure not assigned to {annotator} in {ASSIGNMENT_FILE}"
            )
            for fid, row in contents.failure_ids.items()
            if fid not in assigned
        ]
    if issues:
        raise SheetError(issues)
    return annotations


def read_sheet_dir(sheet_dir: str | Path) -> list[Annotation]:
    """Validate every ``*.csv`` in `sheet_dir`, checked against its ``assignment.json`` when present."""
    sheet_dir = Path(sheet_dir)
    paths = sorted(sheet_dir.glob("*.csv"))
    if not paths:
        raise FileNotFoundError(f"no annotation sheets (*.csv) in {sheet_dir}")
    assignment_file = sheet_dir / ASSIGNMENT_FILE
    assignment = (
        json.loads(assignment_file.read_text(encoding="utf-8"))["sheets"] if assignment_file.is_file() else None
    )
    return read_sheets(paths, assignment)


@dataclass(frozen=True)
class MergedFailure:
    """Every annotator's label of one failure and their consensus (None when they tie)."""

    failure_id: str
    labels: dict[str, str]  # annotator -> canonical label
    label: str | None  # the most frequent label; None when several labels tie for most frequent
    tied: tuple[str, ...] = ()  # the labels that tie (taxonomy order); empty without a tie
    meta: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # annotator -> free-text note (non-empty only)

    @property
    def n_agree(self) -> int:
        """How many annotators gave the most frequent label (on a tie: each tied label's count)."""
        return max(Counter(self.labels.values()).values())

    @property
    def is_tie(self) -> bool:
        return bool(self.tied)


def consensus(labels: Sequence[str]) -> tuple[str | None, tuple[str, ...]]:
    """``(label, ())`` for the unique most frequent canonical label, or ``(None, tied labels)``
    when several labels share the highest count (tied labels in taxonomy order)."""
    counts = Counter(labels)
    top = max(counts.values())
    best = tuple(label for label in LABELS if counts[label] == top)
    return (best[0], ()) if len(best) == 1 else (None, best)


def merge_annotations(annotations: Sequence[Annotation]) -> list[MergedFailure]:
    """One `MergedFailure` per failure id (sorted by id), metadata from its first sheet row."""
    grouped: dict[str, list[Annotation]] = {}
    for a in annotations:
        grouped.setdefault(a.failure_id, []).append(a)
    out = []
    for fid, rows in sorted(grouped.items()):
        label, tied = consensus([a.label for a in rows])
        out.append(
            MergedFailure(
                fid,
                {a.annotator: a.label for a in rows},
                label,
                tied,
                rows[0].meta,
                {a.annotator: a.note for a in rows if a.note},
            )
        )
    return out


def categories_by_annotator(annotations: Sequence[Annotation]) -> dict[str, dict[str, str]]:
    """annotator -> {failure id -> top-level category} (agreement on categories)."""
    out: dict[str, dict[str, str]] = {}
    for a in annotations:
        out.setdefault(a.annotator, {})[a.failure_id] = category(a.label)
    return out


def labels_by_annotator(annotations: Sequence[Annotation]) -> dict[str, dict[str, str]]:
    """annotator -> {failure id -> canonical label} (agreement including the Ambiguous subtypes)."""
    out: dict[str, dict[str, str]] = {}
    for a in annotations:
        out.setdefault(a.annotator, {})[a.failure_id] = a.label
    return out


def write_merged_csv(path: str | Path, merged: Sequence[MergedFailure]) -> Path:
    """The merged table: one row per failure with its metadata (the card linked relative to the
    table), consensus label and category (blank on a tie), ``tie`` (the tied labels joined by
    ``" | "``, blank without a tie), the number of annotators and how many gave the most frequent
    label, then one ``label_<annotator>`` column per annotator (blank where that annotator did not
    label the failure), and the annotators' notes."""
    annotators = sorted({a for m in merged for a in m.labels})
    columns = [
        "failure_id",
        *META_COLUMNS,
        "label",
        "category",
        "tie",
        "n_annotators",
        "n_agree",
        *(f"label_{a}" for a in annotators),
        "notes",
    ]
    path = Path(path)
    rows = [
        {
            "failure_id": m.failure_id,
            **{c: m.meta.get(c, "") for c in META_COLUMNS},
            "card": os.path.relpath(m.meta["card"], path.parent.absolute()) if m.meta.get("card") else "",
            "label": m.label or "",
            "category": category(m.label) if m.label else "",
            "tie": " | ".join(m.tied),
            "n_annotators": len(m.labels),
            "n_agree": m.n_agree,
            **{f"label_{a}": m.labels.get(a, "") for a in annotators},
            "notes": "; ".join(f"{a}: {note}" for a, note in sorted(m.notes.items())),
        }
        for m in merged
    ]
    return atomic_write_csv(path, columns, rows)


def read_merged_labels(path: str | Path) -> dict[int, str]:
    """gallery caption index (``text_index``) -> consensus label, from a `write_merged_csv` table
    (ties have no consensus and are left out)."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        labels = {}
        for row in reader:
            if (row.get("tie") or "").strip() and not (row.get("label") or "").strip():
                continue
            label, text_index = parse_label(row.get("label") or ""), (row.get("text_index") or "").strip()
            if label is None or not text_index.isdigit():
                raise ValueError(
                    f"{path}, row {reader.line_num}: needs a text_index and a taxonomy label, got "
                    f"{text_index!r}, {row.get('label')!r}"
                )
            labels[int(text_index)] = label
    return labels
