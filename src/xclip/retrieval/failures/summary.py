"""Failure-category distribution and the ambiguous-vs-clear ratio, as CSV and a bar chart."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from xclip.explain.render import figure_to_array, save_png
from xclip.io import atomic_write_csv
from xclip.retrieval.failures.taxonomy import LABELS, category, is_ambiguous

DISTRIBUTION_COLUMNS = ("label", "category", "count", "fraction")
AMBIGUITY_COLUMNS = ("n_failures", "ambiguous", "clear", "ambiguous_fraction", "ambiguous_to_clear")


def label_distribution(labels: Sequence[str]) -> list[dict]:
    """One row per canonical label (taxonomy order, zero counts included): label, category,
    count and fraction of all `labels` (one canonical label per failure)."""
    counts = Counter(labels)
    unknown = set(counts) - set(LABELS)
    if unknown:
        raise ValueError(f"not canonical labels: {sorted(unknown)}")
    n = len(labels)
    return [
        {
            "label": label,
            "category": category(label),
            "count": counts[label],
            "fraction": counts[label] / n if n else float("nan"),
        }
        for label in LABELS
    ]


def ambiguity(labels: Sequence[str]) -> dict:
    """Ambiguous (any subtype) vs clear failures: counts, the ambiguous fraction and the
    ambiguous-to-clear ratio (inf when nothing is clear, NaN when there are no labels)."""
    n_amb = sum(is_ambiguous(label) for label in labels)
    n_clear = len(labels) - n_amb
    ratio = n_amb / n_clear if n_clear else (float("inf") if n_amb else float("nan"))
    return {
        "n_failures": len(labels),
        "ambiguous": n_amb,
        "clear": n_clear,
        "ambiguous_fraction": n_amb / len(labels) if labels else float("nan"),
        "ambiguous_to_clear": ratio,
    }


def distribution_chart(distribution: Sequence[dict], ambiguity_row: dict, title: str = "failure categories") -> Figure:
    """Bar chart of failure counts per label; ambiguous labels grey, clear ones blue."""
    fig = Figure(figsize=(7.0, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = [row["label"].replace("Ambiguous/", "Amb/") for row in distribution]
    colours = ["tab:gray" if is_ambiguous(row["label"]) else "tab:blue" for row in distribution]
    bars = ax.bar(range(len(names)), [row["count"] for row in distribution], color=colours)
    ax.bar_label(bars, fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("failures")
    ax.set_title(
        f"{title} (n={ambiguity_row['n_failures']}, ambiguous {ambiguity_row['ambiguous']} : "
        f"clear {ambiguity_row['clear']})",
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def write_summary(out_dir: str | Path, labels: Sequence[str], title: str = "failure categories") -> dict:
    """Write ``distribution.csv``, ``ambiguity.csv`` and ``distribution.png`` into `out_dir`;
    return ``{"distribution": rows, "ambiguity": row}``."""
    out_dir = Path(out_dir)
    distribution, amb = label_distribution(labels), ambiguity(labels)
    atomic_write_csv(out_dir / "distribution.csv", DISTRIBUTION_COLUMNS, distribution)
    atomic_write_csv(out_dir / "ambiguity.csv", AMBIGUITY_COLUMNS, [amb])
    save_png(figure_to_array(distribution_chart(distribution, amb, title)), out_dir / "distribution.png")
    return {"distribution": distribution, "ambiguity": amb}
