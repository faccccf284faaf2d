"""LightningModules: thin wiring of backbones, models, data and metrics."""

from xclip.modules.negalign import NegAlignModule
from xclip.modules.pretrain import ClipPretrainModule
from xclip.modules.retrieval import RetrievalModule
from xclip.modules.suite import EvaluationSuite
from xclip.modules.zeroshot import ZeroShotEvaluation, ZeroShotModule

__all__ = ["ClipPretrainModule", "EvaluationSuite", "NegAlignModule", "RetrievalModule", "ZeroShotEvaluation", "ZeroShotModule"]
