"""TorchMetrics and plain metric functions: retrieval Recall@K, OOD AUROC / FPR@TPR / AUPR."""

from xclip.metrics.ood import OODMetrics, fpr_at_tpr, ood_metrics
from xclip.metrics.retrieval import retrieval_ranks, retrieval_recall_at_k
from xclip.metrics.retrieval_metric import RetrievalRecall

__all__ = ["OODMetrics", "RetrievalRecall", "fpr_at_tpr", "ood_metrics", "retrieval_ranks", "retrieval_recall_at_k"]
