"""``xclip app --db runs/.../tipai.db``: a local Gradio app to browse a TiPAI database.

Pick a prompt (the first one is shown when the page opens): its images with their global scores,
which one is chosen and which rejected, and one comparison figure with every stored heatmap
(crops, dense, Grad-ECLIP, the TSPO head's patch scores when the database holds them or ``--head``
is given). A second tab scores an uploaded image file against a typed prompt with the database's
scoring configuration (global score, crops and dense heatmaps, and the head's patch scores with
``--head``). Errors reach the page as their message (`shown_errors`).

Needs the optional extra: ``pip install "xclip[app]"`` (Gradio).
"""

from __future__ import annotations

import argparse
import functools
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from xclip.data.images import (
    IMAGE_EXTENSIONS,
    load_image01,
    read_rgb,
    resize_center_crop,
    to_rgb,
)
from xclip.explain.render import figure_to_array
from xclip.faithfulness.database import (
    FaithfulnessDatabase,
    ImageRecord,
    file_sha256,
    in_root,
)
from xclip.faithfulness.figures import prompt_figure
from xclip.faithfulness.scoring import METHODS, TiPAIScorer, TiPAIScores

APP_TITLE = "xclip TiPAI faithfulness browser"
PLACEHOLDER = 0.5  # grey shown instead of an image the app cannot or will not show


class Browser:
    """What the app shows, without Gradio (testable): a database, and lazily the backbone and
    head for scoring uploads.

    Stored images are shown only from the folders the database records for their prompts (a
    file directly inside its prompt's folder, by its absolute path): a path elsewhere, a missing
    file and a file whose content changed since it was scored are replaced by a grey square and
    named in the table. Uploads are read and preprocessed exactly as a folder run reads its
    files (`xclip.data.images.read_rgb`, then the database's image size), so an uploaded file
    scores what the database holds for the same file and prompt.

    Args:
        db_path: the TiPAI database (opened read-only).
        head: an exported TSPO head directory, or None.
        backbone: a backbone spec for scoring uploads (default: the database's).
    """

    def __init__(self, db_path: str | Path, head: str | None = None, backbone: str | None = None):
        self.db = FaithfulnessDatabase(db_path, readonly=True)
        self.config = self.db.stored_config() or {}
        self.head_dir, self.backbone_spec = head, backbone or self.config.get("backbone")
        self._scorer: TiPAIScorer | None = None
        self._head = None

    def choices(self) -> list[tuple[str, str]]:
        """(label, prompt_id) of every complete prompt."""
        return [(f"{pid}: {prompt}", pid) for pid, prompt in self.db.prompts()]

    def summary(self) -> str:
        counts = self.db.counts()
        cfg = self.config
        roots = self.db.roots()
        where = f"; images from {', '.join(f'`{r}`' for r in roots)}" if roots else ""
        return (
            f"**{self.db.path.resolve()}**: {counts['prompts']} prompts, {counts['images']} images, "
            f"{counts['pairs']} pairs; backbone `{cfg.get('backbone')}`, {cfg.get('grid')}x{cfg.get('grid')} grid, "
            f"methods {', '.join(cfg.get('methods', []))}, pairs {cfg.get('pair_rule')}{where}"
        )

    # ---- stored prompts -----------------------------------------------------------------------
    def stored_image(self, rec: ImageRecord) -> tuple[Tensor, str | None]:
        """The image `rec` as its run scored it ([3, H, W] in [0, 1]), or a grey square and why it
        is not shown (outside the prompt's folder, missing, changed since scored, unreadable)."""
        grey = torch.full((3, rec.height, rec.width), PLACEHOLDER)
        if rec.png is not None:
            with Image.open(BytesIO(rec.png)) as img:
                arr = np.asarray(to_rgb(img), dtype=np.float32) / 255.0
            return torch.from_numpy(arr).permute(2, 0, 1), None
        root = self.db.prompt_root(rec.prompt_id)
        if not rec.path or not in_root(rec.path, root):
            return grey, (
                f"not shown: {rec.path} is not a file of the database's image folder {root or '(none recorded)'}"
            )
        path = Path(rec.path)
        if not path.is_file():
            return grey, f"missing file: {path} (moved or deleted since it was scored)"
        try:
            changed = file_sha256(path) != rec.sha256
        except OSError as err:
            return grey, f"unreadable file: {path} ({err})"
        if changed:
            return grey, f"changed since it was scored: {path} (its scores are of the old file; score the folder again)"
        image = load_image01(path, rec.height)
        if image is None:
            return grey, f"unreadable file: {path}"
        return image, None

    def prompt_view(self, pid: str) -> tuple[str, list[tuple[np.ndarray, str]], np.ndarray]:
        """(markdown table, gallery [(image, caption)], comparison figure) of one prompt."""
        prompt = dict(self.db.prompts()).get(pid)
        if prompt is None:
            raise ValueError(f"prompt {pid!r} is not in {self.db.path}")
        records = self.db.images(pid)
        shown = [self.stored_image(r) for r in records]
        images = torch.stack([image for image, _ in shown])
        notes = [note for _, note in shown]
        scores = self.db.scores(pid)
        pairs = self.db.pairs(pid)
        chosen = {p.chosen_id for p in pairs}
        rejected = {p.rejected_id for p in pairs}
        roles = ["chosen" if r.image_id in chosen else "rejected" if r.image_id in rejected else "" for r in records]
        global_scores = torch.tensor([scores[r.image_id]["clip"].global_score for r in records])
        maps = {
            m: torch.stack([torch.from_numpy(scores[r.image_id][m].grid) for r in records])
            for m in ("crops", "dense", "dense_gradeclip", "head")
            if all(m in scores[r.image_id] for r in records)
        }
        head_rewards = {
            r.image_id: scores[r.image_id]["head"].global_score for r in records if "head" in scores[r.image_id]
        }
        if "head" not in maps and self.head_dir is not None and not any(notes):
            reward, prob = self._head_scorer().score(prompt, images)
            maps["head"] = 1 - prob.cpu()
            head_rewards = {r.image_id: float(v) for r, v in zip(records, reward)}
        labels = [
            f"seed {r.seed}" + (f", {r.error}" if r.error else "") + (", NOT SHOWN" if note else "")
            for r, note in zip(records, notes)
        ]
        fig = prompt_figure(prompt, images, global_scores, maps, roles, labels, f'"{prompt}"\n{pid}')
        rows = ["| image | role | global score | head reward | error | note |", "|---|---|---|---|---|---|"]
        for r, role, g, note in zip(records, roles, global_scores.tolist(), notes):
            hr = head_rewards.get(r.image_id)
            rows.append(
                f"| {r.image_id} | {role} | {g:.4f} | {'' if hr is None else f'{hr:.3f}'} | {r.error or ''} "
                f"| {note or ''} |"
            )
        gallery = [
            (
                (images[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8),
                f"{roles[i] or 'image'} {float(global_scores[i]):.3f}" + (" (not shown)" if notes[i] else ""),
            )
            for i in range(len(records))
        ]
        return f"### {prompt}\n\n" + "\n".join(rows), gallery, figure_to_array(fig)

    # ---- uploads ------------------------------------------------------------------------------
    def _head_scorer(self):
        if self._head is None:
            from xclip.faithfulness.tspo_head import TSPOScorer

            self._head = TSPOScorer(self.head_dir, self.scorer().backbone)
        return self._head

    def scorer(self) -> TiPAIScorer:
        """The database's scoring configuration (backbone, grid, methods, precision), built once."""
        if self._scorer is None:
            from xclip.backbones import load_backbone

            if not self.backbone_spec:
                raise ValueError("no backbone to score uploads with: start the app with --backbone <spec>")
            precision = self.config.get("precision")
            methods = [m for m in self.config.get("methods", METHODS) if m in METHODS] or list(METHODS)
            self._scorer = TiPAIScorer(
                load_backbone(self.backbone_spec),
                grid=int(self.config.get("grid") or 7),
                methods=methods,
                precision=None if precision in (None, "32") else precision,
            )
        return self._scorer

    def upload_image(self, path: str | Path) -> Tensor:
        """An image file as a folder run reads it: `read_rgb`, then resized and centre-cropped to
        the database's image size: [1, 3, S, S] (`ImageReadError` names an unreadable file)."""
        size = int(self.config.get("image_size") or self.scorer().backbone.image_size)
        return resize_center_crop(read_rgb(path), size)[None]

    def score_file(self, path: str | Path | None, prompt: str) -> tuple[Tensor, TiPAIScores]:
        """An image file against `prompt`: (the image [1, 3, S, S], its `TiPAIScores`)."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("type a prompt to score the image against")
        if path is None:
            raise ValueError("upload an image file (" + ", ".join(IMAGE_EXTENSIONS) + ")")
        image = self.upload_image(path)
        scorer = self.scorer()
        return image, scorer.score(image, scorer.text_embeddings([prompt]))

    def score_upload(self, path: str | Path | None, prompt: str) -> tuple[str, np.ndarray]:
        """An uploaded image file against `prompt`: (markdown, figure)."""
        image, out = self.score_file(path, prompt)
        assert path is not None  # score_file refuses a missing upload
        maps = {k: v.cpu() for k, v in out.maps.items()}
        lines = [f"global score (cosine with the prompt): **{float(out.global_score[0]):.4f}**"]
        if self.head_dir is not None:
            reward, prob = self._head_scorer().score(prompt, image)
            maps["head"] = 1 - prob.cpu()
            lines.append(f"TSPO head reward: **{float(reward[0]):.3f}**")
        fig = prompt_figure(
            prompt, image, out.global_score.cpu(), maps, [""], [Path(path).name], f'"{prompt}"\nuploaded image'
        )
        return "\n\n".join(lines), figure_to_array(fig)


def shown_errors(fn: Callable) -> Callable:
    """`fn` for a Gradio event: any error reaches the browser as its own message (Gradio shows
    only "The upstream Gradio app has raised an exception" for anything but ``gr.Error``)."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapped(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except (ValueError, OSError) as err:  # the app's own messages (ImageReadError is an OSError)
            raise gr.Error(str(err), print_exception=False) from err
        except Exception as err:
            raise gr.Error(f"{type(err).__name__}: {err}") from err

    return wrapped


def build_app(browser: Browser) -> Any:
    """The Gradio Blocks of the app (the first prompt shown when the page opens)."""
    import gradio as gr

    choices = browser.choices()
    view = shown_errors(browser.prompt_view)
    with gr.Blocks(title=APP_TITLE) as demo:
        gr.Markdown(f"# {APP_TITLE}\n\n{browser.summary()}")
        with gr.Tab("Browse the database"):
            prompt = gr.Dropdown(
                choices=choices, value=choices[0][1] if choices else None, label="prompt", elem_id="prompt-select"
            )
            table = gr.Markdown(elem_id="prompt-table")
            gallery = gr.Gallery(
                label="images (role, global score)",
                columns=8,
                height="auto",
                object_fit="contain",
                elem_id="prompt-images",
            )
            heatmaps = gr.Image(
                label="heatmaps: red = bad, green = good", elem_id="prompt-heatmaps", type="numpy", interactive=False
            )
            prompt.change(view, inputs=prompt, outputs=[table, gallery, heatmaps])
            if choices:
                demo.load(view, inputs=prompt, outputs=[table, gallery, heatmaps])
        with gr.Tab("Score an image"):
            with gr.Row():
                # the file itself, not Gradio's decoded array: it is read like a folder run's files
                upload = gr.File(
                    label="image file", file_types=list(IMAGE_EXTENSIONS), type="filepath", elem_id="upload-image"
                )
                text = gr.Textbox(label="prompt", elem_id="upload-prompt")
            button = gr.Button("Score", elem_id="upload-score")
            result = gr.Markdown(elem_id="upload-result")
            figure = gr.Image(label="heatmaps", type="numpy", interactive=False, elem_id="upload-heatmaps")
            button.click(shown_errors(browser.score_upload), inputs=[upload, text], outputs=[result, figure])
    return demo


def serve(args: argparse.Namespace) -> int:
    """Run the app for the parsed arguments of ``xclip app`` (`xclip.faithfulness.cli`)."""
    browser = Browser(args.db, args.head, args.backbone)
    demo = build_app(browser)
    print(f"xclip app: {browser.summary()}\nserving on http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, ssr_mode=False, share=False, quiet=True)
    return 0
