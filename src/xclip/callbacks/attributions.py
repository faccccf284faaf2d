"""Attribution callbacks (SHAP, Integrated Gradients) for any multimodal module: explain the first
items of validate/test for every output head, log the overlays and token charts to TensorBoard and
write PNG / NPY / JSON next to the run's metrics.

The module implements `xclip.explain.multimodal.MultimodalExplainable` (``attribution_targets()``
and ``attribution_inputs(batch)``), e.g. `xclip.distill.TeacherModule` / `StudentModule`. Both
callbacks work on a restored checkpoint (``xclip validate --config ... --ckpt_path ...``): they
need no training state.

Per item and output head (``task``), in ``<run dir>/explanations/<explainer>/<stage>/``:
``<task>_<id>.png`` (the image, the |attribution| summed over channels over it, colour bar, raw
maximum, titled with the text, explainer, item and explained class), ``<task>_<id>_tokens.png``
(word scores: sub-words merged, special tokens dropped; a legend says which sign pushes towards the
explained class), the raw map as ``.npy`` + JSON sidecar, and one record in ``index.json`` with
the item's dataset index
and image file (``path``; null for generated items), the per-modality totals, the modality share,
the completeness gap(s) and the word scores. ``<id>`` is the image file's name (without suffix;
``-<index>`` added when two explained items share one) or, for an item without a file, its
dataset index (see `xclip.explain.multimodal.item_id`). TensorBoard tags:
``<stage>/explanations/<explainer>/<task>_<id>`` and ``..._tokens`` (`xclip.engine.StageCallback`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from xclip.engine import StageCallback
from xclip.explain.captum_explainers import CaptumExplainer
from xclip.explain.multimodal import MultimodalAttribution, MultimodalExplainable, MultimodalInputs, merge_subwords
from xclip.explain.render import (
    explanation_title,
    figure_to_array,
    panels_figure,
    save_map_npy,
    save_png,
    token_bar_chart,
)
from xclip.explain.shap_explainer import SHAPExplainer


def item_seed(seed: int, index: int) -> int:
    """The per-item seed of an explanation from the item's dataset index: the same item gets the
    same draws in any batch."""
    return seed * 100_003 + int(index)


def item_indexes(inputs: MultimodalInputs) -> list[int]:
    """The items' dataset indices (their positions in the batch when the module gives none)."""
    return list(inputs.indexes) if inputs.indexes is not None else list(range(len(inputs)))


class AttributionCallback(StageCallback):
    """Base of `SHAPCallback` and `CaptumCallback`: explain up to `max_items` items per stage.

    Args:
        max_items: items explained per stage (each for every task in `tasks`).
        tasks: output heads to explain (None: all the module's).
        classes: ``"predicted"`` (each item's arg-max class) or ``"all"`` (one map per class).
        cell: None: maps at pixel resolution; an int: |attribution| summed over cell x cell pixel
            blocks (e.g. the patch size) in the NPY and the figure.
        alpha, panel_px: overlay opacity and panel size of the figures.
        subdir: folder under the run directory (``<subdir>/<explainer>/``).
        seed: seeds the per-item draws (SHAP) and the background sample.
    """

    name = "attribution"
    workflow = "explanations"

    def __init__(
        self,
        max_items: int = 4,
        tasks: list[str] | None = None,
        classes: str = "predicted",
        cell: int | None = None,
        alpha: float = 0.5,
        panel_px: int = 192,
        subdir: str = "explanations",
        seed: int = 0,
    ):
        if max_items < 0:
            raise ValueError("max_items must be >= 0")
        if classes not in ("predicted", "all"):
            raise ValueError(f"classes must be 'predicted' or 'all', got {classes!r}")
        super().__init__(f"{subdir}/{self.name}")
        self.max_items, self.tasks, self.classes, self.cell = int(max_items), tasks, classes, cell
        self.alpha, self.panel_px, self.seed = alpha, int(panel_px), int(seed)
        self._explained = 0
        self._names: dict[str, int] = {}  # file name id -> the dataset index it was given to (this stage)

    # ---- what subclasses provide -----------------------------------------------------------------
    def prepare(self, trainer, pl_module) -> None:
        """Once per stage, before the first batch (e.g. draw the SHAP background)."""

    def explain(self, target, inputs: MultimodalInputs, classes, trainer) -> MultimodalAttribution:
        raise NotImplementedError

    def start(self, trainer, pl_module, stage: str) -> None:
        self._explained, self._names = 0, {}
        if not isinstance(pl_module, MultimodalExplainable):
            raise TypeError(
                f"{type(self).__name__} needs a module with attribution_targets() and "
                f"attribution_inputs(batch); {type(pl_module).__name__} has not"
            )
        if self.max_items and trainer.is_global_zero:
            self.prepare(trainer, pl_module)

    # ---- work ------------------------------------------------------------------------------------
    def on_batch(self, trainer, pl_module, outputs, batch, dataloader_idx: int, stage: str) -> None:
        remaining = self.max_items - self._explained
        if remaining <= 0:
            return
        inputs = pl_module.attribution_inputs(batch)
        if inputs is None or not len(inputs):
            return
        inputs = inputs.select(slice(0, remaining))
        self._explained += len(inputs)
        targets = pl_module.attribution_targets()
        for task in self.tasks or list(targets):
            if task not in targets:
                raise KeyError(f"{type(self).__name__}: unknown task {task!r}; the module explains {sorted(targets)}")
            attribution = self.explain(
                targets[task], inputs, "predicted" if self.classes == "predicted" else None, trainer
            )
            self._emit(trainer, stage, targets[task].class_names, inputs, attribution)

    def _emit(
        self, trainer, stage: str, class_names: list[str], inputs: MultimodalInputs, attribution: MultimodalAttribution
    ) -> None:
        name, task = attribution.explainer, attribution.target
        out_dir = self.stage_dir(trainer, stage)
        images01 = inputs.images01.detach().float().cpu()
        image_size = (images01.shape[-2], images01.shape[-1])
        indexes = item_indexes(inputs)
        paths = inputs.paths if inputs.paths is not None else [None] * len(inputs)
        ids = [self._unique_id(item, index) for item, index in zip(inputs.ids, indexes)]
        for slot in range(attribution.classes.shape[1]):
            maps = attribution.image_map(slot, self.cell)
            token_scores = attribution.token_scores(slot)
            totals = attribution.modality_totals(slot)
            for i, item_id in enumerate(ids):
                cls = int(attribution.classes[i, slot])
                cls_name = class_names[cls] if cls < len(class_names) else str(cls)
                suffix = "" if attribution.classes.shape[1] == 1 else f"_c{cls}"
                stem = f"{task}_{item_id}{suffix}"
                where = f"{stage} | task {task} | class {cls_name}"
                title = explanation_title(inputs.texts[i], name, item_id, where)
                n_tok = int(inputs.attention_mask[i].sum())
                words = merge_subwords(inputs.tokens[i][:n_tok], token_scores[i, :n_tok].tolist())
                info = {
                    "text": inputs.texts[i],
                    "explainer": name,
                    "item_id": item_id,
                    "index": indexes[i],
                    "path": paths[i],
                    "task": task,
                    "class": cls,
                    "class_name": cls_name,
                    "title": title,
                    "value": "|attribution| summed over channels",
                }
                npy, _ = save_map_npy(maps[i].numpy(), out_dir / f"{stem}.npy", image_size, extra=info)
                panel = figure_to_array(
                    panels_figure(
                        [("image", images01[i], None), (f"|{name}| for {cls_name}", images01[i], maps[i].numpy())],
                        title,
                        alpha=self.alpha,
                        panel_px=self.panel_px,
                    )
                )
                png = save_png(panel, out_dir / f"{stem}.png", text={"Title": title})
                chart = figure_to_array(
                    token_bar_chart(
                        [w for w, _ in words],
                        [s for _, s in words],
                        title=title,
                        legend=(f"towards {cls_name!r}", f"away from {cls_name!r}"),
                    )
                )
                token_png = save_png(chart, out_dir / f"{stem}_tokens.png", text={"Title": title})
                record = {
                    **info,
                    "stage": stage,
                    "png": png.name,
                    "token_png": token_png.name,
                    "npy": npy.name,
                    "output": float(attribution.output[i, slot]),
                    "references": {k: float(v[i, slot]) for k, v in attribution.references.items()},
                    "deltas": {k: float(v[i, slot]) for k, v in attribution.deltas.items()},
                    "totals": {k: float(v[i]) for k, v in totals.items()},
                    "words": [[w, s] for w, s in words],
                    "map_max": float(maps[i].max()),
                }
                self.records.append(record)
                self.log_image(trainer, stage, name, stem, panel)
                self.log_image(trainer, stage, name, f"{stem}_tokens", chart)

    def _unique_id(self, item_id: str, index: int) -> str:
        """`item_id`, or ``<item_id>-<index>`` when another item of this stage already has it (two rows
        with the same image file, or files of the same name in two folders)."""
        owner = self._names.setdefault(item_id, index)
        if owner == index:
            return item_id
        unique = f"{item_id}-{index}"
        self._names.setdefault(unique, index)
        return unique

    def index_payload(self, trainer, stage: str) -> dict[str, Any]:
        return {"explainer": self.records[0]["explainer"], "settings": self.settings()}

    def settings(self) -> dict[str, Any]:
        return {"max_items": self.max_items, "classes": self.classes, "cell": self.cell, "seed": self.seed}


class SHAPCallback(AttributionCallback):
    """SHAP expected gradients (`xclip.explain.SHAPExplainer`) with a background of
    `background_size` items sampled (seeded) from the validation data, also when testing.

    Args:
        nsamples, batch_size, engine: see `SHAPExplainer`.
        background_size: background rows (reference: 50).
        (the rest: see `AttributionCallback`)
    """

    name = "shap"

    def __init__(
        self, background_size: int = 50, nsamples: int = 200, batch_size: int = 50, engine: str = "batched", **kwargs
    ):
        super().__init__(**kwargs)
        if background_size < 1:
            raise ValueError("background_size must be >= 1")
        self.background_size, self.nsamples, self.batch_size, self.engine = (
            background_size,
            nsamples,
            batch_size,
            engine,
        )
        self.background: MultimodalInputs | None = None

    def prepare(self, trainer, pl_module) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "val_dataloader"):
            raise ValueError(
                "SHAPCallback samples its background from the validation data: run with a datamodule "
                "that has val_dataloader()"
            )
        loader = datamodule.val_dataloader()
        dataset = loader.dataset
        order = np.random.default_rng(self.seed).permutation(len(dataset))
        items = []
        for index in order:
            item = dataset[int(index)]
            if not item.get("unreadable"):
                items.append(item)
            if len(items) == self.background_size:
                break
        if not items:
            raise ValueError("no readable validation item for the SHAP background")
        batch = loader.collate_fn(items)
        self.background = pl_module.attribution_inputs(pl_module.transfer_batch_to_device(batch, pl_module.device, 0))

    def explain(self, target, inputs, classes, trainer) -> MultimodalAttribution:
        assert self.background is not None  # drawn in prepare, before the stage's first batch
        explainer = SHAPExplainer(
            target,
            self.background,
            nsamples=self.nsamples,
            batch_size=self.batch_size,
            seed=self.seed,
            engine=self.engine,
            precision=str(trainer.precision),
        )
        seeds = [item_seed(self.seed, index) for index in item_indexes(inputs)]
        return explainer.explain(inputs, classes, seeds=seeds)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "background_size": len(self.background) if self.background else 0,
            "nsamples": self.nsamples,
            "engine": self.engine,
        }


class CaptumCallback(AttributionCallback):
    """Integrated Gradients on the pixels and LayerIG on the text embedding layer
    (`xclip.explain.CaptumExplainer`), with the completeness delta of each path per item.

    Args:
        n_steps, method, internal_batch_size, image_baseline: see `CaptumExplainer`.
        (the rest: see `AttributionCallback`)
    """

    name = "integrated_gradients"

    def __init__(
        self,
        n_steps: int = 50,
        method: str = "gausslegendre",
        internal_batch_size: int | None = None,
        image_baseline: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.n_steps, self.method, self.internal_batch_size = n_steps, method, internal_batch_size
        self.image_baseline = image_baseline

    def explain(self, target, inputs, classes, trainer) -> MultimodalAttribution:
        return CaptumExplainer(
            target,
            n_steps=self.n_steps,
            method=self.method,
            internal_batch_size=self.internal_batch_size,
            image_baseline=self.image_baseline,
            precision=str(trainer.precision),
        ).explain(inputs, classes)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "n_steps": self.n_steps,
            "method": self.method,
            "internal_batch_size": self.internal_batch_size,
            "image_baseline": self.image_baseline,
        }
