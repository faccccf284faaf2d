"""Explainer speed as ratios against plain inference, measured in one process.

    python scripts/bench_explain.py --out outputs/bench_explain.json

Rows, for a ViT-B/32-size open_clip model (random init: weights do not change the cost) and for
the shipped tiny model, at `--batch` images:
- Grad-ECLIP image maps for 1 text / `encode_image` of the same batch (target <= 1.2)
- Grad-ECLIP for 10 texts / 1 text (target <= 1.1)
- Grad-CAM (last block ln_1) / `encode_image` (target <= 1.5)
- a one-image-at-a-time loop with one gradient call per text (the reference code's way) /
  batched Grad-ECLIP, per image, 10 texts (the issue's GPU target: >= 10x at batch 64)

With `--precision bf16` (or `16`) it also times Grad-ECLIP (1 text) under that autocast precision
and reports throughput in images/s and the speed-up over fp32 (the mixed-precision target on an
H200: ViT-B/32 at batch 256, >= 3x the fp32 ~2,900 images/s).

On a GPU: `python scripts/bench_explain.py --device cuda --batch 64`, and
`python scripts/bench_explain.py --device cuda --batch 256 --precision bf16 --models openclip:ViT-B-32`.

Families: ``--models`` takes any backbone spec. Random-init open_clip models whose tokenizer needs a
download (SigLIP, CLIPA, the multilingual towers) can be timed offline as ``offline:<arch>``: the
full-size architecture with an offline stand-in tokenizer (timing only; the texts are embedded once
before the timed calls). Towers without a pooling attention (ConvNeXt, FastViT, ...) refuse
Grad-ECLIP: their row times Grad-CAM and leaves the Grad-ECLIP columns empty.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from xclip.backbones import Backbone, load_backbone
from xclip.explain import GradCAM, GradECLIP
from xclip.io import atomic_write_text
from xclip.timing import median_time

TEXTS = [
    f"a photo of a {c} {s}"
    for c, s in zip(
        ["red", "green", "blue", "yellow", "purple", "orange", "red", "green", "blue", "yellow"],
        ["circle", "square", "star", "heart", "cross", "triangle", "star", "circle", "heart", "square"],
    )
]


def load(spec: str, device: str) -> Backbone:
    """A backbone for a spec, or for ``offline:<arch>`` a random-init open_clip arch with an offline
    stand-in tokenizer (timing only)."""
    if not spec.startswith("offline:"):
        return load_backbone(spec, device=device)
    import open_clip

    from xclip.backbones import wrap_model
    from xclip.backbones.reduced import offline_tokenizer_for

    arch = spec.removeprefix("offline:")
    return wrap_model(open_clip.create_model(arch, pretrained_hf=False), offline_tokenizer_for(arch)).to(device).eval()


def bench(
    backbone: Backbone, batch: int, repeats: int, loop_images: int, precision: str | None = None
) -> dict[str, float]:
    s, device = backbone.image_size, backbone.device
    images = torch.randn(batch, 3, s, s, device=device)
    ge, cam = GradECLIP(backbone), GradCAM(backbone)
    text1 = backbone.encode_text(TEXTS[:1]).detach()
    text10 = backbone.encode_text(TEXTS).detach()

    def encode():
        with torch.no_grad():
            backbone.encode_image(images)

    t_enc = median_time(encode, repeats, device)
    t_cam = median_time(lambda: cam.image_maps(images, text1), repeats, device)
    if not backbone.vision.has_attention_pool:  # Grad-ECLIP is refused: time Grad-CAM only
        return {"encode_image_s": t_enc, "grad_cam_1_text_s": t_cam, "ratio_grad_cam_vs_encode": t_cam / t_enc}
    t_ge1 = median_time(lambda: ge.image_maps(images, text1), repeats, device)
    t_ge10 = median_time(lambda: ge.image_maps(images, text10), repeats, device)

    def loop():  # the reference way: one image, one text, one gradient call at a time
        for i in range(loop_images):
            for k in range(text10.shape[0]):
                ge.image_maps(images[i : i + 1], text10[k : k + 1])

    t_loop_per_image = median_time(loop, 1, device) / loop_images
    mixed = {}
    if precision is not None:
        low = GradECLIP(backbone, precision=precision)
        t_low = median_time(lambda: low.image_maps(images, text1), repeats, device)
        mixed = {
            f"grad_eclip_1_text_{precision}_s": t_low,
            "images_per_s_fp32": batch / t_ge1,
            f"images_per_s_{precision}": batch / t_low,
            f"ratio_speedup_{precision}_vs_fp32": t_ge1 / t_low,
        }
    return {
        "encode_image_s": t_enc,
        "grad_eclip_1_text_s": t_ge1,
        "grad_eclip_10_texts_s": t_ge10,
        "grad_cam_1_text_s": t_cam,
        "ratio_grad_eclip_1_vs_encode": t_ge1 / t_enc,
        "ratio_grad_eclip_10_vs_1": t_ge10 / t_ge1,
        "ratio_grad_cam_vs_encode": t_cam / t_enc,
        "ratio_loop_vs_batched_10_texts": t_loop_per_image / (t_ge10 / batch),
        **mixed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop-images", type=int, default=4, help="images timed in the one-at-a-time loop")
    parser.add_argument("--models", nargs="+", default=["openclip:ViT-B-32", "xclip:tiny-shapes"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument(
        "--precision", default=None, choices=["bf16", "16"], help="also time Grad-ECLIP under this autocast precision"
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = {}
    for spec in args.models:
        where = args.device if args.device != "cpu" else f"{torch.get_num_threads()} CPU threads"
        print(f"benchmarking {spec} at batch {args.batch} on {where} ...", flush=True)
        backbone = load(spec, args.device)
        rows[spec] = {
            "family": backbone.family,
            **bench(backbone, args.batch, args.repeats, args.loop_images, args.precision),
        }
    keys = list(dict.fromkeys(k for row in rows.values() for k in row if k.startswith("ratio")))
    print("| model | family | " + " | ".join(keys) + " |\n|---|---|" + "---|" * len(keys))
    for spec, row in rows.items():
        print(
            f"| {spec} | {row['family']} | "
            + " | ".join(f"{row[k]:.2f}" if k in row else "refused" for k in keys)
            + " |"
        )
    if args.out:
        atomic_write_text(
            args.out,
            json.dumps(
                {
                    "batch": args.batch,
                    "threads": torch.get_num_threads(),
                    "device": args.device,
                    "precision": args.precision,
                    "results": rows,
                },
                indent=2,
            ),
        )
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
