"""Writing one query's explanations A-D: PNG panels, token bar charts, raw patch-grid NPY maps
(with JSON sidecars) and a JSON index with ranks, scores and file names. Used by the validate
callback and by ``xclip cir-query``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from xclip.cir.explain import CIRExplanation
from xclip.explain.render import (
    figure_to_array,
    panels_figure,
    save_map_npy,
    save_png,
    token_bar_chart,
)
from xclip.io import atomic_write_text

EXPLAINER = "Grad-ECLIP through SEARLE"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:80] or "item"


def write_query_explanation(
    out_dir: str | Path,
    query_id: str,
    caption: str,
    reference01: Tensor,
    reference_name: str,
    candidates01: Tensor,
    candidate_names: Sequence[str],
    ranks: Sequence[int],
    explanation: CIRExplanation,
    is_target: Sequence[bool] | None = None,
    panel_px: int = 192,
) -> tuple[dict[str, Any], list[tuple[str, np.ndarray]]]:
    """Write everything for one query under ``out_dir/<query_id>/`` and return (the JSON index
    entry, [(name, HWC uint8 panel), ...] for TensorBoard).

    Files: ``reference_A.png`` (reference, A, A'), ``reference_A_tokens.png`` (A''s token bars),
    ``rank<r>_BC.png`` (the candidate as it is, B over it, the reference with C: the plain panel
    shows the candidate's own colours, which an overlay hides), ``rank<r>_D.png`` (D's word bars),
    ``*.npy`` raw maps at patch-grid resolution with ``.json`` sidecars, ``explanation.json``.
    """
    folder = Path(out_dir) / _safe(str(query_id))
    ex = explanation
    size = (reference01.shape[-2], reference01.shape[-1])
    images: list[tuple[str, np.ndarray]] = []
    title = f'query {query_id}: "{ex.prompt}" | {EXPLAINER}'
    fig = panels_figure(
        [
            ("reference", reference01, None),
            (f"A: ||phi(ref)|| = {ex.phi_norm:.3g}", reference01, ex.reference_norm_map),
            # two lines: one would run under the colour bar
            (f"A': cos(text('a photo of $'), ref)\n= {ex.self_score:.3f}", reference01, ex.reference_self_map),
        ],
        title,
        panel_px=panel_px,
    )
    images.append(("reference_A", figure_to_array(fig)))
    words = ex.self_words.word_pairs(0, 0)
    chart = token_bar_chart([w for w, _ in words], [s for _, s in words], "A' words: 'a photo of $' vs the reference")
    images.append(("reference_A_tokens", figure_to_array(chart)))
    meta = {"query": str(query_id), "caption": caption, "prompt": ex.prompt, "explainer": EXPLAINER}
    save_map_npy(
        ex.reference_norm_map, folder / "reference_A.npy", size, {**meta, "map": "A", "target": "||phi(f_ref)||"}
    )
    save_map_npy(
        ex.reference_self_map,
        folder / "reference_A_prime.npy",
        size,
        {**meta, "map": "A'", "target": "cos(text('a photo of $'), f_ref)"},
    )
    entry: dict[str, Any] = {
        **meta,
        "reference": reference_name,
        "phi_norm": ex.phi_norm,
        "self_score": ex.self_score,
        "self_words": [[w, s] for w, s in words],
        "files": {
            "A": "reference_A.png",
            "A_tokens": "reference_A_tokens.png",
            "A_npy": "reference_A.npy",
            "A_prime_npy": "reference_A_prime.npy",
        },
        "candidates": [],
    }
    for k, rank in enumerate(ranks):
        cand = candidates01[k]
        score = float(ex.scores[k])
        mark = " (target)" if is_target is not None and is_target[k] else ""
        fig = panels_figure(
            [
                (f"candidate rank {rank}{mark}", cand, None),
                ("B: its map", cand, ex.candidate_maps[k]),
                ("C: reference, through phi", reference01, ex.reference_maps[k]),
            ],
            f"{title}\ncandidate {candidate_names[k]} | s = {score:.3f}",
            panel_px=panel_px,
        )
        stem = f"rank{rank:03d}"
        images.append((f"{stem}_BC", figure_to_array(fig)))
        d_words = ex.prompt_words.word_pairs(k, 0)
        chart = token_bar_chart([w for w, _ in d_words], [s for _, s in d_words], f"D: words of the query, rank {rank}")
        images.append((f"{stem}_D", figure_to_array(chart)))
        cmeta = {**meta, "candidate": candidate_names[k], "rank": int(rank), "score": score}
        save_map_npy(
            ex.candidate_maps[k], folder / f"{stem}_B.npy", (cand.shape[-2], cand.shape[-1]), {**cmeta, "map": "B"}
        )
        save_map_npy(ex.reference_maps[k], folder / f"{stem}_C.npy", size, {**cmeta, "map": "C"})
        entry["candidates"].append(
            {
                "rank": int(rank),
                "file": candidate_names[k],
                "score": score,
                "is_target": bool(is_target[k]) if is_target is not None else None,
                "words": [[w, s] for w, s in d_words],
                "files": {
                    "BC": f"{stem}_BC.png",
                    "D": f"{stem}_D.png",
                    "B_npy": f"{stem}_B.npy",
                    "C_npy": f"{stem}_C.npy",
                },
            }
        )
    for name, array in images:
        save_png(array, folder / f"{name}.png", text={"Title": title})
    atomic_write_text(folder / "explanation.json", json.dumps(entry, indent=2))
    entry["folder"] = str(folder)
    return entry, images
