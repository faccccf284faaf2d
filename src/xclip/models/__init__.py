"""Plain nn.Modules and scoring logic: contrastive loss, zero-shot heads, NegLabel / NegAlign."""

from xclip.models.contrastive import clip_contrastive_loss
from xclip.models.negalign import NegAlignScorer
from xclip.models.negalign_features import NegAlignFeatures
from xclip.models.negalign_sweep import NegAlignTerms
from xclip.models.neglabel import NegLabelScorer
from xclip.models.zeroshot import zero_shot_weights

__all__ = ["NegAlignFeatures", "NegAlignScorer", "NegAlignTerms", "NegLabelScorer", "clip_contrastive_loss",
           "zero_shot_weights"]
