"""Export a `ClipPretrainModule` Lightning checkpoint (.ckpt) to xclip's checkpoint format.

    python scripts/export_checkpoint.py runs/pretrain_tiny_shapes/version_0/checkpoints/last.ckpt exported/
    python scripts/export_checkpoint.py last.ckpt checkpoints/tiny-shapes --overwrite   # replace on purpose

`xclip fit --config configs/pretrain_tiny_shapes.yaml` already exports at the end of fit (into the
run's log directory); this script re-exports any intermediate checkpoint (config.json + fp16
model.safetensors). An existing checkpoint directory is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from xclip.backbones import save_checkpoint
from xclip.clip import ClipPretrainModule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", type=Path, help="Lightning checkpoint of a ClipPretrainModule")
    parser.add_argument("out_dir", type=Path, help="directory to write config.json + model.safetensors into")
    parser.add_argument("--overwrite", action="store_true", help="replace a checkpoint already in out_dir")
    args = parser.parse_args()
    if not args.ckpt.is_file():
        raise SystemExit(f"no checkpoint at {args.ckpt}")
    module = ClipPretrainModule.load_from_checkpoint(args.ckpt, map_location="cpu", export=False)
    hp = module.hparams
    path = save_checkpoint(
        module.model,
        module.model_cfg,
        {
            "image_size": module.model_cfg["vision_cfg"]["image_size"],
            "mean": list(hp.image_mean),
            "std": list(hp.image_std),
        },
        hp.context_length,
        args.out_dir,
        overwrite=args.overwrite,
    )
    print(f"exported {args.ckpt} -> {path}")


if __name__ == "__main__":
    main()
