"""Retrieval failure analysis: top-1 failures, visual cards, annotation sheets, merge and
agreement, category summaries, ShapesWorld auto-labels and failure-driven improvements.

Plain functions over tensors, lists and files; ``xclip.retrieval.RetrievalExplanationCallback``
wires them into a validate run; ``xclip annotations merge`` (``xclip.retrieval.cli``) merges filled
sheets into the report (``xclip.retrieval.failures.report``).
"""

from xclip.retrieval.failures.agreement import cohen_kappa, fleiss_kappa, pairwise_cohen
from xclip.retrieval.failures.annotations import SheetError, merge_annotations, read_sheet_dir
from xclip.retrieval.failures.autolabel import autolabel, autolabel_failures
from xclip.retrieval.failures.cards import write_cards
from xclip.retrieval.failures.extract import Failure, failure_records, sample_failures, top1_failures
from xclip.retrieval.failures.improvements import ensemble_t2i_ranks, rerank_t2i_ranks
from xclip.retrieval.failures.sheets import assign_sheets, write_sheets
from xclip.retrieval.failures.taxonomy import CATEGORIES, LABELS, parse_label

__all__ = [
    "CATEGORIES",
    "LABELS",
    "SheetError",
    "Failure",
    "assign_sheets",
    "autolabel",
    "autolabel_failures",
    "cohen_kappa",
    "ensemble_t2i_ranks",
    "failure_records",
    "fleiss_kappa",
    "merge_annotations",
    "pairwise_cohen",
    "parse_label",
    "read_sheet_dir",
    "rerank_t2i_ranks",
    "sample_failures",
    "top1_failures",
    "write_cards",
    "write_sheets",
]
