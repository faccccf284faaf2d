"""`CIRExplanationCallback`: explanations A-D of a few queries' top-k candidates after each
validate/test epoch, to TensorBoard and to ``explanations/cir/`` (PNG, NPY, JSON)."""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import torch

from xclip.cir.explain import CIRExplainer
from xclip.cir.report import write_query_explanation
from xclip.io import atomic_write_text
from xclip.results import run_directory


class CIRExplanationCallback(pl.Callback):
    """Explain the first `n_queries` queries of the epoch with their `top_k` candidates.

    Reads what `CIRModule` leaves after an epoch (``rankings[method]``, ``benchmark``, ``backbone``,
    ``phi``), so it runs in ``on_validation_end`` / ``on_test_end``. Each query gets one batched
    explanation (`CIRExplainer`); its files go to ``<run>/explanations/cir/<stage>/<query id>/``
    with an ``index.json`` over all queries; TensorBoard tags are
    ``explain/cir/<stage>/<query id>/<panel>``.

    Args:
        n_queries: queries explained per stage (the first ones by query index).
        top_k: candidates per query (reference removed, as in the ranking the metrics use).
        method: whose ranking supplies the candidates (``searle``).
        subdir: folder under the run directory.
    """

    def __init__(self, n_queries: int = 4, top_k: int = 5, method: str = "searle", subdir: str = "explanations/cir"):
        if n_queries < 0 or top_k < 1:
            raise ValueError(f"n_queries must be >= 0 and top_k >= 1, got {n_queries} and {top_k}")
        self.n_queries, self.top_k, self.method, self.subdir = n_queries, top_k, method, subdir

    def _explain(self, trainer: pl.Trainer, module: Any, stage: str) -> None:
        if not trainer.is_global_zero or self.n_queries == 0 or self.method not in getattr(module, "rankings", {}):
            return
        if getattr(module, "phi", None) is None:
            raise ValueError("CIRExplanationCallback needs a module with phi (method 'searle')")
        bench, bb = module.benchmark, module.backbone
        query_index, ranked = module.rankings[self.method]
        reference_index, target_index = bench.reference_index(), bench.target_index()
        explainer = CIRExplainer(bb, module.phi, precision=str(trainer.precision))
        out = run_directory(trainer) / self.subdir / stage
        experiments = [lg.experiment for lg in trainer.loggers if hasattr(getattr(lg, "experiment", None), "add_image")]
        index = []
        for row in range(min(self.n_queries, len(query_index))):  # a few queries; each one is batched
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
                ex = explainer.explain(bb.normalize(ref01[None].to(bb.device)), caption, bb.normalize(cand01.to(bb.device)))
            ranks = [1 + i for i in range(len(cands))]
            entry, panels = write_query_explanation(
                out, query.query_id or str(q), caption, ref01, bench.reference_path(q), cand01,
                [bench.gallery_path(g) for g in cands], ranks, ex, [g == int(target_index[q]) for g in cands])
            index.append(entry)
            for name, panel in panels:
                for exp in experiments:
                    exp.add_image(f"explain/cir/{stage}/{query.query_id or q}/{name}", panel, trainer.global_step,
                                  dataformats="HWC")
        if index:
            atomic_write_text(out / "index.json", json.dumps(index, indent=2))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._explain(trainer, pl_module, "val")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._explain(trainer, pl_module, "test")
