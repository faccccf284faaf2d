"""TiPAI on ShapesWorld's held-out faithfulness prompts: pair statistics of the global score and the
localisation of every patch map (crops, dense patch cosine, dense Grad-ECLIP, a random map) against
the error masks, for the shipped checkpoint and a random-init model of the same architecture.

    python scripts/eval_faithfulness.py --n 100 --out outputs/tipai_eval

Runs ``TiPAIModule`` through ``Trainer.test`` (the numbers ``xclip test --config
configs/tipai_shapes.yaml`` reports) and writes ``<out>.json`` and ``<out>.md`` (the table in
docs/workflows/faithfulness.md).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import open_clip
import torch

from xclip.backbones import Backbone, load_backbone, wrap_model
from xclip.faithfulness import TiPAIDataModule, TiPAIModule
from xclip.io import atomic_write_text

MAPS = {
    "crops": "crops",
    "dense": "dense (patch-token cosine)",
    "dense_gradeclip": "dense (Grad-ECLIP)",
    "random": "random map",
}
COLUMNS = ["KLD", "CC", "SIM", "NSS", "AUC-Judd", "worst_cell_on_error"]


def random_twin(backbone: Backbone, seed: int = 0) -> Backbone:
    torch.manual_seed(seed)
    return wrap_model(open_clip.model.CLIP(**backbone.model_cfg).eval(), preprocess_cfg=backbone.preprocess_cfg)


def evaluate(backbone: Backbone | str, n: int, grid: int, workdir: Path, name: str) -> dict:
    module = TiPAIModule(backbone=backbone, grid=grid, db_path=str(workdir / f"{name}.db"))
    data = TiPAIDataModule(source="shapes", n=n, seed=0, batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        default_root_dir=str(workdir),
    )
    trainer.test(module, datamodule=data, verbose=False)
    return module.extra_results()["tipai"]


def markdown(results: dict, n: int, grid: int) -> str:
    lines = [
        (
            f"Held-out ShapesWorld prompts (test split, n = {n} prompts x 4 images; {grid}x{grid} grid; "
            "saliency metrics and worst-cell hits over the erroneous images)."
        ),
        "",
        "| model | pair accuracy | best is faithful | worst is erroneous |",
        "|---|---|---|---|",
    ]
    for model, res in results.items():
        m = res["metrics"]
        lines.append(
            f"| {model} | {m['pair_accuracy']:.3f} | {m['chosen_is_faithful']:.3f} | {m['rejected_is_erroneous']:.3f} |"
        )
    lines += [
        "",
        "| model | map | KLD (lower better) | CC | SIM | NSS | AUC-Judd | worst cell on error | "
        "rejected: worst cell on error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, res in results.items():
        m = res["metrics"]
        for key, label in MAPS.items():
            cells = " | ".join(f"{m[f'{key}/{c}']:.3f}" for c in (*COLUMNS, "rejected_worst_cell_on_error"))
            lines.append(f"| {model} | {label} | {cells} |")
        lines.append(
            f"| {model} | a random cell (expected) | | | | | | {m['random_pick/worst_cell_on_error']:.3f} | "
            f"{m['random_pick/rejected_worst_cell_on_error']:.3f} |"
        )
    lines += ["", "| model | crops and dense worst cells both on the error | the same by chance |", "|---|---|---|"]
    for model, res in results.items():
        m = res["metrics"]
        lines.append(
            f"| {model} | {m['agreement/crops_and_dense_worst_cell_on_error']:.3f} | {m['agreement/chance']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", default="xclip:tiny-shapes")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--grid", type=int, default=7)
    parser.add_argument("--out", default="outputs/tipai_eval")
    args = parser.parse_args()
    trained = load_backbone(args.spec)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, bb in (("trained", trained), ("random init", random_twin(trained))):
            print(f"scoring with the {name} model ...", flush=True)
            results[name] = evaluate(bb, args.n, args.grid, Path(tmp), name.replace(" ", "_"))
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".json"), json.dumps(results, indent=2))
    table = markdown(results, args.n, args.grid)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)


if __name__ == "__main__":
    main()
