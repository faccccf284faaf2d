"""Lightning callbacks: explanation logging (TensorBoard + PNG/NPY/JSON)."""

from xclip.callbacks.explanations import CAMCallback, ExplanationCallback, GradECLIPCallback

__all__ = ["CAMCallback", "ExplanationCallback", "GradECLIPCallback"]
