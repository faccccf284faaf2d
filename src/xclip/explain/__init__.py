"""Explanations: Grad-ECLIP (image + text), Grad-CAM, GAME and a random baseline, SHAP and Captum
attributions of multimodal models (`SHAPExplainer`, `CaptumExplainer`), plus quality metrics
(`xclip.explain.quality`) and rendering (`xclip.explain.render`)."""

from xclip.explain.base import Explainer, explaining
from xclip.explain.captum_explainers import CaptumExplainer
from xclip.explain.game import GAME
from xclip.explain.gradcam import GradCAM
from xclip.explain.gradeclip import GradECLIP, GradECLIPTerms, TextMaps
from xclip.explain.multimodal import (
    MultimodalAttribution,
    MultimodalExplainable,
    MultimodalInputs,
    MultimodalTarget,
    merge_subwords,
    word_rank,
)
from xclip.explain.random_map import RandomMap, random_values
from xclip.explain.shap_explainer import SHAPExplainer
from xclip.explain.targets import ClassSoftmax, cosine, resolve_target

EXPLAINERS: dict[str, type[Explainer]] = {
    "grad_eclip": GradECLIP,
    "grad_cam": GradCAM,
    "game": GAME,
    "random": RandomMap,
}

__all__ = [
    "EXPLAINERS",
    "GAME",
    "CaptumExplainer",
    "ClassSoftmax",
    "Explainer",
    "GradCAM",
    "GradECLIP",
    "GradECLIPTerms",
    "MultimodalAttribution",
    "MultimodalExplainable",
    "MultimodalInputs",
    "MultimodalTarget",
    "RandomMap",
    "SHAPExplainer",
    "TextMaps",
    "cosine",
    "explaining",
    "merge_subwords",
    "random_values",
    "resolve_target",
    "word_rank",
]
