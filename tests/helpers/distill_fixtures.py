"""Tiny offline Teacher/Student architectures and helpers shared by the distillation tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from xclip.data.shapes import BACKGROUNDS, SHAPES, ShapesNotes

TASKS = {"shape": list(SHAPES), "background": list(BACKGROUNDS)}
VIT = {
    "model_type": "vit",
    "image_size": 64,
    "patch_size": 16,
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
}
MOBILEVIT = {
    "model_type": "mobilevit",
    "image_size": 64,
    "hidden_sizes": [16, 24, 32],
    "neck_hidden_sizes": [8, 8, 16, 16, 24, 32, 40],
    "num_attention_heads": 2,
    "expand_ratio": 2.0,
}
BERT = {
    "model_type": "bert",
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 40,
}
TEACHER_ARGS = {
    "vision": VIT,
    "text": BERT,
    "fusion": "cross_attention",
    "fusion_dim": 32,
    "fusion_options": {"heads": 2, "layers": 1},
}
STUDENT_ARGS = {
    "vision": MOBILEVIT,
    "text": {**BERT, "hidden_size": 16, "intermediate_size": 32},
    "fusion": "concat",
    "fusion_dim": 16,
}


CSV_SIZES = {"train": 12, "dev": 6, "test": 6}


def shapes_csv_layout(root: Path, sizes: dict[str, int] = CSV_SIZES) -> Path:
    """ShapesWorld notes written in the reference CSV layout (metadata_*.csv + images/), labels as
    ``type`` (shape) and ``severity`` (background)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        ds = ShapesNotes(n, seed={"train": 0, "dev": 1, "test": 2}[split], image_size=32)
        lines = ["file_path,type,severity,description"]
        for i in range(n):
            item = ds[i]
            name = f"{split}_{i}.png"
            pixels = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / name)
            lines.append(
                f"images/{name},{SHAPES[item['labels']['shape']]},{BACKGROUNDS[item['labels']['background']]},"
                f'"{item["text"]}"'
            )
        (root / f"metadata_{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_inputs(model, tokenizer, n: int = 3, seed: int = 0):
    """`MultimodalInputs` of `n` ShapesWorld notes for `model`."""
    from xclip.explain.multimodal import MultimodalInputs

    ds = ShapesNotes(n, seed=seed)
    items = [ds[i] for i in range(n)]
    images = torch.stack([it["image"] for it in items])
    enc = tokenizer([it["text"] for it in items], padding=True, return_tensors="pt")
    return MultimodalInputs(
        images,
        model.pixel_values(images),
        enc["input_ids"],
        enc["attention_mask"],
        [tokenizer.convert_ids_to_tokens(r) for r in enc["input_ids"].tolist()],
        [it["text"] for it in items],
        [str(i) for i in range(n)],
        tokenizer.pad_token_id,
    )
