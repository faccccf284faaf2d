"""Lightning callbacks: explanation logging (TensorBoard + PNG/NPY/JSON) and retrieval failure
analysis (cards, annotation sheets, auto-labels, improvements)."""

from xclip.callbacks.explanations import CAMCallback, ExplanationCallback, GradECLIPCallback
from xclip.callbacks.failures import FailureAnalysisCallback
from xclip.callbacks.negalign_maps import NegAlignMapsCallback

__all__ = ["CAMCallback", "ExplanationCallback", "FailureAnalysisCallback", "GradECLIPCallback", "NegAlignMapsCallback"]
