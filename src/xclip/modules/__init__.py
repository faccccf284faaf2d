"""LightningModules: thin wiring of backbones, models, data and metrics."""

from xclip.modules.pretrain import ClipPretrainModule
from xclip.modules.zeroshot import ZeroShotEvaluation, ZeroShotModule

__all__ = ["ClipPretrainModule", "ZeroShotEvaluation", "ZeroShotModule"]
