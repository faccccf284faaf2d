"""`RetrievalModule`: zero-shot image<->text retrieval (Recall@K both ways) over a caption gallery,
with an on-disk embedding cache. Eval only; the ranking math is ``xclip.metrics``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.data.combined_datamodule import CombinedDataModule
from xclip.data.embedding_cache import EmbeddingCache, GalleryEmbeddings, weights_fingerprint
from xclip.data.shapes.datamodule import ShapesWorldDataModule
from xclip.engine import EvaluationModule
from xclip.metrics.retrieval import retrieval_recall_at_k
from xclip.metrics.retrieval_metric import RetrievalRecall, recall_report_rows
from xclip.results import ReportRow
from xclip.retrieval.datamodule import RetrievalDataModule
from xclip.retrieval.gallery import CaptionGallery, ShapesGallery


class RetrievalModule(EvaluationModule):
    """Embed a gallery's images and captions, report ``{stage}/retrieval/t2i_R@k`` and
    ``{stage}/retrieval/i2t_R@k``.

    Batches are ``task == "retrieval"`` batches of a ``RetrievalDataModule`` or of a
    ``ShapesWorldDataModule`` (``collate_captions`` format: images in [0, 1], ``index`` = gallery
    index); ``step(batch, stage)`` handles one. Several processes (DDP) give the numbers of one:
    embeddings are gathered and put in gallery order before ranking.

    After each validate/test epoch (read them in a callback's ``on_validation_end`` /
    ``on_test_end``: Lightning runs the callbacks' ``on_*_epoch_end`` before the module's):
      - ``self.gallery_embeddings``: :class:`GalleryEmbeddings` (CPU, gallery order) of what was seen;
      - ``self.recall_values``: ``{"val/retrieval/t2i_R@1": fraction, ...}`` exact (the logged ones are
        float32);
      - ``self.gallery`` (set in ``setup``): the :class:`CaptionGallery` evaluated
        (``trainer.datamodule.gallery``, or the ShapesWorld gallery equal to a
        ``ShapesWorldDataModule``'s retrieval set), or None.

    Args:
        backbone: a ``load_backbone`` spec (loaded once per process and shared, see
            `xclip.backbones.shared_backbone`) or a `Backbone` object.
        ks: the K of Recall@K.
        text_batch_size: captions embedded per forward.
        cache_dir: root of the embedding cache (None: no cache). A hit skips the model and, with a
            ``RetrievalDataModule``, reading the images.
    """

    workflow = "retrieval"
    tasks = ("retrieval",)

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        ks: tuple[int, ...] = (1, 5, 10),
        text_batch_size: int = 256,
        cache_dir: str | None = None,
    ):
        super().__init__()
        self.backbone, self.backbone_spec = resolve_backbone(backbone)
        self.ks = tuple(ks)
        self.backbone.eval().requires_grad_(False)
        self.text_batch_size, self.cache_dir = text_batch_size, cache_dir
        self.recall = RetrievalRecall(self.ks)
        self.gallery: CaptionGallery | None = None
        self.gallery_embeddings: GalleryEmbeddings | None = None
        self.recall_values: dict[str, float] = {}  # exact fractions (logged metrics are float32)
        self._cache: EmbeddingCache | None = None
        self._cached: GalleryEmbeddings | None = None

    # ---- embedding --------------------------------------------------------------------------
    def embed_images(self, images: Tensor) -> Tensor:
        """[N,3,H,W] in [0,1] -> [N, D] L2-normalised."""
        return self.backbone.encode_image(self.backbone.normalize(images), normalize=True).float()

    def embed_texts(self, texts: list[str]) -> Tensor:
        """K strings -> [K, D] L2-normalised, `text_batch_size` per forward."""
        return self.backbone.encode_texts(texts, self.text_batch_size, normalize=True).float()

    # ---- gallery and cache --------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        split = "test" if stage == "test" else "val"
        data = _serving_datamodule(getattr(self.trainer, "datamodule", None), split)
        self.gallery = _gallery_of(data, split)
        self._cache, self._cached = None, None
        if self.cache_dir is None or self.gallery is None:
            return
        self._cache = EmbeddingCache(self.cache_dir, self.cache_key())
        texts, _ = self.gallery.all_captions()
        cached = self._cache.load(self.gallery.keys(), texts)
        # every process must take the same path: use the cache only if all of them could read it
        if self.trainer.strategy.reduce_boolean_decision(cached is not None, all=True):
            self._cached = cached
            if hasattr(data, "skip_images"):
                data.skip_images = True
        elif hasattr(data, "skip_images"):
            data.skip_images = False

    def cache_key(self) -> dict[str, Any]:
        """What the embeddings depend on: model spec and weights (hashed at every call: weights
        changed in place must not hit an old entry), preprocessing, precision, gallery."""
        return {
            "backbone": self.backbone_spec,
            "weights_sha256": weights_fingerprint(self.backbone),
            "preprocess": self.backbone.preprocess_cfg.to_dict(),
            "precision": str(self.trainer.precision),
            "gallery": self.gallery.fingerprint() if self.gallery is not None else None,
        }

    # ---- steps --------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any], stage: str) -> None:
        """Embed one ``retrieval`` batch into the metric state (nothing to do on a cache hit)."""
        if self._cached is not None or batch.get("cached"):
            return
        img = self.embed_images(batch["image"])
        txt = self.embed_texts(batch["texts"])
        self.recall.update(img, batch["index"], txt, batch["index"][batch["text_to_image"].to(batch["index"].device)])

    def finish(self, stage: str) -> None:
        emb = self._cached if self._cached is not None else self._gathered()
        self.recall.reset()
        if emb is None:
            return
        self.gallery_embeddings = emb
        metrics = retrieval_recall_at_k(emb.image_emb, emb.text_emb, emb.text_to_image, self.ks)
        self.recall_values = {self.metric_key(stage, k): v for k, v in metrics.items()}
        for name, value in metrics.items():
            self.log_metric(stage, name, value)  # computed from the gathered gallery: same on every process
        if (
            self._cached is None
            and self._cache is not None
            and self.gallery is not None
            and self.trainer.is_global_zero
            and _complete(emb, self.gallery)
        ):
            texts, _ = self.gallery.all_captions()
            self._cache.save(emb, self.gallery.keys(), texts)

    def _gathered(self) -> GalleryEmbeddings | None:
        """Every process's embeddings, deduplicated and in gallery order (None if nothing seen)."""
        if not self.trainer.strategy.reduce_boolean_decision(self.recall.update_called, all=False):
            return None
        index, img, txt, owner = self.recall.ordered()
        return GalleryEmbeddings(img.cpu(), txt.cpu(), owner.cpu(), index.cpu())

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Console report rows of this module's logged metrics (see `xclip.results`)."""
        n = self.gallery_embeddings
        size = f"{n.image_emb.shape[0]} images x {n.text_emb.shape[0]} captions" if n is not None else ""
        return [
            ReportRow(row.workflow, f"{row.name} {size}".rstrip(), row.values, row.keys)
            for row in recall_report_rows(metrics, "image-text retrieval", self.workflow)
        ]

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json: the backbone, the gallery and the cache's outcome."""
        emb, cache = self.gallery_embeddings, self._cache
        return {
            **super().extra_results(),
            "retrieval": {
                "recall": dict(self.recall_values),
                "n_images": int(emb.image_emb.shape[0]) if emb is not None else 0,
                "n_captions": int(emb.text_emb.shape[0]) if emb is not None else 0,
                "gallery": self.gallery.fingerprint() if self.gallery is not None else None,
                "embedding_cache": None if cache is None else {"dir": str(Path(cache.dir)), "status": cache.status},
            },
        }


def _serving_datamodule(datamodule: Any, split: str) -> Any:
    """The datamodule that serves the retrieval gallery: itself, or inside a ``CombinedDataModule``
    the first member that serves one."""
    if isinstance(datamodule, CombinedDataModule):
        return next((dm for dm in datamodule.datamodules.values() if _gallery_of(dm, split) is not None), None)
    return datamodule


def _gallery_of(datamodule: Any, split: str) -> CaptionGallery | None:
    """The ``val`` / ``test`` gallery a datamodule serves: its ``gallery_for(split)``, or for
    ShapesWorld the ``ShapesGallery`` with the very samples of its ``retrieval`` set of that split."""
    if isinstance(datamodule, RetrievalDataModule):
        return datamodule.gallery_for(split)
    if isinstance(getattr(datamodule, "gallery", None), CaptionGallery):
        return datamodule.gallery
    if isinstance(datamodule, ShapesWorldDataModule) and "retrieval" in datamodule.val_tasks:
        opts = datamodule.task_options.get("retrieval", {})
        n = datamodule.n_test if split == "test" else datamodule.n_val
        return ShapesGallery(n=n, seed=datamodule.seed + 1000, image_size=datamodule.image_size, split=split, **opts)
    return None


def _complete(emb: GalleryEmbeddings, gallery: CaptionGallery) -> bool:
    """Whether `emb` covers the whole `gallery` in order (e.g. not under ``limit_val_batches``)."""
    n = len(gallery)
    return (
        emb.image_index.numel() == n
        and torch.equal(emb.image_index, torch.arange(n))
        and torch.equal(emb.text_to_image, gallery.all_captions()[1])
    )
