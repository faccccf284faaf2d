"""Explanation callbacks: explain items during validate/test, log overlays and token charts to
TensorBoard and write PNG / NPY / JSON next to the run's metrics.

Which items and texts: the module's ``explanation_inputs(batch) -> (images01 [n,3,H,W], texts [n],
ids [n]) | None`` (`xclip.engine.EvaluationModule`; by default the batch's ``image`` with its
``caption``, or each image's first caption in ``texts``).

Which model: ``pl_module.backbone_for(batch)`` (an ``EvaluationSuite`` answers with the backbone of
the member the batch is routed to).
Explanations run under the trainer's precision (``bf16-mixed``, ``16-mixed``...), like the steps.

Every PNG shows the image and the map with a colour bar, under a title with the explained text,
the explainer, the item id and its task / dataloader (also in the PNG's ``Title`` text chunk and
in the map's JSON sidecar). Files go to ``<run dir>/explanations/<explainer>/<stage>/`` with an
``index.json`` there; TensorBoard tags are ``<stage>/explanations/<explainer>/<task>_dl<k>_<id>``
(the scheme of `xclip.engine.StageCallback`).
"""

from __future__ import annotations

from typing import Any

import torch

from xclip.engine import ReportsResults, StageCallback, default_explanation_inputs
from xclip.explain import EXPLAINERS, Explainer, GradECLIP
from xclip.explain.render import (
    explanation_figure,
    explanation_title,
    figure_to_array,
    save_map_npy,
    save_png,
    token_bar_chart,
)


class ExplanationCallback(StageCallback):
    """Explain the first `max_items` items of validate/test with any explainer.

    Args:
        explainer: a name in ``xclip.explain.EXPLAINERS`` (``grad_eclip``, ``grad_cam``, ``game``, ``random``).
        explainer_kwargs: constructor arguments of the explainer (e.g. ``{"mode": "reference"}``).
        max_items: items explained per stage (across all dataloaders).
        text_maps: also explain the texts (Grad-ECLIP only): token bar charts and word scores.
        dataloader_idx: only this dataloader (None: any).
        alpha: overlay opacity.
        panel_px: side of each panel of the PNG / TensorBoard images (small images are hard to
            read); the NPY maps stay at patch-grid resolution.
        subdir: folder under the log directory (the explainer's name is added below it).
    """

    workflow = "explanations"

    def __init__(
        self,
        explainer: str = "grad_eclip",
        explainer_kwargs: dict[str, Any] | None = None,
        max_items: int = 8,
        text_maps: bool = True,
        dataloader_idx: int | None = None,
        alpha: float = 0.5,
        panel_px: int = 192,
        subdir: str = "explanations",
    ):
        if explainer not in EXPLAINERS:
            raise ValueError(f"unknown explainer {explainer!r}; choose from {sorted(EXPLAINERS)}")
        if max_items < 0:
            raise ValueError("max_items must be >= 0")
        super().__init__(f"{subdir}/{EXPLAINERS[explainer].name}")
        self.explainer_name, self.explainer_kwargs = explainer, dict(explainer_kwargs or {})
        self.max_items, self.text_maps, self.dataloader_idx = max_items, text_maps, dataloader_idx
        self.alpha, self.panel_px = alpha, int(panel_px)
        self._explainers: dict[int, Explainer] = {}  # id(backbone) -> explainer (a suite may hold several)

    def on_batch(self, trainer, pl_module, outputs, batch, dataloader_idx: int, stage: str) -> None:
        remaining = self.max_items - len(self.records)
        if remaining <= 0:
            return
        if self.dataloader_idx is not None and dataloader_idx != self.dataloader_idx:
            return
        contract = isinstance(pl_module, ReportsResults)
        picked = pl_module.explanation_inputs(batch) if contract else default_explanation_inputs(batch)
        if picked is None:
            return
        images, texts, ids = picked
        images, texts, ids = images[:remaining], list(texts[:remaining]), list(ids[:remaining])
        if not len(texts):
            return
        backbone = pl_module.backbone_for(batch) if contract else getattr(pl_module, "backbone", None)
        if backbone is None:
            raise AttributeError(
                f"{type(pl_module).__name__} has no `backbone`: the explanation callbacks "
                "need a module that wraps an xclip backbone"
            )
        explainer = self._explainer_for(backbone, trainer)
        # validate/test run under inference_mode; explanations need autograd on fresh tensors
        with torch.inference_mode(False), torch.enable_grad():
            images01 = images.detach().clone()
            model_in = backbone.normalize(images01.to(backbone.device))
            maps = explainer.pair_maps(model_in, texts).cpu()  # [n, gh, gw]: image i with text i
            words = None
            if self.text_maps and isinstance(explainer, GradECLIP):
                tm = explainer.text_maps(model_in, texts)
                words = [tm.word_pairs(i, i) for i in range(len(texts))]
        where = f"{batch.get('task', 'batch')} / dl {dataloader_idx}"
        self._emit(trainer, stage, dataloader_idx, where, explainer.name, images01.cpu(), texts, ids, maps, words)

    def _explainer_for(self, backbone, trainer) -> Explainer:
        """One explainer per backbone, running under the trainer's precision."""
        key = id(backbone)
        if key not in self._explainers or self._explainers[key].backbone is not backbone:
            self._explainers[key] = EXPLAINERS[self.explainer_name](
                backbone, precision=str(trainer.precision), **self.explainer_kwargs
            )
        return self._explainers[key]

    def _emit(self, trainer, stage, dataloader_idx, where, name, images01, texts, ids, maps, words) -> None:
        out_dir = self.stage_dir(trainer, stage)
        task = where.split(" / ")[0]
        for i, (text, item_id) in enumerate(zip(texts, ids)):
            stem = f"{stage}_{task}_dl{dataloader_idx}_{item_id}"
            title = explanation_title(text, name, item_id, where)
            info = {
                "text": text,
                "explainer": name,
                "item_id": item_id,
                "task": task,
                "dataloader_idx": dataloader_idx,
                "title": title,
            }
            npy, _ = save_map_npy(
                maps[i].numpy(), out_dir / f"{stem}.npy", image_size=tuple(images01.shape[-2:]), extra=info
            )
            panel = figure_to_array(
                explanation_figure(images01[i], maps[i].numpy(), title, alpha=self.alpha, panel_px=self.panel_px)
            )
            png = save_png(panel, out_dir / f"{stem}.png", text={"Title": title})
            record = {
                "id": item_id,
                "stage": stage,
                "task": task,
                "dataloader_idx": dataloader_idx,
                "text": text,
                "title": title,
                "png": str(png.relative_to(out_dir)),
                "npy": str(npy.relative_to(out_dir)),
                "map_max": float(maps[i].max()),
                "all_zero": bool(maps[i].max() <= 0),
            }
            chart = None
            if words is not None:
                record["words"] = words[i]
                fig = token_bar_chart([w for w, _ in words[i]], [s for _, s in words[i]], title=title)
                chart = figure_to_array(fig)
                record["token_png"] = str(
                    save_png(chart, out_dir / f"{stem}_tokens.png", text={"Title": title}).relative_to(out_dir)
                )
            self.log_image(trainer, stage, name, f"{task}_dl{dataloader_idx}_{item_id}", panel)
            if chart is not None:
                self.log_image(trainer, stage, name, f"{task}_dl{dataloader_idx}_{item_id}_tokens", chart)
            self.records.append(record)

    def index_payload(self, trainer, stage: str) -> dict[str, Any]:
        return {
            "explainer": EXPLAINERS[self.explainer_name].name,
            "precision": str(trainer.precision),
            "all_zero_maps": sum(r["all_zero"] for r in self.records),
        }


class GradECLIPCallback(ExplanationCallback):
    """Grad-ECLIP image maps and word scores (see `ExplanationCallback`)."""

    def __init__(self, max_items: int = 8, mode: str = "model", text_maps: bool = True, **kwargs):
        super().__init__(
            explainer="grad_eclip", explainer_kwargs={"mode": mode}, max_items=max_items, text_maps=text_maps, **kwargs
        )


class CAMCallback(ExplanationCallback):
    """Grad-CAM maps on the last block's ln_1 (or `layer="block_input"`), see `ExplanationCallback`."""

    def __init__(self, max_items: int = 8, layer: str = "ln_1", **kwargs):
        super().__init__(
            explainer="grad_cam", explainer_kwargs={"layer": layer}, max_items=max_items, text_maps=False, **kwargs
        )
