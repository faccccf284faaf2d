"""The annotation report: validate and merge filled sheets, measure agreement, summarise.

Command line (after the annotators filled their CSVs)::

    xclip annotations merge --sheets runs/.../failures/sheets --out runs/.../failures/annotations

writes ``merged.csv``, ``agreement.csv``, ``distribution.csv``, ``ambiguity.csv``,
``distribution.png`` and ``report.json`` into ``--out``. Invalid sheets exit with status 1 and
list every bad row (file, row, value) on stderr.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from xclip.io import atomic_write_csv, atomic_write_text
from xclip.retrieval.failures.agreement import fleiss_on_shared, pairwise_cohen
from xclip.retrieval.failures.annotations import (
    categories_by_annotator,
    labels_by_annotator,
    merge_annotations,
    read_sheet_dir,
    write_merged_csv,
)
from xclip.retrieval.failures.summary import write_summary
from xclip.retrieval.failures.taxonomy import CATEGORIES, LABELS

AGREEMENT_COLUMNS = ("level", "method", "annotators", "n_items", "observed", "kappa")


def write_annotation_report(sheet_dir: str | Path, out_dir: str | Path) -> dict:
    """Merge the sheets in `sheet_dir` and write the report files into `out_dir`.

    Agreement is measured twice: on top-level categories (level ``category``: the Ambiguous
    subtypes count as one) and on full labels (level ``label``: ``Ambiguous/underspecified`` and
    ``Ambiguous/nearduplicate`` count as different); each with Cohen's kappa for every annotator
    pair on the failures both labelled and Fleiss' kappa on the failures every annotator labelled.
    The distribution counts each failure with a consensus once; ties (annotators split evenly
    between labels) are counted and listed, never resolved.

    Returns:
        the contents of ``report.json``.
    Raises:
        SheetError: the sheets do not validate (nothing is written).
    """
    out_dir = Path(out_dir)
    annotations = read_sheet_dir(sheet_dir)
    merged = merge_annotations(annotations)
    write_merged_csv(out_dir / "merged.csv", merged)
    categories = categories_by_annotator(annotations)
    rows = []
    for level, labels, vocabulary in (
        ("category", categories, CATEGORIES),
        ("label", labels_by_annotator(annotations), LABELS),
    ):
        rows += [
            {
                "level": level,
                "method": "cohen",
                "annotators": f"{p.annotator_a}+{p.annotator_b}",
                "n_items": p.n_items,
                "observed": p.observed,
                "kappa": p.kappa,
            }
            for p in pairwise_cohen(labels)
        ]
        n_shared, fleiss = fleiss_on_shared(labels, vocabulary)
        rows.append(
            {
                "level": level,
                "method": "fleiss",
                "annotators": "all",
                "n_items": n_shared,
                "observed": "",
                "kappa": fleiss,
            }
        )
    atomic_write_csv(out_dir / "agreement.csv", AGREEMENT_COLUMNS, rows)
    ties = [m for m in merged if m.is_tie]
    summary = write_summary(out_dir, [m.label for m in merged if m.label is not None])  # None: a tie
    report = {
        "sheets": str(sheet_dir),
        "n_annotations": len(annotations),
        "n_failures": len(merged),
        "n_ties": len(ties),
        "ties": {m.failure_id: list(m.tied) for m in ties},
        "rows_per_annotator": {a: len(v) for a, v in sorted(categories.items())},
        "agreement": rows,
        **summary,
    }
    atomic_write_text(out_dir / "report.json", json.dumps(_strict_json(report), indent=2) + "\n")
    return report


def _strict_json(value):
    """`value` with NaN / inf floats replaced by None (strict JSON has no such numbers)."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value
