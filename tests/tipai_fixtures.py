"""A TiPAI prompt folder in the exact on-disk format users give (``prompts.json`` +
``{prompt_id}_{seed}.png``), written from ShapesWorld's faithfulness sets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from xclip.data.shapes import ShapesFaithfulness


def write_prompt_folder(root: Path, n: int = 3, seed: int = 7, image_size: int = 64) -> dict[str, dict]:
    """Write `n` prompts x 4 renderings; returns {prompt_id: {"prompt", "errors"}}."""
    root.mkdir(parents=True, exist_ok=True)
    data = ShapesFaithfulness(n=n, seed=seed, image_size=image_size)
    prompts, truth = {}, {}
    for i in range(n):
        item = data[i]
        pid = f"prompt_{i:03d}"  # an underscore inside the id: the seed is what follows the last one
        prompts[pid] = item["prompt"]
        truth[pid] = {"prompt": item["prompt"], "errors": item["errors"]}
        for s, image in enumerate(item["images"]):
            arr = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(arr).save(root / f"{pid}_{s}.png")
    (root / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    return truth
