"""The OOD workflow: zero-shot OOD detection with NegLabel and NegAlign.

Plain math (tensors in, tensors out): ``neglabel.py`` (NegMining, grouped NegLabel score),
``negalign.py`` (role split, CAM foreground, background embedding, P_align), ``negatives.py``
(mining + role split of a vocabulary), ``negalign_features.py`` (one traced forward per batch),
``negalign_sweep.py`` (every variant and lambda from stored per-image terms), ``evaluation.py``
(lambda selection, oracle and ablation from those terms), ``text_embeddings.py`` and
``vocabulary.py`` (word lists, shipped in ``wordlists/``).
Data: ``waterbirds.py``, ``datamodule.py`` (``OODDataModule``). Lightning wiring:
``negalign_module.py`` (``NegAlignModule``), ``report.py`` (its tables and figures),
``callback.py`` (``OODExplanationCallback``). OOD metrics are in ``xclip.metrics.ood``;
``xclip vocab`` is ``cli.py``.
"""

from xclip.lazy_exports import lazy_exports

_EXPORTS = {
    "NegAlignFeatures": ".negalign_features",
    "NegAlignModule": ".negalign_module",
    "NegAlignScorer": ".negalign",
    "NegAlignTerms": ".negalign_sweep",
    "NegLabelScorer": ".neglabel",
    "OODDataModule": ".datamodule",
    "OODExplanationCallback": ".callback",
    "WaterBirds": ".waterbirds",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
