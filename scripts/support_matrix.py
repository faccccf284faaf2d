"""The support matrix of docs/backbones.md, generated: every architecture of open_clip's registry and the three
Hugging Face classes, built small and offline, run through every explainer and workflow probe.

    python scripts/support_matrix.py                      # print the table and the counts
    python scripts/support_matrix.py --write docs/backbones.md   # rewrite the table between the markers

Each architecture is built from open_clip's own config with reduced width, depth and input size
(`xclip.backbones.reduced.reduced_openclip`: the same tower classes, pooling, masks and tokenizer
interface; tokenizers that need a download replaced by an offline one of the same interface),
wrapped with `wrap_model`, and probed:

- loads: ``encode_image`` / ``encode_text`` equal open_clip's own (<= 1e-5) and the traced forward
  pools to the same embedding: zero-shot, retrieval and TiPAI's crop scores need nothing more;
- Grad-ECLIP image maps, text maps, Grad-CAM, GAME: each runs with finite maps, or is refused
  with a message naming the family and the explainer to use instead (the reason is listed);
- NegAlign: its image side (CAM foreground, background embedding) runs with finite numbers;
- CIR: SEARLE's pseudo-token injection of a word's own embedding equals the plain text encoder;
  CIR maps (A-D) run;
- TiPAI dense: patch similarity and evidence maps run with finite numbers;
- tested by: the `tests/shared/test_families.py` family whose towers are the same classes with the same
  pooling (every check there is exact against the library or a plain-autograd computation).

SHAP and Captum explain any differentiable model and are unchanged by the family (they are not
probed here).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections import Counter
from pathlib import Path

import torch

START, END = "<!-- support-matrix:start -->", "<!-- support-matrix:end -->"
TEXTS = ["a photo of a red circle", "two blue squares on water"]
COLUMNS = [
    "loads",
    "grad_eclip",
    "text_maps",
    "grad_cam",
    "game",
    "negalign",
    "cir_injection",
    "cir_maps",
    "tipai_dense",
]
HEADERS = [
    "loads + encodes",
    "Grad-ECLIP image",
    "Grad-ECLIP text",
    "Grad-CAM",
    "GAME",
    "NegAlign",
    "CIR (SEARLE)",
    "CIR maps",
    "TiPAI dense",
]


def build(name: str):
    from xclip.backbones import wrap_model
    from xclip.backbones.reduced import (
        offline_tokenizer_for,
        reduced_hf,
        reduced_openclip,
    )

    if name.startswith("hf:"):
        model, tokenizer = reduced_hf(name.removeprefix("hf:"))
    else:
        model, tokenizer = reduced_openclip(name), offline_tokenizer_for(name)
    return wrap_model(model, tokenizer).eval()


def signature(bb) -> tuple:
    return type(bb.vision).__name__, bb.vision.pooling, bb.vision.family, bb.text.family


def _outcome(fn) -> tuple[bool, str]:
    from xclip.backbones import UnsupportedFamily

    try:
        out = fn()
    except UnsupportedFamily as err:
        return False, str(err)
    if isinstance(out, torch.Tensor) and not torch.isfinite(out).all():
        return False, "non-finite output"
    return True, ""


def probe(bb) -> dict[str, tuple[bool, str]]:
    from xclip.cir.explain import CIRExplainer
    from xclip.cir.phi import Phi
    from xclip.explain import GAME, GradCAM, GradECLIP
    from xclip.faithfulness.scoring import TiPAIScorer
    from xclip.ood.negalign_features import NegAlignFeatures

    s = bb.image_size
    images = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    images01 = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(1))
    tokens = bb.tokenize(TEXTS)
    model = bb.model
    with torch.no_grad():
        if hasattr(model, "get_image_features"):
            ok = bb.trace_image(images, 1).embedding.shape == bb.encode_image(images).shape
        else:
            ours = bb.encode_image(images)
            ok = torch.allclose(
                ours, model.encode_image(images, normalize=False), atol=1e-5, rtol=0
            ) and torch.allclose(bb.encode_text(tokens), model.encode_text(tokens, normalize=False), atol=1e-5, rtol=0)
            if bb.vision.pooling != "untraced":  # an encode-only tower: encoding is what "loads" means there
                ok = ok and torch.allclose(bb.trace_image(images, 1).embedding, ours, atol=1e-5, rtol=0)
    results = {"loads": (bool(ok), "" if ok else "encoders differ from the library's")}

    def injection():
        slot, word = bb.tokenize(["a photo of $"]), bb.tokenize(["a photo of cat"])
        position = int((slot[0] == bb.placeholder_id).nonzero()[0])
        pseudo = bb.token_embedding(word)[:, position].detach()
        with torch.no_grad():
            diff = bb.encode_text_from_embeddings(bb.token_embedding(slot), slot, pseudo) - bb.encode_text(word)
        return torch.tensor(0.0) if diff.abs().max() <= 1e-5 else torch.tensor(float("nan"))

    def negalign():
        feats = NegAlignFeatures(bb)(images, bb.encode_texts(["circle", "square"]).detach())
        return torch.cat([feats.image_emb.flatten(), feats.bg_emb.flatten(), feats.cam.flatten()])

    def tipai():
        scorer = TiPAIScorer(bb, grid=2, methods=("dense",))
        out = scorer.score(images01, scorer.text_embeddings(TEXTS))
        return torch.cat([m.flatten() for m in out.maps.values()])

    def cir_maps():
        explanation = CIRExplainer(bb, Phi.for_backbone(bb)).explain(images[:1], "is blue", images)
        return torch.cat([explanation.candidate_maps.flatten(), explanation.reference_maps.flatten()])

    probes = {
        "grad_eclip": lambda: GradECLIP(bb).image_maps(images, TEXTS),
        "text_maps": lambda: GradECLIP(bb).text_maps(images, TEXTS).token_scores,
        "grad_cam": lambda: GradCAM(bb).image_maps(images, TEXTS),
        "game": lambda: GAME(bb).image_maps(images, TEXTS),
        "negalign": negalign,
        "cir_injection": injection,
        "cir_maps": cir_maps,
        "tipai_dense": tipai,
    }
    for name, fn in probes.items():
        results[name] = _outcome(fn)
    return results


def reason_label(message: str) -> str:
    """A short footnote key for a refusal."""
    if "pools without attention" in message or "no query" in message:
        return "average pooling: no pooling query (use Grad-CAM)"
    if "relative-position" in message:
        return "relative-position bias in every attention (encode only)"
    if "transformers blocks are not traced" in message:
        return "Hugging Face text encoder: blocks not traced (image-side maps, SHAP/Captum)"
    if "Grad-ECLIP" in message and "CIR" not in message:
        return "needs Grad-ECLIP's pooling attention"
    return message.split(":")[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--write", type=Path, default=None, help="a Markdown file whose table between the markers is rewritten"
    )
    parser.add_argument("--archs", nargs="*", default=None, help="only these (default: all of open_clip's + HF)")
    args = parser.parse_args()
    import open_clip

    from xclip.backbones.reduced import FAMILIES

    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    names = args.archs or [*open_clip.list_models(), "hf:CLIPModel", "hf:SiglipModel", "hf:Siglip2Model"]
    signatures = {}
    for family, arch in FAMILIES.items():
        signatures.setdefault(signature(build(arch)), family)
    rows, reasons = [], {}
    for name in names:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        try:
            bb = build(name)
            outcome = probe(bb)
            family = f"{bb.vision.family} / {bb.text.family}"
            tested = signatures.get(signature(bb), "")
        except Exception as err:  # noqa: BLE001 - a build failure of any kind is a row of its own
            outcome = {c: (False, f"{type(err).__name__}: {err}") for c in COLUMNS}
            family, tested = "build failed", ""
        cells = []
        for column in COLUMNS:
            ok, message = outcome[column]
            if ok:
                cells.append("yes")
            else:
                key = reason_label(message)
                reasons.setdefault(key, len(reasons) + 1)
                cells.append(f"no ({reasons[key]})")
        rows.append((name, family, cells, tested))
    counts = {c: sum(r[2][i] == "yes" for r in rows) for i, c in enumerate(COLUMNS)}
    families = Counter(r[1] for r in rows)
    n_oc = sum(not r[0].startswith("hf:") for r in rows)
    lines = [
        START,
        "",
        (
            f"Generated by `python scripts/support_matrix.py --write docs/backbones.md` over {n_oc} open_clip "
            f"architectures and {len(rows) - n_oc} Hugging Face classes ({len(families)} tower combinations)."
        ),
        "",
        "| | " + " | ".join(HEADERS) + " |",
        "|---|" + "---|" * len(HEADERS),
        f"| **count (of {len(rows)})** | " + " | ".join(str(counts[c]) for c in COLUMNS) + " |",
        "",
        "Reasons: " + "; ".join(f"({i}) {k}" for k, i in sorted(reasons.items(), key=lambda kv: kv[1])) + ".",
        "",
        "<details><summary>Every architecture</summary>",
        "",
        "| architecture | image tower / text tower | " + " | ".join(HEADERS) + " | tested by |",
        "|---|---|" + "---|" * len(HEADERS) + "---|",
    ]
    for name, family, cells, tested in rows:
        test = f"`test_families.py[{tested}]`" if tested else "this script"
        lines.append(f"| `{name}` | {family} | " + " | ".join(cells) + f" | {test} |")
    lines += ["", "</details>", "", END]
    table = "\n".join(lines)
    print(table)
    if args.write:
        text = args.write.read_text()
        if START not in text or END not in text:
            raise SystemExit(f"{args.write}: no {START} ... {END} markers to replace")
        new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: table, text, flags=re.DOTALL)
        tmp = args.write.with_suffix(".tmp")
        tmp.write_text(new)
        tmp.replace(args.write)
        print(f"wrote {args.write}", file=sys.stderr)


if __name__ == "__main__":
    main()
