"""Speed of the Teacher/Student workflow, as ratios measured in one process:

1. SHAP (expected gradients, ``nsamples`` draws, ``background`` rows) seconds per explained sample:
   ``shap.GradientExplainer`` one sample at a time (the reference loop), xclip's batched engine one
   sample at a time, and the batched engine on ``--n`` samples at once (same numbers; the tests
   check them equal).
2. Inference throughput (images + notes per second, forward only, tokenised beforehand) of the
   student against the teacher, and both parameter counts.

    python scripts/bench_distill.py [--device cuda] [--n 8] [--nsamples 200] [--background 50]
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from xclip.data.image_folder import collate_skipping
from xclip.distill import DistillDataModule, load_classifier
from xclip.explain import MultimodalInputs, SHAPExplainer
from xclip.timing import median_time, once


def inputs_for(model, tokenizer, batch, device) -> MultimodalInputs:
    enc = tokenizer(list(batch["text"]), padding=True, return_tensors="pt")
    images = batch["image"].to(device)
    return MultimodalInputs(
        images,
        model.pixel_values(images),
        enc["input_ids"].to(device),
        enc["attention_mask"].to(device),
        [tokenizer.convert_ids_to_tokens(r) for r in enc["input_ids"].tolist()],
        list(batch["text"]),
        [str(int(i)) for i in batch["index"]],
        int(tokenizer.pad_token_id),
    )


def one_at_a_time(explainer: SHAPExplainer, x: MultimodalInputs, n: int) -> None:
    for i in range(n):
        explainer.explain(x.select([i]), seeds=[i])


def forward(model, x: MultimodalInputs) -> None:
    with torch.no_grad():
        model(x.pixel_values, x.input_ids, x.attention_mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="xclip:distill-teacher-shapes")
    parser.add_argument("--student", default="xclip:distill-student-shapes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n", type=int, default=8, help="samples explained by the batched call")
    parser.add_argument("--nsamples", type=int, default=200)
    parser.add_argument("--background", type=int, default=50)
    parser.add_argument("--shap-batch", type=int, default=200, help="rows per forward/backward of the batched engine")
    parser.add_argument("--throughput-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)

    models = {name: load_classifier(spec)[:2] for name, spec in (("teacher", args.teacher), ("student", args.student))}
    data = DistillDataModule(source="shapes", n_val=args.background, n_test=max(args.n, args.throughput_batch))
    val, test = data.dataset("val"), data.dataset("test")
    bg_batch = collate_skipping([val[i] for i in range(args.background)])
    x_batch = collate_skipping([test[i] for i in range(args.n)])
    t_batch = collate_skipping([test[i] for i in range(args.throughput_batch)])

    print(f"SHAP, nsamples={args.nsamples}, background={args.background} rows, device={device}")
    print(
        "| model | shap.GradientExplainer, 1 at a time | batched engine, 1 at a time | batched engine, "
        f"{args.n} at once | speed-up vs shap |"
    )
    print("|---|---|---|---|---|")
    for name, (model, tok) in models.items():
        model.to(device)
        bg, x = inputs_for(model, tok, bg_batch, device), inputs_for(model, tok, x_batch, device)
        target = model.explain_target("shape")
        batched = SHAPExplainer(target, bg, nsamples=args.nsamples, batch_size=args.shap_batch)
        reference = SHAPExplainer(target, bg, nsamples=args.nsamples, batch_size=50, engine="shap")
        n_ref = min(2, args.n)  # the reference loop is slow: time two samples
        batched.explain(x.select([0]))  # warm-up
        t_ref = once(partial(one_at_a_time, reference, x, n_ref), device) / n_ref
        t_one = once(partial(one_at_a_time, batched, x, n_ref), device) / n_ref
        t_all = once(partial(batched.explain, x), device) / args.n
        print(f"| {name} | {t_ref:.2f} s | {t_one:.2f} s | {t_all:.2f} s | {t_ref / t_all:.1f}x |", flush=True)

    print(f"\ninference, batch {args.throughput_batch}, forward only (texts tokenised beforehand)")
    print("| model | parameters | images+notes / s | vs teacher |")
    print("|---|---|---|---|")
    speed = {}
    for name, (model, tok) in models.items():
        x = inputs_for(model, tok, t_batch, device)
        speed[name] = args.throughput_batch / median_time(partial(forward, model, x), args.repeats, device)
        params = sum(p.numel() for p in model.parameters())
        print(
            f"| {name} | {params / 1e6:.2f} M | {speed[name]:.0f} | {speed[name] / speed['teacher']:.2f}x |", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
