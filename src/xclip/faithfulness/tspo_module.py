"""`TSPOHeadModule`: trains the TSPO head on cached frozen CLIP features (``xclip fit --config
configs/tspo_head_shapes.yaml``) and measures it on held-out prompts next to its baselines.

Loss per batch of prompts: the Bradley-Terry loss over every ordered pair of a prompt's renderings
(faithful vs erroneous: the faithful one wins; two renderings of the same kind: a tie, 0.5/0.5;
PickScore's 1 / pairs-of-the-prompt weights) plus ``patch_weight`` x the patch term
MSE(sigmoid(logit), patch target) (HPSv2's region loss, here text-conditioned), plus
``residual_penalty`` x mean(g^2) of the reward's learned residual over the zero-shot score.

Validation / test metrics (``{stage}/faithfulness/tspo/...``): pairwise accuracy of the head's reward and of the
zero-shot cosine on the faithful-vs-erroneous pairs; patch IoU at 0.5 and patch AUC over the
erroneous images for the head, the dense patch-cosine map and (when cached) the crop heatmap, the
baselines scaled to [0, 1] per image (`patch_metrics.minmax_badness`). The head's patch
predictions of the first prompts are drawn to TensorBoard. After fit the head is exported
(safetensors + config + card) to `export_dir`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.engine import (
    EXPORT_ARGUMENTS,
    STAGES,
    EvaluationModule,
    ExportMixin,
    tensorboard_writers,
    warmup_cosine_scheduler,
)
from xclip.explain.render import figure_to_array
from xclip.faithfulness.figures import patch_prediction_figure
from xclip.faithfulness.localisation import pair_statistics
from xclip.faithfulness.pairs import bradley_terry_loss, pairwise_accuracy
from xclip.faithfulness.patch_metrics import minmax_badness, patch_auc, patch_iou
from xclip.faithfulness.tspo_head import HeadFeatures, TSPOHead, export_head, head_card, load_head, with_weights
from xclip.metrics.score_table import ScoreTable
from xclip.results import ReportRow

BASELINES = ("head", "dense", "crops")


def prompt_pairs(r: int) -> tuple[Tensor, Tensor]:
    """Every unordered pair (i < j) of R renderings: two [R(R-1)/2] index tensors."""
    i, j = torch.triu_indices(r, r, offset=1)
    return i, j


def pair_labels(faithful: Tensor, i: Tensor, j: Tensor) -> Tensor:
    """P(rendering i preferred over j) per prompt and pair: faithful [B, R] -> [B, pairs]
    (1: i faithful and j not, 0: the reverse, 0.5: a tie)."""
    fi, fj = faithful[:, i].double(), faithful[:, j].double()
    return 0.5 + 0.5 * (fi - fj)


class TSPOHeadModule(ExportMixin, EvaluationModule):
    """Train / evaluate the TSPO head on `TSPOFeatureDataModule` batches.

    Args:
        backbone: the frozen CLIP the features come from (spec or `Backbone`; sizes the head and
            is recorded in the export).
        hidden: the head's hidden width (see `TSPOHead`).
        dropout: the head's dropout.
        init_scale: the initial scale of the reward's zero-shot term.
        lr: AdamW's learning rate, decayed with a cosine to 0 over the run.
        weight_decay: AdamW's weight decay.
        patch_weight: weight of the patch term.
        residual_penalty: weight of mean(g^2), g = reward - scale * zero-shot cosine (the learned
            residual): keeps the reward anchored at the zero-shot score where the features give
            no evidence (0: off).
        export: export the trained head at the end of fit: the weights of the validation epoch
            with the best head pair accuracy (model selection on the validation split; the test
            split stays untouched).
        export_dir: where (None: ``<log dir>/model``; fit never writes into ``checkpoints/`` unless
            told to).
        overwrite: allow `export_dir` to exist already (replaced atomically, e.g. to re-make the
            shipped ``checkpoints/tspo-head-tiny-shapes`` on purpose); without it fit refuses at setup.
        head_checkpoint: an exported head to start from (e.g. ``xclip test`` of the shipped head).
        log_prompts: held-out prompts whose patch predictions go to TensorBoard.
    """

    workflow = "faithfulness"
    tasks = ("tspo",)
    shipped_folder = "checkpoints/tspo-head-tiny-shapes"
    not_hyperparameters = EXPORT_ARGUMENTS
    backbone: Backbone  # set through __dict__ in __init__: not a submodule

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        hidden: int = 256,
        dropout: float = 0.1,
        init_scale: float = 10.0,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        patch_weight: float = 1.0,
        residual_penalty: float = 0.0,
        export: bool = True,
        export_dir: str | None = None,
        overwrite: bool = False,
        head_checkpoint: str | None = None,
        log_prompts: int = 4,
    ):
        super().__init__()
        self.set_export(export, export_dir, overwrite)
        backbone, self.backbone_spec = resolve_backbone(backbone)
        # the frozen backbone only sizes the head and is fingerprinted in the export: kept out of the
        # module tree so Lightning checkpoints hold the head alone
        self.__dict__["backbone"] = backbone
        self.patch_weight, self.residual_penalty, self.log_prompts = patch_weight, residual_penalty, log_prompts
        width = self.backbone.token_width
        if head_checkpoint is not None:
            self.head = load_head(head_checkpoint)
            self.head.check_backbone(self.backbone)
        else:
            self.head = TSPOHead(self.backbone.embed_dim, width, self.backbone.grid_size, hidden, dropout, init_scale)
        floats = ("reward", "zero_shot", *(f"{b}_{m}" for b in BASELINES for m in ("iou", "auc")))
        self.table = ScoreTable(floats, ("index", "render", "faithful", "has_error"), unique_by=("index", "render"))
        self._results: dict[str, Any] = {}
        self._figure_batch: dict[str, Tensor] | None = None
        # the best validation epoch so far: (head pair accuracy, epoch, head weights, validation results)
        self._best: tuple[float, int, dict[str, Tensor], dict[str, Any]] | None = None

    # ---- forward -------------------------------------------------------------------------------
    def _features(self, batch: dict[str, Tensor]) -> HeadFeatures:
        b, r = batch["image"].shape[:2]
        return HeadFeatures(
            batch["text"][:, None].expand(b, r, -1).reshape(b * r, -1),
            batch["image"].flatten(0, 1),
            batch["tokens"].flatten(0, 1),
            batch["patch_sim"].flatten(0, 1),
        )

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """-> reward [B, R], patch logits [B, R, P]."""
        b, r = batch["image"].shape[:2]
        reward, logits = self.head(self._features(batch))
        return reward.view(b, r), logits.view(b, r, -1)

    def losses(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        reward, logits = self(batch)
        i, j = prompt_pairs(reward.shape[1])
        p = pair_labels(batch["faithful"], i, j).to(reward)
        bt = bradley_terry_loss(reward[:, i].flatten(), reward[:, j].flatten(), p.flatten())
        patch = torch.nn.functional.mse_loss(logits.sigmoid(), batch["patch_target"].to(logits))
        residual = reward - self.head.scale * (batch["image"] * batch["text"][:, None]).sum(-1)  # g [B, R]
        residual_loss = residual.pow(2).mean()
        loss = bt + self.patch_weight * patch + self.residual_penalty * residual_loss
        acc = pairwise_accuracy(reward[:, i].flatten().detach(), reward[:, j].flatten().detach(), p.flatten())
        return {
            "loss": loss,
            "bt_loss": bt,
            "patch_loss": patch,
            "residual_loss": residual_loss.detach(),
            "pair_accuracy": torch.tensor(acc),
        }

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        out = self.losses(batch)
        for k, v in out.items():
            self.log(f"train/{k}", v, prog_bar=k in ("loss", "pair_accuracy"), batch_size=batch["image"].shape[0])
        return out["loss"]

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.head.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return {"optimizer": opt, "lr_scheduler": warmup_cosine_scheduler(opt, total, warmup_steps=0)}

    # ---- evaluation ----------------------------------------------------------------------------
    def start(self, stage: str) -> None:
        self.table.reset()
        self._figure_batch = None

    def step(self, batch: dict[str, Tensor], stage: str) -> None:
        reward, logits = self(batch)
        b, r = reward.shape
        target = batch["patch_target"].bool().flatten(0, 1)
        maps = {"head": logits.sigmoid().flatten(0, 1), "dense": minmax_badness(batch["patch_sim"].flatten(0, 1))}
        if "crops" in batch:
            maps["crops"] = minmax_badness(batch["crops"].flatten(0, 1))
        cols = {"reward": reward.flatten(), "zero_shot": (batch["image"] * batch["text"][:, None]).sum(-1).flatten()}
        nan = torch.full((b * r,), float("nan"), device=reward.device)
        for name in BASELINES:
            cols[f"{name}_iou"] = patch_iou(maps[name], target) if name in maps else nan
            cols[f"{name}_auc"] = patch_auc(maps[name], target) if name in maps else nan
        self.table.update(
            **cols,
            index=batch["index"].to(reward.device).repeat_interleave(r),
            render=torch.arange(r, device=reward.device).repeat(b),
            faithful=batch["faithful"].flatten().long(),
            has_error=target.any(1).long(),
        )
        if self._figure_batch is None:  # the epoch's first batch
            self._figure_batch = {
                k: v[: self.log_prompts].detach().cpu()
                for k, v in {**batch, "prob": logits.sigmoid()}.items()
                if isinstance(v, Tensor)
            }

    def finish(self, stage: str) -> None:
        rows = {k: v.cpu() for k, v in self.table.rows().items()}
        if not rows["index"].numel() or self.trainer.sanity_checking:
            return
        metrics = {
            f"{name}_pair_accuracy": pair_statistics(rows[col], rows["index"], rows["faithful"])["pair_accuracy"]
            for name, col in (("head", "reward"), ("zero_shot", "zero_shot"))
        }
        error = rows["has_error"] == 1
        for name in BASELINES:
            for m in ("iou", "auc"):
                values = rows[f"{name}_{m}"][error]
                if values.isfinite().any():
                    metrics[f"{name}_patch_{m}"] = float(values.nanmean())
        for k, v in metrics.items():
            self.log_metric(stage, f"tspo/{k}", v)  # from the gathered table: the same on every process
        self._results[stage] = {
            "metrics": metrics,
            "n_prompts": int(rows["index"].unique().numel()),
            "n_images": int(rows["index"].numel()),
            "n_error_images": int(error.sum()),
            "epoch": self.current_epoch,
            "step": self.global_step,
        }
        accuracy = metrics["head_pair_accuracy"]
        if stage == "val" and self.trainer.state.fn == "fit" and (self._best is None or accuracy > self._best[0]):
            weights = {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()}
            self._best = (accuracy, self.current_epoch, weights, dict(self._results["val"]))
        self._log_figure(stage)

    def _log_figure(self, stage: str) -> None:
        batch, dm = self._figure_batch, getattr(self.trainer, "datamodule", None)
        if batch is None or not self.trainer.is_global_zero or dm is None or not hasattr(dm, "dataset"):
            return
        data = dm.dataset("test" if stage == "test" else "val")
        gh, gw = self.head.patch_grid
        rows = []
        for k, idx in enumerate(batch["index"].tolist()):  # re-render a few held-out prompts (no model calls)
            item = data[idx]
            for r in range(item["images"].shape[0]):
                crops = minmax_badness(batch["crops"][k, r][None])[0] if "crops" in batch else None
                rows.append(
                    (
                        item["prompt"],
                        item["errors"][r],
                        item["images"][r],
                        batch["patch_target"][k, r],
                        batch["prob"][k, r],
                        crops,
                    )
                )
        array = figure_to_array(patch_prediction_figure(rows[: 4 * self.log_prompts], (gh, gw)))
        for writer in tensorboard_writers(self.trainer):
            writer.add_image(
                self.metric_key(stage, "tspo/patch_predictions"), array, self.global_step, dataformats="HWC"
            )

    def export_model(self, path: Path) -> None:
        """The weights of the best validation epoch (by head pair accuracy; the last ones without
        validation), with the recipe and the validation numbers in config.json and the card."""
        head, val = self.head, self._results.get("val", {})
        if self._best is not None:
            head, val = with_weights(self.head, self._best[2]), self._best[3]
        extra = {"trained_with": {k: v for k, v in self.hparams.items() if k != "head_checkpoint"}, "validation": val}
        card = head_card(self.backbone_spec, val, self.trainer.global_step)
        export_head(head, path, self.backbone, self.backbone_spec, extra, card, overwrite=self.overwrite)

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        rows = []
        for stage in STAGES:
            pre = self.metric_key(stage, "tspo/")
            keys = [pre + k for k in ("head_pair_accuracy", "zero_shot_pair_accuracy") if pre + k in metrics]
            if keys:
                labels = {"head_pair_accuracy": "head", "zero_shot_pair_accuracy": "zero-shot CLIP"}
                rows.append(
                    ReportRow(
                        "TSPO head",
                        f"pairwise accuracy, faithful vs erroneous [{stage}]",
                        {labels[k[len(pre) :]]: metrics[k] for k in keys},
                        keys,
                    )
                )
            for m, label in (("iou", "patch IoU at 0.5"), ("auc", "patch AUC")):
                keys = [f"{pre}{b}_patch_{m}" for b in BASELINES if f"{pre}{b}_patch_{m}" in metrics]
                if keys:
                    rows.append(
                        ReportRow(
                            "TSPO head",
                            f"{label}, erroneous images [{stage}]",
                            {k[len(pre) :].split("_")[0]: metrics[k] for k in keys},
                            keys,
                        )
                    )
        return rows

    def extra_results(self) -> dict[str, Any]:
        return {**super().extra_results(), "tspo": self._results}
