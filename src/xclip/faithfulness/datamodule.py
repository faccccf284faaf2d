"""Prompts with several generated images each, for TiPAI scoring: a user's folder
(``prompts.json`` + ``{prompt_id}_{seed}.png``) or ShapesWorld's faithfulness sets.

Folder layout::

    root/prompts.json          {"<prompt_id>": "<prompt>", ...}
                               or [{"prompt_id": "<id>", "prompt": "<text>"}, ...]
    root/<prompt_id>_<seed>.png   any text-to-image model's outputs, one file per seed

Images are read by `xclip.data.images` (RGB, shorter side resized to `image_size`, centre crop);
an unreadable file (also one over `xclip.data.images.MAX_PIXELS` pixels) is skipped and reported
with its path, the prompt keeps its other images. Each image carries the SHA-256 of what was read
(the file's bytes; a generated image's float32 pixels) and folder images their resolved absolute
path, so the database can tell a changed file from a stored one.

File names are checked before anything is scored: a prompt id is at most `MAX_PROMPT_ID_BYTES`
UTF-8 bytes without path separators or control characters (it becomes part of image and figure
file names), and a seed is an integer that fits 64 bits.

Batches (``task = "faithfulness"``) hold B prompts and all their M images flattened:
``prompt_id`` / ``prompt`` [B], ``index`` [B] (dataset index), ``images`` [M, 3, S, S] in [0, 1],
``prompt_of`` [M] (the prompt's position in the batch), ``seed`` [M], ``image_id`` [M],
``path`` [M] (None for generated images), ``sha256`` [M] (content hashes), ``root`` [B] (the
resolved folder, None for generated images), ``faithful`` [M] (1 / 0, -1 unknown), ``error`` [M]
(the ShapesWorld error kind or None), ``error_masks`` [M, S, S] (ShapesWorld only) and
``skipped_paths`` (unreadable files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from xclip.data.images import IMAGE_EXTENSIONS, load_image01
from xclip.data.sampling import eval_loader
from xclip.data.shapes import ShapesFaithfulness
from xclip.faithfulness.database import file_sha256

log = logging.getLogger(__name__)

SOURCES = ("shapes", "folder")
_STEM = re.compile(r"^(?P<prompt_id>.+)_(?P<seed>-?\d+)$")
# a prompt id becomes <prompt_id>_<seed>.<ext> and the figure <stage>_<prompt_id>.png: both must fit
# the usual 255-byte limit of a file name with room for a 20-digit seed and the extension
MAX_PROMPT_ID_BYTES = 200
SEED_RANGE = (-(2**63), 2**63 - 1)  # stored as SQLite INTEGER and torch.long
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_prompt_id(pid: str, where: str | Path) -> None:
    """Raise naming `where` when `pid` cannot be part of a file name (see the module docstring)."""
    shown = pid if len(pid) <= 60 else f"{pid[:40]}...{pid[-10:]}"
    if not pid or pid in (".", "..") or "/" in pid or "\\" in pid:
        raise ValueError(f"{where}: prompt id {shown!r} must be a non-empty name without path separators")
    if _CONTROL.search(pid):
        raise ValueError(f"{where}: prompt id {shown!r} holds a control character; use printable characters")
    n = len(pid.encode("utf-8"))
    if n > MAX_PROMPT_ID_BYTES:
        raise ValueError(
            f"{where}: prompt id {shown!r} is {n} bytes long (UTF-8), over the limit of "
            f"{MAX_PROMPT_ID_BYTES}: it becomes part of the image and figure file names; use a shorter id"
        )


def read_prompts(path: str | Path) -> dict[str, str]:
    """``prompts.json`` -> {prompt_id: prompt}; malformed records raise naming the file and entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: no prompts file (expected prompts.json with {{"<prompt_id>": "<prompt>"}})')
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid UTF-8 JSON ({err})") from None
    if isinstance(data, dict):
        entries = list(data.items())
    elif isinstance(data, list):
        entries = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict) or "prompt_id" not in rec or "prompt" not in rec:
                raise ValueError(f'{path}: entry {i} must be an object with "prompt_id" and "prompt", got {rec!r}')
            entries.append((rec["prompt_id"], rec["prompt"]))
    else:
        raise ValueError(
            f"{path}: expected an object {{prompt_id: prompt}} or a list of "
            f'{{"prompt_id", "prompt"}} records, got {type(data).__name__}'
        )
    prompts: dict[str, str] = {}
    for pid, prompt in entries:
        pid = str(pid)
        check_prompt_id(pid, path)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path}: prompt {pid!r} must be a non-empty string, got {prompt!r}")
        if pid in prompts:
            raise ValueError(f"{path}: prompt id {pid!r} appears twice")
        prompts[pid] = prompt.strip()
    if not prompts:
        raise ValueError(f"{path}: holds no prompts")
    return prompts


class PromptFolder(Dataset):
    """A folder of generated images with its ``prompts.json`` (see the module docstring).

    Item: ``{"prompt_id", "prompt", "images" [R, 3, S, S], "seeds" [R], "paths" [R],
    "skipped_paths", "index"}``. Prompts without any image file are left out (logged, listed in
    ``prompts_without_images``).
    """

    def __init__(self, root: str | Path, image_size: int = 224, prompts_file: str = "prompts.json"):
        self.image_size = int(image_size)
        if not Path(root).expanduser().is_dir():
            raise FileNotFoundError(f"image folder {root}: no such directory")
        self.root = Path(root).expanduser().resolve()  # stored paths resolve from any working directory
        prompts = read_prompts(self.root / prompts_file)
        files: dict[str, list[tuple[int, Path]]] = {}
        unknown = []
        for p in sorted(self.root.iterdir()):
            if not p.is_file() or p.suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            match = _STEM.match(p.stem)
            if match is None:
                raise ValueError(f"{p}: image files must be named <prompt_id>_<seed>{p.suffix} (seed an integer)")
            seed = int(match["seed"])
            if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
                raise ValueError(
                    f"{p}: seed {match['seed']} does not fit a 64-bit integer; name the file "
                    f"<prompt_id>_<seed>{p.suffix} with a seed in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]"
                )
            if match["prompt_id"] not in prompts:
                unknown.append(p.name)
                continue
            files.setdefault(match["prompt_id"], []).append((seed, p))
        if unknown:
            raise ValueError(
                f"{self.root}: images of prompt ids missing from {prompts_file}: {unknown[:10]}"
                + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            )
        self.prompts_without_images = sorted(set(prompts) - set(files))
        if self.prompts_without_images:
            log.warning(
                "%s: %d prompts have no image file and are skipped: %s",
                self.root,
                len(self.prompts_without_images),
                self.prompts_without_images[:10],
            )
        self.entries = [(pid, prompts[pid], sorted(files[pid])) for pid in prompts if pid in files]
        if not self.entries:
            raise ValueError(f"{self.root}: no image matches a prompt of {prompts_file}")
        for pid, _, seeds in self.entries:
            dup = sorted({s for s, _ in seeds if sum(t == s for t, _ in seeds) > 1})
            if dup:
                raise ValueError(f"{self.root}: prompt {pid!r} has several files for seeds {dup}")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pid, prompt, seeds = self.entries[index]
        images, kept, skipped = [], [], []
        for seed, path in seeds:
            try:
                digest = file_sha256(path)
            except OSError as err:
                log.warning("skipping unreadable image: %s: %s", path, err)
                image = None
            else:
                image = load_image01(path, self.image_size)
            if image is None:
                skipped.append(str(path))
            else:
                images.append(image)
                kept.append((seed, str(path), digest))
        size = self.image_size
        return {
            "prompt_id": pid,
            "prompt": prompt,
            "index": index,
            "root": str(self.root),
            "images": torch.stack(images) if images else torch.zeros(0, 3, size, size),
            "seeds": [k[0] for k in kept],
            "paths": [k[1] for k in kept],
            "sha256": [k[2] for k in kept],
            "skipped_paths": skipped,
        }


class ShapesPrompts(Dataset):
    """ShapesWorld's faithfulness set as prompts with images: ``prompt_id`` =
    ``shapes-<split>-<seed>-<index>``, seeds = the rendering positions, plus each rendering's
    ``errors`` / ``error_masks`` / ``faithful``."""

    def __init__(self, n: int = 200, seed: int = 1000, image_size: int = 64, n_renderings: int = 4, split: str = "val"):
        self.data = ShapesFaithfulness(n=n, seed=seed, image_size=image_size, n_renderings=n_renderings, split=split)
        self.tag = f"shapes-{split}-{seed}"

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        r = item["images"].shape[0]
        images = item["images"].float().contiguous()
        return {
            "prompt_id": f"{self.tag}-{index:05d}",
            "prompt": item["prompt"],
            "index": index,
            "root": None,
            "images": images,
            "seeds": list(range(r)),
            "paths": [None] * r,
            "skipped_paths": [],
            "sha256": [hashlib.sha256(im.numpy().tobytes()).hexdigest() for im in images],
            "errors": item["errors"],
            "error_masks": item["error_masks"],
            "faithful": item["faithful"],
        }


def collate_prompts(items: list[dict[str, Any]]) -> dict[str, Any]:
    """B prompt items -> one batch with their images flattened (see the module docstring)."""
    counts = [it["images"].shape[0] for it in items]
    batch: dict[str, Any] = {
        "task": "faithfulness",
        "prompt_id": [it["prompt_id"] for it in items],
        "prompt": [it["prompt"] for it in items],
        "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
        "images": torch.cat([it["images"] for it in items]),
        "prompt_of": torch.repeat_interleave(torch.arange(len(items)), torch.tensor(counts, dtype=torch.long)),
        "seed": torch.tensor([s for it in items for s in it["seeds"]], dtype=torch.long),
        "image_id": [f"{it['prompt_id']}_{s}" for it in items for s in it["seeds"]],
        "path": [p for it in items for p in it["paths"]],
        "sha256": [h for it in items for h in it["sha256"]],
        "root": [it["root"] for it in items],
        "skipped_paths": [p for it in items for p in it["skipped_paths"]],
    }
    if all("faithful" in it for it in items):
        batch["faithful"] = torch.cat([it["faithful"].long() for it in items])
        batch["error"] = [e for it in items for e in it["errors"]]
        batch["error_masks"] = torch.cat([it["error_masks"] for it in items])
    else:
        batch["faithful"] = torch.full((sum(counts),), -1, dtype=torch.long)
        batch["error"] = [None] * sum(counts)
    return batch


class TiPAIDataModule(pl.LightningDataModule):
    """Prompts and their generated images for ``TiPAIModule`` (validate / test).

    Args:
        source: ``shapes`` (ShapesWorld faithfulness sets, the embedded default) or ``folder``.
        data_root: the folder of ``source: folder`` (validate); ``test_data_root``: its held-out
            folder for ``xclip test`` (a folder has no split of its own).
        prompts_file: the prompts file name inside the folder.
        n, seed, n_renderings: ShapesWorld: prompts per split, the base seed (validation prompts use
            ``seed + 1000``, test prompts ``seed + 1000`` in the disjoint test key family), images per
            prompt.
        image_size: side of the square images (the crop grid is cut from these pixels).
        batch_size: prompts per batch (each batch is one database transaction).
    """

    def __init__(
        self,
        source: str = "shapes",
        data_root: str | None = None,
        test_data_root: str | None = None,
        prompts_file: str = "prompts.json",
        n: int = 200,
        seed: int = 0,
        n_renderings: int = 4,
        image_size: int = 64,
        batch_size: int = 8,
        num_workers: int = 0,
    ):
        super().__init__()
        if source not in SOURCES:
            raise ValueError(f"unknown TiPAI source {source!r}; choose from {SOURCES}")
        if source == "folder" and not data_root:
            raise ValueError(
                "source='folder' needs data_root: the folder holding prompts.json and <prompt_id>_<seed>.png files"
            )
        self.source, self.data_root, self.test_data_root = source, data_root, test_data_root
        self.prompts_file = prompts_file
        self.n, self.seed, self.n_renderings, self.image_size = n, seed, n_renderings, image_size
        self.batch_size, self.num_workers = batch_size, num_workers

    def dataset(self, split: str) -> Dataset:
        """The prompts of ``val`` or ``test``."""
        if self.source == "shapes":
            return ShapesPrompts(self.n, self.seed + 1000, self.image_size, self.n_renderings, split)
        if split == "test":
            if not self.test_data_root:
                raise ValueError(
                    "source 'folder' has no held-out split: set test_data_root for `xclip test`, or run "
                    "`xclip validate` on data_root"
                )
            return PromptFolder(self.test_data_root, self.image_size, self.prompts_file)
        assert self.data_root is not None  # __init__ refuses source 'folder' without data_root
        return PromptFolder(self.data_root, self.image_size, self.prompts_file)

    def _loader(self, split: str) -> DataLoader:
        return eval_loader(self.dataset(split), self.batch_size, collate_prompts, self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
