"""The retrieval workflow: zero-shot image<->text retrieval and its failure analysis.

- ``gallery.py``, ``coco.py``: caption galleries (ShapesWorld, files, COCO / Karpathy loaders).
- ``datamodule.py``: ``RetrievalDataModule``.
- ``retrieval_module.py``: ``RetrievalModule`` (LightningModule; ranking math in ``xclip.metrics``).
- ``failures/``: top-1 failures, cards, annotation sheets, merge + agreement, auto-labels,
  improvements (plain functions); ``callback.py``: ``RetrievalExplanationCallback`` (their
  Lightning wiring); ``cli.py``: ``xclip annotations merge``.
"""

from xclip.lazy_exports import lazy_exports

_EXPORTS = {
    "AnnotationError": ".coco",
    "CaptionGallery": ".gallery",
    "FileGallery": ".gallery",
    "RetrievalDataModule": ".datamodule",
    "RetrievalExplanationCallback": ".callback",
    "RetrievalModule": ".retrieval_module",
    "ShapesGallery": ".gallery",
    "load_coco_captions": ".coco",
    "load_karpathy": ".coco",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
