"""TorchMetrics and plain metric functions: retrieval Recall@K, OOD AUROC / FPR@TPR / AUPR."""

from xclip.metrics.gather import gather_objects
from xclip.metrics.ood import OODMetrics, fpr_at_tpr, ood_metrics, roc_curve
from xclip.metrics.retrieval import retrieval_ranks, retrieval_recall_at_k
from xclip.metrics.retrieval_metric import RetrievalRecall
from xclip.metrics.score_table import ScoreTable, unique_rows

__all__ = ["OODMetrics", "RetrievalRecall", "ScoreTable", "fpr_at_tpr", "gather_objects", "ood_metrics", "retrieval_ranks",
           "retrieval_recall_at_k", "roc_curve", "unique_rows"]
