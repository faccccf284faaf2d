"""`CIREvaluation`: the validate/test side shared by `CIRModule` and phi's training module.

It embeds the gallery (``cir_gallery`` batches; through the embedding cache when ``cache_dir`` is
set) and the queries (``cir_query`` batches; `query_features` is the subclass's method), gathers
both across processes keyed by index (a distributed sampler's repeats are dropped), ranks, scores
with the dataset's official metrics (`xclip.cir.scoring`) and, on a split with hidden targets,
writes the test-submission files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from xclip.backbones import Backbone, resolve_backbone
from xclip.cir.benchmark import CIRBenchmark
from xclip.cir.scoring import (
    DEFAULT_KS,
    benchmark_metrics,
    per_category_recall,
    rank_queries,
    write_submissions,
)
from xclip.data.embedding_cache import (
    EmbeddingCache,
    GalleryEmbeddings,
    weights_fingerprint,
)
from xclip.metrics import gather_objects, unique_rows
from xclip.results import ReportRow, run_directory

log = logging.getLogger(__name__)

METHOD_NAMES = {
    "searle": "SEARLE (phi)",
    "searle_oti": "SEARLE-OTI",
    "image": "image only",
    "text": "text only",
    "image_text": "image + text (sum)",
}


class KeyedRows(Metric):
    """Rows keyed by an integer index, with named [B, D] columns; ``ordered()`` returns the rows
    sorted by index, each index once (the first copy), across processes inside ``sync_context``."""

    full_state_update = False

    def __init__(self, names: Sequence[str], **kwargs):
        super().__init__(**kwargs)
        self.names = tuple(names)
        self.add_state("index", default=[], dist_reduce_fx="cat")
        for name in self.names:
            self.add_state(f"col_{name}", default=[], dist_reduce_fx="cat")

    def update(self, index: Tensor, **columns: Tensor) -> None:
        if set(columns) != set(self.names):
            raise ValueError(f"KeyedRows needs the columns {sorted(self.names)}, got {sorted(columns)}")
        self.index.append(index.detach().long())
        for name, value in columns.items():
            getattr(self, f"col_{name}").append(value.detach().float())

    def ordered(self) -> tuple[Tensor, dict[str, Tensor]]:
        # states are lists of batches, or one tensor once synced across processes
        if isinstance(self.index, list) and not self.index:
            return torch.zeros(0, dtype=torch.long), {}
        index = dim_zero_cat(self.index).reshape(-1)
        cols = {name: dim_zero_cat(getattr(self, f"col_{name}")) for name in self.names}
        if index.numel() == 0:
            return index, {}
        cols = {name: value.reshape(index.numel(), -1) for name, value in cols.items()}
        rows = unique_rows({"index": index, **cols}, ("index",))
        order = rows["index"].argsort()
        return rows["index"][order], {name: rows[name][order] for name in self.names}

    def compute(self) -> Tensor:
        return torch.tensor(float(len(self.ordered()[0])))


class CIREvaluation(pl.LightningModule):
    """Eval-side machinery for CIR (see the module docstring). Subclasses set ``self.methods`` and
    implement ``query_features(features [B, D] unnormalised, batch) -> {method: [B, D] normalised}``.

    After a validate/test epoch: ``self.metrics`` (``{method: {metric: fraction}}``),
    ``self.rankings`` (``{method: (query_index [Q'], ranked gallery indices [Q', N])}``),
    ``self.gallery`` (:class:`GalleryEmbeddings` of the gallery seen), ``self.benchmark``.
    """

    def __init__(self, backbone: str | Backbone, methods: Sequence[str], ks: Sequence[int] | None = None,
                 cache_dir: str | None = None, submission_name: str = "submission"):
        super().__init__()
        self.backbone, self.backbone_spec = resolve_backbone(backbone)
        self.backbone.eval().requires_grad_(False)
        unknown = [m for m in methods if m not in METHOD_NAMES]
        if unknown or not methods:
            raise ValueError(f"unknown CIR methods {unknown}: choose from {sorted(METHOD_NAMES)}")
        self.methods = tuple(methods)
        self.ks = tuple(ks) if ks else None
        self.cache_dir, self.submission_name = cache_dir, submission_name
        self.gallery_rows = KeyedRows(("emb",))
        self.query_rows = KeyedRows(self.methods)
        self.benchmark: CIRBenchmark | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.per_kind: dict[str, dict[str, float]] = {}
        self.per_kind_subset: dict[str, dict[str, float]] = {}
        self.rankings: dict[str, tuple[Tensor, Tensor]] = {}
        self.gallery: GalleryEmbeddings | None = None
        self.submissions: list[str] = []
        self._skipped: dict[str, list[str]] = {"gallery": [], "query": []}
        self.skipped: dict[str, list[str]] = {"gallery": [], "query": []}
        self._cache: EmbeddingCache | None = None
        self._cached: GalleryEmbeddings | None = None

    # ---- what subclasses provide -----------------------------------------------------------
    def query_features(self, features: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        raise NotImplementedError

    # ---- embedding -------------------------------------------------------------------------
    def image_features(self, images01: Tensor) -> Tensor:
        """[B, 3, S, S] in [0, 1] -> unnormalised image features [B, D] (phi's input)."""
        return self.backbone.encode_image(self.backbone.normalize(images01.to(self.device))).float()

    # ---- setup and cache -------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        data = getattr(self.trainer, "datamodule", None)
        split = "test" if stage == "test" else "val"
        self.benchmark = data.benchmark_for(split) if hasattr(data, "benchmark_for") else None
        self._cache, self._cached = None, None
        if self.cache_dir is None or self.benchmark is None:
            return
        self._cache = EmbeddingCache(self.cache_dir, self.cache_key())
        cached = self._cache.load(self.benchmark.gallery_keys, [])
        if self.trainer.strategy.reduce_boolean_decision(cached is not None, all=True):
            self._cached = cached
        if hasattr(data, "skip_gallery_images"):
            data.skip_gallery_images = self._cached is not None

    def cache_key(self) -> dict[str, Any]:
        """The gallery embeddings depend on: model spec and weights, preprocessing, precision, gallery."""
        return {"kind": "cir-gallery", "backbone": self.backbone_spec,
                "weights_sha256": weights_fingerprint(self.backbone),
                "preprocess": self.backbone.preprocess_cfg.to_dict(), "precision": str(self.trainer.precision),
                "gallery": self.benchmark.fingerprint()}

    # ---- steps -----------------------------------------------------------------------------
    def _skip(self, batch: dict[str, Any], kind: str) -> bool:
        self._skipped[kind].extend(batch.get("skipped_paths", []))
        return "index" not in batch or (kind == "gallery" and "image" not in batch) or \
            (kind == "query" and "reference" not in batch)

    def gallery_step(self, batch: dict[str, Any]) -> None:
        if self._cached is not None or batch.get("cached") or self._skip(batch, "gallery"):
            return
        emb = F.normalize(self.image_features(batch["image"]), dim=-1)
        self.gallery_rows.update(batch["index"], emb=emb)

    def query_step(self, batch: dict[str, Any]) -> None:
        if self._skip(batch, "query"):
            return
        feats = self.query_features(self.image_features(batch["reference"]), batch)
        self.query_rows.update(batch["index"], **feats)

    def eval_step(self, batch: dict[str, Any]) -> None:
        task = batch.get("task")
        if task == "cir_gallery":
            self.gallery_step(batch)
        elif task == "cir_query":
            self.query_step(batch)
        else:
            raise ValueError(f"{type(self).__name__} evaluates 'cir_gallery' and 'cir_query' batches, got {task!r}")

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        with torch.no_grad():
            self.eval_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        with torch.no_grad():
            self.eval_step(batch)

    # ---- epoch end -------------------------------------------------------------------------
    def _gathered(self, rows: KeyedRows) -> tuple[Tensor, dict[str, Tensor]]:
        if not self.trainer.strategy.reduce_boolean_decision(rows.update_called, all=False):
            return torch.zeros(0, dtype=torch.long), {}
        with rows.sync_context():
            return rows.ordered()

    def finish(self, stage: str) -> None:
        """Gather, rank, score, log (``{stage}/{method}/{metric}``), write submissions."""
        bench = self.benchmark
        g_index, g_cols = (self._cached.image_index, {"emb": self._cached.image_emb}) if self._cached is not None \
            else self._gathered(self.gallery_rows)
        q_index, q_cols = self._gathered(self.query_rows)
        self.gallery_rows.reset()
        self.query_rows.reset()
        self.skipped = {k: sorted({p for part in gather_objects(v) for p in part}) for k, v in self._skipped.items()}
        self._skipped = {"gallery": [], "query": []}
        self.metrics, self.per_kind, self.per_kind_subset, self.rankings, self.submissions = {}, {}, {}, {}, []
        if bench is None or not g_cols or not q_cols or self.trainer.sanity_checking:
            return  # (the sanity check sees a few batches: no full gallery to rank)
        self.gallery = GalleryEmbeddings(g_cols["emb"].cpu(), torch.zeros(0, g_cols["emb"].shape[1]),
                                         torch.zeros(0, dtype=torch.long), g_index.cpu())
        scored = bench.has_targets()
        for method in self.methods:
            top = None if bench.name in ("shapes", "cirr") else max(self.ks or DEFAULT_KS[bench.name])
            ranked = rank_queries(bench, q_index.cpu(), q_cols[method].cpu(), g_index.cpu(), g_cols["emb"].cpu(), top)
            self.rankings[method] = (q_index.cpu(), ranked)
            if scored:
                self.metrics[method] = benchmark_metrics(bench, q_index.cpu(), ranked, self.ks)
                if bench.name == "shapes":
                    self.per_kind[method] = per_category_recall(bench, q_index.cpu(), ranked, 1)
                    self.per_kind_subset[method] = per_category_recall(bench, q_index.cpu(), ranked, 1, subset=True)
                for name, value in self.metrics[method].items():
                    # identical on every process (computed from the gathered rows)
                    self.log(f"{stage}/{method}/{name}", value, sync_dist=True)
            elif self.trainer.is_global_zero:
                out = run_directory(self.trainer) / "submissions"
                paths = write_submissions(bench, q_index.cpu(), ranked, out, f"{self.submission_name}_{method}")
                self.submissions.extend(str(p) for p in paths)
        if self._cached is None and self._cache is not None and self.trainer.is_global_zero \
                and g_index.numel() == bench.n_gallery:
            self._cache.save(self.gallery, bench.gallery_keys, [])

    def on_validation_epoch_end(self) -> None:
        self.finish("val")

    def on_test_epoch_end(self) -> None:
        self.finish("test")

    # ---- reporting -------------------------------------------------------------------------
    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """One console row per method and stage (columns: the metrics)."""
        rows = []
        bench = self.benchmark
        where = f"{bench.name} {bench.split}, {len(bench)} queries x {bench.n_gallery} images" if bench else ""
        for stage in ("val", "test"):
            for method in self.methods:
                # the metric functions' own order (R@1, R@5, ...), not the alphabetical one
                keys = [f"{stage}/{method}/{name}" for name in self.metrics.get(method, {})
                        if f"{stage}/{method}/{name}" in metrics]
                if keys:
                    rows.append(ReportRow("composed image retrieval", f"{METHOD_NAMES[method]} [{stage}; {where}]",
                                          {k.split("/", 2)[2]: metrics[k] for k in keys}, keys))
        return rows

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json under ``cir``."""
        bench, cache = self.benchmark, self._cache
        return {"backbone": self.backbone_spec, "cir": {
            "benchmark": None if bench is None else {"name": bench.name, "split": bench.split, "queries": len(bench),
                                                     "gallery": bench.n_gallery},
            "metrics": self.metrics, "recall_at_1_per_kind": self.per_kind,
            "subset_recall_at_1_per_kind": self.per_kind_subset,
            "chance": bench.subset_chance() if hasattr(bench, "subset_chance") else {}, "submissions": self.submissions,
            "skipped": self.skipped,
            "embedding_cache": None if cache is None else {"dir": str(Path(cache.dir)), "status": cache.status}}}
