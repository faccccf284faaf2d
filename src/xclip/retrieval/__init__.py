"""The retrieval workflow: zero-shot image<->text retrieval and its failure analysis.

- ``gallery.py``, ``coco.py``: caption galleries (ShapesWorld, files, COCO / Karpathy loaders).
- ``datamodule.py``: ``RetrievalDataModule``.
- ``retrieval_module.py``: ``RetrievalModule`` (LightningModule; ranking math in ``xclip.metrics``).
- ``failures/``: top-1 failures, cards, annotation sheets, merge + agreement, auto-labels,
  improvements (plain functions); ``callback.py``: ``RetrievalExplanationCallback`` (their
  Lightning wiring); ``cli.py``: ``xclip annotations merge``.
"""

from xclip.retrieval.coco import AnnotationError, load_coco_captions, load_karpathy
from xclip.retrieval.datamodule import RetrievalDataModule
from xclip.retrieval.callback import RetrievalExplanationCallback
from xclip.retrieval.gallery import CaptionGallery, FileGallery, ShapesGallery
from xclip.retrieval.retrieval_module import RetrievalModule

__all__ = ["AnnotationError", "CaptionGallery", "FileGallery", "RetrievalDataModule", "RetrievalExplanationCallback",
           "RetrievalModule", "ShapesGallery", "load_coco_captions", "load_karpathy"]
