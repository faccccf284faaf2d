"""`MultimodalClassifier`: an image tower and a text tower, each pooled and projected to the fusion
width, a fusion chosen by name, and one classification head per task (plain ``nn.Module``)."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from xclip.backbones.inputs import check_images01
from xclip.distill.fusion import build_fusion
from xclip.distill.towers import TextTower, TowerOutput, VisionTower
from xclip.explain.multimodal import MultimodalTarget


@dataclass
class ClassifierOutput:
    """Per-task logits ``{task: [B, K_task]}`` and the fused features [B, d] (what KD's MSE term matches)."""

    logits: dict[str, Tensor]
    features: Tensor


def head_keys(tasks: Collection[str]) -> dict[str, str]:
    """Task name -> its head's key in ``heads`` (and so in the state dict): the name itself, or
    ``task<i>_<name>`` for a name `nn.ModuleDict` cannot hold (an attribute of it such as
    ``type``, the reference layout's first label column, or a name with a dot)."""
    keys = {}
    for i, task in enumerate(tasks):
        safe = task and "." not in task and not hasattr(nn.ModuleDict, task)
        keys[task] = task if safe else f"task{i}_{task.replace('.', '_')}"
    if len(set(keys.values())) != len(keys):
        raise ValueError(f"task names {list(tasks)} give clashing head names {list(keys.values())}; rename a task")
    return keys


class MultimodalClassifier(nn.Module):
    """Image + text -> one class per task.

    Args:
        vision, text: tower specs (hub id, local folder, or a config dict with ``model_type``;
            see `xclip.distill.towers`).
        tasks: task name -> class names, in label-id order (one head each).
        fusion: ``concat``, ``cross_attention`` or ``gated``; `fusion_options` its arguments
            (``heads``, ``layers``, ``hidden``, ``dropout``).
        fusion_dim: the width both modalities are projected to.
        text_pooling: ``cls`` or ``mean``.
        dropout: before each head.
    """

    def __init__(
        self,
        vision: str | dict[str, Any],
        text: str | dict[str, Any],
        tasks: Mapping[str, Sequence[str]],
        fusion: str = "concat",
        fusion_dim: int = 128,
        fusion_options: dict[str, Any] | None = None,
        text_pooling: str = "cls",
        dropout: float = 0.1,
    ):
        super().__init__()
        if not tasks:
            raise ValueError("a classifier needs at least one task (task name -> class names)")
        for task, classes in tasks.items():
            if len(classes) < 2:
                raise ValueError(f"task {task!r} has {len(classes)} class(es); a head needs at least 2")
        self.tasks = {str(t): [str(c) for c in classes] for t, classes in tasks.items()}
        self.vision, self.text = VisionTower(vision), TextTower(text, text_pooling)
        self.image_projection = nn.Linear(self.vision.feature_size, fusion_dim)
        self.text_projection = nn.Linear(self.text.feature_size, fusion_dim)
        self.fusion_name, self.fusion_options = fusion, dict(fusion_options or {})
        self.fusion = build_fusion(fusion, fusion_dim, **self.fusion_options)
        self.head_keys = head_keys(self.tasks)
        self.heads = nn.ModuleDict(
            {
                self.head_keys[t]: nn.Sequential(nn.Dropout(dropout), nn.Linear(fusion_dim, len(c)))
                for t, c in self.tasks.items()
            }
        )
        self.fusion_dim, self.text_pooling, self.dropout = int(fusion_dim), text_pooling, float(dropout)

    def config(self) -> dict[str, Any]:
        """JSON-able arguments that rebuild this architecture offline (the towers' resolved configs)."""
        return {
            "vision": self.vision.config_dict,
            "text": self.text.config_dict,
            "tasks": self.tasks,
            "fusion": self.fusion_name,
            "fusion_dim": self.fusion_dim,
            "fusion_options": self.fusion_options,
            "text_pooling": self.text_pooling,
            "dropout": self.dropout,
        }

    def pixel_values(self, images01: Tensor) -> Tensor:
        """[B, 3, H, W] in [0, 1] -> the image tower's input."""
        check_images01(images01)
        return self.vision.pixel_values(images01)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> ClassifierOutput:
        """pixel_values [B, 3, H, W], input_ids / attention_mask [B, T] -> `ClassifierOutput`."""
        return self._fuse(self.vision(pixel_values), self.text(input_ids, attention_mask))

    def forward_embeds(self, pixel_values: Tensor, token_embeds: Tensor, attention_mask: Tensor) -> ClassifierOutput:
        """As `forward`, from token embeddings [B, T, D] (``text.embed(input_ids)``): the
        differentiable text input of gradient explanations."""
        return self._fuse(self.vision(pixel_values), self.text.forward_embeds(token_embeds, attention_mask))

    def _fuse(self, image: TowerOutput, text: TowerOutput) -> ClassifierOutput:
        image = TowerOutput(self.image_projection(image.pooled), self.image_projection(image.tokens), image.mask)
        text = TowerOutput(self.text_projection(text.pooled), self.text_projection(text.tokens), text.mask)
        fused = self.fusion(image, text)
        return ClassifierOutput({t: self.heads[key](fused) for t, key in self.head_keys.items()}, fused)

    def explain_target(self, task: str) -> MultimodalTarget:
        """What the SHAP / Captum explainers need to explain `task`'s logits."""
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r}; this model has {sorted(self.tasks)}")
        return MultimodalTarget(
            name=task,
            module=self,
            forward_embeds=lambda pv, emb, mask: self.forward_embeds(pv, emb, mask).logits[task],
            forward_ids=lambda pv, ids, mask: self.forward(pv, ids, mask).logits[task],
            embed=self.text.embed,
            embedding_layer=self.text.embedding_layer,
            pixel_values=self.pixel_values,
            class_names=self.tasks[task],
        )
