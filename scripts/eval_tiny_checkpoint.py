"""Measure the numbers of the tiny checkpoint's model card, next to a random-init model of the
same architecture: zero-shot shape and colour accuracy on held-out single-object images, and
Recall@1/5 both ways on a held-out 1,000-image caption set.

    python scripts/eval_tiny_checkpoint.py --checkpoint checkpoints/tiny-shapes --out outputs/tiny_card.json

Held-out sets use seed 2000, a sample stream training never draws from (training: seed 0 of the
pretrain stream; validation during training: seed 1000).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import torch

from xclip.backbones import load_backbone, wrap_model
from xclip.clip import ZeroShotModule
from xclip.data import ShapesWorldDataModule
from xclip.io import atomic_write_text

KEYS = ("shape_acc", "colour_acc", "t2i_R@1", "t2i_R@5", "i2t_R@1", "i2t_R@5")


def evaluate(module: ZeroShotModule, n_classification: int, n_retrieval: int, seed: int) -> dict[str, float]:
    """Zero-shot accuracy and Recall@K of `module` on held-out ShapesWorld sets."""
    results = {}
    for task, n in (("classification", n_classification), ("retrieval", n_retrieval)):
        data = ShapesWorldDataModule(
            val_tasks=[task], seed=seed - 1000, n_val=n, batch_size=250, image_size=module.backbone.image_size
        )
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
        results.update({k.rsplit("/", 1)[1]: float(v) for k, v in metrics.items()})
    return {k: results[k] for k in KEYS}


def random_init_twin(module: ZeroShotModule, seed: int = 0) -> ZeroShotModule:
    """The same module with a freshly initialised model of the checkpoint's architecture."""
    model_cfg = getattr(module.backbone, "model_cfg", None)
    if not model_cfg:
        raise ValueError("the backbone carries no open_clip model_cfg to rebuild a random-init twin from")
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**model_cfg).eval()
    module.backbone = wrap_model(model, preprocess_cfg=module.backbone.preprocess_cfg)
    module.backbone.requires_grad_(False)
    return module


def markdown(rows: dict[str, dict[str, float]]) -> str:
    head = "| model | " + " | ".join(KEYS) + " |\n|---|" + "---|" * len(KEYS) + "\n"
    return head + "".join(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k in KEYS) + " |\n" for name, r in rows.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="xclip:tiny-shapes", help="backbone spec or checkpoint directory")
    parser.add_argument("--n-classification", type=int, default=1000)
    parser.add_argument("--n-retrieval", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    args = parser.parse_args()
    load_backbone(args.checkpoint)  # fail fast with the loader's message when the checkpoint is missing
    rows = {"trained": evaluate(ZeroShotModule(args.checkpoint), args.n_classification, args.n_retrieval, args.seed)}
    twin = random_init_twin(ZeroShotModule(args.checkpoint))
    rows["random init"] = evaluate(twin, args.n_classification, args.n_retrieval, args.seed)
    print(markdown(rows))
    if args.out:
        atomic_write_text(
            args.out,
            json.dumps(
                {
                    "checkpoint": args.checkpoint,
                    "seed": args.seed,
                    "n_classification": args.n_classification,
                    "n_retrieval": args.n_retrieval,
                    "results": rows,
                },
                indent=2,
            ),
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
