"""Zero-shot evaluation on ShapesWorld-style batches: attribute classification and retrieval.

`ZeroShotEvaluation` holds the validate/test wiring; subclasses say how to embed images and
texts (`ZeroShotModule` through a backbone, `ClipPretrainModule` through the model it trains).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.backbones.prompts import zero_shot_weights
from xclip.data.shapes import COLOURS, SHAPES
from xclip.metrics.retrieval_metric import RetrievalRecall, recall_report_rows
from xclip.metrics.score_table import ScoreTable
from xclip.results import ReportRow

DEFAULT_PROMPTS: dict[str, list[str]] = {
    "shape": ["a photo of a {}.", "a {}."],
    # colour prompts ensemble over shapes, so no shape is favoured
    "colour": [f"a photo of a {{}} {s}." for s in SHAPES],
}
DEFAULT_CLASSES: dict[str, list[str]] = {"shape": list(SHAPES), "colour": list(COLOURS)}


class ZeroShotEvaluation(pl.LightningModule):
    """Validate/test: zero-shot accuracy per attribute on ``classification`` batches and
    Recall@K both ways on ``retrieval`` batches. Subclasses implement `embed_images`/`embed_texts`.

    Args:
        classes: attribute -> class names; each attribute must be a label key of the batch.
        prompts: attribute -> prompt templates with ``{}`` for the class name.
        recall_ks: the K of Recall@K.
    """

    def __init__(self, classes: dict[str, list[str]] | None = None, prompts: dict[str, list[str]] | None = None,
                 recall_ks: tuple[int, ...] = (1, 5, 10)):
        super().__init__()
        self.classes = dict(classes if classes is not None else DEFAULT_CLASSES)
        self.prompts = dict(prompts if prompts is not None else DEFAULT_PROMPTS)
        missing = sorted(set(self.classes) - set(self.prompts))
        if missing:
            raise ValueError(f"no prompt templates for attribute(s) {missing}: add them under `prompts`")
        # per-item predictions keyed by dataset index: the padded repeats of a DistributedSampler are
        # scored once, so several processes give exactly the single-process accuracy
        columns = ("index", *(f"{a}_{kind}" for a in self.classes for kind in ("pred", "label")))
        self.predictions = ScoreTable((), columns, unique_by=("index",))
        self.recall = RetrievalRecall(recall_ks)
        self._heads: dict[str, Tensor] = {}
        self._recall_stages: set[str] = set()  # stages in which this module logged Recall@K
        self.n_classified = 0  # distinct images behind the last accuracies

    def embed_images(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] -> [N, D] L2-normalised."""
        raise NotImplementedError

    def embed_texts(self, texts: list[str]) -> Tensor:
        """K strings -> [K, D] L2-normalised."""
        raise NotImplementedError

    def _build_heads(self) -> None:
        self._heads = {a: zero_shot_weights(self.embed_texts, c, self.prompts[a]) for a, c in self.classes.items()}

    def on_validation_epoch_start(self) -> None:
        self._build_heads()

    def on_test_epoch_start(self) -> None:
        self._build_heads()

    def _eval_step(self, batch: dict[str, Any]) -> None:
        task = batch.get("task")
        if task == "classification":
            missing = [a for a in self._heads if a not in batch]
            if missing:
                raise KeyError(f"classification batches carry no labels for attribute(s) {missing}")
            emb = self.embed_images(batch["image"])
            columns = {"index": batch["index"]}
            for attr, head in self._heads.items():
                columns[f"{attr}_pred"] = (emb @ head.T).argmax(-1)
                columns[f"{attr}_label"] = torch.as_tensor(batch[attr], device=emb.device)
            self.predictions.update(**columns)
        elif task == "retrieval":
            img = self.embed_images(batch["image"])
            txt = self.embed_texts(batch["texts"])
            self.recall.update(img, batch["index"], txt, batch["index"][batch["text_to_image"]])
        else:
            raise ValueError(f"{type(self).__name__} evaluates 'classification' and 'retrieval' batches, got {task!r}")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch)

    def _log_epoch(self, stage: str) -> None:
        if self.predictions.update_called:
            rows = self.predictions.rows()
            for attr in self.classes:
                correct = (rows[f"{attr}_pred"] == rows[f"{attr}_label"]).double()
                # identical on every process (computed from the gathered, de-duplicated rows)
                self.log(f"{stage}/zeroshot_{attr}_acc", correct.mean().item(), sync_dist=False)
            self.n_classified = int(rows["index"].numel())
        self.predictions.reset()
        if self.recall.update_called:
            for name, value in self.recall.compute().items():
                self.log(f"{stage}/{name}", value)
            self._recall_stages.add(stage)
        self.recall.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Console report rows of this module's logged metrics (see `xclip.results`)."""
        rows = []
        for stage in ("val", "test"):
            for attr, names in self.classes.items():
                key = f"{stage}/zeroshot_{attr}_acc"
                if key in metrics:
                    rows.append(ReportRow("zero-shot classification", f"accuracy, {attr} ({len(names)} classes), "
                                          f"{self.n_classified} images [{stage}]",
                                          {"": metrics[key]}, [key]))
        # recall keys only if this module logged them (a suite's RetrievalModule logs the same names)
        own = {k: v for k, v in metrics.items() if k.split("/", 1)[0] in self._recall_stages}
        return rows + recall_report_rows(own, "zero-shot retrieval")


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

    def __init__(self, backbone: str | Backbone = "xclip:tiny-shapes", classes: dict[str, list[str]] | None = None,
                 prompts: dict[str, list[str]] | None = None, recall_ks: tuple[int, ...] = (1, 5, 10),
                 text_batch_size: int = 256):
        super().__init__(classes=classes, prompts=prompts, recall_ks=recall_ks)
        self.backbone, self.backbone_spec = resolve_backbone(backbone)
        self.backbone.eval().requires_grad_(False)
        self.text_batch_size = text_batch_size

    def embed_images(self, images: Tensor) -> Tensor:
        return self.backbone.encode_image(self.backbone.normalize(images), normalize=True)

    def embed_texts(self, texts: list[str]) -> Tensor:
        return self.backbone.encode_texts(texts, self.text_batch_size, normalize=True)

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json: the backbone and how many distinct images were classified."""
        return {"backbone": self.backbone_spec, "n_classified": self.n_classified}
