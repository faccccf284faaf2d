"""The loading entry points under their historical module path (``xclip.backbones.loading``).

They live in `xclip.backbones.registry` (dispatch to the backends) and
`xclip.backbones.backends.xclip_checkpoint` (the checkpoint format); import them from
``xclip.backbones``.
"""

from .backends.xclip_checkpoint import (
    checkpoint_path,
    checkpoints_dir,
    is_checkpoint_dir,
    load_checkpoint,
    save_checkpoint,
)
from .network import OfflineWeightsError
from .registry import load_backbone, resolve_backbone, shared_backbone, wrap_model

__all__ = ["OfflineWeightsError", "checkpoint_path", "checkpoints_dir", "is_checkpoint_dir", "load_backbone",
           "load_checkpoint", "resolve_backbone", "save_checkpoint", "shared_backbone", "wrap_model"]
