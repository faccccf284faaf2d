"""One interface over open_clip and HF CLIP models (see :class:`Backbone`)."""
from .base import (
    PLACEHOLDER_TOKEN_ID,
    Backbone,
    BlockTrace,
    BlockView,
    ImageTrace,
    PreprocessCfg,
    TextTokenizer,
    TextTrace,
)
from .loading import (
    OfflineWeightsError,
    checkpoint_path,
    checkpoints_dir,
    is_checkpoint_dir,
    load_backbone,
    load_checkpoint,
    resolve_backbone,
    save_checkpoint,
    shared_backbone,
    wrap_model,
)
from .openclip import ClipBPETokenizer, OpenCLIPBackbone
from .prompts import prompt_texts, zero_shot_weights

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "Backbone",
    "BlockTrace",
    "BlockView",
    "ClipBPETokenizer",
    "ImageTrace",
    "OfflineWeightsError",
    "OpenCLIPBackbone",
    "PreprocessCfg",
    "TextTokenizer",
    "TextTrace",
    "checkpoint_path",
    "checkpoints_dir",
    "is_checkpoint_dir",
    "load_backbone",
    "load_checkpoint",
    "resolve_backbone",
    "save_checkpoint",
    "shared_backbone",
    "wrap_model",
    "prompt_texts",
    "zero_shot_weights",
]


def __getattr__(name: str):
    # HFCLIPBackbone imports transformers (slow); load it only when asked for.
    if name == "HFCLIPBackbone":
        from .hf import HFCLIPBackbone

        return HFCLIPBackbone
    raise AttributeError(name)
