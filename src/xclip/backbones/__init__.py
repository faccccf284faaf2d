"""One interface over CLIP-family models of open_clip and Hugging Face (see :class:`Backbone`).

`load_backbone` / `wrap_model` dispatch through the backend registry (`xclip.backbones.registry`):
one module per backend under `xclip.backbones.backends` (open_clip, HF, xclip checkpoint folders).
"""

from . import tiny_towers  # noqa: F401  (registers xclip's timm entry points)
from .backends.xclip_checkpoint import (
    checkpoint_path,
    checkpoints_dir,
    is_checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
)
from .base import (
    PLACEHOLDER_TOKEN_ID,
    Backbone,
    BlockTrace,
    BlockView,
    ImageTrace,
    PoolAttention,
    PoolTrace,
    PreprocessCfg,
    TextTokenizer,
    TextTrace,
    UnsupportedFamily,
)
from .network import OfflineWeightsError
from .openclip import OpenCLIPBackbone
from .prompts import prompt_texts, zero_shot_weights
from .registry import (
    load_backbone,
    register_backend,
    resolve_backbone,
    shared_backbone,
    wrap_model,
)
from .tokenizers import ClipBPETokenizer

__all__ = [
    "PLACEHOLDER_TOKEN_ID",
    "Backbone",
    "BlockTrace",
    "BlockView",
    "ClipBPETokenizer",
    "ImageTrace",
    "OfflineWeightsError",
    "OpenCLIPBackbone",
    "PoolAttention",
    "PoolTrace",
    "PreprocessCfg",
    "TextTokenizer",
    "TextTrace",
    "UnsupportedFamily",
    "checkpoint_path",
    "checkpoints_dir",
    "is_checkpoint_dir",
    "load_backbone",
    "load_checkpoint",
    "register_backend",
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
