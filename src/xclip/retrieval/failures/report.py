"""The annotation report: validate and merge filled sheets, measure agreement, summarise.

Command line (after the annotators filled their CSVs)::

    xclip-annotations merge --sheets runs/.../failures/sheets --out runs/.../failures/annotations

writes ``merged.csv``, ``agreement.csv``, ``distribution.csv``, ``ambiguity.csv``,
``distribution.png`` and ``report.json`` into ``--out``. Invalid sheets exit with status 1 and
list every bad row (file, row, value) on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from xclip.io import atomic_write_csv, atomic_write_text
from xclip.retrieval.failures.agreement import fleiss_on_shared, pairwise_cohen
from xclip.retrieval.failures.annotations import (
    AnnotationError,
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
        AnnotationError: the sheets do not validate (nothing is written).
    """
    out_dir = Path(out_dir)
    annotations = read_sheet_dir(sheet_dir)
    merged = merge_annotations(annotations)
    write_merged_csv(out_dir / "merged.csv", merged)
    categories = categories_by_annotator(annotations)
    rows = []
    for level, labels, vocabulary in (("category", categories, CATEGORIES),
                                      ("label", labels_by_annotator(annotations), LABELS)):
        rows += [{"level": level, "method": "cohen", "annotators": f"{p.annotator_a}+{p.annotator_b}",
                  "n_items": p.n_items, "observed": p.observed, "kappa": p.kappa} for p in pairwise_cohen(labels)]
        n_shared, fleiss = fleiss_on_shared(labels, vocabulary)
        rows.append({"level": level, "method": "fleiss", "annotators": "all", "n_items": n_shared, "observed": "",
                     "kappa": fleiss})
    atomic_write_csv(out_dir / "agreement.csv", AGREEMENT_COLUMNS, rows)
    ties = [m for m in merged if m.is_tie]
    summary = write_summary(out_dir, [m.label for m in merged if not m.is_tie])
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


def main(argv: Sequence[str] | None = None) -> int:
    """``xclip-annotations merge --sheets DIR --out DIR``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="xclip-annotations",
                                     description="Merge filled failure-annotation sheets and summarise them.")
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="validate + merge sheets, agreement, category summary")
    merge.add_argument("--sheets", required=True, type=Path, help="folder with the filled <annotator>.csv sheets")
    merge.add_argument("--out", required=True, type=Path, help="output folder")
    args = parser.parse_args(argv)
    try:
        report = write_annotation_report(args.sheets, args.out)
    except (AnnotationError, FileNotFoundError) as err:
        print(f"xclip-annotations: {err}", file=sys.stderr)
        return 1
    amb = report["ambiguity"]
    print(f"{report['n_failures']} failures, {report['n_annotations']} labels from "
          f"{len(report['rows_per_annotator'])} annotators, {report['n_ties']} ties (no consensus)")
    for row in report["agreement"]:
        print(f"  {row['level']:<8} {row['method']:<6} {row['annotators']:<30} n={row['n_items']:<4} "
              f"kappa={_fmt(row['kappa'])}")
    print(f"  ambiguous {amb['ambiguous']} : clear {amb['clear']} (ratio {_fmt(amb['ambiguous_to_clear'])}; "
          "ties left out)")
    print(f"wrote {args.out}")
    return 0


def _fmt(value: float) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
