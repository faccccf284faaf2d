"""The Lightning contract written once: the evaluation module base (`EvaluationModule`: ``step`` /
``start`` / ``finish``, typed `ReportsResults`), the export mixin over the one model-folder format
(`ExportMixin`, `xclip.model_folder`), the stage callback base (`StageCallback`) and the learning-rate
schedule (`warmup_cosine`)."""

from xclip.engine.evaluation import (
    STAGES,
    EvaluationModule,
    ExplanationInputs,
    ReportsResults,
    default_explanation_inputs,
)
from xclip.engine.export import EXPORT_ARGUMENTS, ExportMixin
from xclip.engine.schedule import warmup_cosine, warmup_cosine_scheduler
from xclip.engine.stage_callback import StageCallback, tensorboard_writers

__all__ = [
    "EXPORT_ARGUMENTS",
    "STAGES",
    "EvaluationModule",
    "ExplanationInputs",
    "ExportMixin",
    "ReportsResults",
    "StageCallback",
    "default_explanation_inputs",
    "tensorboard_writers",
    "warmup_cosine",
    "warmup_cosine_scheduler",
]
