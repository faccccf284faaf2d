"""`CIRExplanationCallback`: explanations A-D of a few queries' top-k candidates after each
validate/test epoch, to TensorBoard and to ``explanations/cir/<stage>/`` (PNG, NPY, JSON)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch

from xclip.cir.explain import CIRExplainer
from xclip.cir.report import write_query_explanation
from xclip.engine import StageCallback


class CIRExplanationCallback(StageCallback):
    """Explain the first `max_items` queries of the epoch with their `top_k` candidates.

    Reads what `CIRModule` leaves after an epoch (``rankings[method]``, ``benchmark``, ``backbone``,
    ``phi``), so it runs in ``on_validation_end`` / ``on_test_end``. Each query gets one batched
    explanation (`CIRExplainer`); its files go to ``<run>/explanations/cir/<stage>/<query id>/``
    with an ``index.json`` over all queries (``items``: one entry per query); TensorBoard tags are
    ``<stage>/cir/<panel>/<query id>``.

    Args:
        max_items: queries explained per stage (the first ones by query index).
        top_k: candidates per query (reference removed, as in the ranking the metrics use).
        method: whose ranking supplies the candidates (``searle``).
        subdir: folder under the run directory.
    """

    workflow = "cir"

    def __init__(self, max_items: int = 4, top_k: int = 5, method: str = "searle", subdir: str = "explanations/cir"):
        if max_items < 0 or top_k < 1:
            raise ValueError(f"max_items must be >= 0 and top_k >= 1, got {max_items} and {top_k}")
        super().__init__(subdir)
        self.max_items, self.top_k, self.method = max_items, top_k, method

    def end(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        if trainer.is_global_zero:
            self._explain(trainer, module, stage)
        self.write_index(trainer, stage)

    def _explain(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        if self.max_items == 0 or self.method not in getattr(module, "rankings", {}):
            return
        if getattr(module, "phi", None) is None:
            raise ValueError("CIRExplanationCallback needs a module with phi (method 'searle')")
        bench, bb = module.benchmark, module.backbone
        query_index, ranked = module.rankings[self.method]
        reference_index, target_index = bench.reference_index(), bench.target_index()
        explainer = CIRExplainer(bb, module.phi, precision=str(trainer.precision))
        out = self.stage_dir(trainer, stage)
        for row in range(min(self.max_items, len(query_index))):  # a few queries; each one is batched
            q = int(query_index[row])
            ref01 = bench.reference_image(q)
            if ref01 is None:
                continue
            cands = [int(g) for g in ranked[row] if int(g) >= 0 and int(g) != int(reference_index[q])][: self.top_k]
            images = [bench.gallery_image(g) for g in cands]
            kept = [(g, im) for g, im in zip(cands, images) if im is not None]
            if not kept:
                continue
            cands, cand01 = [g for g, _ in kept], torch.stack([im for _, im in kept])
            query = bench.queries[q]
            caption = " and ".join(query.captions)
            with torch.inference_mode(False):
                ex = explainer.explain(
                    bb.normalize(ref01[None].to(bb.device)), caption, bb.normalize(cand01.to(bb.device))
                )
            ranks = [1 + i for i in range(len(cands))]
            entry, panels = write_query_explanation(
                out,
                query.query_id or str(q),
                caption,
                ref01,
                bench.reference_path(q),
                cand01,
                [bench.gallery_path(g) for g in cands],
                ranks,
                ex,
                [g == int(target_index[q]) for g in cands],
            )
            self.records.append(entry)
            for name, panel in panels:
                self.log_image(trainer, stage, name, query.query_id or str(q), panel)
