"""`TeacherModule` and `StudentModule`: Lightning training and evaluation of multimodal multi-task
classifiers, the student distilled from a frozen teacher.

Both log ``{stage}/distill/<task>_macro_f1``, ``_acc``, ``_auroc`` and ``{stage}/distill/mean_macro_f1``
(the checkpoint monitor: the best checkpoint is the one with the highest mean macro F1 over the tasks),
save the label vocabulary and the tokenizer inside every Lightning checkpoint, resume from one
(``xclip fit --ckpt_path``), evaluate one (``xclip validate --ckpt_path``) and (into the run directory
or `export_dir`)
export the best checkpoint of a fit in the shipped format (`xclip.distill.checkpoint`).

They implement `xclip.explain.multimodal.MultimodalExplainable`, so `SHAPCallback` and
`CaptumCallback` explain them during validate/test.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xclip.backbones.inputs import check_texts
from xclip.distill.checkpoint import label_fingerprint, load_classifier, save_classifier
from xclip.distill.kd_loss import FeatureProjection, distillation_loss
from xclip.distill.metrics import MultitaskClassificationMetrics
from xclip.distill.model import ClassifierOutput, MultimodalClassifier
from xclip.distill.tokenizer import load_tokenizer
from xclip.engine import EXPORT_ARGUMENTS, STAGES, EvaluationModule, ExportMixin, warmup_cosine_scheduler
from xclip.explain.multimodal import MultimodalInputs, MultimodalTarget, item_id
from xclip.metrics import gather_objects
from xclip.results import ReportRow

CHECKPOINT_KEY = "xclip_distill"


def _vocabulary(labels: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    return {str(t): [str(c) for c in classes] for t, classes in labels.items()}


class MultimodalClassifierModule(ExportMixin, EvaluationModule):
    """What the teacher and the student share: building the model, tokenising, metrics, checkpoints.
    On its own it evaluates and explains a saved model (``init_from``; no training step).

    Args:
        model: `MultimodalClassifier` arguments without ``tasks`` (``vision``, ``text``,
            ``fusion``, ``fusion_dim``, ``fusion_options``, ``text_pooling``, ``dropout``); a text
            config dict without ``vocab_size`` gets the tokenizer's.
        init_from: a shipped checkpoint folder (or ``xclip:<name>``) to start from instead
            (its architecture, weights, classes and tokenizer).
        labels: task -> class names; None: the datamodule's (``label_vocabulary``), or the
            checkpoint's when one is given.
        tokenizer: see `xclip.distill.tokenizer.load_tokenizer`.
        max_length: longest tokenised text (longer ones are cut).
        lr: AdamW's learning rate, after a linear warm-up of `warmup_steps` then a cosine decay to 0
            (per step).
        weight_decay: AdamW's weight decay (matrices only).
        warmup_steps: optimiser steps of the linear warm-up.
        export: at the end of fit, write the best checkpoint in the shipped format.
        export_dir: where (None: ``<log dir>/model``); never the shipped ``checkpoints/`` by default.
        overwrite: allow `export_dir` to be an existing checkpoint folder (replaced atomically; a
            fit that would replace one without it is refused before training).
        frozen: parts of the model not trained (``"vision"``, ``"text"``, ``"fusion"``...: its
            top-level submodules), e.g. a pretrained image tower used as a fixed feature extractor.
    """

    role = "model"
    workflow = "distill"
    shipped_folder = "checkpoints/distill-*-shapes"
    not_hyperparameters = EXPORT_ARGUMENTS

    def __init__(
        self,
        model: dict[str, Any] | None = None,
        init_from: str | None = None,
        labels: dict[str, list[str]] | None = None,
        tokenizer: str = "shapes-wordpiece",
        max_length: int = 32,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        export: bool = True,
        export_dir: str | None = None,
        overwrite: bool = False,
        frozen: Sequence[str] = (),
    ):
        super().__init__()
        self.set_export(export, export_dir, overwrite)
        if (model is None) == (init_from is None):
            raise ValueError("give exactly one of `model` (an architecture) and `init_from` (a checkpoint folder)")
        self.model_args, self.init_from = dict(model or {}), init_from
        self.max_length, self.lr, self.weight_decay, self.warmup_steps = int(max_length), lr, weight_decay, warmup_steps
        self.frozen = list(frozen)
        self.model: MultimodalClassifier | None = None
        self.labels = _vocabulary(labels) if labels else None
        # whose classes the model has (in messages; None: the data's, taken in setup), and whether
        # their order is known to be the one the weights were trained with (a label fingerprint)
        self.label_source: str | None = "the `labels` argument's" if labels else None
        self.label_order_checked = True
        if init_from is not None:
            self.model, self.tokenizer, config = load_classifier(init_from)
            self.max_length = int(config.get("max_length", self.max_length))
            if self.role == "model":  # evaluating a shipped model: report it under its own role
                self.role = config.get("role") or self.role
            if self.labels is not None and self.labels != self.model.tasks:
                raise ValueError(f"labels {self.labels} differ from the checkpoint's {self.model.tasks}")
            self.labels = self.model.tasks
            self.label_source = f"the checkpoint {init_from}'s"
            self.label_order_checked = config["label_order_checked"]
            self._freeze()
        else:
            self.tokenizer = load_tokenizer(tokenizer)
            if self.labels is not None:
                self._build(self.labels)
        self.metrics: MultitaskClassificationMetrics | None = None
        self._skipped: list[str] = []
        self._scores: dict[str, float] = {}
        self._n_scored: dict[str, int] = {}  # stage -> items scored
        self._notes: dict[str, str] = {}  # logged metric key -> why its value is NaN

    # ---- building --------------------------------------------------------------------------------
    def _build(self, labels: Mapping[str, Sequence[str]]) -> None:
        args = dict(self.model_args)
        text = args.get("text")
        if isinstance(text, dict) and "vocab_size" not in text:
            args["text"] = {**text, "vocab_size": len(self.tokenizer)}
        self.model = MultimodalClassifier(tasks=labels, **args)
        self.labels = self.model.tasks
        self._freeze()

    @property
    def classifier(self) -> MultimodalClassifier:
        """`model`, once built: in __init__ (`labels`, `init_from`) or in `setup` (the data's labels)."""
        if self.model is None:
            raise RuntimeError(
                f"{type(self).__name__}: the model is not built yet; without `labels` or `init_from` "
                "it is built in setup from the datamodule's label vocabulary"
            )
        return self.model

    def _freeze(self) -> None:
        parts = dict(self.classifier.named_children())
        unknown = [p for p in self.frozen if p not in parts]
        if unknown:
            raise ValueError(f"frozen parts {unknown} are not parts of the model; choose from {sorted(parts)}")
        for part in self.frozen:
            parts[part].requires_grad_(False)

    def setup(self, stage: str) -> None:
        super().setup(stage)  # the export check of a fit (ExportMixin)
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.model is None:
            if datamodule is None or not hasattr(datamodule, "label_vocabulary"):
                raise ValueError(
                    f"{type(self).__name__}: no labels: pass `labels`, `init_from`, or a datamodule "
                    "with a label_vocabulary (DistillDataModule)"
                )
            # a checkpoint restored after setup may bring other classes: `on_load_checkpoint` rebuilds
            self._build(datamodule.label_vocabulary)
        elif datamodule is not None and hasattr(datamodule, "use_label_vocabulary"):
            # dev/test labels encoded with the model's classes (by name)
            datamodule.use_label_vocabulary(
                self.model.tasks, self.label_source or "the model's", check_order=not self.label_order_checked
            )

    # ---- forward ---------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """input_ids, attention_mask [B, T] (padded to the longest, cut at max_length)."""
        enc = self.tokenizer(
            check_texts(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def forward(self, images01: Tensor, texts: Sequence[str]) -> ClassifierOutput:
        """images01 [B, 3, H, W] in [0, 1] and B texts -> `ClassifierOutput`."""
        ids, mask = self.tokenize(texts)
        return self.classifier(self.classifier.pixel_values(images01), ids, mask)

    # ---- evaluation ------------------------------------------------------------------------------
    def start(self, stage: str) -> None:
        self.metrics = MultitaskClassificationMetrics(
            {t: len(c) for t, c in self.classifier.tasks.items()}, class_names=self.classifier.tasks
        ).to(self.device)
        self._skipped = []

    def step(self, batch: dict[str, Any], stage: str) -> None:
        self._skipped.extend(batch.get("skipped_paths", []))
        if "image" not in batch:  # every item of the batch was unreadable
            return
        assert self.metrics is not None  # made in start
        out = self(batch["image"], batch["text"])
        labels = batch["labels"]
        loss = distillation_loss(out.logits, None, labels, alpha=0.0, beta=0.0).ce  # CE summed over the tasks
        self.log_metric(stage, "loss", loss, batch_size=len(batch["text"]), sync_dist=True)
        self.metrics.update_batch({t: v.float().softmax(-1) for t, v in out.logits.items()}, labels, batch["index"])

    def finish(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        assert self.metrics is not None  # made in start
        scores = self.metrics.scores()
        self._scores = scores
        self._n_scored[stage] = int(scores["n_items"])
        self._notes = {k: v for k, v in self._notes.items() if not k.startswith(f"{stage}/")}
        self._notes.update({self.metric_key(stage, name): note for name, note in self.metrics.notes.items()})
        for name, value in scores.items():
            if name != "n_items":
                self.log_metric(stage, name, value, prog_bar=name == "mean_macro_f1")
        self._skipped = sorted({p for paths in gather_objects(self._skipped) for p in paths})

    def extra_results(self) -> dict[str, Any]:
        """results.json: the role, classes, item count, parameter count, skipped files and why a metric
        is NaN (``notes``: logged key -> reason)."""
        return {
            "distill": {
                "role": self.role,
                "tasks": self.classifier.tasks,
                "n_items": int(self._scores.get("n_items", 0)),
                "parameters": sum(p.numel() for p in self.classifier.parameters()),
                "skipped_paths": self._skipped,
                "notes": dict(self._notes),
            }
        }

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Per task: macro F1, accuracy and AUROC with the number of items scored (and why AUROC is
        n/a when it is undefined); the mean macro F1 over the tasks."""
        rows = []
        for stage in STAGES:
            n = f", n={self._n_scored[stage]}" if stage in self._n_scored else ""
            for task in self.classifier.tasks:
                keys = [self.metric_key(stage, f"{task}_{m}") for m in ("macro_f1", "acc", "auroc")]
                if keys[0] in metrics:
                    note = self._notes.get(keys[2])
                    name = f"{task} ({stage}{n}): macro F1 | accuracy | OvR AUROC"
                    name += f" (AUROC {note})" if note else ""
                    rows.append(
                        ReportRow(
                            f"distill ({self.role})",
                            name,
                            dict(zip(("macro F1", "accuracy", "AUROC"), (metrics[k] for k in keys))),
                            keys,
                        )
                    )
            key = self.metric_key(stage, "mean_macro_f1")
            if key in metrics:
                rows.append(
                    ReportRow(
                        f"distill ({self.role})", f"mean macro F1 over tasks ({stage}{n})", {"": metrics[key]}, [key]
                    )
                )
        return rows

    # ---- explanations (MultimodalExplainable) ----------------------------------------------------
    def attribution_targets(self) -> dict[str, MultimodalTarget]:
        return {task: self.classifier.explain_target(task) for task in self.classifier.tasks}

    def attribution_inputs(self, batch: dict[str, Any]) -> MultimodalInputs | None:
        if "image" not in batch:
            return None
        images = batch["image"].to(self.device)
        ids, mask = self.tokenize(batch["text"])
        index = batch.get("index")
        indexes = [int(i) for i in index] if index is not None else list(range(len(images)))
        paths: list[str | None] = [str(p) for p in batch["path"]] if "path" in batch else [None] * len(images)
        # transformers types the tokens of a list of ids as str | list[str]
        tokens: list[list[str]] = [self.tokenizer.convert_ids_to_tokens(r) for r in ids.tolist()]  # type: ignore[misc]
        return MultimodalInputs(
            images,
            self.classifier.pixel_values(images),
            ids,
            mask,
            tokens,
            list(batch["text"]),
            [item_id(p, i) for p, i in zip(paths, indexes)],
            int(self.tokenizer.pad_token_id),
            indexes,
            paths,
        )

    # ---- training --------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.classifier.parameters() if p.requires_grad]

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.trainable_parameters():
            (no_decay if p.ndim < 2 else decay).append(p)  # norms and biases are not decayed
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return {"optimizer": opt, "lr_scheduler": warmup_cosine_scheduler(opt, total, self.warmup_steps)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_KEY] = {
            "labels": self.classifier.tasks,
            "label_fingerprint": label_fingerprint(self.classifier.tasks),
            "model": self.classifier.config(),
            "tokenizer": self.tokenizer.backend_tokenizer.to_str(),
            "special_tokens": self.tokenizer.special_tokens_map,
            "max_length": self.max_length,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the tokenizer and the text length; the checkpoint's classes (checked against its
        label fingerprint) must be the model's, unless the model's came from the data in `setup`:
        then it is rebuilt with the checkpoint's (its weights are the checkpoint's next)."""
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise ValueError(f"not a {type(self).__name__} checkpoint (no {CHECKPOINT_KEY!r} entry)")
        labels = _vocabulary(saved["labels"])
        stored = saved.get("label_fingerprint")  # absent in checkpoints written before it was stored
        if stored is not None and stored != label_fingerprint(labels):
            raise ValueError(
                f"the checkpoint's classes {labels} do not match its label fingerprint ({stored} vs "
                f"{label_fingerprint(labels)}): its label vocabulary was changed after saving"
            )
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        self.tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(saved["tokenizer"]), **saved["special_tokens"]
        )
        self.max_length = int(saved["max_length"])
        if self.model is not None and labels != self.model.tasks and self.label_source is not None:
            raise ValueError(f"the checkpoint's classes {labels} differ from {self.label_source} {self.model.tasks}")
        if self.model is None or labels != self.model.tasks:  # not built yet (load_from_checkpoint), or from the data
            self._build(labels)
        self.label_source, self.label_order_checked = "the checkpoint's", True
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "use_label_vocabulary"):
            datamodule.use_label_vocabulary(labels, self.label_source)

    def export_model(self, path: Path) -> None:
        """The best checkpoint of the fit (by mean macro F1; the last weights without one)."""
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            self.classifier.load_state_dict(
                {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
            )
        score = getattr(callback, "best_model_score", None)
        extra = {
            "role": self.role,
            "best_checkpoint": str(best) or None,
            "best_val_mean_macro_f1": None if score is None else float(score),
        }
        save_classifier(self.classifier, self.tokenizer, path, self.max_length, extra=extra, overwrite=self.overwrite)


class TeacherModule(MultimodalClassifierModule):
    """The teacher: cross-entropy on every task (summed). See `MultimodalClassifierModule`."""

    role = "teacher"

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        out = self(batch["image"], batch["text"])
        loss = distillation_loss(out.logits, None, batch["labels"], alpha=0.0, beta=0.0).total
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        return loss


class StudentModule(MultimodalClassifierModule):
    """The student: ``CE + alpha * T^2 * KL(teacher || student) + beta * MSE(student features,
    projection(teacher features))`` with the teacher frozen (eval mode, no gradient, not in the
    checkpoint) and the projection trained in the same optimiser as the student. ``alpha = beta
    = 0`` trains the no-KD comparison (no teacher forward at all).

    Args:
        teacher: the teacher's checkpoint folder (``xclip:<name>`` or a path); it fixes the classes.
        alpha: weight of the KL term (reference: 1).
        beta: weight of the feature MSE term (reference: 100).
        temperature: T of the KL term (reference: 2).
        model: the student's architecture; the other arguments: see `MultimodalClassifierModule`.
    """

    role = "student"
    teacher: MultimodalClassifier  # set past nn.Module's registration: not a submodule

    def __init__(
        self,
        teacher: str,
        model: dict[str, Any] | None = None,
        alpha: float = 1.0,
        beta: float = 100.0,
        temperature: float = 2.0,
        **kwargs,
    ):
        teacher_model, teacher_tokenizer, teacher_config = load_classifier(teacher)
        labels = kwargs.pop("labels", None) or teacher_model.tasks
        super().__init__(model=model, labels=labels, **kwargs)
        if self.classifier.tasks != teacher_model.tasks:
            raise ValueError(
                f"the student's classes {self.classifier.tasks} differ from the teacher's {teacher_model.tasks}"
            )
        self.label_source = f"the teacher {teacher}'s"
        self.label_order_checked = teacher_config["label_order_checked"]
        self.teacher_spec, self.alpha, self.beta, self.temperature = (
            teacher,
            float(alpha),
            float(beta),
            float(temperature),
        )
        teacher_model.requires_grad_(False).eval()
        object.__setattr__(self, "teacher", teacher_model)  # not a submodule: not trained, not checkpointed
        self.teacher_tokenizer = teacher_tokenizer
        self.teacher_max_length = int(teacher_config.get("max_length", self.max_length))
        self.kd_projection = None
        if beta > 0:
            # drawn aside from the global generator: the KD and no-KD students see the same batches
            with torch.random.fork_rng(devices=[]):
                self.kd_projection = FeatureProjection(teacher_model.fusion_dim, self.classifier.fusion_dim)
        if self.alpha == 0 and self.beta == 0:
            self.role = "student (no KD)"

    def on_fit_start(self) -> None:
        self.teacher.to(self.device).eval()

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        extra = list(self.kd_projection.parameters()) if self.kd_projection is not None else []
        return super().trainable_parameters() + extra

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        ids, mask = self.tokenize(batch["text"])
        pixel_values = self.classifier.pixel_values(batch["image"])
        out = self.classifier(pixel_values, ids, mask)
        teacher_logits = projected = None
        if self.alpha > 0 or self.beta > 0:
            self.teacher.eval()
            enc = self.teacher_tokenizer(
                list(batch["text"]),
                padding=True,
                truncation=True,
                max_length=self.teacher_max_length,
                return_tensors="pt",
            )
            with torch.no_grad():  # the teacher reads the texts through its own tokenizer
                t_out = self.teacher(
                    self.teacher.pixel_values(batch["image"]),
                    enc["input_ids"].to(self.device),
                    enc["attention_mask"].to(self.device),
                )
            teacher_logits = {t: v.detach() for t, v in t_out.logits.items()}
            if self.kd_projection is not None:
                projected = self.kd_projection(t_out.features.detach())
        parts = distillation_loss(
            out.logits,
            teacher_logits,
            batch["labels"],
            out.features,
            projected,
            self.alpha,
            self.beta,
            self.temperature,
        )
        n = len(batch["text"])
        self.log("train/loss", parts.total, prog_bar=True, batch_size=n)
        self.log_dict({"train/ce": parts.ce, "train/kd": parts.kd, "train/mse": parts.mse}, batch_size=n)
        return parts.total
