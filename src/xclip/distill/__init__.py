"""Multimodal Teacher/Student classifiers with knowledge distillation: HF image and text towers,
fusions by name, one head per task (`MultimodalClassifier`), the KD loss, the CSV / ShapesWorld
data (`DistillDataModule`), `TeacherModule` / `StudentModule` and the shipped checkpoint format."""

from xclip.distill.checkpoint import label_fingerprint, load_classifier, resolve_checkpoint, save_classifier
from xclip.distill.classifier_module import MultimodalClassifierModule, StudentModule, TeacherModule
from xclip.distill.datamodule import CSVFormatError, DistillDataModule
from xclip.distill.fusion import FUSIONS, build_fusion
from xclip.distill.kd_loss import DistillationLoss, FeatureProjection, distillation_loss, kd_kl
from xclip.distill.metrics import MultitaskClassificationMetrics
from xclip.distill.model import ClassifierOutput, MultimodalClassifier
from xclip.distill.tokenizer import load_tokenizer, train_wordpiece
from xclip.distill.towers import TextTower, VisionTower

__all__ = [
    "FUSIONS",
    "CSVFormatError",
    "ClassifierOutput",
    "DistillDataModule",
    "DistillationLoss",
    "FeatureProjection",
    "MultimodalClassifier",
    "MultimodalClassifierModule",
    "MultitaskClassificationMetrics",
    "StudentModule",
    "TeacherModule",
    "TextTower",
    "VisionTower",
    "build_fusion",
    "distillation_loss",
    "kd_kl",
    "label_fingerprint",
    "load_classifier",
    "load_tokenizer",
    "resolve_checkpoint",
    "save_classifier",
    "train_wordpiece",
]
