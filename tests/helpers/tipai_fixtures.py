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


def write_odd_images(root: Path, pid: str = "odd", prompt: str = "a red circle") -> dict[str, str]:
    """Add a prompt whose images are what users upload: an RGBA PNG whose transparent half hides
    dark blue pixels (composited on white by xclip's reader, black-ish if the alpha is dropped),
    a 300x200 and a 128x96 RGB image (resized and centre-cropped like any folder image). Returns
    {file name: what it is}."""
    rng = np.random.default_rng(5)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[..., 2] = 90  # the colour under the transparent pixels
    rgba[:, :32, :3] = (200, 30, 30)
    rgba[:, :32, 3] = 255  # the left half opaque red, the right half transparent
    Image.fromarray(rgba, mode="RGBA").save(root / f"{pid}_0.png")
    wide = np.full((200, 300, 3), 240, np.uint8)
    wide[60:140, 40:120] = (210, 20, 20)
    Image.fromarray(wide).save(root / f"{pid}_1.png")
    small = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(small).save(root / f"{pid}_2.png")
    prompts_file = root / "prompts.json"
    prompts = json.loads(prompts_file.read_text())
    prompts[pid] = prompt
    prompts_file.write_text(json.dumps(prompts, indent=2) + "\n")
    return {f"{pid}_0.png": "RGBA 64x64", f"{pid}_1.png": "RGB 300x200", f"{pid}_2.png": "RGB 128x96"}


def write_database(path: Path, n: int = 3, grid: int = 3, seed: int = 7) -> list[str]:
    """A TiPAI database of `n` ShapesWorld prompts with made-up patch grids (for the app): returns
    the prompt ids."""
    import io

    from xclip.faithfulness.database import (
        FaithfulnessDatabase,
        ImageRecord,
        PairRecord,
        PromptRecord,
        ScoreRecord,
    )

    data = ShapesFaithfulness(n=n, seed=seed)
    rng = np.random.default_rng(seed)
    config = {"backbone": "xclip:tiny-shapes", "grid": grid, "methods": ["crops", "dense"], "pair_rule": "best_worst"}
    records = []
    for i in range(n):
        item = data[i]
        pid = f"prompt_{i:03d}"
        rec = PromptRecord(pid, item["prompt"])
        glob = rng.random(item["images"].shape[0])
        for s, image in enumerate(item["images"]):
            buf = io.BytesIO()
            Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buf, format="PNG")
            image_id = f"{pid}_{s}"
            rec.images.append(
                ImageRecord(
                    image_id,
                    pid,
                    s,
                    "shapes",
                    64,
                    64,
                    png=buf.getvalue(),
                    error=item["errors"][s],
                    faithful=item["errors"][s] == "none",
                )
            )
            rec.scores.append(ScoreRecord(image_id, "clip", float(glob[s])))
            for method in ("crops", "dense", "dense_gradeclip"):
                rec.scores.append(ScoreRecord(image_id, method, None, rng.random((grid, grid)).astype(np.float32)))
        best, worst = int(glob.argmax()), int(glob.argmin())
        rec.pairs.append(
            PairRecord(pid, f"{pid}_{best}", f"{pid}_{worst}", float(glob[best]), float(glob[worst]), "best_worst")
        )
        records.append(rec)
    with FaithfulnessDatabase(path, config) as db:
        db.write(records)
    return [r.prompt_id for r in records]
