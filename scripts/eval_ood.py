"""NegLabel vs NegAlign on ShapesWorld with the shipped checkpoint: the OOD tables of docs/workflows/ood.md.

    python scripts/eval_ood.py                       # writes outputs/ood_table.{md,json}
    python scripts/eval_ood.py --backbone checkpoints/other --n 500

Runs ``xclip test --config configs/ood_shapes.yaml`` (one pass: NegLabel, NegLabel*, NegAlign
for every lambda and the whole M1/M2/M3/P_align ablation on the held-out test sets; lambda is
chosen on the validation sets, which the test run scores too), then formats its ``results.json``:
the main comparison (with the lambda chosen on validation, and the oracle lambda of the test data
for reference), the lambda sweep of the configured variant, the ablation at the configured lambda
and at each row's best lambda on the test data (an oracle), per-split statistics and the negative
vocabulary's role split.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from xclip.cli import main as xclip_main
from xclip.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("ood_background", "ood_novel_shape")


def run(backbone: str, n: int, save_dir: Path) -> dict:
    xclip_main(
        [
            "test",
            "--config",
            str(ROOT / "configs" / "ood_shapes.yaml"),
            "--model.init_args.backbone",
            backbone,
            "--trainer.logger.init_args.save_dir",
            str(save_dir),
            "--trainer.enable_progress_bar",
            "false",
            "--data.init_args.n_id",
            str(n),
            "--data.init_args.n_ood",
            str(n),
            "--data.init_args.n_calib",
            str(n // 2),
        ]
    )
    run_dir = sorted((save_dir / "ood_shapes").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))[-1]
    return json.loads((run_dir / "results.json").read_text()) | {"run_dir": str(run_dir)}


def cells(metrics: dict) -> str:
    return " | ".join(f"{metrics[s]['auroc']:.3f} | {metrics[s]['fpr95']:.3f}" for s in SPLITS)


HEAD = "| AUROC bg | FPR95 bg | AUROC novel | FPR95 novel |"
RULE = "|---|---|---|---|"


def markdown(res: dict, n: int) -> str:
    neg = res["ood"]
    cfg, lam = neg["config"], neg["config"]["lam"]
    best, oracle = neg["best_lambda"], neg["oracle_lambda"]
    star = cfg["variant"].replace("+p_align", "").replace("p_align", "") or "no toggle"
    per_lambda = {p["lambda"]: p["metrics"] for p in neg["per_lambda"]}
    lines = [
        f"ShapesWorld spurious variant, held-out test sets, {res['backbone']}: ID {n} images "
        f"(square on land / circle on water, "
        f"95% correlated), OOD {n} background-only and {n} novel-shape images, {n // 2} ID calibration images "
        f"(M3 statistics). {cfg['n_negatives']} negatives mined from the shipped word lists "
        f"(roles: {cfg['n_roles']}), {cfg['n_groups']} groups, M1 k = {cfg['m1_topk']}. FPR95: "
        f"{neg['convention']} convention. Configured variant: `{cfg['variant']}`, lambda {lam:g}.",
        "",
        f"| variant {HEAD}",
        f"|---{RULE}",
        f"| NegLabel | {cells(neg['variants']['neglabel'])} |",
        f"| NegLabel* ({star}) | {cells(neg['variants']['neglabel_star'])} |",
        f"| NegAlign, lambda {lam:g} | {cells(neg['variants']['negalign'])} |",
        f"| NegAlign, lambda {best:g} chosen on validation | {cells(neg['variants']['negalign_selected'])} |",
        f"| NegAlign, lambda {oracle:g} best on these test sets (oracle) | {cells(per_lambda[oracle])} |",
        "",
        f"Lambda sweep of `{cfg['variant']}`:",
        "",
        f"| lambda {HEAD}",
        f"|---{RULE}",
    ]
    lines += [f"| {lam_:g} | {cells(m)} |" for lam_, m in per_lambda.items()]
    lines += [
        "",
        f"Ablation (each row at lambda {lam:g}; best lambda per row in the last column):",
        "",
        f"| M1 | M2 | M3 | P_align {HEAD} best lambda (AUROC bg / novel) |",
        f"|---|---|---|---{RULE}---|",
    ]
    for row in neg["ablation"]:
        flags = " | ".join("x" if row[k] else "" for k in ("m1", "m2", "m3", "p_align"))
        sweep = max(row["per_lambda"], key=lambda p: sum(p["metrics"][s]["auroc"] for s in SPLITS))
        best_cell = (
            f"{sweep['lambda']:g} ({sweep['metrics'][SPLITS[0]]['auroc']:.3f} / "
            f"{sweep['metrics'][SPLITS[1]]['auroc']:.3f})"
            if row["p_align"]
            else "-"
        )
        lines.append(f"| {flags} | {cells(row['metrics'])} | {best_cell} |")
    for toggle, why in neg["ablation_unavailable"].items():
        lines.append(f"\n{toggle} not measured: {why}.")
    lines += [
        "",
        "Per split (configured variant; P_align and NegLabel* after M3 when it is on):",
        "",
        "| split | n | skipped | NegLabel | NegLabel* | P_align | S_final | CAM valid | ID accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, st in neg["splits"].items():
        acc = f"{st['id_accuracy']:.3f}" if "id_accuracy" in st else "-"
        lines.append(
            f"| {name} | {st['n']} | {st['skipped']} | {st['mean_s_neglabel_plain']:.3f} | "
            f"{st['mean_s_neglabel_star']:.3f} | {st['mean_p_align']:.3f} | {st['mean_s_final']:.3f} | "
            f"{st['cam_valid_rate']:.3f} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="xclip:tiny-shapes")
    parser.add_argument("--n", type=int, default=1000, help="ID images and images per OOD set")
    parser.add_argument("--out", default="outputs/ood_table", help="output path without suffix")
    parser.add_argument("--runs", default="runs", help="where the validate run is logged")
    args = parser.parse_args()
    res = run(args.backbone, args.n, Path(args.runs))
    out = Path(args.out)
    table = markdown(res, args.n)
    atomic_write_text(out.with_suffix(".md"), table)
    summary = {"backbone": res["backbone"], "run_dir": res["run_dir"], "metrics": res["metrics"], **res["ood"]}
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=1))
    print(table)
    print(f"wrote {out.with_suffix('.md')} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
