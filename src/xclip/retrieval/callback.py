"""`RetrievalExplanationCallback`: after a retrieval validate/test, the top-1 text->image failures
explained with visual cards (Grad-ECLIP maps of both images) and annotation sheets, ShapesWorld
auto-labels with their merged report, and the failure-driven improvements (template ensembling,
lexical re-ranking) per failure category.

Needs a module like ``xclip.retrieval.RetrievalModule`` that, by the end of validate/test, exposes
``gallery_embeddings`` (``image_emb`` [I, D], ``text_emb`` [T, D] L2-normalised, ``text_to_image``
[T], ``image_index`` [I]: each row's gallery index), ``gallery`` (a ``CaptionGallery``; one with
``scene(i)`` enables auto-labels) and ``backbone``. Inside an ``EvaluationSuite`` it analyses the
member that holds these.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch import Tensor

from xclip.engine import StageCallback, tensorboard_writers
from xclip.explain import GradECLIP
from xclip.metrics import retrieval_ranks
from xclip.retrieval.failures.annotations import read_merged_labels
from xclip.retrieval.failures.autolabel import autolabel_failures
from xclip.retrieval.failures.cards import write_cards
from xclip.retrieval.failures.extract import (
    Failure,
    failure_records,
    sample_failures,
    top1_failures,
    write_failures_csv,
)
from xclip.retrieval.failures.improvements import (
    DEFAULT_TEMPLATES,
    LEXICAL,
    POOLINGS,
    encode_templates,
    ensemble_t2i_ranks,
    improvement_rows,
    rerank_t2i_ranks,
    write_improvements,
)
from xclip.retrieval.failures.report import write_annotation_report
from xclip.retrieval.failures.sheets import annotator_names, assign_sheets, feasible_counts, fill_sheets, write_sheets
from xclip.retrieval.failures.taxonomy import LABELS


class RetrievalExplanationCallback(StageCallback):
    """Failure analysis at the end of validate/test (global rank 0), written under
    ``<run dir>/failures/<stage>/``: ``failures.csv`` with every failure, ``cards/``, ``sheets/``,
    ``index.json`` (the summary, and one item per sampled failure), on ShapesWorld ``auto/`` (the
    sheets filled by the auto-labeller and their merged report), and ``improvements.csv`` /
    ``improvements.png``. TensorBoard: ``<stage>/retrieval/card/<failure id>`` and
    ``<stage>/retrieval/improvements/all``.

    Args:
        max_items: size of the seeded failure sample that gets cards and sheets.
        seed: seed of the sample and of the sheet assignment.
        n_annotators, per_annotator, overlap: sheets ``annotator_1..n``, each with `per_annotator`
            own failures plus the `overlap` shared ones (shrunk, with a warning, when the sample
            is too small).
        cards: render a Grad-ECLIP card per sampled failure.
        card_batch_size, card_size: failures explained per call; displayed image side.
        log_cards: cards also logged to TensorBoard (when a TensorBoard logger is present).
        autolabel: label failures from scene graphs when the gallery has them (ShapesWorld).
        labels_csv: a merged table (``xclip annotations merge`` output, ``merged.csv``) whose
            labels define the improvement subsets; default: the auto-labels, if any.
        improvements: evaluate template ensembling and lexical re-ranking.
        templates, poolings, tau: the ensembling (``{}`` is the caption; ``mean|max|logsumexp``).
        rerank_k, rerank_weight, lexical: re-rank the top `rerank_k` by
            ``score + rerank_weight * lexical`` (``tfidf|overlap``).
        ks: the K of the improvement table.
        subdir: folder under the run directory.
    """

    workflow = "retrieval"
    write_empty_index = True  # "no failure" is a result

    def __init__(
        self,
        max_items: int = 50,
        seed: int = 0,
        n_annotators: int = 2,
        per_annotator: int = 20,
        overlap: int = 10,
        cards: bool = True,
        card_batch_size: int = 8,
        card_size: int = 256,
        log_cards: int = 4,
        autolabel: bool = True,
        labels_csv: str | None = None,
        improvements: bool = True,
        templates: Sequence[str] = DEFAULT_TEMPLATES,
        poolings: Sequence[str] = POOLINGS,
        tau: float = 0.01,
        rerank_k: int = 10,
        rerank_weight: float = 0.1,
        lexical: str = "tfidf",
        ks: Sequence[int] = (1, 5, 10),
        subdir: str = "failures",
    ):
        super().__init__(subdir)
        unknown = [p for p in poolings if p not in POOLINGS]
        if unknown or lexical not in LEXICAL:
            raise ValueError(
                f"poolings must be in {POOLINGS} (got {list(poolings)}), lexical in {LEXICAL} (got {lexical!r})"
            )
        if any("{}" not in t for t in templates):
            raise ValueError(f"every template needs a '{{}}' for the caption, got {list(templates)}")
        self.max_items, self.seed = max_items, seed
        self.n_annotators, self.per_annotator, self.overlap = n_annotators, per_annotator, overlap
        self.cards, self.card_batch_size, self.card_size, self.log_cards = cards, card_batch_size, card_size, log_cards
        self.autolabel, self.labels_csv = autolabel, labels_csv
        self.improvements, self.templates, self.poolings, self.tau = improvements, list(templates), list(poolings), tau
        self.rerank_k, self.rerank_weight, self.lexical = rerank_k, rerank_weight, lexical
        self.ks = tuple(ks)
        self._summary: dict[str, Any] = {}

    def end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.analyse(trainer, pl_module, stage)

    # ---- work ----------------------------------------------------------------------------------
    def analyse(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "val") -> dict[str, Any] | None:
        """Run the analysis on `pl_module`'s embeddings; returns the summary in ``index.json``."""
        if trainer.sanity_checking or not trainer.is_global_zero:
            return None
        module = retrieval_member(pl_module)
        emb, gallery = getattr(module, "gallery_embeddings", None), getattr(module, "gallery", None)
        if emb is None or gallery is None:
            rank_zero_warn(
                f"RetrievalExplanationCallback: {type(pl_module).__name__} has no (member with) "
                "gallery_embeddings/gallery after this epoch; nothing to analyse"
            )
            return None
        out = self.stage_dir(trainer, stage)
        captions, row_text_ids = _row_captions(gallery, emb.image_index, emb.text_to_image)
        top1 = top1_failures(emb.image_emb, emb.text_emb, emb.text_to_image)
        gallery_texts, _ = gallery.all_captions()
        failures = failure_records(_to_gallery(top1, row_text_ids, emb.image_index), gallery_texts, gallery.keys())
        auto = autolabel_failures(failures, gallery.scene) if self.autolabel and hasattr(gallery, "scene") else None
        write_failures_csv(out / "failures.csv", failures, {"auto_label": auto} if auto is not None else None)

        sample = sample_failures(failures, self.max_items, self.seed)
        cards = (
            self._cards(trainer, stage, module.backbone, sample, gallery, out / "cards")
            if self.cards and sample
            else {}
        )
        per_annotator, overlap = feasible_counts(len(sample), self.n_annotators, self.per_annotator, self.overlap)
        if (per_annotator, overlap) != (self.per_annotator, self.overlap):
            rank_zero_warn(
                f"RetrievalExplanationCallback: {len(sample)} sampled failures; sheets get "
                f"per_annotator={per_annotator}, overlap={overlap} instead of {self.per_annotator}, "
                f"{self.overlap}"
            )
        assignment = assign_sheets([f.failure_id for f in sample], self.n_annotators, per_annotator, overlap, self.seed)
        write_sheets(out / "sheets", sample, assignment, cards)
        summary: dict[str, Any] = {
            "n_captions": len(captions),
            "n_images": int(emb.image_emb.shape[0]),
            "n_failures": len(failures),
            "n_sampled": len(sample),
            "n_cards": len(cards),
            "n_annotators": self.n_annotators,
            "per_annotator": per_annotator,
            "overlap": overlap,
        }
        if auto is not None:
            by_id = dict(zip((f.failure_id for f in failures), auto))
            fill_sheets(
                out / "sheets", dict.fromkeys(annotator_names(self.n_annotators), by_id), out / "auto" / "sheets"
            )
            report = write_annotation_report(out / "auto" / "sheets", out / "auto")
            summary["auto_labels"] = {label: auto.count(label) for label in LABELS if label in auto}
            summary["auto_report_ambiguity"] = report["ambiguity"]
        if self.improvements:
            labels = self._subset_labels(failures, auto)
            rows = self._improvements(module.backbone, emb, captions, top1["text_index"], labels, row_text_ids)
            _, png = write_improvements(out, rows, self.ks)
            summary["improvements"] = rows
            self._log_png(trainer, stage, "improvements", "all", png)
        self._summary = summary
        self.records = [
            {
                "failure_id": f.failure_id,
                "text_index": f.text_index,
                "caption": f.caption,
                "card": str(cards[f.failure_id].relative_to(out)) if f.failure_id in cards else None,
            }
            for f in sample
        ]
        self.write_index(trainer, stage)
        return summary

    def index_payload(self, trainer: pl.Trainer, stage: str) -> dict[str, Any]:
        return dict(self._summary)

    def _cards(self, trainer, stage: str, backbone, sample: list[Failure], gallery, out_dir: Path) -> dict[str, Path]:
        explainer = GradECLIP(backbone, precision=str(trainer.precision))
        paths = write_cards(explainer, sample, gallery.image, out_dir, self.card_batch_size, self.card_size)
        for fid in list(paths)[: self.log_cards]:
            self._log_png(trainer, stage, "card", fid, paths[fid])
        return paths

    def _log_png(self, trainer, stage: str, what: str, item: str, png: Path) -> None:
        if not tensorboard_writers(trainer):
            return
        with Image.open(png) as im:
            self.log_image(trainer, stage, what, item, np.asarray(im.convert("RGB")))

    def _subset_labels(self, failures: list[Failure], auto: list[str] | None) -> dict[int, str]:
        """gallery caption index -> label of the failures that define the improvement subsets."""
        if self.labels_csv is not None:
            return read_merged_labels(self.labels_csv)
        if auto is not None:
            return {f.text_index: label for f, label in zip(failures, auto)}
        return {}

    def _improvements(
        self, backbone, emb, captions: list[str], failure_rows: Tensor, labels: dict[int, str], row_text_ids: Tensor
    ) -> list[dict]:
        ranks = {"baseline": retrieval_ranks(emb.image_emb, emb.text_emb, emb.text_to_image)[0].cpu()}
        params = {"baseline": ""}
        template_emb = encode_templates(backbone, captions, self.templates)
        for pooling in self.poolings:
            name = f"templates_{pooling}"
            ranks[name] = ensemble_t2i_ranks(emb.image_emb, template_emb, emb.text_to_image, pooling, self.tau)
            params[name] = f"K={len(self.templates)}" + (f", tau={self.tau}" if pooling == "logsumexp" else "")
        name = f"rerank_{self.lexical}"
        ranks[name] = rerank_t2i_ranks(
            emb.image_emb, emb.text_emb, emb.text_to_image, captions, self.rerank_k, self.rerank_weight, self.lexical
        )
        params[name] = f"k={self.rerank_k}, weight={self.rerank_weight}"
        subsets = {"all": torch.arange(len(captions)), "failures": failure_rows}
        row_of = {int(g): r for r, g in enumerate(row_text_ids.tolist())}
        for label in LABELS:
            rows = [row_of[t] for t, lab in labels.items() if lab == label and t in row_of]
            if rows:
                subsets[f"failures:{label}"] = torch.tensor(sorted(rows), dtype=torch.long)
        return improvement_rows(ranks, subsets, self.ks, params)


def retrieval_member(pl_module: pl.LightningModule) -> pl.LightningModule:
    """The module that holds the retrieval results: `pl_module` itself, or the first member of a
    suite (``pl_module.members``) that has ``gallery_embeddings``."""
    if hasattr(pl_module, "gallery_embeddings"):
        return pl_module
    members = getattr(pl_module, "members", None)
    found = [m for m in (members.values() if members is not None else []) if hasattr(m, "gallery_embeddings")]
    return found[0] if found else pl_module


def _row_captions(gallery, image_index: Tensor, text_to_image: Tensor) -> tuple[list[str], Tensor]:
    """The captions of the embedding rows (each seen image's captions in slot order) and each
    row's gallery caption index [T]."""
    texts, owner = gallery.all_captions()
    counts = torch.bincount(owner, minlength=len(gallery))
    bounds = torch.cumsum(counts, 0)
    starts, ends = (bounds - counts).tolist(), bounds.tolist()
    ids = (
        torch.cat([torch.arange(starts[i], ends[i]) for i in image_index.tolist()])
        if len(image_index)
        else torch.empty(0, dtype=torch.long)
    )
    if ids.numel() != text_to_image.numel():
        raise ValueError(
            f"the embeddings hold {text_to_image.numel()} captions, but their images have {ids.numel()} "
            "in the gallery: gallery_embeddings and gallery do not match"
        )
    return [texts[j] for j in ids.tolist()], ids


def _to_gallery(top1: dict[str, Tensor], row_text_ids: Tensor, image_index: Tensor) -> dict[str, Tensor]:
    """`top1_failures` output with embedding rows replaced by gallery caption / image indices."""
    return {
        **top1,
        "text_index": row_text_ids[top1["text_index"]],
        "gt_image": image_index[top1["gt_image"]],
        "retrieved_image": image_index[top1["retrieved_image"]],
    }
