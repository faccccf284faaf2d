"""Zero-shot evaluation on ShapesWorld-style batches: attribute classification and retrieval.

`ZeroShotEvaluation` holds the validate/test wiring; subclasses say how to embed images and
texts (`ZeroShotModule` through a backbone, `ClipPretrainModule` through the model it trains).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.backbones.prompts import zero_shot_weights
from xclip.data.shapes import COLOURS, SHAPES
from xclip.engine import STAGES, EvaluationModule
from xclip.metrics.retrieval_metric import RetrievalRecall, recall_report_rows
from xclip.metrics.score_table import ScoreTable
from xclip.results import ReportRow

DEFAULT_PROMPTS: dict[str, list[str]] = {
    "shape": ["a photo of a {}.", "a {}."],
    # colour prompts ensemble over shapes, so no shape is favoured
    "colour": [f"a photo of a {{}} {s}." for s in SHAPES],
}
DEFAULT_CLASSES: dict[str, list[str]] = {"shape": list(SHAPES), "colour": list(COLOURS)}


class ZeroShotEvaluation(EvaluationModule):
    """Validate/test: zero-shot accuracy per attribute on ``classification`` batches and
    Recall@K both ways on ``retrieval`` batches, logged as ``{stage}/zeroshot/{attribute}_acc`` and
    ``{stage}/zeroshot/{t2i,i2t}_R@k``. Subclasses implement `embed_images`/`embed_texts`.

    Args:
        class_names: attribute -> class names; each attribute must be a label key of the batch.
        prompts: attribute -> prompt templates with ``{}`` for the class name.
        ks: the K of Recall@K.
    """

    workflow = "zeroshot"
    tasks = ("classification", "retrieval")

    def __init__(
        self,
        class_names: dict[str, list[str]] | None = None,
        prompts: dict[str, list[str]] | None = None,
        ks: tuple[int, ...] = (1, 5, 10),
    ):
        super().__init__()
        self.class_names = dict(class_names if class_names is not None else DEFAULT_CLASSES)
        self.prompts = dict(prompts if prompts is not None else DEFAULT_PROMPTS)
        missing = sorted(set(self.class_names) - set(self.prompts))
        if missing:
            raise ValueError(f"no prompt templates for attribute(s) {missing}: add them under `prompts`")
        # per-item predictions keyed by dataset index: the padded repeats of a DistributedSampler are
        # scored once, so several processes give exactly the single-process accuracy
        columns = ("index", *(f"{a}_{kind}" for a in self.class_names for kind in ("pred", "label")))
        self.predictions = ScoreTable((), columns, unique_by=("index",))
        self.recall = RetrievalRecall(ks)
        self._heads: dict[str, Tensor] = {}
        self.n_classified = 0  # distinct images behind the last accuracies

    def embed_images(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] -> [N, D] L2-normalised."""
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> Tensor:
        """K strings -> [K, D] L2-normalised."""
        raise NotImplementedError

    def start(self, stage: str) -> None:
        self._heads = {a: zero_shot_weights(self.embed_texts, c, self.prompts[a]) for a, c in self.class_names.items()}

    def step(self, batch: dict[str, Any], stage: str) -> None:
        if batch["task"] == "classification":
            missing = [a for a in self._heads if a not in batch]
            if missing:
                raise KeyError(f"classification batches carry no labels for attribute(s) {missing}")
            emb = self.embed_images(batch["image"])
            columns = {"index": batch["index"]}
            for attr, head in self._heads.items():
                columns[f"{attr}_pred"] = (emb @ head.T).argmax(-1)
                columns[f"{attr}_label"] = torch.as_tensor(batch[attr], device=emb.device)
            self.predictions.update(**columns)
        else:
            img = self.embed_images(batch["image"])
            txt = self.embed_texts(batch["texts"])
            self.recall.update(img, batch["index"], txt, batch["index"][batch["text_to_image"]])

    def finish(self, stage: str) -> None:
        rows = self.predictions.gathered_rows(self.trainer.strategy)
        if rows is not None:
            for attr in self.class_names:
                correct = (rows[f"{attr}_pred"] == rows[f"{attr}_label"]).double()
                self.log_metric(stage, f"{attr}_acc", correct.mean().item())  # same on every process
            self.n_classified = int(rows["index"].numel())
        self.predictions.reset()
        if self.trainer.strategy.reduce_boolean_decision(self.recall.update_called, all=False):
            for name, value in self.recall.compute().items():
                self.log_metric(stage, name, value)
        self.recall.reset()

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Console report rows of this module's logged metrics (see `xclip.results`)."""
        rows = []
        for stage in STAGES:
            for attr, names in self.class_names.items():
                key = self.metric_key(stage, f"{attr}_acc")
                if key in metrics:
                    rows.append(
                        ReportRow(
                            "zero-shot classification",
                            f"accuracy, {attr} ({len(names)} classes), {self.n_classified} images [{stage}]",
                            {"": metrics[key]},
                            [key],
                        )
                    )
        return rows + recall_report_rows(metrics, "zero-shot retrieval", self.workflow)


def normalized(x: Tensor) -> Tensor:
    return F.normalize(x.float(), dim=-1)


class ZeroShotModule(ZeroShotEvaluation):
    """Eval-only zero-shot classification + retrieval with any backbone spec.

    Args:
        backbone: a `load_backbone` spec (``xclip:tiny-shapes``, ``openclip:ViT-B-32``, a path...),
            loaded once per process and shared with every module naming the same spec
            (`xclip.backbones.shared_backbone`), or a `Backbone` object.
        text_batch_size: texts embedded per forward (prompt sets can be large).
    """

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        class_names: dict[str, list[str]] | None = None,
        prompts: dict[str, list[str]] | None = None,
        ks: tuple[int, ...] = (1, 5, 10),
        text_batch_size: int = 256,
    ):
        super().__init__(class_names=class_names, prompts=prompts, ks=ks)
        self.backbone, self.backbone_spec = resolve_backbone(backbone)
        self.backbone.eval().requires_grad_(False)
        self.text_batch_size = text_batch_size

    def embed_images(self, images: Tensor) -> Tensor:
        return self.backbone.encode_image(self.backbone.normalize(images), normalize=True)

    def embed_texts(self, texts: list[str]) -> Tensor:
        return self.backbone.encode_texts(texts, self.text_batch_size, normalize=True)

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json: the backbone and how many distinct images were classified."""
        return {**super().extra_results(), "n_classified": self.n_classified}
