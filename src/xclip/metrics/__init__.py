"""TorchMetrics and plain metric functions (retrieval Recall@K; OOD and CIR metrics follow)."""

from xclip.metrics.retrieval import retrieval_ranks, retrieval_recall_at_k
from xclip.metrics.retrieval_metric import RetrievalRecall

__all__ = ["RetrievalRecall", "retrieval_ranks", "retrieval_recall_at_k"]
