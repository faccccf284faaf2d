"""Text-to-image faithfulness (TiPAI): global + patch faithfulness scores (crops, dense), heatmaps,
chosen/rejected pairs in one SQLite database, the TSPO head trained on the pairs, and the app
(``xclip app --db ...``)."""

from xclip.faithfulness.callback import TiPAIFiguresCallback
from xclip.faithfulness.database import FaithfulnessDatabase, FaithfulnessDatabaseError
from xclip.faithfulness.datamodule import (
    PromptFolder,
    ShapesPrompts,
    TiPAIDataModule,
    read_prompts,
)
from xclip.faithfulness.pairs import bradley_terry_loss, pairwise_accuracy, select_pairs
from xclip.faithfulness.scoring import TiPAIScorer, TiPAIScores, badness
from xclip.faithfulness.tipai_module import TiPAIModule
from xclip.faithfulness.tspo_data import TSPOFeatureDataModule
from xclip.faithfulness.tspo_head import TSPOHead, TSPOScorer, export_head, load_head
from xclip.faithfulness.tspo_module import TSPOHeadModule

__all__ = [
    "FaithfulnessDatabase", "FaithfulnessDatabaseError", "PromptFolder", "ShapesPrompts", "TSPOFeatureDataModule", "TSPOHead",
    "TSPOHeadModule", "TSPOScorer",
    "TiPAIDataModule", "TiPAIFiguresCallback", "TiPAIModule", "TiPAIScorer", "TiPAIScores", "badness",
    "bradley_terry_loss", "export_head", "load_head", "pairwise_accuracy", "read_prompts", "select_pairs",
]
