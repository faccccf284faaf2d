"""`NegAlignModule`: zero-shot OOD detection with NegLabel and NegAlign (eval only).

One validate/test pass runs each image through the backbone once (:class:`NegAlignFeatures`:
embedding, CAM foreground, background embedding) and stores every per-image term
(:class:`NegAlignTerms`). At epoch end plain NegLabel, NegLabel*, NegAlign for every lambda of the
sweep and the whole M1/M2/M3/P_align ablation are scored from those numbers, without re-running
the model. Batches come from :class:`~xclip.ood.datamodule.OODDataModule` (tagged ``task="ood"``,
``split``, ``role``); :meth:`NegAlignModule.ood_step` holds the per-batch work so a multi-task
module can route such batches to it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.explain.render import figure_to_array, save_png
from xclip.io import atomic_write_csv, atomic_write_text
from xclip.metrics.gather import gather_objects
from xclip.metrics.score_table import ScoreTable
from xclip.ood.negalign import NegAlignScorer
from xclip.ood.negalign_features import NegAlignFeatures
from xclip.ood.negalign_sweep import (
    ALL_VARIANTS,
    TERM_COLUMNS,
    NegAlignTerms,
    Variant,
    variant_scores,
    zscore_stats,
    zscored,
)
from xclip.ood.negatives import ROLES, Negatives, build_negatives, id_embeddings
from xclip.ood.report import (
    mean_auroc,
    roc_figure,
    split_statistics,
    sweep_figure,
    variant_metrics,
    write_breakdown,
)
from xclip.ood.text_embeddings import TextEmbeddings
from xclip.ood.vocabulary import read_words, resolve_words
from xclip.results import ReportRow, run_directory

NEG_LABEL_FILES = {"noun": "neg_labels_noun.txt", "adj": "neg_labels_adj.txt"}
INT_COLUMNS = ("split", "pred_class", "cam_valid", "bg_fell_back", "label", "index")


def split_code(partition: str, name: str) -> int:
    """A set's integer code in the score tables: the same on every process, whatever order the
    batches arrive in."""
    return zlib.crc32(f"{partition}/{name}".encode()) & 0x7FFFFFFF


class NegAlignModule(pl.LightningModule):
    """NegLabel / NegAlign OOD evaluation of any backbone.

    Args:
        backbone: a ``load_backbone`` spec (loaded once per process and shared, see
            `xclip.backbones.shared_backbone`) or a `Backbone` object.
        class_names: ID class names, in label order.
        id_prompts: templates with ``{}`` for every class, or class name -> prompts.
        nouns, adjectives: candidate negative words: a word-list file, a list, or None for the
            shipped ShapesWorld lists (``xclip/ood/wordlists``).
        neg_labels_dir: a folder with saved ``neg_labels_noun.txt`` / ``neg_labels_adj.txt``
            (NegRefine's format, or a previous run's output): used as the negatives, no mining.
        noun_templates, adj_templates: prompts of the candidate words (NegLabel: ``the nice {}``,
            ``This is a {} photo``).
        percentile, keep_ratio: NegMining (0.95, lowest 15%).
        n_groups, seed, tau: NegLabel's groups, grouping seed and temperature.
        role_tau: the r-score margin of the object / background / ambiguous split.
        cam_percentile, dilation: the CAM foreground (top 20% of patches, dilated by 1 patch).
        k: TopKMean size of P_align.
        m1_topk: M1's k (largest group scores averaged).
        m1, m2, m3, use_p_align, lam: the configured NegAlign variant (``negalign`` in the metrics).
        lambdas: the lambda sweep of the configured variant (every ablation row is swept too).
        convention: FPR95 convention of :func:`xclip.metrics.ood_metrics`.
        text_batch_size, text_cache_dir: text encoding batch and an optional disk cache folder.
        breakdown_csv: also write ``per_image.csv``.
    """

    def __init__(self, backbone: str | Backbone = "xclip:tiny-shapes", class_names: Sequence[str] = ("square", "circle"),
                 id_prompts: Sequence[str] | Mapping[str, Sequence[str]] = ("the nice {}",),
                 nouns: str | list[str] | None = None, adjectives: str | list[str] | None = None,
                 neg_labels_dir: str | None = None, noun_templates: Sequence[str] = ("the nice {}",),
                 adj_templates: Sequence[str] = ("This is a {} photo",), percentile: float = 0.95,
                 keep_ratio: float = 0.15, n_groups: int = 10, seed: int = 0, tau: float = 0.01,
                 role_tau: float = 0.05, cam_percentile: float = 80.0, dilation: int = 1, k: int = 5,
                 m1_topk: int = 5, m1: bool = False, m2: bool = False, m3: bool = True, use_p_align: bool = True,
                 lam: float = 1.0, lambdas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0),
                 convention: str = "neglabel", text_batch_size: int = 256, text_cache_dir: str | None = None,
                 breakdown_csv: bool = False):
        # an explicit dict: LightningCLI would hand a module nested in an EvaluationSuite the suite's hparams
        self_args = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        backbone, spec = resolve_backbone(backbone)
        self.save_hyperparameters({**self_args, "backbone": spec})
        if not lambdas:
            raise ValueError("`lambdas` is empty: give at least one lambda to sweep")
        self.backbone, self.backbone_spec = backbone, spec
        self.class_names = list(class_names)
        self.id_prompts = dict(id_prompts) if isinstance(id_prompts, Mapping) else list(id_prompts)
        self.variant = Variant(m1, m2, m3, use_p_align)
        self.lam, self.lambdas = float(lam), [float(x) for x in lambdas]
        self.backbone.eval().requires_grad_(False)
        self.features = NegAlignFeatures(self.backbone, cam_percentile, dilation)
        self.texts = TextEmbeddings(self.backbone, self.backbone_spec, text_batch_size, text_cache_dir)
        self.table = ScoreTable(TERM_COLUMNS, INT_COLUMNS, unique_by=("split", "index"))
        self.skips = ScoreTable((), ("split", "index"), unique_by=("split", "index"))
        self.terms: NegAlignTerms | None = None
        self.negatives: Negatives | None = None
        self.unavailable: dict[str, str] = {}  # toggle -> why the text side cannot score it
        self._splits: dict[int, tuple[str, str, str]] = {}  # code -> (partition, name, role), in order of appearance
        self._skipped_paths: dict[tuple[int, int], str] = {}  # (code, index) -> path of an unreadable image
        self._results: dict[str, Any] = {}
        self.dropped_id_names = 0  # candidate nouns equal to an ID class name (never negatives)

    # ---- text side (once per run) ---------------------------------------------------------------
    def _vocabulary(self) -> tuple[list[str], list[str], bool]:
        """(nouns, adjectives, mine?) from saved negative labels or the candidate word lists."""
        hp = self.hparams
        if hp.neg_labels_dir is not None:
            folder = Path(hp.neg_labels_dir)
            nouns, adjs = (read_words(folder / NEG_LABEL_FILES[p]) if (folder / NEG_LABEL_FILES[p]).is_file() else []
                           for p in ("noun", "adj"))
            if not nouns and not adjs:
                raise ValueError(f"`neg_labels_dir` ({folder}) holds no words in {sorted(NEG_LABEL_FILES.values())}")
            return nouns, adjs, False
        nouns = resolve_words(hp.nouns, "nouns", "nouns")
        # an ID class name is no negative of itself (NegLabel skips them among the nouns)
        id_names = {c.strip().lower() for c in self.class_names}
        kept = [w for w in nouns if w.strip().lower() not in id_names]
        self.dropped_id_names = len(nouns) - len(kept)
        return kept, resolve_words(hp.adjectives, "adjectives", "adjectives"), True

    def build_text_side(self) -> NegAlignTerms:
        """ID embeddings, negatives (mined or loaded), role split and the scorer; cached for the run."""
        if self.terms is not None:
            return self.terms
        hp = self.hparams
        id_emb = id_embeddings(self.texts, self.class_names, self.id_prompts)
        nouns, adjs, mine = self._vocabulary()
        neg = build_negatives(self.texts, id_emb, nouns, adjs, hp.noun_templates, hp.adj_templates, mine=mine,
                              percentile=hp.percentile, keep_ratio=hp.keep_ratio, role_tau=hp.role_tau)
        n_obj, n_bg = neg.roles["object"].numel(), neg.roles["background"].numel()
        has_m2, has_bg = n_obj >= hp.n_groups, n_bg > 0
        self.unavailable = {}
        if not has_m2:
            self.unavailable["m2"] = (f"only {n_obj} of {len(neg.words)} negatives lean object (r > {hp.role_tau}), "
                                      f"fewer than n_groups={hp.n_groups}")
        if not has_bg:
            self.unavailable["p_align"] = (f"no negative of {len(neg.words)} leans background (r < -{hp.role_tau})")
        for flag, term in (("m2", "m2"), ("use_p_align", "p_align")):
            if hp[flag] and term in self.unavailable:
                raise ValueError(f"`{flag}` is on but {self.unavailable[term]}: set `{flag}` false, lower "
                                 "`role_tau` or `n_groups`, or add words")
        # scores in float64: NegLabel's sigmoid saturates near 1 in float32 and ties would hide the ranking
        id_emb, neg_emb = id_emb.double(), neg.emb.double()
        scorer = NegAlignScorer(id_emb, neg_emb, object_idx=neg.roles["object"] if has_m2 else None,
                                neg_bg_emb=neg_emb[neg.roles["background"]] if has_bg else None,
                                n_groups=hp.n_groups, seed=hp.seed, tau=hp.tau, m1_topk=hp.m1_topk,
                                m2_role_aware=has_m2, use_p_align=has_bg, k=hp.k)
        self.negatives, self.terms = neg, NegAlignTerms(scorer).to(self.device)
        return self.terms

    def _write_vocabulary(self, out_dir: Path) -> None:
        neg = self.negatives
        for pos, name in NEG_LABEL_FILES.items():
            atomic_write_text(out_dir / name, "".join(f"{w}\n" for w, p in zip(neg.words, neg.pos) if p == pos))
        role_of = {i: role for role in ROLES for i in neg.roles[role].tolist()}
        atomic_write_csv(out_dir / "neg_roles.csv", ("word", "pos", "r", "role"),
                         ({"word": w, "pos": p, "r": f"{r:.6f}", "role": role_of[i]}
                          for i, (w, p, r) in enumerate(zip(neg.words, neg.pos, neg.r.tolist()))))
        for role in ROLES:
            atomic_write_text(out_dir / f"neg_{role}.txt", "".join(f"{w}\n" for w in neg.role_words(role)))

    def _start(self) -> None:
        self.build_text_side()
        self._splits, self._results, self._skipped_paths = {}, {}, {}
        self.table.reset()
        self.skips.reset()
        if self.trainer.is_global_zero:
            self._write_vocabulary(run_directory(self.trainer))

    def on_validation_start(self) -> None:
        self._start()

    def on_test_start(self) -> None:
        self._start()

    # ---- per batch ------------------------------------------------------------------------------
    def ood_step(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Score one tagged batch (``image`` [B,3,H,W] in [0,1], ``split``, ``role``, ``partition``,
        ``skipped_index`` / ``skipped_paths``) and store its rows. Returns the CAM outputs for
        callbacks (empty if no image was readable)."""
        terms = self.build_text_side()
        partition, name, role = batch.get("partition", "val"), batch["split"], batch["role"]
        code = split_code(partition, name)
        self._splits.setdefault(code, (partition, name, role))
        skipped = torch.as_tensor(batch.get("skipped_index", torch.zeros(0, dtype=torch.long)))
        # updated on every batch, also with no row, so every process holds a state to gather
        self.skips.update(split=torch.full_like(skipped, code).to(self.device), index=skipped.to(self.device))
        for i, path in zip(skipped.tolist(), batch.get("skipped_paths", ["?"] * skipped.numel())):
            self._skipped_paths[(code, i)] = path
        if "image" not in batch:
            return {}
        # validate/test run under inference_mode; the CAM needs autograd on fresh tensors
        with torch.inference_mode(False):
            images = self.backbone.normalize(batch["image"].to(self.device).clone())
            feats = self.features(images, terms.id_emb)
            with torch.no_grad():
                out = terms(feats.image_emb, feats.bg_emb)
        n = images.shape[0]
        self.table.update(**{c: out[c] for c in TERM_COLUMNS}, split=torch.full((n,), code, device=self.device),
                          pred_class=out["pred_class"], cam_valid=feats.cam_valid, bg_fell_back=feats.bg_fell_back,
                          label=torch.as_tensor(batch.get("label", torch.full((n,), -1))).to(self.device),
                          index=torch.as_tensor(batch.get("index", torch.arange(n))).to(self.device))
        return {"cam": feats.cam.cpu(), "fg_mask": feats.fg_mask.cpu(), "cam_valid": feats.cam_valid.cpu(),
                "pred_class": out["pred_class"].cpu()}

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self.ood_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Tensor]:
        return self.ood_step(batch)

    # ---- epoch end ------------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        self._evaluate("val")

    def on_test_epoch_end(self) -> None:
        self._evaluate("test")

    def _sets(self, rows: dict[str, Tensor], partition: str) -> tuple[Tensor, dict[str, Tensor]]:
        """(ID rows [N] bool, OOD set name -> rows [N] bool) of one partition."""
        codes = {c: (name, role) for c, (part, name, role) in self._splits.items() if part == partition}
        id_codes = [c for c, (_, role) in codes.items() if role == "id"]
        ood_codes = [c for c, (_, role) in codes.items() if role == "ood"]
        if len(id_codes) != 1 or not ood_codes:
            raise ValueError(f"OOD evaluation needs exactly one ID split and at least one OOD split in the "
                             f"{partition!r} partition, got {sorted(codes.values())}")
        return rows["split"] == id_codes[0], {codes[c][0]: rows["split"] == c for c in ood_codes}

    def _in_set_order(self, rows: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rows sorted by set (in the order the sets arrived) then item index: the same order
        whatever the number of processes that scored them."""
        rank = {code: i for i, code in enumerate(self._splits)}
        set_rank = torch.tensor([rank.get(int(c), len(rank)) for c in rows["split"].tolist()], dtype=torch.long)
        order = torch.argsort(rows["index"], stable=True)
        order = order[torch.argsort(set_rank[order], stable=True)]
        return {k: v[order] for k, v in rows.items()}

    def _split_names(self, evaluated: str) -> dict[int, tuple[str, str]]:
        """code -> (report name, role): the evaluated partition's sets keep their names, the
        lambda-selection sets of a test run are prefixed ``val/``."""
        return {c: (name if part == evaluated or role == "calib" else f"{part}/{name}", role)
                for c, (part, name, role) in self._splits.items()}

    def _evaluate(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        rows = self._in_set_order({k: v.cpu() for k, v in self.table.rows().items()})
        skips = self._in_set_order({k: v.cpu() for k, v in self.skips.rows().items()})
        paths: dict[tuple[int, int], str] = {}
        for part in gather_objects(self._skipped_paths):
            paths.update(part)
        names = self._split_names(evaluated := "test" if stage == "test" else "val")
        skipped = {c: int((skips["split"] == c).sum()) for c in names}
        skipped_paths = {names[c][0]: sorted(paths.get((c, int(i)), "?") for i in skips["index"][skips["split"] == c])
                         for c in names if skipped[c]}
        is_id, ood_masks = self._sets(rows, evaluated)
        sel_id, sel_ood = self._sets(rows, "val")
        empty = [n for n, m in {"id": is_id, **ood_masks, "val/id": sel_id,
                                **{f"val/{k}": v for k, v in sel_ood.items()}}.items() if not m.any()]
        if empty:
            raise ValueError(f"no readable image in split(s) {empty} (unreadable images skipped: {skipped_paths})")
        terms = {c: rows[c] for c in TERM_COLUMNS}
        calib_codes = [c for c, (_, role) in names.items() if role == "calib"]
        calib = rows["split"] == calib_codes[0] if calib_codes else None
        stats = zscore_stats({c: v[calib] for c, v in terms.items()}) if calib is not None and calib.any() else None
        if self.variant.m3 and stats is None:
            raise ValueError("m3 is on but no ID calibration images were evaluated: give the datamodule a "
                             "calibration set (n_calib > 0 / calib_split) or set m3 false")
        conv = self.hparams.convention

        def metrics(variant: Variant, lam: float) -> dict[str, dict[str, float]]:
            return variant_metrics(terms, is_id, ood_masks, variant, lam, stats, conv)

        star = Variant(self.variant.m1, self.variant.m2, self.variant.m3, False)
        per_lambda = [metrics(self.variant, lam) for lam in self.lambdas]
        on_val = per_lambda if evaluated == "val" else [
            variant_metrics(terms, sel_id, sel_ood, self.variant, lam, stats, conv) for lam in self.lambdas]
        best = max(range(len(self.lambdas)), key=lambda i: mean_auroc(on_val[i]))
        oracle = max(range(len(self.lambdas)), key=lambda i: mean_auroc(per_lambda[i]))
        ablation = []
        for v in ALL_VARIANTS:
            if (v.m3 and stats is None) or not self.terms.available(v):
                continue
            sweep = [{"lambda": lam, "metrics": metrics(v, lam)} for lam in (self.lambdas if v.p_align else [0.0])]
            ablation.append({"name": v.name, "m1": v.m1, "m2": v.m2, "m3": v.m3, "p_align": v.p_align,
                             "metrics": metrics(v, self.lam if v.p_align else 0.0), "per_lambda": sweep})
        variants = {"neglabel": metrics(Variant(), 0.0), "neglabel_star": metrics(star, 0.0),
                    "negalign": metrics(self.variant, self.lam), "negalign_selected": per_lambda[best]}
        for vname, per_split in variants.items():
            for split, values in per_split.items():
                for key, value in values.items():
                    self.log(f"{stage}/{split}/{vname}/{key}", value, sync_dist=False, add_dataloader_idx=False)
        configured = {"s_neglabel_plain": terms["star"], "s_neglabel_star": variant_scores(terms, star, 0.0, stats),
                      "p_align": zscored(terms, "p_align", stats) if self.variant.m3 else terms["p_align"],
                      "s_final": variant_scores(terms, self.variant, self.lam, stats)}
        self._results = {
            "config": self._config(),
            "convention": conv,
            "evaluated_partition": evaluated,
            "splits": split_statistics(rows, names, skipped, configured),
            "skipped_paths": skipped_paths,
            "variants": variants,
            "lambdas": self.lambdas,
            "per_lambda": [{"lambda": lam, "metrics": m} for lam, m in zip(self.lambdas, per_lambda)],
            "best_lambda": self.lambdas[best],
            "best_lambda_chosen_on": "val",
            "best_lambda_rule": ("highest mean AUROC over the OOD splits of the validation partition; "
                                 f"its {evaluated} metrics are `variants.negalign_selected`"
                                 + (" (chosen and reported on the same data: test runs keep them apart)"
                                    if evaluated == "val" else "")),
            "oracle_lambda": self.lambdas[oracle],
            "oracle_lambda_rule": f"highest mean AUROC on the reported {evaluated} data itself: an oracle, for reference only",
            "ablation": ablation,
            "ablation_unavailable": {**self.unavailable, **({"m3": "no calibration split"} if stats is None else {})},
            "zscore_stats": stats,
        }
        if self.trainer.is_global_zero:
            unreadable = [(c, int(i), paths.get((c, int(i)), "?")) for c, i in zip(skips["split"].tolist(),
                                                                                   skips["index"].tolist())]
            self._write_outputs(stage, rows, names, terms, is_id, ood_masks, per_lambda, configured, star, stats,
                                unreadable)

    def _config(self) -> dict[str, Any]:
        neg = self.negatives
        return {**{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items()},
                "variant": self.variant.name, "n_negatives": len(neg.words),
                "n_roles": {r: neg.roles[r].numel() for r in ROLES}, "text_encoded": self.texts.encoded,
                "id_names_dropped_from_nouns": self.dropped_id_names}

    def _write_outputs(self, stage: str, rows: dict[str, Tensor], names: dict[int, tuple[str, str]],
                       terms: dict[str, Tensor], is_id: Tensor, ood_masks: dict[str, Tensor],
                       per_lambda: list[dict[str, dict[str, float]]], configured: dict[str, Tensor], star: Variant,
                       stats: dict[str, tuple[float, float]] | None, unreadable: list[tuple[int, int, str]]) -> None:
        """Figures (PNG + TensorBoard) and, on request, the per-image CSV (unreadable images
        included, with their paths)."""
        out_dir = run_directory(self.trainer)
        title = f"{self.variant.name} on {self.backbone_spec}"
        figures = {"lambda_sweep": sweep_figure(self.lambdas, per_lambda, title)}
        curves = {}
        for label, v, lam in (("NegLabel", Variant(), 0.0), ("NegLabel*", star, 0.0),
                              (f"NegAlign lam={self.lam:g}", self.variant, self.lam)):
            s = variant_scores(terms, v, lam, stats)
            curves[label] = {split: (s[is_id], s[m]) for split, m in ood_masks.items()}
        figures["roc"] = roc_figure(curves)
        experiments = [lg.experiment for lg in self.trainer.loggers
                       if hasattr(getattr(lg, "experiment", None), "add_image")]
        for name, fig in figures.items():
            array = figure_to_array(fig)
            save_png(array, out_dir / f"{stage}_{name}.png")
            for exp in experiments:
                exp.add_image(f"{stage}/negalign/{name}", array, self.global_step, dataformats="HWC")
        if self.hparams.breakdown_csv:
            write_breakdown(out_dir / f"{stage}_per_image.csv", rows, names, configured, self.class_names, unreadable)

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Console report rows: one per variant and OOD set, AUROC / FPR95 / AUPR columns."""
        res = self._results
        names = {"neglabel": "NegLabel", "neglabel_star": f"NegLabel* ({Variant(self.variant.m1, self.variant.m2, self.variant.m3, False).name})",
                 "negalign": f"NegAlign {self.variant.name}, lambda {self.lam:g} (configured)",
                 "negalign_selected": f"NegAlign {self.variant.name}, lambda {res.get('best_lambda', '?'):g} "
                                      f"(chosen on {res.get('best_lambda_chosen_on', 'val')})"
                 if isinstance(res.get("best_lambda"), float) else "NegAlign (lambda chosen on val)"}
        columns = {"auroc": "AUROC", "fpr95": "FPR95", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out"}
        rows = []
        for stage in ("val", "test"):
            for variant, label in names.items():
                for split in sorted({k.split("/")[1] for k in metrics if k.startswith(f"{stage}/")
                                     and k.count("/") == 3 and k.split("/")[2] == variant}):
                    keys = [f"{stage}/{split}/{variant}/{m}" for m in columns if f"{stage}/{split}/{variant}/{m}" in metrics]
                    rows.append(ReportRow("OOD detection", f"{label} vs {split} [{stage}]",
                                          {columns[k.rsplit('/', 1)[1]]: metrics[k] for k in keys}, keys))
        return rows

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json by the CLI: backbone and the whole NegAlign report."""
        return {"backbone": self.backbone_spec, "negalign": self._results}

