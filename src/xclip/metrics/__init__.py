"""TorchMetrics and plain metric functions: retrieval Recall@K, OOD AUROC / FPR@TPR / AUPR, CIR
Recall@K / Recall_subset@K / mAP@K, heatmap-vs-annotation metrics (KLD, CC, SIM, NSS, AUC-Judd)."""

from xclip.metrics.cir import (
    cir_recall,
    circo_map_at_k,
    cirr_recall,
    cirr_subset_recall,
    rank_gallery,
)
from xclip.metrics.gather import gather_objects
from xclip.metrics.ood import OODMetrics, fpr_at_tpr, ood_metrics, roc_curve
from xclip.metrics.retrieval import retrieval_ranks, retrieval_recall_at_k
from xclip.metrics.retrieval_metric import RetrievalRecall
from xclip.metrics.saliency import SALIENCY_METRICS, auc_judd, cc, kld, nss, saliency_metrics, sim
from xclip.metrics.score_table import ScoreTable, unique_rows

__all__ = [
    "OODMetrics",
    "RetrievalRecall",
    "SALIENCY_METRICS",
    "ScoreTable",
    "auc_judd",
    "cc",
    "cir_recall",
    "circo_map_at_k",
    "cirr_recall",
    "cirr_subset_recall",
    "fpr_at_tpr",
    "gather_objects",
    "kld",
    "nss",
    "ood_metrics",
    "rank_gallery",
    "retrieval_ranks",
    "retrieval_recall_at_k",
    "roc_curve",
    "saliency_metrics",
    "sim",
    "unique_rows",
]
