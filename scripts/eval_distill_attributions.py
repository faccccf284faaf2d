"""Measure SHAP and Integrated Gradients on ShapesWorld notes, where the deciding part of each task
is known: the share of the image attribution mass on the object (``shape``, decided by the image),
the rank of the background word among the note's words (``background``, decided by the note), and
each task's modality share |sum image| / (|sum image| + |sum text|). Every explainer runs on the
trained teacher and student, on an untrained model of the teacher's architecture, and is set next
to a random attribution of the same shapes. Explained class: the true label. Items: the held-out
test split; SHAP's background: validation items.

    python scripts/eval_distill_attributions.py --n 40 --out runs/distill_attributions.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from xclip.data.image_folder import collate_skipping
from xclip.distill import DistillDataModule, MultimodalClassifier, load_classifier
from xclip.distill.attribution_eval import deciding_word_ranks, mass_on_region, random_attribution_like
from xclip.explain import CaptumExplainer, MultimodalInputs, SHAPExplainer
from xclip.io import atomic_write_text


def inputs_for(model, tokenizer, batch, max_length: int) -> MultimodalInputs:
    enc = tokenizer(list(batch["text"]), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    ids = enc["input_ids"]
    return MultimodalInputs(
        batch["image"],
        model.pixel_values(batch["image"]),
        ids,
        enc["attention_mask"],
        [tokenizer.convert_ids_to_tokens(r) for r in ids.tolist()],
        list(batch["text"]),
        [str(int(i)) for i in batch["index"]],
        int(tokenizer.pad_token_id),
    )


def mean(values) -> float:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def measure(attribution, task: str, batch, inputs) -> dict[str, list[float]]:
    """Per item, the measurements of one task's attributions (see the module docstring)."""
    out = {"image_share": attribution.modality_totals(0)["image_share"].tolist()}
    if task == "shape":
        out["mass_on_object"] = mass_on_region(attribution.image_map(0).float(), batch["mask"]).tolist()
    else:
        ranks, counts = deciding_word_ranks(
            inputs.tokens, attribution.token_scores(0), inputs.attention_mask, batch["deciding_word"]
        )
        out.update({"word_rank": ranks, "top1": [float(r == 1) for r in ranks], "n_words": counts})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default="xclip:distill-teacher-shapes")
    parser.add_argument("--student", default="xclip:distill-student-shapes")
    parser.add_argument("--n", type=int, default=40, help="test items explained")
    parser.add_argument("--background", type=int, default=50, help="SHAP background rows (validation items)")
    parser.add_argument("--nsamples", type=int, default=200, help="SHAP draws per item")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--models",
        nargs="*",
        default=["teacher", "student", "untrained"],
        help="models explained (none: only the model-free rows)",
    )
    parser.add_argument("--out", default="runs/distill_attributions.json")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    teacher, tokenizer, config = load_classifier(args.teacher)
    student, student_tok, student_config = load_classifier(args.student)
    untrained = MultimodalClassifier(**config["model"]).eval()  # the teacher's architecture, random init
    models = {
        "teacher": (teacher, tokenizer, config),
        "student": (student, student_tok, student_config),
        "untrained": (untrained, tokenizer, config),
    }
    models = {name: models[name] for name in args.models}
    data = DistillDataModule(source="shapes", n_val=max(args.background, 1), n_test=args.n)
    test, val = data.dataset("test"), data.dataset("val")
    g = torch.Generator().manual_seed(args.seed)
    bg_batch = collate_skipping([val[int(i)] for i in torch.randperm(len(val), generator=g)[: args.background]])
    batches = [
        collate_skipping([test[i] for i in range(s, min(s + args.batch, args.n))]) for s in range(0, args.n, args.batch)
    ]

    rows: dict[str, dict[str, dict[str, list[float]]]] = {}
    # a model-free reference: |x - mean background|, what SHAP's (x - bg) factor alone puts on the
    # pixels whatever the model
    difference = (torch.cat([b["image"] for b in batches]) - bg_batch["image"].mean(0)).abs().sum(1)
    masks = torch.cat([b["mask"] for b in batches])
    rows["input difference |x - mean bg| | -"] = {
        "shape": {"mass_on_object": mass_on_region(difference, masks).tolist()}
    }
    accuracy: dict[str, dict[str, float]] = {}
    start = time.perf_counter()
    for name, (model, tok, cfg) in models.items():
        max_length = int(cfg.get("max_length", 32))
        background = inputs_for(model, tok, bg_batch, max_length)
        correct = dict.fromkeys(model.tasks, 0)
        for batch in batches:
            inputs = inputs_for(model, tok, batch, max_length)
            with torch.no_grad():
                logits = model(inputs.pixel_values, inputs.input_ids, inputs.attention_mask).logits
            for task in model.tasks:
                correct[task] += int((logits[task].argmax(1) == batch["labels"][task]).sum())
                target, labels = model.explain_target(task), batch["labels"][task]
                seeds = [args.seed * 100_003 + int(i) for i in batch["index"]]
                shap = SHAPExplainer(
                    target, background, nsamples=args.nsamples, batch_size=100, seed=args.seed
                ).explain(inputs, labels, seeds=seeds)
                ig = CaptumExplainer(target, n_steps=args.ig_steps, internal_batch_size=100).explain(inputs, labels)
                measured = [(f"SHAP | {name}", shap), (f"IG | {name}", ig)]
                if name == args.models[0]:  # the random baseline of the text side and of the shares, once
                    measured.append(("random | -", random_attribution_like(shap, seed=int(batch["index"][0]))))
                for row, att in measured:
                    per_item = rows.setdefault(row, {}).setdefault(task, {})
                    for key, values in measure(att, task, batch, inputs).items():
                        per_item.setdefault(key, []).extend(values)
            print(
                f"{name}: {batch['index'][-1].item() + 1}/{args.n} items, {time.perf_counter() - start:.0f} s",
                flush=True,
            )
        accuracy[name] = {t: c / args.n for t, c in correct.items()}

    table = {
        row: {task: {k: mean(v) for k, v in values.items()} for task, values in tasks.items()}
        for row, tasks in rows.items()
    }
    area = float(torch.cat([b["mask"].flatten(1).float().mean(1) for b in batches]).mean())
    payload = {
        "n": args.n,
        "nsamples": args.nsamples,
        "background": args.background,
        "ig_steps": args.ig_steps,
        "object_area_fraction": area,
        "accuracy": accuracy,
        "table": table,
        "seconds": time.perf_counter() - start,
    }
    atomic_write_text(args.out, json.dumps(payload, indent=2))
    print(f"\nobject area fraction (the random expectation of mass on object): {area:.3f}")
    print(
        "| attribution | model | shape: mass on object | shape: image share | background: rank of word "
        "(mean) | background: word ranked first | background: image share |"
    )
    print("|---|---|---|---|---|---|---|")
    for row, tasks in table.items():
        method, model = row.split(" | ")
        s, b = tasks["shape"], tasks.get("background", {})

        def cell(d, key, fmt="{:.3f}"):
            return fmt.format(d[key]) if key in d else "-"

        rank = f"{b['word_rank']:.2f} of {b['n_words']:.1f}" if "word_rank" in b else "-"
        print(
            f"| {method} | {model} | {cell(s, 'mass_on_object')} | {cell(s, 'image_share')} | {rank} | "
            f"{cell(b, 'top1', '{:.2f}')} | {cell(b, 'image_share')} |"
        )
    print(f"\naccuracy on these items: {json.dumps(accuracy)}\nwrote {Path(args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
