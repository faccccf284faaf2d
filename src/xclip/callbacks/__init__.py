"""Generic explanation callbacks (TensorBoard + PNG/NPY/JSON) usable with any module that wraps a
backbone. Workflow-specific callbacks live in their workflow package."""

from xclip.callbacks.attributions import AttributionCallback, CaptumCallback, SHAPCallback
from xclip.callbacks.explanations import CAMCallback, ExplanationCallback, GradECLIPCallback

__all__ = [
    "AttributionCallback",
    "CAMCallback",
    "CaptumCallback",
    "ExplanationCallback",
    "GradECLIPCallback",
    "SHAPCallback",
]
