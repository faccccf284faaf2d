"""Retrieval speed and memory, as ratios measured in one process (CPU).

    python scripts/bench_retrieval.py [--large] [--out outputs/bench_retrieval.json]

1. Recall@{1,5,10} on synthetic L2-normalised embeddings, 5,000 images x 25,000 captions (5 per
   image, D=512 as ViT-B/32): xclip's chunked ranking (``retrieval_recall_at_k``) against the
   naive full-matrix way of the reference code (LAION CLIP_benchmark: the whole [T, I] score
   matrix, a [T, I] positive-pair mask, top-k per row). Time, peak extra memory, and the numbers,
   which must be identical.
2. ``--large``: 100,000 images x 500,000 captions (``--large-images``) with the chunked path
   only (the naive score matrix would be 200 GB of float32). D is ``--large-dim`` (64 by
   default) so the run takes minutes, not hours, on a free CPU; the memory bound (one chunk of
   scores) depends on neither D nor the gallery size.
3. Embedding throughput: ``xclip validate`` (``RetrievalModule`` + ``RetrievalDataModule``,
   the shipped tiny model, ShapesWorld, no cache) against a bare loop over the same DataLoader
   calling ``encode_image`` / ``encode_text`` (the script way). Target: validate <= 1.10x.

Peak memory is the process's resident-set high-water mark (``VmHWM``, reset before each
measurement through ``/proc/self/clear_refs``) minus the resident set at the start of the
measurement, so it counts what the measured call allocated on top of its inputs (Linux only).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from xclip.data.shapes.datamodule import collate_captions
from xclip.io import atomic_write_text
from xclip.metrics import retrieval_recall_at_k
from xclip.retrieval import RetrievalDataModule, RetrievalModule

KS = (1, 5, 10)


# ---- memory ---------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measured(fn: Callable[[], object]) -> tuple[object, float, int]:
    """``(result, seconds, peak extra bytes)`` of one call of `fn`."""
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    base = _status_kib("VmRSS")
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    return out, seconds, (_status_kib("VmHWM") - base) * 1024


# ---- Recall@K ---------------------------------------------------------------------------------
def synthetic(n_images: int, per_image: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Images [I, D], captions [I*per_image, D] = their image + noise of norm sqrt(D)/4, owners
    [T]; all normalised. The noise makes Recall@1 neither 0 nor 1 at these sizes."""
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n_images, dim, generator=g), dim=-1)
    owner = torch.arange(n_images).repeat_interleave(per_image)
    txt = torch.empty(len(owner), dim)
    for s in range(0, len(owner), 100_000):  # the noise in pieces: no big temporary
        o = owner[s : s + 100_000]
        txt[s : s + len(o)] = F.normalize(img[o] + 0.25 * torch.randn(len(o), dim, generator=g), dim=-1)
    return img, txt, owner


def naive_recall(image_emb: Tensor, text_emb: Tensor, text_to_image: Tensor, ks=KS) -> dict[str, float]:
    """CLIP_benchmark's zero-shot retrieval: the full [T, I] scores and positive mask, top-k per row."""
    scores = text_emb @ image_emb.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_to_image] = True
    out = {}
    for k in ks:
        top = scores.topk(k, dim=1).indices
        out[f"t2i_R@{k}"] = positive.gather(1, top).any(1).sum().item() / scores.shape[0]
    for k in ks:
        top = scores.T.topk(k, dim=1).indices
        out[f"i2t_R@{k}"] = positive.T.gather(1, top).any(1).sum().item() / scores.shape[1]
    return out


def bench_recall(n_images: int, per_image: int, dim: int, naive: bool) -> dict:
    img, txt, owner = synthetic(n_images, per_image, dim)
    row = {"images": n_images, "captions": len(owner), "dim": dim, "full_matrix_bytes": n_images * len(owner) * 4}
    got, t_chunk, m_chunk = measured(lambda: retrieval_recall_at_k(img, txt, owner, KS))
    row.update(chunked_s=t_chunk, chunked_peak_bytes=m_chunk, recall=got)
    if naive:
        want, t_naive, m_naive = measured(lambda: naive_recall(img, txt, owner, KS))
        if want != got:
            raise AssertionError(f"chunked {got} != naive {want}")
        row.update(
            naive_s=t_naive,
            naive_peak_bytes=m_naive,
            identical=True,
            ratio_time_chunked_vs_naive=t_chunk / t_naive,
            ratio_memory_chunked_vs_naive=m_chunk / m_naive,
        )
    return row


# ---- embedding throughput ------------------------------------------------------------------------
def bench_throughput(n: int, batch: int, repeats: int) -> dict:
    module = RetrievalModule("xclip:tiny-shapes")
    data = RetrievalDataModule(source="shapes", n=n, image_size=64, batch_size=batch)
    backbone = module.backbone

    def validate() -> dict:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        )
        start = time.perf_counter()
        trainer.validate(module, datamodule=data, verbose=False)
        return {"s": time.perf_counter() - start, "recall": dict(module.recall_values)}

    def bare() -> dict:
        start = time.perf_counter()
        images, texts, owners = [], [], []
        with torch.no_grad():
            for b in DataLoader(data.gallery, batch_size=batch, collate_fn=collate_captions):
                images.append(backbone.encode_image(backbone.normalize(b["image"]), normalize=True))
                texts.append(backbone.encode_text(b["texts"], normalize=True))
                owners.append(b["index"][b["text_to_image"]])
        recall = retrieval_recall_at_k(torch.cat(images), torch.cat(texts), torch.cat(owners), KS)
        return {"s": time.perf_counter() - start, "recall": {f"val/{k}": v for k, v in recall.items()}}

    runs = {"validate": [], "bare": []}
    for _ in range(repeats):  # interleaved, so drifting load hits both alike
        runs["validate"].append(validate())
        runs["bare"].append(bare())
    if runs["validate"][0]["recall"] != runs["bare"][0]["recall"]:
        raise AssertionError(f"validate {runs['validate'][0]['recall']} != bare loop {runs['bare'][0]['recall']}")
    t_val, t_bare = (min(r["s"] for r in runs[k]) for k in ("validate", "bare"))
    return {
        "images": n,
        "captions": 2 * n,
        "batch": batch,
        "image_size": 64,
        "model": "xclip:tiny-shapes",
        "validate_s": t_val,
        "bare_loop_s": t_bare,
        "validate_images_per_s": n / t_val,
        "bare_images_per_s": n / t_bare,
        "ratio_validate_vs_bare": t_val / t_bare,
        "all_validate_s": [r["s"] for r in runs["validate"]],
        "all_bare_s": [r["s"] for r in runs["bare"]],
        "recall": runs["validate"][0]["recall"],
    }


# ---- report ----------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(result: dict) -> str:
    lines = [
        "# Retrieval benchmark",
        "",
        f"CPU, {result['threads']} threads; {result['note']}",
        "",
        "| case | method | time (s) | peak extra memory | full [T, I] matrix |",
        "|---|---|---|---|---|",
    ]
    for name in ("recall_5k", "recall_large"):
        row = result.get(name)
        if not row:
            continue
        case = f"{row['images']:,} x {row['captions']:,}, D={row['dim']}"
        lines.append(
            f"| {case} | chunked | {row['chunked_s']:.2f} | {_gib(row['chunked_peak_bytes'])} | "
            f"{_gib(row['full_matrix_bytes'])} |"
        )
        if "naive_s" in row:
            lines.append(
                f"| {case} | naive (CLIP_benchmark) | {row['naive_s']:.2f} | {_gib(row['naive_peak_bytes'])} | "
                f"{_gib(row['full_matrix_bytes'])} |"
            )
        else:
            lines.append(f"| {case} | naive | not run: needs the {_gib(row['full_matrix_bytes'])} score matrix | | |")
    r5 = result["recall_5k"]
    lines += [
        "",
        f"5k x 25k: chunked / naive time = {r5['ratio_time_chunked_vs_naive']:.2f}, peak memory = "
        f"{r5['ratio_memory_chunked_vs_naive']:.2f}; identical Recall@K: {r5['identical']} ({r5['recall']}).",
    ]
    tp = result.get("throughput")
    if tp:
        lines += [
            "",
            f"Embedding throughput ({tp['images']} ShapesWorld images + {tp['captions']} captions, "
            f"{tp['model']}, batch {tp['batch']}): validate {tp['validate_s']:.2f} s "
            f"({tp['validate_images_per_s']:.0f} img/s), bare encode loop {tp['bare_loop_s']:.2f} s "
            f"({tp['bare_images_per_s']:.0f} img/s); ratio validate / bare = {tp['ratio_validate_vs_bare']:.3f} "
            "(target <= 1.10).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", action="store_true", help="also run 100k images x 500k captions (chunked only)")
    parser.add_argument("--large-dim", type=int, default=64)
    parser.add_argument("--large-images", type=int, default=100_000, help="images of the large case (5 captions each)")
    parser.add_argument("--throughput-images", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3, help="throughput runs of each kind (the fastest counts)")
    parser.add_argument("--note", default="", help="free text for the report (e.g. what else ran on the machine)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_retrieval.json"))
    args = parser.parse_args()

    result = {"threads": torch.get_num_threads(), "device": "cpu", "note": args.note}
    print("Recall@K 5k x 25k, chunked vs naive ...", flush=True)
    result["recall_5k"] = bench_recall(5000, 5, 512, naive=True)
    print(json.dumps(result["recall_5k"], indent=1), flush=True)
    if args.large:
        print(
            f"Recall@K {args.large_images:,} x {5 * args.large_images:,}, D={args.large_dim}, chunked ...", flush=True
        )
        result["recall_large"] = bench_recall(args.large_images, 5, args.large_dim, naive=False)
        print(json.dumps(result["recall_large"], indent=1), flush=True)
    print("embedding throughput, validate vs bare loop ...", flush=True)
    result["throughput"] = bench_throughput(args.throughput_images, 250, args.repeats)
    print(json.dumps(result["throughput"], indent=1), flush=True)

    atomic_write_text(args.out, json.dumps(result, indent=2))
    atomic_write_text(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))
    print(f"wrote {args.out} and {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
