"""Explanation quality of SEARLE's maps on ShapesWorld (see `xclip.cir.quality`): the backbone and phi
of configs/cir_shapes.yaml (the tiny CLIP that read relative captions and its phi), next to a
random-init CLIP of the same architecture with a random-init phi, and random maps.

    python scripts/eval_cir_explanations.py --n 300 --out outputs/cir_explanations.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import open_clip
import torch

from xclip.backbones import load_backbone, wrap_model
from xclip.cir.benchmark import ShapesCIRBenchmark
from xclip.cir.phi import Phi, load_phi
from xclip.cir.quality import collect_maps, random_maps, score_maps
from xclip.io import atomic_write_text

COLUMNS = [
    ("B_on_modified", "B on modified object"),
    ("B_on_other_objects", "B on other objects"),
    ("C_on_shared", "C on shared object"),
    ("C_elsewhere", "C elsewhere"),
    ("D_dollar_top2", "$ in D's top 2"),
    ("D_chance_top2", "chance"),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="xclip:tiny-shapes-cir")
    p.add_argument("--phi", default="xclip:searle-phi-tiny-shapes-cir")
    p.add_argument("--n", type=int, default=300, help="single-edit queries (50 reference sets x 6 edits)")
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--out", default="outputs/cir_explanations.json")
    args = p.parse_args()
    bench = ShapesCIRBenchmark(args.n, args.seed, 64, args.split)
    queries = list(range(args.n))
    trained, phi = load_backbone(args.backbone), load_phi(args.phi)
    torch.manual_seed(0)
    random_bb = wrap_model(open_clip.model.CLIP(**trained.model_cfg).eval(), preprocess_cfg=trained.preprocess_cfg)
    random_phi = Phi.for_backbone(random_bb).eval()
    maps = {
        "trained": collect_maps(trained, phi, bench, queries),
        "random init": collect_maps(random_bb, random_phi, bench, queries),
    }
    maps["random map"] = random_maps(maps["trained"])
    results = {name: score_maps(bench, queries, m) for name, m in maps.items()}
    margins = {
        "B": results["trained"]["B_on_modified"] - results["random init"]["B_on_modified"],
        "C": results["trained"]["C_on_shared"] - results["random init"]["C_on_shared"],
    }
    header = (
        f"ShapesWorld CIR {args.split}, {args.n} queries (B: {results['trained']['B_queries']} with a modified and "
        f"another object; C: {results['trained']['C_queries']} with a shared object)"
    )
    lines = [header, "", "| model | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r[k]:.3f}" for k, _ in COLUMNS) + " |")
    lines.append("")
    lines.append(f"margin over the random-init model: B {margins['B']:+.3f}, C {margins['C']:+.3f} (target >= 0.2)")
    print("\n".join(lines))
    atomic_write_text(
        Path(args.out), json.dumps({"args": vars(args), "results": results, "margins": margins}, indent=2)
    )


if __name__ == "__main__":
    main()
