"""The CLIP workflow: contrastive training of the tiny ShapesWorld CLIP and zero-shot
classification.

- ``contrastive.py``: the symmetric InfoNCE loss and SigLIP's sigmoid loss (plain math).
- ``zeroshot_module.py``: ``ZeroShotEvaluation`` / ``ZeroShotModule`` (LightningModules).
- ``pretrain_module.py``: ``ClipPretrainModule`` (training; the shipped checkpoint's recipe).
"""

from xclip.clip.contrastive import clip_contrastive_loss, sigmoid_contrastive_loss
from xclip.clip.pretrain_module import ClipPretrainModule
from xclip.clip.zeroshot_module import ZeroShotEvaluation, ZeroShotModule

__all__ = [
    "ClipPretrainModule",
    "ZeroShotEvaluation",
    "ZeroShotModule",
    "clip_contrastive_loss",
    "sigmoid_contrastive_loss",
]
