"""Held-out pair accuracy of a TSPO head vs the zero-shot CLIP score, with a paired bootstrap over
prompts (is the difference larger than the split's noise?).

    python scripts/eval_tspo_head.py --n 100 1000     # the recipe's test prompts, then 900 more

The ShapesWorld test family is index-seeded, so the first 100 of 1000 prompts are the recipe's
100-prompt test split.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from tqdm import tqdm

from xclip.backbones import load_backbone
from xclip.data.shapes import ShapesFaithfulness
from xclip.faithfulness import TSPOScorer


def correct_pairs(scores: torch.Tensor, faithful: torch.Tensor) -> tuple[int, int]:
    """(faithful-vs-erroneous pairs where the faithful image scores strictly higher, all such pairs)."""
    diff = scores[faithful][:, None] - scores[~faithful][None, :]
    return int((diff > 0).sum()), diff.numel()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--head", default="checkpoints/tspo-head-tiny-shapes")
    parser.add_argument("--backbone", default="xclip:tiny-shapes")
    parser.add_argument("--n", type=int, nargs="+", default=[100, 1000], help="prompt counts (prefixes of the largest)")
    parser.add_argument("--resamples", type=int, default=2000)
    args = parser.parse_args()
    bb = load_backbone(args.backbone)
    scorer = TSPOScorer(args.head, bb)
    data = ShapesFaithfulness(n=max(args.n), seed=1000, image_size=64, n_renderings=4, split="test")
    counts = []  # per prompt: head correct, zero-shot correct, pairs
    for k in tqdm(range(len(data)), desc="scoring held-out prompts"):
        item = data[k]
        reward, _ = scorer.score(item["prompt"], item["images"])
        with torch.no_grad():
            cos = (
                bb.encode_image(bb.normalize(item["images"]), normalize=True)
                @ bb.encode_text([item["prompt"]], normalize=True)[0]
            )
        faithful = item["faithful"].bool()
        head, pairs = correct_pairs(reward, faithful)
        clip, _ = correct_pairs(cos, faithful)
        counts.append((head, clip, pairs))
    counts = np.array(counts, dtype=np.float64)
    rng = np.random.default_rng(0)
    print(
        "| prompts | pairs | head pair acc. | zero-shot pair acc. | difference "
        "| 95% interval (paired bootstrap over prompts) |"
    )
    print("|---|---|---|---|---|---|")
    for n in sorted(args.n):
        c = counts[:n]
        head, clip = c[:, 0].sum() / c[:, 2].sum(), c[:, 1].sum() / c[:, 2].sum()
        idx = rng.integers(0, n, size=(args.resamples, n))
        sums = c[idx].sum(1)  # [resamples, 3]
        lo, hi = np.percentile(sums[:, 0] / sums[:, 2] - sums[:, 1] / sums[:, 2], [2.5, 97.5])
        print(f"| {n} | {int(c[:, 2].sum())} | {head:.4f} | {clip:.4f} | {head - clip:+.4f} | [{lo:+.4f}, {hi:+.4f}] |")


if __name__ == "__main__":
    main()
