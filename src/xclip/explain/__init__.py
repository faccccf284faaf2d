"""Explanations: Grad-ECLIP (image + text), Grad-CAM, GAME and a random baseline, plus quality
metrics (`xclip.explain.quality`) and rendering (`xclip.explain.render`)."""

from xclip.explain.base import Explainer, explaining
from xclip.explain.game import GAME
from xclip.explain.gradcam import GradCAM
from xclip.explain.gradeclip import GradECLIP, GradECLIPTerms, TextMaps
from xclip.explain.random_map import RandomMap
from xclip.explain.targets import ClassSoftmax, cosine, resolve_target

EXPLAINERS = {"grad_eclip": GradECLIP, "grad_cam": GradCAM, "game": GAME, "random": RandomMap}

__all__ = ["EXPLAINERS", "GAME", "ClassSoftmax", "Explainer", "GradCAM", "GradECLIP", "GradECLIPTerms", "RandomMap", "TextMaps",
           "cosine", "explaining", "resolve_target"]
