"""`CIREvaluation`: the validate/test side shared by `CIRModule` and phi's training module.

It embeds the gallery (``cir_gallery`` batches; through the embedding cache when ``cache_dir`` is
set) and the queries (``cir_query`` batches; `query_features` is the subclass's method), gathers
both across processes keyed by index (a distributed sampler's repeats are dropped), ranks, scores
with the dataset's official metrics (`xclip.cir.scoring`) and, on a split with hidden targets,
writes the test-submission files. A query whose reference or target image cannot be read counts
as a miss (the denominator is every query); the report row and results.json say how many queries
were evaluated (``n_evaluated`` of ``n_queries``) and name the others.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.cir.benchmark import CIRBenchmark
from xclip.cir.scoring import (
    DEFAULT_KS,
    benchmark_metrics,
    coverage,
    coverage_note,
    full_rankings,
    per_category_recall,
    rank_queries,
    write_submissions,
)
from xclip.data.embedding_cache import (
    EmbeddingCache,
    GalleryEmbeddings,
    weights_fingerprint,
)
from xclip.engine import STAGES, EvaluationModule
from xclip.metrics import ScoreTable, gather_objects
from xclip.results import ReportRow, run_directory

log = logging.getLogger(__name__)

METHOD_NAMES = {
    "searle": "SEARLE (phi)",
    "searle_oti": "SEARLE-OTI",
    "image": "image only",
    "text": "text only",
    "image_text": "image + text (sum)",
}


class CIREvaluation(EvaluationModule):
    """Eval-side machinery for CIR (see the module docstring). Subclasses set ``self.methods`` and
    implement ``query_features(features [B, D] unnormalised, batch) -> {method: [B, D] normalised}``.

    After a validate/test epoch: ``self.metrics`` (``{method: {metric: fraction}}``),
    ``self.rankings`` (``{method: (query_index [Q'], ranked gallery indices [Q', N])}``),
    ``self.gallery`` (:class:`GalleryEmbeddings` of the gallery seen), ``self.coverage``
    (`xclip.cir.scoring.coverage`), ``self.benchmark``. Metrics are logged as
    ``{stage}/cir/{method}/{metric}``.
    """

    workflow = "cir"
    tasks = ("cir_gallery", "cir_query")

    def __init__(
        self,
        backbone: str | Backbone,
        methods: Sequence[str],
        ks: Sequence[int] | None = None,
        cache_dir: str | None = None,
        submission_name: str = "submission",
    ):
        super().__init__()
        self.backbone, self.backbone_spec = resolve_backbone(backbone)
        self.backbone.eval().requires_grad_(False)
        unknown = [m for m in methods if m not in METHOD_NAMES]
        if unknown or not methods:
            raise ValueError(f"unknown CIR methods {unknown}: choose from {sorted(METHOD_NAMES)}")
        self.methods = tuple(methods)
        self.ks = tuple(ks) if ks else None
        self.cache_dir, self.submission_name = cache_dir, submission_name
        self.gallery_rows = ScoreTable(int_columns=("index",), vector_columns=("emb",), unique_by=("index",), sort=True)
        self.query_rows = ScoreTable(
            int_columns=("index",), vector_columns=self.methods, unique_by=("index",), sort=True
        )
        self.benchmark: CIRBenchmark | None = None
        self.metrics: dict[str, dict[str, float]] = {}
        self.per_kind: dict[str, dict[str, float]] = {}
        self.per_kind_subset: dict[str, dict[str, float]] = {}
        self.rankings: dict[str, tuple[Tensor, Tensor]] = {}
        self.coverage: dict[str, Any] = {}
        self.gallery: GalleryEmbeddings | None = None
        self.submissions: list[str] = []
        self._skipped: dict[str, list[str]] = {"gallery": [], "query": []}
        self.skipped: dict[str, list[str]] = {"gallery": [], "query": []}
        self._unreadable_queries: list[int] = []  # indices of queries whose reference could not be read
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
        self.benchmark = data.benchmark_for(split) if data is not None and hasattr(data, "benchmark_for") else None
        self._cache, self._cached = None, None
        if self.cache_dir is None or self.benchmark is None:
            return
        self._cache = EmbeddingCache(self.cache_dir, self.cache_key(self.benchmark))
        cached = self._cache.load(self.benchmark.gallery_keys, [])
        if self.trainer.strategy.reduce_boolean_decision(cached is not None, all=True):
            self._cached = cached
        if data is not None and hasattr(data, "skip_gallery_images"):
            data.skip_gallery_images = self._cached is not None

    def cache_key(self, benchmark: CIRBenchmark) -> dict[str, Any]:
        """The gallery embeddings depend on: model spec and weights, preprocessing, precision, gallery."""
        return {
            "kind": "cir-gallery",
            "backbone": self.backbone_spec,
            "weights_sha256": weights_fingerprint(self.backbone),
            "preprocess": self.backbone.preprocess_cfg.to_dict(),
            "precision": str(self.trainer.precision),
            "gallery": benchmark.fingerprint(),
        }

    # ---- steps -----------------------------------------------------------------------------
    def _skip(self, batch: dict[str, Any], kind: str) -> bool:
        self._skipped[kind].extend(batch.get("skipped_paths", []))
        if kind == "query" and "skipped_index" in batch:
            self._unreadable_queries.extend(int(i) for i in batch["skipped_index"])
        return (
            "index" not in batch
            or (kind == "gallery" and "image" not in batch)
            or (kind == "query" and "reference" not in batch)
        )

    def gallery_step(self, batch: dict[str, Any]) -> None:
        if self._cached is not None or batch.get("cached") or self._skip(batch, "gallery"):
            return
        emb = F.normalize(self.image_features(batch["image"]), dim=-1)
        self.gallery_rows.update(index=batch["index"], emb=emb)

    def query_step(self, batch: dict[str, Any]) -> None:
        if self._skip(batch, "query"):
            return
        feats = self.query_features(self.image_features(batch["reference"]), batch)
        self.query_rows.update(index=batch["index"], **feats)

    def step(self, batch: dict[str, Any], stage: str) -> None:
        with torch.no_grad():
            if batch["task"] == "cir_gallery":
                self.gallery_step(batch)
            else:
                self.query_step(batch)

    # ---- epoch end -------------------------------------------------------------------------
    def _gathered(self, rows: ScoreTable) -> tuple[Tensor, dict[str, Tensor]]:
        """(item index [N] sorted, column -> [N, D]) of every process, each item once."""
        table = rows.gathered_rows(self.trainer.strategy)
        if table is None or table["index"].numel() == 0:
            return torch.zeros(0, dtype=torch.long), {}
        return table["index"], {name: table[name] for name in rows.vector_columns}

    def finish(self, stage: str) -> None:
        """Gather, rank, score, log (``{stage}/cir/{method}/{metric}``), write submissions."""
        bench = self.benchmark
        g_index, g_cols = (
            (self._cached.image_index, {"emb": self._cached.image_emb})
            if self._cached is not None
            else self._gathered(self.gallery_rows)
        )
        q_index, q_cols = self._gathered(self.query_rows)
        self.gallery_rows.reset()
        self.query_rows.reset()
        self.skipped = {k: sorted({p for part in gather_objects(v) for p in part}) for k, v in self._skipped.items()}
        self._skipped = {"gallery": [], "query": []}
        unreadable_queries = sorted({i for part in gather_objects(self._unreadable_queries) for i in part})
        self._unreadable_queries = []
        self.metrics, self.per_kind, self.per_kind_subset, self.rankings, self.submissions = {}, {}, {}, {}, []
        self.coverage = {}
        if bench is None or self.trainer.sanity_checking:
            return  # (the sanity check sees a few batches: no full gallery to rank)
        if not g_cols or not q_cols:
            kind = "gallery" if not g_cols else "query reference"
            skipped = self.skipped["gallery" if not g_cols else "query"]
            raise ValueError(
                f"{bench.name} {bench.split}: no {kind} image could be read ({len(skipped)} unreadable, "
                f"e.g. {', '.join(skipped[:3])}): check the dataset root and the image files"
            )
        q_index, g_index = q_index.cpu(), g_index.cpu()
        self._check_finite(bench, g_index, g_cols["emb"], q_index, q_cols)
        self.gallery = GalleryEmbeddings(
            g_cols["emb"].cpu(), torch.zeros(0, g_cols["emb"].shape[1]), torch.zeros(0, dtype=torch.long), g_index
        )
        self.coverage = coverage(bench, q_index, g_index, unreadable_queries)
        if coverage_note(self.coverage):
            log.warning("%s %s: %s", bench.name, bench.split, coverage_note(self.coverage))
        scored = bench.has_targets()
        for method in self.methods:
            top = None if bench.name in ("shapes", "cirr") else max(self.ks or DEFAULT_KS[bench.name])
            ranked = rank_queries(bench, q_index, q_cols[method].cpu(), g_index, g_cols["emb"].cpu(), top)
            self.rankings[method] = (q_index, ranked)
            if scored:
                self.metrics[method] = benchmark_metrics(bench, q_index, ranked, self.ks, gallery_index=g_index)
                if bench.name == "shapes":
                    self.per_kind[method] = per_category_recall(bench, q_index, ranked, 1)
                    self.per_kind_subset[method] = per_category_recall(bench, q_index, ranked, 1, subset=True)
                for name, value in self.metrics[method].items():
                    self.log_metric(stage, f"{method}/{name}", value)  # from the gathered rows: same everywhere
            elif self.trainer.is_global_zero:
                # every query id is written; one that was not evaluated gets an empty list (named in results.json)
                out = run_directory(self.trainer) / "submissions"
                paths = write_submissions(
                    bench,
                    torch.arange(len(bench)),
                    full_rankings(len(bench), q_index, ranked),
                    out,
                    f"{self.submission_name}_{method}",
                )
                self.submissions.extend(str(p) for p in paths)
        if (
            self._cached is None
            and self._cache is not None
            and self.trainer.is_global_zero
            and g_index.numel() == bench.n_gallery
        ):
            self._cache.save(self.gallery, bench.gallery_keys, [])

    def _check_finite(
        self, bench: CIRBenchmark, g_index: Tensor, g_emb: Tensor, q_index: Tensor, q_cols: Mapping[str, Tensor]
    ) -> None:
        """Refuse NaN / infinite embeddings, naming the gallery files or query ids (a NaN cosine
        would rank that image first for every query)."""
        precision = f"the precision ({self.trainer.precision})"
        bad = g_index[~torch.isfinite(g_emb.cpu()).all(1)].tolist()
        if bad:
            raise ValueError(
                f"{bench.name} {bench.split}: the model gave NaN or infinite embeddings for {len(bad)} "
                f"gallery images, e.g. {', '.join(bench.gallery_path(i) for i in bad[:3])}: check the "
                f"weights, {precision} and these files"
            )
        for method, emb in q_cols.items():
            bad = q_index[~torch.isfinite(emb.cpu()).all(1)].tolist()
            if bad:
                ids = [bench.queries[i].query_id or str(i) for i in bad[:5]]
                raise ValueError(
                    f"{bench.name} {bench.split}: method {method!r} gave NaN or infinite query features "
                    f"for {len(bad)} queries (ids {', '.join(ids)}; e.g. reference "
                    f"{bench.reference_path(bad[0])}): check the weights (phi too) and {precision}"
                )

    # ---- reporting -------------------------------------------------------------------------
    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """One console row per method and stage (columns: the metrics)."""
        rows = []
        bench = self.benchmark
        where = f"{bench.name} {bench.split}, {len(bench)} queries x {bench.n_gallery} images" if bench else ""
        cov = self.coverage
        if bench and coverage_note(cov):  # short here; the full note is logged and in results.json
            missed = len(cov["not_evaluated"]["unreadable_reference"]) + len(cov["not_evaluated"]["not_loaded"])
            where = (
                f"{bench.name} {bench.split}, {cov['n_evaluated']} of {cov['n_queries']} queries evaluated x "
                f"{cov['n_gallery_read']} of {cov['n_gallery']} images read; misses: {missed} not evaluated, "
                f"{len(cov['target_not_read'])} target not read"
            )
        for stage in STAGES:
            for method in self.methods:
                # the metric functions' own order (R@1, R@5, ...), not the alphabetical one
                names = [n for n in self.metrics.get(method, {}) if self.metric_key(stage, f"{method}/{n}") in metrics]
                keys = [self.metric_key(stage, f"{method}/{n}") for n in names]
                if keys:
                    rows.append(
                        ReportRow(
                            "composed image retrieval",
                            f"{METHOD_NAMES[method]} [{stage}; {where}]",
                            {n: metrics[k] for n, k in zip(names, keys)},
                            keys,
                        )
                    )
        return rows

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json under ``cir``."""
        bench, cache = self.benchmark, self._cache
        return {
            **super().extra_results(),
            "cir": {
                "benchmark": None
                if bench is None
                else {
                    "name": bench.name,
                    "split": bench.split,
                    **(self.coverage or {"n_queries": len(bench), "n_gallery": bench.n_gallery}),
                },
                "metrics": self.metrics,
                "recall_at_1_per_kind": self.per_kind,
                "subset_recall_at_1_per_kind": self.per_kind_subset,
                "chance": bench.subset_chance() if bench is not None and hasattr(bench, "subset_chance") else {},
                "submissions": self.submissions,
                "skipped": self.skipped,
                "embedding_cache": None if cache is None else {"dir": str(Path(cache.dir)), "status": cache.status},
            },
        }
