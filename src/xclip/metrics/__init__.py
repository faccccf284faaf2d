"""TorchMetrics and plain metric functions: retrieval Recall@K, OOD AUROC / FPR@TPR / AUPR, heatmap-vs-annotation
metrics (KLD, CC, SIM, NSS, AUC-Judd)."""

from xclip.metrics.gather import gather_objects
from xclip.metrics.ood import OODMetrics, fpr_at_tpr, ood_metrics, roc_curve
from xclip.metrics.retrieval import retrieval_ranks, retrieval_recall_at_k
from xclip.metrics.retrieval_metric import RetrievalRecall
from xclip.metrics.saliency import SALIENCY_METRICS, auc_judd, cc, kld, nss, saliency_metrics, sim
from xclip.metrics.score_table import ScoreTable, unique_rows

__all__ = ["OODMetrics", "RetrievalRecall", "SALIENCY_METRICS", "ScoreTable", "auc_judd", "cc", "fpr_at_tpr", "gather_objects",
           "kld", "nss", "ood_metrics", "retrieval_ranks", "retrieval_recall_at_k", "roc_curve", "saliency_metrics", "sim",
           "unique_rows"]
