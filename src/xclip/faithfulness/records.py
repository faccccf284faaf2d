"""What TiPAI writes to its database, built from a scored batch (plain functions): which stored
images can be reused (`reusable_images`), the prompt records with their images, scores and pairs
(`prompt_records`), and a generated image's PNG bytes (`png_bytes`)."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from xclip.faithfulness.database import (
    FaithfulnessDatabaseError,
    ImageRecord,
    PairRecord,
    PromptRecord,
    ScoreRecord,
    StoredPrompt,
)


def reusable_images(
    batch: Mapping[str, Any], states: Mapping[str, StoredPrompt], resume: bool, db_path: object
) -> tuple[Tensor, Tensor, list[bool]]:
    """Which images of a TiPAI batch the database holds with the same content (reuse), which it
    holds with other content (re-scored), and which prompts need writing.

    An image's stored scores are reused only when `resume` is on, its prompt is complete with the
    same text and folder, and the image's resolved path and content hash are the stored ones; a
    prompt is written again when any of its images is scored now or its set of images changed (its
    pairs are rebuilt). `states` is ``db.prompt_states(batch["prompt_id"])``. Returns [M] bool
    reuse, [M] bool rescored and [B] write flags.

    Raises:
        FaithfulnessDatabaseError: a prompt id the database holds from another folder.
    """
    prompt_of = batch["prompt_of"].tolist()
    for b, pid in enumerate(batch["prompt_id"]):
        state = states.get(pid)
        if state is not None and state.root != batch["root"][b]:
            raise FaithfulnessDatabaseError(
                f"{db_path}: prompt {pid!r} was scored from {state.root or 'generated (ShapesWorld) images'}; this "
                f"run reads it from {batch['root'][b] or 'generated (ShapesWorld) images'}. A database holds each "
                "prompt id from one folder (another folder's prompt ids get their own rows): pass another db_path "
                "for this folder (e.g. --model.init_args.db_path runs/<name>/tipai.db)"
            )
    reuse, rescored = [], []
    for i, b in enumerate(prompt_of):
        state = states.get(batch["prompt_id"][b])
        stored = None if state is None or not state.complete else state.images.get(batch["image_id"][i])
        same = (
            state is not None
            and stored is not None
            and state.prompt == batch["prompt"][b]
            and stored == (batch["path"][i], batch["sha256"][i])
        )
        reuse.append(resume and same)
        rescored.append(stored is not None and not reuse[-1])
    write = []
    for b, pid in enumerate(batch["prompt_id"]):
        state = states.get(pid)
        rows = [i for i, p in enumerate(prompt_of) if p == b]
        unchanged = (
            state is not None
            and state.complete
            and all(reuse[i] for i in rows)
            and set(state.images) == {batch["image_id"][i] for i in rows}
        )
        write.append(not unchanged)
    return torch.tensor(reuse, dtype=torch.bool), torch.tensor(rescored, dtype=torch.bool), write


def prompt_records(
    batch: Mapping[str, Any],
    prompts: Sequence[int],
    global_score: Tensor,
    maps: Mapping[str, Tensor],
    pairs: Tensor,
    head_reward: Tensor,
    pair_rule: str,
) -> list[PromptRecord]:
    """The database records of the batch's prompts `prompts`: each with its images (a generated
    one's PNG stored inline), its global score [M] and patch maps ``{name: [M, G, G]}`` (the ``head``
    map's score is the head's reward [M]) and its chosen/rejected `pairs` [P, 2]."""
    prompt_of = batch["prompt_of"].tolist()
    images, faithful = batch["images"], batch["faithful"].tolist()
    cpu_maps = {k: v.detach().cpu().numpy() for k, v in maps.items()}
    rewards = head_reward.detach().cpu().tolist()
    records = []
    for b in prompts:
        pid = batch["prompt_id"][b]
        rows = [i for i, p in enumerate(prompt_of) if p == b]
        rec = PromptRecord(pid, batch["prompt"][b], root=batch["root"][b])
        for i in rows:
            path = batch["path"][i]
            rec.images.append(
                ImageRecord(
                    batch["image_id"][i],
                    pid,
                    int(batch["seed"][i]),
                    "shapes" if path is None else "folder",
                    int(images.shape[-2]),
                    int(images.shape[-1]),
                    path=path,
                    png=png_bytes(images[i]) if path is None else None,
                    error=batch["error"][i],
                    faithful=None if faithful[i] < 0 else bool(faithful[i]),
                    sha256=batch["sha256"][i],
                )
            )
            rec.scores.append(ScoreRecord(batch["image_id"][i], "clip", float(global_score[i])))
            for name, grid in cpu_maps.items():
                rec.scores.append(
                    ScoreRecord(
                        batch["image_id"][i], name, float(grid[i].mean()) if name != "head" else rewards[i], grid[i]
                    )
                )
        for c, r in pairs.tolist():
            if prompt_of[c] == b:
                rec.pairs.append(
                    PairRecord(
                        pid,
                        batch["image_id"][c],
                        batch["image_id"][r],
                        float(global_score[c]),
                        float(global_score[r]),
                        pair_rule,
                    )
                )
        records.append(rec)
    return records


def png_bytes(image01: Tensor) -> bytes:
    """An image [3, H, W] in [0, 1] as PNG bytes."""
    arr = (image01.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()
