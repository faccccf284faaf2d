"""`NegAlignModule`: zero-shot OOD detection with NegLabel and NegAlign (eval only).

One validate/test pass runs each image through the backbone once (:class:`NegAlignFeatures`:
embedding, CAM foreground, background embedding) and stores every per-image term
(:class:`NegAlignTerms`). At epoch end plain NegLabel, NegLabel*, NegAlign for every lambda of the
sweep and the whole M1/M2/M3/P_align ablation are scored from those numbers, without re-running
the model. Batches come from :class:`~xclip.ood.datamodule.OODDataModule` (tagged ``task="ood"``,
``split``, ``role``); the scoring of every variant and lambda is `xclip.ood.evaluation.evaluate`.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.engine import STAGES, EvaluationModule, tensorboard_writers
from xclip.explain.render import figure_to_array, save_png
from xclip.io import atomic_write_csv, atomic_write_text
from xclip.metrics.gather import gather_objects
from xclip.metrics.ood import Convention
from xclip.metrics.score_table import ScoreTable
from xclip.ood.evaluation import OODEvaluation, evaluate, in_set_order, report_names, set_masks
from xclip.ood.negalign import NegAlignScorer
from xclip.ood.negalign_features import NegAlignFeatures
from xclip.ood.negalign_sweep import TERM_COLUMNS, NegAlignTerms, Variant, variant_scores
from xclip.ood.negatives import ROLES, Negatives, build_negatives, id_embeddings
from xclip.ood.report import roc_figure, split_statistics, sweep_figure, write_breakdown
from xclip.ood.text_embeddings import TextEmbeddings
from xclip.ood.vocabulary import read_words, resolve_words
from xclip.results import ReportRow, run_directory

NEG_LABEL_FILES = {"noun": "neg_labels_noun.txt", "adj": "neg_labels_adj.txt"}
INT_COLUMNS = ("split", "pred_class", "cam_valid", "bg_fell_back", "label", "index")


def split_code(partition: str, name: str) -> int:
    """A set's integer code in the score tables: the same on every process, whatever order the
    batches arrive in."""
    return zlib.crc32(f"{partition}/{name}".encode()) & 0x7FFFFFFF


class NegAlignModule(EvaluationModule):
    """NegLabel / NegAlign OOD evaluation of any backbone; metrics are logged as
    ``{stage}/ood/{ood set}/{variant}/{auroc,fpr95,aupr_in,aupr_out}``.

    Args:
        backbone: a ``load_backbone`` spec (loaded once per process and shared, see
            `xclip.backbones.shared_backbone`) or a `Backbone` object.
        class_names: ID class names, in label order.
        id_prompts: templates with ``{}`` for every class, or class name -> prompts.
        nouns: candidate negative nouns: a word-list file, a list, or None for the shipped
            ShapesWorld list (``xclip/ood/wordlists``).
        adjectives: candidate negative adjectives, the same way.
        neg_labels_dir: a folder with saved ``neg_labels_noun.txt`` / ``neg_labels_adj.txt``
            (NegRefine's format, or a previous run's output): used as the negatives, no mining.
        noun_templates: prompts of the candidate nouns (NegLabel: ``the nice {}``).
        adj_templates: prompts of the candidate adjectives (NegLabel: ``This is a {} photo``).
        percentile: NegMining's percentile of a word's similarity to the ID classes (0.95).
        keep_ratio: the share of the least ID-like words kept as negatives (0.15).
        n_groups: NegLabel's number of groups.
        seed: the seed of NegLabel's grouping.
        tau: NegLabel's temperature.
        role_tau: the r-score margin of the object / background / ambiguous split.
        cam_percentile: the CAM foreground's percentile (80: the top 20% of patches).
        dilation: patches the foreground is dilated by.
        k: TopKMean size of P_align.
        m1_topk: M1's k (largest group scores averaged).
        m1: M1, top-k aggregation of the group scores (the configured NegAlign variant, ``negalign``
            in the metrics).
        m2: M2, role-aware negatives (object-leaning only).
        m3: M3, z-score scale stabilisation.
        use_p_align: add lam * P_align.
        lam: the configured lambda.
        lambdas: the lambda sweep of the configured variant (every ablation row is swept too).
        convention: FPR95 convention of :func:`xclip.metrics.ood_metrics`.
        text_batch_size: texts encoded per forward.
        text_cache_dir: an optional disk cache folder of the vocabulary's text embeddings.
        breakdown_csv: also write ``per_image.csv``.
    """

    workflow = "ood"
    tasks = ("ood",)

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        class_names: Sequence[str] = ("square", "circle"),
        id_prompts: Sequence[str] | Mapping[str, Sequence[str]] = ("the nice {}",),
        nouns: str | list[str] | None = None,
        adjectives: str | list[str] | None = None,
        neg_labels_dir: str | None = None,
        noun_templates: Sequence[str] = ("the nice {}",),
        adj_templates: Sequence[str] = ("This is a {} photo",),
        percentile: float = 0.95,
        keep_ratio: float = 0.15,
        n_groups: int = 10,
        seed: int = 0,
        tau: float = 0.01,
        role_tau: float = 0.05,
        cam_percentile: float = 80.0,
        dilation: int = 1,
        k: int = 5,
        m1_topk: int = 5,
        m1: bool = False,
        m2: bool = False,
        m3: bool = True,
        use_p_align: bool = True,
        lam: float = 1.0,
        lambdas: Sequence[float] = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0),
        convention: Convention = "neglabel",
        text_batch_size: int = 256,
        text_cache_dir: str | None = None,
        breakdown_csv: bool = False,
    ):
        super().__init__()
        backbone, spec = resolve_backbone(backbone)
        if not lambdas:
            raise ValueError("`lambdas` is empty: give at least one lambda to sweep")
        self.backbone, self.backbone_spec = backbone, spec
        self.class_names = list(class_names)
        self.id_prompts = dict(id_prompts) if isinstance(id_prompts, Mapping) else list(id_prompts)
        self.variant = Variant(m1, m2, m3, use_p_align)
        self.lam, self.lambdas = float(lam), [float(x) for x in lambdas]
        # the text side (build_text_side)
        self.neg_labels_dir, self.nouns, self.adjectives = neg_labels_dir, nouns, adjectives
        self.noun_templates, self.adj_templates = noun_templates, adj_templates
        self.percentile, self.keep_ratio, self.role_tau = percentile, keep_ratio, role_tau
        self.n_groups, self.seed, self.tau, self.m1_topk, self.k = n_groups, seed, tau, m1_topk, k
        self.convention, self.breakdown_csv = convention, breakdown_csv
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
        if self.neg_labels_dir is not None:
            folder = Path(self.neg_labels_dir)
            nouns, adjs = (
                read_words(folder / NEG_LABEL_FILES[p]) if (folder / NEG_LABEL_FILES[p]).is_file() else []
                for p in ("noun", "adj")
            )
            if not nouns and not adjs:
                raise ValueError(f"`neg_labels_dir` ({folder}) holds no words in {sorted(NEG_LABEL_FILES.values())}")
            return nouns, adjs, False
        nouns = resolve_words(self.nouns, "nouns", "nouns")
        # an ID class name is no negative of itself (NegLabel skips them among the nouns)
        id_names = {c.strip().lower() for c in self.class_names}
        kept = [w for w in nouns if w.strip().lower() not in id_names]
        self.dropped_id_names = len(nouns) - len(kept)
        return kept, resolve_words(self.adjectives, "adjectives", "adjectives"), True

    def build_text_side(self) -> NegAlignTerms:
        """ID embeddings, negatives (mined or loaded), role split and the scorer; cached for the run."""
        if self.terms is not None:
            return self.terms
        id_emb = id_embeddings(self.texts, self.class_names, self.id_prompts)
        nouns, adjs, mine = self._vocabulary()
        neg = build_negatives(
            self.texts,
            id_emb,
            nouns,
            adjs,
            self.noun_templates,
            self.adj_templates,
            mine=mine,
            percentile=self.percentile,
            keep_ratio=self.keep_ratio,
            role_tau=self.role_tau,
        )
        n_obj, n_bg = neg.roles["object"].numel(), neg.roles["background"].numel()
        has_m2, has_bg = n_obj >= self.n_groups, n_bg > 0
        self.unavailable = {}
        if not has_m2:
            self.unavailable["m2"] = (
                f"only {n_obj} of {len(neg.words)} negatives lean object (r > {self.role_tau}), "
                f"fewer than n_groups={self.n_groups}"
            )
        if not has_bg:
            self.unavailable["p_align"] = f"no negative of {len(neg.words)} leans background (r < -{self.role_tau})"
        for flag, on, term in (("m2", self.variant.m2, "m2"), ("use_p_align", self.variant.p_align, "p_align")):
            if on and term in self.unavailable:
                raise ValueError(
                    f"`{flag}` is on but {self.unavailable[term]}: set `{flag}` false, lower "
                    "`role_tau` or `n_groups`, or add words"
                )
        # scores in float64: NegLabel's sigmoid saturates near 1 in float32 and ties would hide the ranking
        id_emb, neg_emb = id_emb.double(), neg.emb.double()
        scorer = NegAlignScorer(
            id_emb,
            neg_emb,
            object_idx=neg.roles["object"] if has_m2 else None,
            neg_bg_emb=neg_emb[neg.roles["background"]] if has_bg else None,
            n_groups=self.n_groups,
            seed=self.seed,
            tau=self.tau,
            m1_topk=self.m1_topk,
            m2_role_aware=has_m2,
            use_p_align=has_bg,
            k=self.k,
        )
        self.negatives, self.terms = neg, NegAlignTerms(scorer).to(self.device)
        return self.terms

    def _write_vocabulary(self, out_dir: Path) -> None:
        neg = self.negatives
        assert neg is not None  # build_text_side ran first (_start_pass)
        for pos, name in NEG_LABEL_FILES.items():
            atomic_write_text(out_dir / name, "".join(f"{w}\n" for w, p in zip(neg.words, neg.pos) if p == pos))
        role_of = {i: role for role in ROLES for i in neg.roles[role].tolist()}
        atomic_write_csv(
            out_dir / "neg_roles.csv",
            ("word", "pos", "r", "role"),
            (
                {"word": w, "pos": p, "r": f"{r:.6f}", "role": role_of[i]}
                for i, (w, p, r) in enumerate(zip(neg.words, neg.pos, neg.r.tolist()))
            ),
        )
        for role in ROLES:
            atomic_write_text(out_dir / f"neg_{role}.txt", "".join(f"{w}\n" for w in neg.role_words(role)))

    def _start_pass(self) -> None:
        self.build_text_side()
        self._splits, self._results, self._skipped_paths = {}, {}, {}
        self.table.reset()
        self.skips.reset()
        if self.trainer.is_global_zero:
            self._write_vocabulary(run_directory(self.trainer))

    def on_validation_start(self) -> None:
        self._start_pass()

    def on_test_start(self) -> None:
        self._start_pass()

    # ---- per batch ------------------------------------------------------------------------------
    def step(self, batch: dict[str, Any], stage: str) -> dict[str, Tensor]:
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
        self.table.update(
            **{c: out[c] for c in TERM_COLUMNS},
            split=torch.full((n,), code, device=self.device),
            pred_class=out["pred_class"],
            cam_valid=feats.cam_valid,
            bg_fell_back=feats.bg_fell_back,
            label=torch.as_tensor(batch.get("label", torch.full((n,), -1))).to(self.device),
            index=torch.as_tensor(batch.get("index", torch.arange(n))).to(self.device),
        )
        return {
            "cam": feats.cam.cpu(),
            "fg_mask": feats.fg_mask.cpu(),
            "cam_valid": feats.cam_valid.cpu(),
            "pred_class": out["pred_class"].cpu(),
        }

    # ---- epoch end ------------------------------------------------------------------------------
    def finish(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        rows = in_set_order({k: v.cpu() for k, v in self.table.rows().items()}, self._splits)
        skips = in_set_order({k: v.cpu() for k, v in self.skips.rows().items()}, self._splits)
        paths: dict[tuple[int, int], str] = {}
        for part in gather_objects(self._skipped_paths):
            paths.update(part)
        evaluated = "test" if stage == "test" else "val"
        names = report_names(self._splits, evaluated)
        skipped = {c: int((skips["split"] == c).sum()) for c in names}
        skipped_paths = {
            names[c][0]: sorted(paths.get((c, int(i)), "?") for i in skips["index"][skips["split"] == c])
            for c in names
            if skipped[c]
        }
        empty = [names[c][0] for c in names if names[c][1] != "calib" and not (rows["split"] == c).any()]
        if empty:
            raise ValueError(f"no readable image in split(s) {empty} (unreadable images skipped: {skipped_paths})")
        assert self.terms is not None  # built at the pass start (_start_pass)
        result = evaluate(
            rows, self._splits, evaluated, self.variant, self.lam, self.lambdas, self.convention, self.terms.available
        )
        for vname, per_split in result.variants.items():
            for split, values in per_split.items():
                for key, value in values.items():
                    self.log_metric(stage, f"{split}/{vname}/{key}", value, add_dataloader_idx=False)
        self._results = {
            "config": self._config(),
            "convention": self.convention,
            "evaluated_partition": evaluated,
            "splits": split_statistics(rows, names, skipped, result.configured),
            "skipped_paths": skipped_paths,
            "variants": result.variants,
            "lambdas": self.lambdas,
            "per_lambda": [{"lambda": lam, "metrics": m} for lam, m in zip(self.lambdas, result.per_lambda)],
            "best_lambda": self.lambdas[result.best],
            "best_lambda_chosen_on": "val",
            "best_lambda_rule": (
                "highest mean AUROC over the OOD splits of the validation partition; "
                f"its {evaluated} metrics are `variants.negalign_selected`"
                + (" (chosen and reported on the same data: test runs keep them apart)" if evaluated == "val" else "")
            ),
            "oracle_lambda": self.lambdas[result.oracle],
            "oracle_lambda_rule": f"highest mean AUROC on the reported {evaluated} data itself: an oracle, "
            "for reference only",
            "ablation": result.ablation,
            "ablation_unavailable": {
                **self.unavailable,
                **({"m3": "no calibration split"} if result.stats is None else {}),
            },
            "zscore_stats": result.stats,
        }
        if self.trainer.is_global_zero:
            unreadable = [
                (c, int(i), paths.get((c, int(i)), "?"))
                for c, i in zip(skips["split"].tolist(), skips["index"].tolist())
            ]
            self._write_outputs(stage, rows, names, result, unreadable)

    def _config(self) -> dict[str, Any]:
        neg = self.negatives
        assert neg is not None  # built at the pass start (_start_pass)
        return {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in self.hparams.items()},
            "variant": self.variant.name,
            "n_negatives": len(neg.words),
            "n_roles": {r: neg.roles[r].numel() for r in ROLES},
            "text_encoded": self.texts.encoded,
            "id_names_dropped_from_nouns": self.dropped_id_names,
        }

    def _write_outputs(
        self,
        stage: str,
        rows: dict[str, Tensor],
        names: dict[int, tuple[str, str]],
        result: OODEvaluation,
        unreadable: list[tuple[int, int, str]],
    ) -> None:
        """Figures (PNG + TensorBoard) and, on request, the per-image CSV (unreadable images
        included, with their paths)."""
        out_dir = run_directory(self.trainer)
        terms = {c: rows[c] for c in TERM_COLUMNS}
        is_id, ood_masks = set_masks(rows, self._splits, "test" if stage == "test" else "val")
        title = f"{self.variant.name} on {self.backbone_spec}"
        figures = {"lambda_sweep": sweep_figure(self.lambdas, result.per_lambda, title)}
        curves = {}
        for label, v, lam in (
            ("NegLabel", Variant(), 0.0),
            ("NegLabel*", result.star, 0.0),
            (f"NegAlign lam={self.lam:g}", self.variant, self.lam),
        ):
            s = variant_scores(terms, v, lam, result.stats)
            curves[label] = {split: (s[is_id], s[m]) for split, m in ood_masks.items()}
        figures["roc"] = roc_figure(curves)
        for name, fig in figures.items():
            array = figure_to_array(fig)
            save_png(array, out_dir / f"{stage}_{name}.png")
            for writer in tensorboard_writers(self.trainer):
                writer.add_image(self.metric_key(stage, name), array, self.global_step, dataformats="HWC")
        if self.breakdown_csv:
            write_breakdown(
                out_dir / f"{stage}_per_image.csv", rows, names, result.configured, self.class_names, unreadable
            )

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """Console report rows: one per variant and OOD set, AUROC / FPR95 / AUPR columns."""
        res = self._results
        names = {
            "neglabel": "NegLabel",
            "neglabel_star": f"NegLabel* ({Variant(self.variant.m1, self.variant.m2, self.variant.m3, False).name})",
            "negalign": f"NegAlign {self.variant.name}, lambda {self.lam:g} (configured)",
            "negalign_selected": f"NegAlign {self.variant.name}, lambda {res.get('best_lambda', '?'):g} "
            f"(chosen on {res.get('best_lambda_chosen_on', 'val')})"
            if isinstance(res.get("best_lambda"), float)
            else "NegAlign (lambda chosen on val)",
        }
        columns = {"auroc": "AUROC", "fpr95": "FPR95", "aupr_in": "AUPR-in", "aupr_out": "AUPR-out"}
        rows = []
        for stage in STAGES:
            prefix = self.metric_key(stage, "")
            for variant, label in names.items():
                for split in sorted(
                    {
                        k[len(prefix) :].split("/")[0]
                        for k in metrics
                        if k.startswith(prefix)
                        and k[len(prefix) :].count("/") == 2
                        and k[len(prefix) :].split("/")[1] == variant
                    }
                ):
                    keys = [self.metric_key(stage, f"{split}/{variant}/{m}") for m in columns]
                    keys = [k for k in keys if k in metrics]
                    rows.append(
                        ReportRow(
                            "OOD detection",
                            f"{label} vs {split} [{stage}]",
                            {columns[k.rsplit("/", 1)[1]]: metrics[k] for k in keys},
                            keys,
                        )
                    )
        return rows

    def extra_results(self) -> dict[str, Any]:
        """Merged into results.json by the CLI: backbone and the whole NegAlign report."""
        return {**super().extra_results(), "ood": self._results}
