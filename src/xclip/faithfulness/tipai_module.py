"""`TiPAIModule`: text-to-image faithfulness scoring (eval only).

Per batch of prompts (``TiPAIDataModule``): global scores, patch scores (``crops`` / ``dense``),
chosen/rejected pairs, all written to the TiPAI database in one transaction; prompts the database
already holds complete are read back instead of re-scored (an interrupted run resumes, a re-run
scores nothing again). With ShapesWorld's known errors it measures, per map and for a random map:
KLD, CC, SIM, NSS, AUC-Judd between the badness map and the error mask, the share of erroneous
images whose worst cell touches the error, and the global score's pair accuracy.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from xclip.backbones import Backbone, resolve_backbone
from xclip.data.embedding_cache import weights_fingerprint
from xclip.engine import STAGES, EvaluationModule
from xclip.faithfulness.database import FaithfulnessDatabase, PromptRecord
from xclip.faithfulness.evaluation import METRIC_NAMES, tipai_metrics
from xclip.faithfulness.grid import resample_to_cells
from xclip.faithfulness.localisation import error_cells, localisation, random_goodness
from xclip.faithfulness.pairs import select_pairs
from xclip.faithfulness.records import prompt_records, reusable_images
from xclip.faithfulness.report import COUNTS, tipai_report_rows
from xclip.faithfulness.scoring import METHODS, TiPAIScorer
from xclip.faithfulness.tspo_head import TSPOHead, load_head
from xclip.metrics.gather import gather_objects
from xclip.metrics.score_table import ScoreTable
from xclip.results import ReportRow, run_directory


class TiPAIModule(EvaluationModule):
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

    Metrics are logged as ``{stage}/faithfulness/tipai/...``.
    """

    workflow = "faithfulness"
    tasks = ("faithfulness",)

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        grid: int = 7,
        methods: Sequence[str] = METHODS,
        crop_batch_size: int = 256,
        pair_rule: str = "best_worst",
        margin: float = 0.0,
        db_path: str | None = None,
        resume: bool = True,
        head: str | None = None,
        random_seed: int = 0,
    ):
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
        return {
            "backbone": self.backbone_spec,
            "weights_sha256": weights_fingerprint(self.backbone),
            "grid": self.grid,
            "methods": list(self.methods),
            "pair_rule": self.pair_rule,
            "margin": self.margin,
            "head": None if self.head is None else self.head.fingerprint,
            "image_size": int(image_size),
            "precision": self.scorer.precision or "32",
        }

    def database_path(self) -> Path:
        return Path(self.db_path) if self.db_path else run_directory(self.trainer) / "tipai.db"

    def start(self, stage: str) -> None:
        self.table.reset()
        self._counts = dict.fromkeys(COUNTS, 0)
        self._pair_sums = torch.zeros(3, dtype=torch.float64)  # chosen score, rejected score, their gap
        self._skipped, self._results = [], {}
        self.scorer.precision = (
            None if str(self.trainer.precision) in ("32", "32-true") else str(self.trainer.precision)
        )

    def _open(self, image_size: int) -> FaithfulnessDatabase:
        """The database, opened at the first batch (its configuration includes the image size)."""
        if self.db is None:
            self.db = FaithfulnessDatabase(self.database_path(), self.db_config(image_size))
        return self.db

    def on_validation_end(self) -> None:
        self._say_where()

    def on_test_end(self) -> None:
        self._say_where()

    def _say_where(self) -> None:
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or self.db is None:
            return
        rows = self.db.counts()
        path = self.db.path.resolve()
        print(
            f"\nTiPAI database: {path} ({rows['prompts']} prompts, {rows['images']} images, {rows['pairs']} pairs); "
            f"browse it with: xclip app --db {path}",
            flush=True,
        )

    def teardown(self, stage: str) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    # ---- scoring --------------------------------------------------------------------------
    def step(self, batch: dict[str, Any], stage: str) -> dict[str, Any]:
        """Score (or read back) one batch of prompts, store it, update the metric table; returns
        what the explanation callback draws."""
        self._skipped.extend(batch.get("skipped_paths", []))
        db = self._open(int(batch["images"].shape[-1]))
        prompt_of = batch["prompt_of"].to(self.device)
        m = prompt_of.shape[0]
        reuse, rescored, write = reusable_images(batch, db.prompt_states(batch["prompt_id"]), self.resume, db.path)
        present = torch.zeros(len(write), dtype=torch.bool)
        present[batch["prompt_of"]] = True  # prompts with at least one readable image
        self._counts["prompts"] += len(write)
        self._counts["prompts_without_images"] += int((~present).sum())
        if m == 0:  # no readable image: the batch's prompts leave the database
            db.write(
                PromptRecord(batch["prompt_id"][b], batch["prompt"][b], root=batch["root"][b])
                for b in range(len(write))
            )
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
            loaded = self._load(db, batch, ~todo_img)
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
            db.write(prompt_records(batch, new_prompts, global_score, maps, pairs, head_reward, self.pair_rule))
        self._update_table(batch, global_score, maps)
        return {
            "prompt_id": batch["prompt_id"],
            "prompt": batch["prompt"],
            "images": batch["images"].detach().cpu(),
            "prompt_of": batch["prompt_of"].cpu(),
            "image_id": batch["image_id"],
            "error": batch["error"],
            "global": global_score.cpu(),
            "maps": {k: v.cpu() for k, v in maps.items()},
            "pairs": pairs.cpu(),
        }

    def _score(self, batch: dict[str, Any], rows: Tensor) -> dict[str, Tensor]:
        images = batch["images"].to(self.device)[rows]
        prompt_of = batch["prompt_of"].to(self.device)[rows]
        text = self.scorer.text_embeddings(batch["prompt"])
        out = self.scorer.score(images, text[prompt_of])
        result = {"global": out.global_score, **out.maps}
        if self.head is not None:
            assert out.trace is not None  # the head needs the 'dense' method (checked in __init__), which traces
            with torch.no_grad():
                reward, error_prob = self.head.score_trace(self.backbone, out.trace, text[prompt_of])
            result["head"] = 1 - _to_grid(error_prob, self.grid, tuple(images.shape[-2:]))
            result["head_reward"] = reward
        return result

    def _load(self, db: FaithfulnessDatabase, batch: dict[str, Any], rows: Tensor) -> dict[str, Tensor]:
        """The stored scores of the images in `rows` (their prompts are complete in `db`)."""
        wanted = [batch["image_id"][i] for i in rows.nonzero().flatten().tolist()]
        by_image: dict[str, dict] = {}
        for pid in {batch["prompt_id"][int(batch["prompt_of"][i])] for i in rows.nonzero().flatten().tolist()}:
            by_image.update(db.scores(pid))
        missing = [i for i in wanted if i not in by_image]
        if missing:
            raise ValueError(
                f"{db.path}: images {missing[:5]} of complete prompts are not stored: the folder "
                "changed since the database was written; pass another db_path"
            )
        out = {"global": torch.tensor([by_image[i]["clip"].global_score for i in wanted], dtype=torch.float32)}
        for name in self.map_names:
            out[name] = torch.from_numpy(np.stack([by_image[i][name].grid for i in wanted]))
        if self.head is not None:
            rewards = [by_image[i]["head"].global_score for i in wanted]
            out["head_reward"] = torch.tensor([float("nan") if r is None else r for r in rewards], dtype=torch.float32)
        return {k: v.to(self.device) for k, v in out.items()}

    def _update_table(self, batch: dict[str, Any], global_score: Tensor, maps: dict[str, Tensor]) -> None:
        m = global_score.shape[0]
        index = batch["index"].to(self.device)[batch["prompt_of"].to(self.device)]
        seed = batch["seed"].to(self.device)
        cols: dict[str, Tensor] = {
            "global": global_score,
            "index": index,
            "seed": seed,
            "faithful": batch["faithful"].to(self.device),
        }
        masks = batch.get("error_masks")
        random = random_goodness(index.cpu(), seed.cpu(), self.grid, self.random_seed).to(self.device)
        all_maps = {**maps, "random": random}
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

    # ---- epoch end ------------------------------------------------------------------------
    def finish(self, stage: str) -> None:
        if self.trainer.sanity_checking:
            return
        rows = {k: v.cpu() for k, v in self.table.rows().items()}
        skipped = sorted({p for part in gather_objects(self._skipped) for p in part})
        counts = {k: sum(c[k] for c in gather_objects(self._counts)) for k in COUNTS}
        counts.update(images=int(rows["index"].numel()), images_skipped=len(skipped))
        pair_sums = torch.stack([s.cpu() for s in gather_objects(self._pair_sums)]).sum(0)
        metrics = tipai_metrics(rows, self.baselines, self.map_names, counts["pairs"], pair_sums)
        for key, value in metrics.items():  # from the gathered table and totals: the same on every process
            self.log_metric(stage, f"tipai/{key}", value)
        for key, value in counts.items():
            self.log_metric(stage, f"tipai/n_{key}", float(value))
        counts_db = self.db.counts() if self.db is not None else {}
        self._results = {
            "database": str(self.database_path().resolve()),
            "database_rows": counts_db,
            "grid": self.grid,
            "methods": list(self.methods),
            "maps": list(self.map_names),
            "pair_rule": self.pair_rule,
            "margin": self.margin,
            "head": self.head_dir,
            "n_images": int(rows["index"].numel()),
            "n_error_images": int(((rows["faithful"] == 0) & rows["error_share"].isfinite()).sum()),
            "prompts_scored": counts["prompts_scored"],
            "prompts_from_database": counts["prompts_from_database"],
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
        (incl. the random map) with its localisation (`xclip.faithfulness.report`)."""
        return [
            row
            for stage in STAGES
            for row in tipai_report_rows(metrics, self.metric_key(stage, "tipai/"), stage, self.baselines, self.grid)
        ]

    def extra_results(self) -> dict[str, Any]:
        return {**super().extra_results(), "tipai": self._results}


def _to_grid(patch_map: Tensor, grid: int, image_size: tuple[int, int]) -> Tensor:
    """A ViT-grid map [N, gh, gw] -> [N, G, G] (area resampling)."""
    return resample_to_cells(patch_map.double(), grid, image_size).float()
