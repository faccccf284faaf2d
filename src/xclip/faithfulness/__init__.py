"""Text-to-image faithfulness (TiPAI): global + patch faithfulness scores (crops, dense), heatmaps,
chosen/rejected pairs in one SQLite database, the TSPO head trained on the pairs, and the app
(``xclip app --db ...``).

Plain code: ``scoring.py`` (TiPAI scores), ``grid.py``, ``pairs.py``, ``localisation.py``,
``patch_metrics.py``, ``evaluation.py`` (a run's measurements), ``records.py`` and ``database.py``
(what is stored), ``tspo_head.py`` (the head, its export), ``figures.py``, ``report.py``.
Lightning: ``datamodule.py`` / ``tspo_datamodule.py``, ``tipai_module.py``, ``tspo_module.py``,
``callback.py``. Commands: ``cli.py`` (``xclip app``; the app itself is ``app.py``).
"""

from xclip.lazy_exports import lazy_exports

_EXPORTS = {
    "FaithfulnessDatabase": ".database",
    "FaithfulnessDatabaseError": ".database",
    "FaithfulnessExplanationCallback": ".callback",
    "PromptFolder": ".datamodule",
    "ShapesPrompts": ".datamodule",
    "TSPOFeatureDataModule": ".tspo_datamodule",
    "TSPOHead": ".tspo_head",
    "TSPOHeadModule": ".tspo_module",
    "TSPOScorer": ".tspo_head",
    "TiPAIDataModule": ".datamodule",
    "TiPAIModule": ".tipai_module",
    "TiPAIScorer": ".scoring",
    "TiPAIScores": ".scoring",
    "badness": ".scoring",
    "bradley_terry_loss": ".pairs",
    "export_head": ".tspo_head",
    "load_head": ".tspo_head",
    "pairwise_accuracy": ".pairs",
    "read_prompts": ".datamodule",
    "select_pairs": ".pairs",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
