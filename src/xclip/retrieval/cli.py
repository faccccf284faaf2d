"""``xclip annotations merge --sheets DIR --out DIR``: merge filled failure-annotation sheets into the
report (agreement, category summary, ambiguity); see `xclip.retrieval.failures.report`."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path


def main(argv: Sequence[str] | None = None) -> int:
    """``xclip annotations merge --sheets DIR --out DIR``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="xclip annotations", description="Merge filled failure-annotation sheets and summarise them."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    merge = commands.add_parser("merge", help="validate + merge sheets, agreement, category summary")
    merge.add_argument("--sheets", required=True, type=Path, help="folder with the filled <annotator>.csv sheets")
    merge.add_argument("--out", required=True, type=Path, help="output folder")
    args = parser.parse_args(argv)
    from xclip.retrieval.failures.annotations import SheetError  # the command's --help needs neither
    from xclip.retrieval.failures.report import write_annotation_report

    try:
        report = write_annotation_report(args.sheets, args.out)
    except (SheetError, FileNotFoundError) as err:
        print(f"xclip annotations: error: {err}", file=sys.stderr)
        return 1
    amb = report["ambiguity"]
    print(
        f"{report['n_failures']} failures, {report['n_annotations']} labels from "
        f"{len(report['rows_per_annotator'])} annotators, {report['n_ties']} ties (no consensus)"
    )
    for row in report["agreement"]:
        print(
            f"  {row['level']:<8} {row['method']:<6} {row['annotators']:<30} n={row['n_items']:<4} "
            f"kappa={_fmt(row['kappa'])}"
        )
    print(
        f"  ambiguous {amb['ambiguous']} : clear {amb['clear']} (ratio {_fmt(amb['ambiguous_to_clear'])}; "
        "ties left out)"
    )
    print(f"wrote {args.out}")
    return 0


def _fmt(value: float) -> str:
    return "nan" if isinstance(value, float) and math.isnan(value) else f"{value:.3f}"
