"""`TiPAIModule`: text-to-image faithfulness scoring (eval only).

Per batch of prompts (``TiPAIDataModule``): global scores, patch scores (``crops`` / ``dense``),
chosen/rejected pairs, all written to the TiPAI database in one transaction; prompts the database
already holds complete are read back instead of re-scored (an interrupted run resumes, a re-run
scores nothing again). With ShapesWorld's known errors it measures, per map and for a random map:
KLD, CC, SIM, NSS, AUC-Judd between the badness map and the error mask, the share of erroneous
images whose worst cell touches the error, and the global score's pair accuracy.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.data.embedding_cache import weights_fingerprint
from xclip.faithfulness.database import (
    FaithfulnessDatabase,
    FaithfulnessDatabaseError,
    ImageRecord,
    PairRecord,
    PromptRecord,
    ScoreRecord,
)
from xclip.faithfulness.grid import resample_to_cells
from xclip.faithfulness.localisation import (
    METRIC_KEYS,
    error_cells,
    localisation,
    pair_statistics,
    random_goodness,
    rejected_images,
)
from xclip.faithfulness.pairs import select_pairs
from xclip.faithfulness.scoring import METHODS, TiPAIScorer
from xclip.faithfulness.tspo_head import TSPOHead, load_head
from xclip.metrics.gather import gather_objects
from xclip.metrics.score_table import ScoreTable
from xclip.results import ReportRow, run_directory

METRIC_NAMES = {v: k for k, v in METRIC_KEYS.items()}
# what a run counts (results.json, the console report): prompts seen, without a readable image, written
# (scored now) or read back whole; images scored for the first time, re-scored because their file or
# prompt changed, read back from the database; pairs
COUNTS = ("prompts", "prompts_without_images", "prompts_scored", "prompts_from_database", "images_scored",
          "images_rescored", "images_from_database", "pairs")


class TiPAIModule(pl.LightningModule):
    """TiPAI scoring of prompts x generated images.

    Args:
        backbone: a ``load_backbone`` spec (shared per process) or a `Backbone`.
        grid: G, cells per side of the patch grid (the proof of concept used 7).
        methods: ``crops`` and/or ``dense``.
        crop_batch_size: crops embedded per forward.
        pair_rule: ``best_worst`` (per prompt, best vs worst by the global score) or ``all``
            (every ordered pair whose score difference exceeds `margin`).
        margin: the minimum score difference of a pair.
        db_path: the TiPAI database (default ``<run dir>/tipai.db``); give a fixed path to resume
            an interrupted run or to re-run without re-scoring.
        resume: read prompts the database holds complete instead of scoring them again.
        head: an exported TSPO head directory (``checkpoints/tspo-head-tiny-shapes``): its reward and
            patch error probabilities are stored as method ``head`` (needs ``dense``, whose
            forward it reads).
        random_seed: seed of the random-map baseline.
    """

    def __init__(self, backbone: str | Backbone = "xclip:tiny-shapes", grid: int = 7,
                 methods: Sequence[str] = METHODS, crop_batch_size: int = 256, pair_rule: str = "best_worst",
                 margin: float = 0.0, db_path: str | None = None, resume: bool = True, head: str | None = None,
                 random_seed: int = 0):
        super().__init__()
        self.backbone, self.backbone_spec = resolve_backbone(backbone)
        self.backbone.eval().requires_grad_(False)
        self.scorer = TiPAIScorer(self.backbone, grid, methods, crop_batch_size)
        select_pairs(torch.zeros(0), torch.zeros(0, dtype=torch.long), pair_rule, margin)  # check the rule now
        self.grid, self.methods, self.pair_rule, self.margin = int(grid), tuple(methods), pair_rule, float(margin)
        self.db_path, self.resume, self.random_seed = db_path, resume, int(random_seed)
        self.head_dir = head
        self.head: TSPOHead | None = None
        if head is not None:
            if "dense" not in self.methods:
                raise ValueError("head needs the 'dense' method (it reads the dense forward's features)")
            self.head = load_head(head)
            self.head.check_backbone(self.backbone)
        self.map_names = self.scorer.map_names + (("head",) if self.head is not None else ())
        self.baselines = self.map_names + ("random",)
        floats = ("global", "error_share", *(f"{m}_{k}" for m in self.baselines for k in METRIC_NAMES))
        ints = ("index", "seed", "faithful", *(f"{m}_hit" for m in self.baselines))
        self.table = ScoreTable(floats, ints, unique_by=("index", "seed"))
        self.db: FaithfulnessDatabase | None = None
        self._counts = dict.fromkeys(COUNTS, 0)
        self._pair_sums = torch.zeros(3, dtype=torch.float64)
        self._skipped: list[str] = []
        self._results: dict[str, Any] = {}

    # ---- database -------------------------------------------------------------------------
    def db_config(self, image_size: int) -> dict[str, Any]:
        """What the stored scores depend on (a database holds one configuration); `image_size` is
        the side the images were resized and cropped to before scoring."""
        return {"backbone": self.backbone_spec, "weights_sha256": weights_fingerprint(self.backbone),
                "grid": self.grid, "methods": list(self.methods), "pair_rule": self.pair_rule, "margin": self.margin,
                "head": None if self.head is None else self.head.fingerprint, "image_size": int(image_size),
                "precision": self.scorer.precision or "32"}

    def database_path(self) -> Path:
        return Path(self.db_path) if self.db_path else run_directory(self.trainer) / "tipai.db"

    def _start(self) -> None:
        self.table.reset()
        self._counts = dict.fromkeys(COUNTS, 0)
        self._pair_sums = torch.zeros(3, dtype=torch.float64)  # chosen score, rejected score, their gap
        self._skipped, self._results = [], {}
        self.scorer.precision = None if str(self.trainer.precision) in ("32", "32-true") else str(self.trainer.precision)

    def _open(self, image_size: int) -> FaithfulnessDatabase:
        """The database, opened at the first batch (its configuration includes the image size)."""
        if self.db is None:
            self.db = FaithfulnessDatabase(self.database_path(), self.db_config(image_size))
        return self.db

    def on_validation_start(self) -> None:
        self._start()

    def on_test_start(self) -> None:
        self._start()

    def on_validation_end(self) -> None:
        self._say_where()

    def on_test_end(self) -> None:
        self._say_where()

    def _say_where(self) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or self.db is None:
            return
        rows = self.db.counts()
        path = self.db.path.resolve()
        print(f"\nTiPAI database: {path} ({rows['prompts']} prompts, {rows['images']} images, {rows['pairs']} pairs); "
              f"browse it with: xclip app --db {path}", flush=True)

    def teardown(self, stage: str) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # ---- scoring --------------------------------------------------------------------------
    def _reusable(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, list[bool]]:
        """Which images of the batch the database holds with the same content, which it holds with
        other content (re-scored), and which prompts need writing.

        An image's stored scores are reused only when its prompt is complete with the same text and
        folder and the image's resolved path and content hash are the stored ones; a prompt is
        written again when any of its images is scored now or its set of images changed (its pairs
        are rebuilt). Returns [M] bool reuse, [M] bool rescored and [B] write flags.
        """
        db = self.db
        prompt_of = batch["prompt_of"].tolist()
        states = db.prompt_states(batch["prompt_id"])
        for b, pid in enumerate(batch["prompt_id"]):
            state = states.get(pid)
            if state is not None and state.root != batch["root"][b]:
                raise FaithfulnessDatabaseError(
                    f"{db.path}: prompt {pid!r} was scored from {state.root or 'generated (ShapesWorld) images'}; this "
                    f"run reads it from {batch['root'][b] or 'generated (ShapesWorld) images'}. A database holds each "
                    "prompt id from one folder (another folder's prompt ids get their own rows): pass another db_path "
                    "for this folder (e.g. --model.init_args.db_path runs/<name>/tipai.db)")
        reuse, rescored = [], []
        for i, b in enumerate(prompt_of):
            state = states.get(batch["prompt_id"][b])
            stored = None if state is None or not state.complete else state.images.get(batch["image_id"][i])
            same = (stored is not None and state.prompt == batch["prompt"][b]
                    and stored == (batch["path"][i], batch["sha256"][i]))
            reuse.append(self.resume and same)
            rescored.append(stored is not None and not reuse[-1])
        write = []
        for b, pid in enumerate(batch["prompt_id"]):
            state = states.get(pid)
            rows = [i for i, p in enumerate(prompt_of) if p == b]
            unchanged = (state is not None and state.complete and all(reuse[i] for i in rows)
                         and set(state.images) == {batch["image_id"][i] for i in rows})
            write.append(not unchanged)
        return torch.tensor(reuse, dtype=torch.bool), torch.tensor(rescored, dtype=torch.bool), write

    def faithfulness_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Score (or read back) one batch of prompts, store it, update the metric table; returns
        what the figure callback draws."""
        if batch.get("task") != "faithfulness":
            raise ValueError(f"TiPAIModule evaluates 'faithfulness' batches, got task {batch.get('task')!r}")
        self._skipped.extend(batch.get("skipped_paths", []))
        self._open(int(batch["images"].shape[-1]))
        prompt_of = batch["prompt_of"].to(self.device)
        m = prompt_of.shape[0]
        reuse, rescored, write = self._reusable(batch)
        present = torch.zeros(len(write), dtype=torch.bool)
        present[batch["prompt_of"]] = True  # prompts with at least one readable image
        self._counts["prompts"] += len(write)
        self._counts["prompts_without_images"] += int((~present).sum())
        if m == 0:  # no readable image: the batch's prompts leave the database
            self.db.write(PromptRecord(batch["prompt_id"][b], batch["prompt"][b], root=batch["root"][b])
                          for b in range(len(write)))
            return {}
        global_score = torch.zeros(m, device=self.device)
        maps = {name: torch.zeros(m, self.grid, self.grid, device=self.device) for name in self.map_names}
        head_reward = torch.full((m,), float("nan"), device=self.device)  # the TSPO head's reward (with `head`)
        todo_img = ~reuse.to(self.device)
        if todo_img.any():
            scored = self._score(batch, todo_img)
            global_score[todo_img] = scored.pop("global")
            if "head_reward" in scored:
                head_reward[todo_img] = scored.pop("head_reward")
            for name, value in scored.items():
                maps[name][todo_img] = value
        if (~todo_img).any():
            loaded = self._load(batch, ~todo_img)
            global_score[~todo_img] = loaded.pop("global")
            if "head_reward" in loaded:
                head_reward[~todo_img] = loaded.pop("head_reward")
            for name, value in loaded.items():
                maps[name][~todo_img] = value
        self._counts["prompts_scored"] += sum(w and bool(p) for w, p in zip(write, present.tolist()))
        self._counts["prompts_from_database"] += sum(not w and bool(p) for w, p in zip(write, present.tolist()))
        self._counts["images_scored"] += int((~reuse & ~rescored).sum())
        self._counts["images_rescored"] += int(rescored.sum())
        self._counts["images_from_database"] += int(reuse.sum())
        pairs = select_pairs(global_score, prompt_of, self.pair_rule, self.margin)
        chosen, rejected = global_score[pairs[:, 0]].double().cpu(), global_score[pairs[:, 1]].double().cpu()
        self._counts["pairs"] += int(pairs.shape[0])
        self._pair_sums += torch.stack([chosen.sum(), rejected.sum(), (chosen - rejected).sum()])
        new_prompts = [b for b in range(len(batch["prompt_id"])) if write[b]]  # without images: removed
        if new_prompts:
            self.db.write(self._records(batch, new_prompts, global_score, maps, pairs, head_reward))
        self._update_table(batch, global_score, maps)
        return {"prompt_id": batch["prompt_id"], "prompt": batch["prompt"], "images": batch["images"].detach().cpu(),
                "prompt_of": batch["prompt_of"].cpu(), "image_id": batch["image_id"], "error": batch["error"],
                "global": global_score.cpu(), "maps": {k: v.cpu() for k, v in maps.items()}, "pairs": pairs.cpu()}

    def _score(self, batch: dict[str, Any], rows: Tensor) -> dict[str, Tensor]:
        images = batch["images"].to(self.device)[rows]
        prompt_of = batch["prompt_of"].to(self.device)[rows]
        text = self.scorer.text_embeddings(batch["prompt"])
        out = self.scorer.score(images, text[prompt_of])
        result = {"global": out.global_score, **out.maps}
        if self.head is not None:
            with torch.no_grad():
                reward, error_prob = self.head.score_trace(self.backbone, out.trace, text[prompt_of])
            result["head"] = 1 - _to_grid(error_prob, self.grid, tuple(images.shape[-2:]))
            result["head_reward"] = reward
        return result

    def _load(self, batch: dict[str, Any], rows: Tensor) -> dict[str, Tensor]:
        """The stored scores of the images in `rows` (their prompts are complete in the database)."""
        wanted = [batch["image_id"][i] for i in rows.nonzero().flatten().tolist()]
        by_image: dict[str, dict] = {}
        for pid in {batch["prompt_id"][int(batch["prompt_of"][i])] for i in rows.nonzero().flatten().tolist()}:
            by_image.update(self.db.scores(pid))
        missing = [i for i in wanted if i not in by_image]
        if missing:
            raise ValueError(f"{self.db.path}: images {missing[:5]} of complete prompts are not stored: the folder "
                             "changed since the database was written; pass another db_path")
        out = {"global": torch.tensor([by_image[i]["clip"].global_score for i in wanted], dtype=torch.float32)}
        for name in self.map_names:
            out[name] = torch.from_numpy(np.stack([by_image[i][name].grid for i in wanted]))
        if self.head is not None:
            rewards = [by_image[i]["head"].global_score for i in wanted]
            out["head_reward"] = torch.tensor([float("nan") if r is None else r for r in rewards], dtype=torch.float32)
        return {k: v.to(self.device) for k, v in out.items()}

    def _records(self, batch: dict[str, Any], prompts: list[int], global_score: Tensor, maps: dict[str, Tensor],
                 pairs: Tensor, head_reward: Tensor) -> list[PromptRecord]:
        prompt_of = batch["prompt_of"].tolist()
        images, faithful = batch["images"], batch["faithful"].tolist()
        cpu_maps = {k: v.detach().cpu().numpy() for k, v in maps.items()}
        rewards = head_reward.detach().cpu().tolist()
        records = []
        for b in prompts:
            pid = batch["prompt_id"][b]
            rows = [i for i, p in enumerate(prompt_of) if p == b]
            rec = PromptRecord(pid, batch["prompt"][b], root=batch["root"][b])
            for i in rows:
                path = batch["path"][i]
                rec.images.append(ImageRecord(
                    batch["image_id"][i], pid, int(batch["seed"][i]), "shapes" if path is None else "folder",
                    int(images.shape[-2]), int(images.shape[-1]), path=path,
                    png=_png(images[i]) if path is None else None, error=batch["error"][i],
                    faithful=None if faithful[i] < 0 else bool(faithful[i]), sha256=batch["sha256"][i]))
                rec.scores.append(ScoreRecord(batch["image_id"][i], "clip", float(global_score[i])))
                for name in self.map_names:
                    rec.scores.append(ScoreRecord(batch["image_id"][i], name,
                                                  float(cpu_maps[name][i].mean()) if name != "head" else rewards[i],
                                                  cpu_maps[name][i]))
            for c, r in pairs.tolist():
                if prompt_of[c] == b:
                    rec.pairs.append(PairRecord(pid, batch["image_id"][c], batch["image_id"][r], float(global_score[c]),
                                                float(global_score[r]), self.pair_rule))
            records.append(rec)
        return records

    def _update_table(self, batch: dict[str, Any], global_score: Tensor, maps: dict[str, Tensor]) -> None:
        m = global_score.shape[0]
        index = batch["index"].to(self.device)[batch["prompt_of"].to(self.device)]
        seed = batch["seed"].to(self.device)
        cols: dict[str, Tensor] = {"global": global_score, "index": index, "seed": seed,
                                   "faithful": batch["faithful"].to(self.device)}
        masks = batch.get("error_masks")
        all_maps = {**maps, "random": random_goodness(index.cpu(), seed.cpu(), self.grid, self.random_seed).to(self.device)}
        if masks is None:
            nan = torch.full((m,), float("nan"), device=self.device)
            cols["error_share"] = nan
            for name in self.baselines:
                cols.update({f"{name}_{k}": nan for k in METRIC_NAMES})
                cols[f"{name}_hit"] = torch.full((m,), -1, dtype=torch.long, device=self.device)
        else:
            masks = masks.to(self.device)
            cols["error_share"] = error_cells(masks, self.grid).flatten(1).double().mean(1)
            for name, goodness in all_maps.items():
                for key, value in localisation(goodness, masks).items():
                    cols[f"{name}_{key}"] = value
        self.table.update(**cols)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.faithfulness_step(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        return self.faithfulness_step(batch)

    # ---- epoch end ------------------------------------------------------------------------
    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        rows = {k: v.cpu() for k, v in self.table.rows().items()}
        skipped = sorted({p for part in gather_objects(self._skipped) for p in part})
        counts = {k: sum(c[k] for c in gather_objects(self._counts)) for k in COUNTS}
        counts.update(images=int(rows["index"].numel()), images_skipped=len(skipped))
        pair_sums = torch.stack([s.cpu() for s in gather_objects(self._pair_sums)]).sum(0)
        metrics: dict[str, float] = {}
        if counts["pairs"]:
            mean = (pair_sums / counts["pairs"]).tolist()
            metrics.update({"pairs/mean_chosen_score": mean[0], "pairs/mean_rejected_score": mean[1],
                            "pairs/mean_score_gap": mean[2]})
        if rows["index"].numel():
            stats = pair_statistics(rows["global"], rows["index"], rows["faithful"])
            if stats["n_pairs"]:
                metrics.update({k: stats[k] for k in ("pair_accuracy", "chosen_is_faithful", "rejected_is_erroneous")})
            error = rows["error_share"].isfinite() & (rows["faithful"] == 0)
            if error.any():
                for name in self.baselines:
                    for key, label in METRIC_NAMES.items():
                        metrics[f"{name}/{label}"] = float(rows[f"{name}_{key}"][error].nanmean())
                    metrics[f"{name}/worst_cell_on_error"] = float(rows[f"{name}_hit"][error].double().mean())
                share = rows["error_share"][error]
                metrics["random_pick/worst_cell_on_error"] = float(share.mean())
                # the images a user would look at: each prompt's rejected one, when it has an error
                rejected = error & rejected_images(rows["global"], rows["index"])
                if rejected.any():
                    for name in self.baselines:
                        metrics[f"{name}/rejected_worst_cell_on_error"] = float(rows[f"{name}_hit"][rejected].double().mean())
                    metrics["random_pick/rejected_worst_cell_on_error"] = float(rows["error_share"][rejected].mean())
                if {"crops", "dense"} <= set(self.map_names):
                    both = (rows["crops_hit"][error] == 1) & (rows["dense_hit"][error] == 1)
                    metrics["agreement/crops_and_dense_worst_cell_on_error"] = float(both.double().mean())
                    metrics["agreement/chance"] = float(share.square().mean())
        for key, value in metrics.items():
            self.log(f"{stage}/tipai/{key}", value, sync_dist=True)
        for key, value in counts.items():  # the gathered totals: the same on every process
            self.log(f"{stage}/tipai/n_{key}", float(value), sync_dist=True)
        counts_db = self.db.counts() if self.db is not None else {}
        self._results = {
            "database": str(self.database_path().resolve()),
            "database_rows": counts_db,
            "grid": self.grid, "methods": list(self.methods), "maps": list(self.map_names),
            "pair_rule": self.pair_rule, "margin": self.margin, "head": self.head_dir,
            "n_images": int(rows["index"].numel()),
            "n_error_images": int(((rows["faithful"] == 0) & rows["error_share"].isfinite()).sum()),
            "prompts_scored": counts["prompts_scored"], "prompts_from_database": counts["prompts_from_database"],
            "counts": counts,
            "skipped_paths": skipped,
            "metrics": metrics,
            "conventions": {
                "badness": "max(goodness) - goodness per image, painted cell by cell over the pixels",
                "saliency": "MIT benchmark variant (xclip.metrics.saliency), averaged over erroneous images",
                "worst_cell_on_error": "share of erroneous images whose lowest-goodness cell touches the error mask",
                "rejected_worst_cell_on_error": "the same over the rejected images (each prompt's worst by the global "
                                                "score) that have an error",
                "random_pick": "expected worst_cell_on_error of a uniformly random cell (the share of error cells)",
                "agreement": "share of erroneous images where the crops and dense worst cells both touch the error; "
                             "chance = the same for two independent random cells",
            },
        }

    def report_rows(self, metrics: Mapping[str, float | None]) -> list[ReportRow]:
        """The run's counts (prompts, images, pairs), one row for the pair statistics, one per map
        (incl. the random map) with its localisation."""
        rows = []
        for stage in ("val", "test"):
            pre = f"{stage}/tipai/"
            if pre + "n_prompts" in metrics:
                n = {k: int(metrics.get(f"{pre}n_{k}") or 0) for k in (*COUNTS, "images", "images_skipped")}
                rows.append(ReportRow(
                    "text-to-image faithfulness",
                    f"prompts [{stage}]: {n['prompts']} ({n['prompts_scored']} written (new or changed), "
                    f"{n['prompts_from_database']} unchanged in the database, {n['prompts_without_images']} without a "
                    "readable image)", {}, [pre + f"n_{k}" for k in COUNTS if k.startswith("prompts")]))
                rows.append(ReportRow(
                    "text-to-image faithfulness",
                    f"images [{stage}]: {n['images']} ({n['images_scored']} new, {n['images_rescored']} changed and "
                    f"re-scored, {n['images_from_database']} read back from the database); {n['images_skipped']} "
                    "unreadable and skipped", {}, [pre + f"n_{k}" for k in (*COUNTS, "images", "images_skipped")
                                         if k.startswith("images")]))
                keys = [pre + k for k in ("pairs/mean_chosen_score", "pairs/mean_rejected_score", "pairs/mean_score_gap")
                        if pre + k in metrics]
                names = {"mean_chosen_score": "chosen", "mean_rejected_score": "rejected", "mean_score_gap": "gap"}
                rows.append(ReportRow("text-to-image faithfulness",
                                      f"{n['pairs']} chosen/rejected pairs: mean global score [{stage}]",
                                      {names[k.rsplit("/", 1)[1]]: metrics[k] for k in keys}, [pre + "n_pairs", *keys]))
            keys = [pre + k for k in ("pair_accuracy", "chosen_is_faithful", "rejected_is_erroneous") if pre + k in metrics]
            if keys:
                rows.append(ReportRow("text-to-image faithfulness", f"global CLIP score: pairs [{stage}]",
                                      {k.rsplit("/", 1)[1].replace("_", " "): metrics[k] for k in keys}, keys))
            for name in self.baselines:
                keys = [f"{pre}{name}/{m}" for m in (*METRIC_KEYS, "worst_cell_on_error", "rejected_worst_cell_on_error")
                        if f"{pre}{name}/{m}" in metrics]
                if keys:
                    label = {"random": "random map"}.get(name, name)
                    names = {"worst_cell_on_error": "worst cell on error",
                             "rejected_worst_cell_on_error": "rejected: worst cell on error"}
                    rows.append(ReportRow("text-to-image faithfulness",
                                          f"{label} {self.grid}x{self.grid}: badness vs error mask [{stage}]",
                                          {names.get(k.rsplit("/", 1)[1], k.rsplit("/", 1)[1]): metrics[k] for k in keys},
                                          keys))
            labels = {"random_pick/worst_cell_on_error": "random cell on error",
                      "random_pick/rejected_worst_cell_on_error": "random cell on a rejected image's error",
                      "agreement/crops_and_dense_worst_cell_on_error": "crops and dense both on error",
                      "agreement/chance": "both by chance"}
            keys = [pre + k for k in labels if pre + k in metrics]
            if keys:
                rows.append(ReportRow("text-to-image faithfulness", f"worst cell: chance and agreement [{stage}]",
                                      {labels[k[len(pre):]]: metrics[k] for k in keys}, keys))
        return rows

    def extra_results(self) -> dict[str, Any]:
        return {"backbone": self.backbone_spec, "tipai": self._results}


def _to_grid(patch_map: Tensor, grid: int, image_size: tuple[int, int]) -> Tensor:
    """A ViT-grid map [N, gh, gw] -> [N, G, G] (area resampling)."""
    return resample_to_cells(patch_map.double(), grid, image_size).float()


def _png(image01: Tensor) -> bytes:
    arr = (image01.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
