"""Speed of SEARLE's explanations and of OTI, as ratios measured in one process.

    python scripts/bench_cir.py --out outputs/bench_cir.json
    python scripts/bench_cir.py --backbone openclip:ViT-B-32 --image-size 224   # a ViT-B/32-size model
    python scripts/bench_cir.py --device cuda                                     # on a GPU

Rows:
- retrieve + explain A-D for a query's top 10 candidates in one batched call / retrieve + explain
  the top 1 (target <= 2x);
- the same 10 candidates explained in a per-candidate loop (the original script's way: every
  candidate redoes the reference's forward, phi and the text) / batched (GPU target >= 10x);
- OTI: images per second when `--oti-batch` images are inverted together / one image at a time
  (the same number of steps each).
Retrieval ranks a gallery whose embeddings are already computed (the cache's job, not timed).
A random-init phi is as costly as a trained one; so is a random-init backbone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from xclip.backbones import load_backbone
from xclip.cir.explain import CIRExplainer
from xclip.cir.oti import OTIConfig, oti_invert
from xclip.cir.phi import Phi
from xclip.cir.query import query_features
from xclip.data.shapes import ShapesCIR
from xclip.io import atomic_write_text
from xclip.metrics.cir import rank_gallery
from xclip.timing import median_time

CAPTION = "is blue instead of red"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="xclip:tiny-shapes")
    p.add_argument("--image-size", type=int, default=None, help="render size (default: the backbone's input size)")
    p.add_argument("--gallery", type=int, default=500, help="gallery images (embedded once, not timed)")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--oti-batch", type=int, default=64)
    p.add_argument("--oti-steps", type=int, default=10)
    p.add_argument("--oti-single", type=int, default=4, help="images inverted one at a time for the OTI baseline")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="outputs/bench_cir.json")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bb = load_backbone(args.backbone, device=args.device).requires_grad_(False)
    torch.manual_seed(0)
    phi = Phi.for_backbone(bb).to(bb.device).eval()
    size = args.image_size or bb.image_size
    ds = ShapesCIR(args.gallery, seed=7, image_size=size, split="val")
    images = torch.stack([ds[i]["target"] for i in range(args.gallery)])
    with torch.no_grad():
        gallery = torch.cat(
            [
                bb.encode_image(bb.normalize(images[i : i + 64].to(bb.device)), normalize=True)
                for i in range(0, args.gallery, 64)
            ]
        )
    reference01 = ds[0]["reference"][None].to(bb.device)
    explainer = CIRExplainer(bb, phi)

    def retrieve(k: int) -> torch.Tensor:
        reference = bb.normalize(reference01)
        with torch.no_grad():
            q = query_features(bb, phi(bb.encode_image(reference)), [[CAPTION]])
        top = rank_gallery(q, gallery, top=k)[0].cpu()
        return reference, bb.normalize(images[top].to(bb.device))

    def batched(k: int) -> None:
        reference, candidates = retrieve(k)
        explainer.explain(reference, CAPTION, candidates)

    def loop() -> None:
        reference, candidates = retrieve(args.top_k)
        for j in range(candidates.shape[0]):
            explainer.explain(reference, CAPTION, candidates[j : j + 1])

    t_one = median_time(lambda: batched(1), args.repeats, args.device)
    t_batched = median_time(lambda: batched(args.top_k), args.repeats, args.device)
    t_loop = median_time(loop, max(1, args.repeats // 2), args.device)

    feats = bb.encode_image(
        bb.normalize(torch.stack([ds[i]["reference"] for i in range(args.oti_batch)]).to(bb.device))
    ).detach()
    config = OTIConfig(steps=args.oti_steps)
    t_oti_batched = median_time(
        lambda: oti_invert(bb, feats, list(range(args.oti_batch)), config=config), 1, args.device
    )

    def oti_single() -> None:
        for i in range(args.oti_single):
            oti_invert(bb, feats[i : i + 1], [i], config=config)

    t_oti_single = median_time(oti_single, 1, args.device)
    result = {
        "backbone": args.backbone,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "image_size": size,
        "gallery": args.gallery,
        "top_k": args.top_k,
        "retrieve_explain_top1_s": t_one,
        "retrieve_explain_batched_s": t_batched,
        "per_candidate_loop_s": t_loop,
        "batched_over_top1": t_batched / t_one,
        "loop_over_batched": t_loop / t_batched,
        "oti_steps": args.oti_steps,
        "oti_batched_images_per_s": args.oti_batch / t_oti_batched,
        "oti_single_images_per_s": args.oti_single / t_oti_single,
        "oti_batched_over_single_throughput": (args.oti_batch / t_oti_batched) / (args.oti_single / t_oti_single),
    }
    print(json.dumps(result, indent=2))
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
