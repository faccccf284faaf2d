"""NegAlign speed as ratios measured in one process (CPU by default).

    python scripts/bench_ood.py --out outputs/bench_ood.json
    python scripts/bench_ood.py --device cuda --out outputs/bench_ood_gpu.json

On a ViT-B/32-size open_clip model (random init: weights do not change the cost) with 10,000
negatives (random unit text embeddings: scoring cost depends on the count, not the words) and
100 groups, at `--batch` images:
- full NegAlign per batch (one traced forward, the predicted class's Grad-CAM at the last block's
  ln_1, background embedding, every ablation term incl. P_align) / plain NegLabel (encode_image +
  NegLabel scores), target <= 1.5;
- a one-image-at-a-time loop of the same NegAlign work / the batched call, per image;
- the vocabulary's text embeddings: encoding `--text-words` prompts cold, then the in-memory and
  on-disk cache hits (what a second use in a run and a new run pay).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from xclip.backbones import load_backbone
from xclip.io import atomic_write_text
from xclip.ood import NegAlignFeatures, NegAlignScorer, NegAlignTerms, NegLabelScorer
from xclip.ood.text_embeddings import TextEmbeddings
from xclip.ood.vocabulary import builtin_wordlist, read_words
from xclip.timing import median_time, once


def text_side(dim: int, n_neg: int, n_groups: int, m1_topk: int) -> tuple[NegLabelScorer, NegAlignTerms]:
    g = torch.Generator().manual_seed(0)
    id_emb = F.normalize(torch.randn(2, dim, generator=g), dim=-1).double()
    neg_emb = F.normalize(torch.randn(n_neg, dim, generator=g), dim=-1).double()
    roles = torch.randperm(n_neg, generator=g)
    obj, bg = roles[: int(0.4 * n_neg)], roles[int(0.4 * n_neg) : int(0.8 * n_neg)]
    scorer = NegAlignScorer(
        id_emb, neg_emb, object_idx=obj, neg_bg_emb=neg_emb[bg], n_groups=n_groups, m1_topk=m1_topk, m2_role_aware=True
    )
    return NegLabelScorer(id_emb, neg_emb, n_groups), NegAlignTerms(scorer)


def bench_images(spec: str, batch: int, repeats: int, loop_images: int, n_neg: int, device: str) -> dict[str, float]:
    bb = load_backbone(spec, device=device).eval().requires_grad_(False)
    s = bb.image_size
    images = torch.randn(batch, 3, s, s, device=device)
    neglabel, terms = (m.to(device) for m in text_side(bb.embed_dim, n_neg, 100, 50))
    features = NegAlignFeatures(bb)

    def plain(x: torch.Tensor) -> None:
        with torch.no_grad():
            neglabel(bb.encode_image(x).double())

    def full(x: torch.Tensor) -> None:
        f = features(x, terms.id_emb)
        with torch.no_grad():
            terms(f.image_emb, f.bg_emb)

    t_plain = median_time(lambda: plain(images), repeats, device)
    t_full = median_time(lambda: full(images), repeats, device)
    singles = images[:loop_images]
    full(singles[:1])  # warm-up at batch 1
    t_loop = once(lambda: [full(singles[i : i + 1]) for i in range(len(singles))], device)
    return {
        "batch": batch,
        "negatives": n_neg,
        "neglabel_s_per_image": t_plain / batch,
        "negalign_s_per_image": t_full / batch,
        "negalign_over_neglabel": t_full / t_plain,
        "loop_s_per_image": t_loop / len(singles),
        "loop_over_batched": (t_loop / len(singles)) / (t_full / batch),
    }


def bench_text(spec: str, n_words: int, device: str) -> dict[str, float]:
    bb = load_backbone(spec, device=device).eval()
    words = read_words(builtin_wordlist("nouns")) + read_words(builtin_wordlist("adjectives"))
    prompts = [f"the nice {a} {b}" for a in words for b in words][:n_words]
    with tempfile.TemporaryDirectory() as cache:
        texts = TextEmbeddings(bb, spec, batch_size=256, cache_dir=cache)
        t_cold = once(lambda: texts(prompts), device)  # includes the one-off weights fingerprint
        t_memory = median_time(lambda: texts(prompts), 3, device)
        fresh = TextEmbeddings(bb, spec, batch_size=256, cache_dir=cache)
        t_disk = once(lambda: fresh(prompts), device)
        assert fresh.encoded == 0, "the disk cache missed"
    return {
        "prompts": n_words,
        "cold_s": t_cold,
        "cold_s_per_prompt": t_cold / n_words,
        "cold_s_extrapolated_10k": t_cold / n_words * 10_000,
        "memory_hit_s": t_memory,
        "new_run_disk_hit_s": t_disk,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default="openclip:ViT-B-32")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--negatives", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--loop-images", type=int, default=16, help="images timed one at a time")
    parser.add_argument("--text-words", type=int, default=256, help="prompts encoded cold (extrapolated to 10k)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--out", default="outputs/bench_ood.json")
    args = parser.parse_args()
    result = {
        "spec": args.spec,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "images": bench_images(args.spec, args.batch, args.repeats, args.loop_images, args.negatives, args.device),
        "text": bench_text(args.spec, args.text_words, args.device),
    }
    atomic_write_text(Path(args.out), json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
