"""TiPAI / TSPO speed as ratios measured in one process (CPU by default).

    python scripts/bench_faithfulness.py --out outputs/bench_faithfulness.json
    python scripts/bench_faithfulness.py --device cuda --out outputs/bench_faithfulness_gpu.json

- ``dense`` vs ``crops`` on the same images and a 7x7 grid: the crops embed 49 cells per image
  (49 forward passes), dense runs one traced forward (+ Grad-ECLIP's vector-Jacobian product
  through the CLS tail); target time ratio >= 10x;
- TSPO head training steps per second on cached features vs with the frozen backbone in the loop
  (features recomputed from the images at every step), same batch;
- TiPAI database writes: rows per second with a batch of prompts per transaction (as
  ``TiPAIModule`` writes) vs one transaction per prompt.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from xclip.backbones import load_backbone
from xclip.data.shapes import ShapesFaithfulness
from xclip.faithfulness.database import (
    FaithfulnessDatabase,
    ImageRecord,
    PairRecord,
    PromptRecord,
    ScoreRecord,
)
from xclip.faithfulness.grid import cell_means
from xclip.faithfulness.pairs import bradley_terry_loss
from xclip.faithfulness.scoring import TiPAIScorer
from xclip.faithfulness.tspo_head import HeadFeatures, TSPOHead, extract_features
from xclip.faithfulness.tspo_module import pair_labels, prompt_pairs
from xclip.io import atomic_write_text
from xclip.timing import median_time


def shapes_batch(n_prompts: int, image_size: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    data = ShapesFaithfulness(n=n_prompts, seed=5, image_size=image_size)
    items = [data[i] for i in range(n_prompts)]
    images = torch.cat([it["images"] for it in items])
    masks = torch.cat([it["error_masks"] for it in items])
    faithful = torch.stack([it["faithful"] for it in items])
    return images, [it["prompt"] for it in items], masks, faithful


def bench_scoring(bb, images: torch.Tensor, prompts: list[str], grid: int, repeats: int, device: str) -> dict:
    scorer = TiPAIScorer(bb, grid=grid, crop_batch_size=512)
    r = images.shape[0] // len(prompts)
    text = scorer.text_embeddings(prompts).repeat_interleave(r, 0)
    images = images.to(device)
    t_crops = median_time(lambda: scorer.crops(images, text), repeats, device)
    t_dense = median_time(lambda: scorer.dense(images, text), repeats, device)
    t_global = median_time(lambda: scorer.global_scores(images, text), repeats, device)
    n = images.shape[0]
    return {
        "images": n,
        "grid": grid,
        "crop_forwards_per_image": grid * grid,
        "dense_forwards_per_image": 1,
        "crops_s_per_image": t_crops / n,
        "dense_s_per_image": t_dense / n,
        "global_only_s_per_image": t_global / n,
        "crops_over_dense": t_crops / t_dense,
        "dense_over_global_only": t_dense / t_global,
    }


def bench_head(
    bb, images: torch.Tensor, prompts: list[str], masks: torch.Tensor, faithful: torch.Tensor, repeats: int, device: str
) -> dict:
    n_prompts, r = faithful.shape
    gh, gw = bb.grid_size
    text = bb.encode_texts(prompts, normalize=True).float().repeat_interleave(r, 0)
    target = (cell_means(masks.float(), gh) > 0).flatten(1).to(device)
    head = TSPOHead(bb.embed_dim, bb.vision_blocks()[-1].out_proj.out_features, (gh, gw)).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3)
    i, j = prompt_pairs(r)
    labels = pair_labels(faithful.to(device), i, j)

    def step(f: HeadFeatures) -> None:
        reward, logits = head(f)
        reward = reward.view(n_prompts, r)
        loss = bradley_terry_loss(
            reward[:, i].flatten(), reward[:, j].flatten(), labels.flatten().to(reward)
        ) + torch.nn.functional.mse_loss(logits.sigmoid(), target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()

    cached = extract_features(bb, images, text).to(device)
    t_cached = median_time(lambda: step(cached), repeats, device)
    t_loop = median_time(lambda: step(extract_features(bb, images, text).to(device)), repeats, device)
    return {
        "prompts_per_step": n_prompts,
        "images_per_step": n_prompts * r,
        "cached_steps_per_s": 1 / t_cached,
        "backbone_in_loop_steps_per_s": 1 / t_loop,
        "cached_over_backbone_in_loop": t_loop / t_cached,
    }


def db_records(n_prompts: int, per_prompt: int, grid: int, offset: int = 0) -> list[PromptRecord]:
    rng = np.random.default_rng(0)
    png = b"\x89PNG" + bytes(2000)  # a small generated image's worth of bytes
    out = []
    for p in range(offset, offset + n_prompts):
        pid = f"p{p:06d}"
        rec = PromptRecord(pid, f"prompt {p}")
        for s in range(per_prompt):
            iid = f"{pid}_{s}"
            rec.images.append(ImageRecord(iid, pid, s, "shapes", 64, 64, png=png, error="none", faithful=True))
            rec.scores.append(ScoreRecord(iid, "clip", float(rng.random())))
            for m in ("crops", "dense", "dense_gradeclip"):
                rec.scores.append(ScoreRecord(iid, m, None, rng.random((grid, grid)).astype(np.float32)))
        rec.pairs.append(PairRecord(pid, f"{pid}_0", f"{pid}_1", 0.9, 0.1, "best_worst"))
        out.append(rec)
    return out


def bench_db(n_prompts: int, batch: int) -> dict:
    records = db_records(n_prompts, 4, 7)
    rows = sum(1 + len(r.images) + len(r.scores) + len(r.pairs) for r in records)
    with tempfile.TemporaryDirectory() as tmp:
        with FaithfulnessDatabase(Path(tmp) / "batched.db", {"bench": 1}) as db:
            start = time.perf_counter()
            for s in range(0, n_prompts, batch):
                db.write(records[s : s + batch])
            t_batched = time.perf_counter() - start
        with FaithfulnessDatabase(Path(tmp) / "single.db", {"bench": 1}) as db:
            start = time.perf_counter()
            for rec in records:
                db.write([rec])
            t_single = time.perf_counter() - start
    return {
        "prompts": n_prompts,
        "rows": rows,
        "prompts_per_transaction": batch,
        "batched_rows_per_s": rows / t_batched,
        "one_prompt_per_transaction_rows_per_s": rows / t_single,
        "batched_over_single": t_single / t_batched,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="xclip:tiny-shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--prompts", type=int, default=4, help="prompts (x4 images) for the scoring benchmark")
    parser.add_argument("--head-prompts", type=int, default=16, help="prompts (x4 images) per head training step")
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--db-prompts", type=int, default=2000)
    parser.add_argument("--out", default="outputs/bench_faithfulness.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.spec, device=args.device).eval().requires_grad_(False)
    images, prompts, _, _ = shapes_batch(args.prompts, bb.image_size)
    result = {"device": args.device, "spec": args.spec, "threads": torch.get_num_threads()}
    result["scoring"] = bench_scoring(bb, images, prompts, args.grid, args.repeats, args.device)
    print(json.dumps(result["scoring"], indent=2), flush=True)
    images, prompts, masks, faithful = shapes_batch(args.head_prompts, bb.image_size)
    result["head"] = bench_head(bb, images, prompts, masks, faithful, args.repeats, args.device)
    print(json.dumps(result["head"], indent=2), flush=True)
    result["database"] = bench_db(args.db_prompts, 50)
    print(json.dumps(result["database"], indent=2), flush=True)
    atomic_write_text(args.out, json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
