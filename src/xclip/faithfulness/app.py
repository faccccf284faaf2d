"""``xclip app --db runs/.../tipai.db``: a local Gradio app to browse a TiPAI database.

Pick a prompt: its images with their global scores, which one is chosen and which rejected, and
one comparison figure with every stored heatmap (crops, dense, Grad-ECLIP, the TSPO head's patch
scores when the database holds them or ``--head`` is given). A second tab scores an uploaded
image against a typed prompt with the database's backbone (global score, crops and dense
heatmaps, and the head's patch scores with ``--head``).

Needs the optional extra: ``pip install "xclip[app]"`` (Gradio).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xclip.data.images import load_image01
from xclip.explain.render import figure_to_array
from xclip.faithfulness.database import FaithfulnessDatabase
from xclip.faithfulness.figures import prompt_figure
from xclip.faithfulness.scoring import TiPAIScorer

APP_TITLE = "xclip TiPAI faithfulness browser"


class Browser:
    """What the app shows, without Gradio (testable): a database, and lazily the backbone and
    head for scoring uploads.

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
        return (f"**{self.db.path}**: {counts['prompts']} prompts, {counts['images']} images, {counts['pairs']} pairs; "
                f"backbone `{cfg.get('backbone')}`, {cfg.get('grid')}x{cfg.get('grid')} grid, methods "
                f"{', '.join(cfg.get('methods', []))}, pairs {cfg.get('pair_rule')}")

    def _images(self, pid: str) -> tuple[list, torch.Tensor]:
        records = self.db.images(pid)
        images = []
        for rec in records:
            if rec.png is not None:
                from io import BytesIO

                from PIL import Image

                arr = np.asarray(Image.open(BytesIO(rec.png)).convert("RGB"), dtype=np.float32) / 255.0
                images.append(torch.from_numpy(arr).permute(2, 0, 1))
            else:
                image = load_image01(rec.path, rec.height)
                images.append(image if image is not None else torch.zeros(3, rec.height, rec.width))
        return records, torch.stack(images)

    def prompt_view(self, pid: str) -> tuple[str, list[tuple[np.ndarray, str]], np.ndarray]:
        """(markdown table, gallery [(image, caption)], comparison figure) of one prompt."""
        prompt = dict(self.db.prompts()).get(pid)
        if prompt is None:
            raise ValueError(f"prompt {pid!r} is not in {self.db.path}")
        records, images = self._images(pid)
        scores = self.db.scores(pid)
        pairs = self.db.pairs(pid)
        chosen = {p.chosen_id for p in pairs}
        rejected = {p.rejected_id for p in pairs}
        roles = ["chosen" if r.image_id in chosen else "rejected" if r.image_id in rejected else "" for r in records]
        global_scores = torch.tensor([scores[r.image_id]["clip"].global_score for r in records])
        maps = {m: torch.stack([torch.from_numpy(scores[r.image_id][m].grid) for r in records])
                for m in ("crops", "dense", "dense_gradeclip", "head") if all(m in scores[r.image_id] for r in records)}
        head_rewards = {r.image_id: scores[r.image_id]["head"].global_score for r in records if "head" in scores[r.image_id]}
        if "head" not in maps and self.head_dir is not None:
            reward, prob = self._head_scorer().score(prompt, images)
            maps["head"] = 1 - prob.cpu()
            head_rewards = {r.image_id: float(v) for r, v in zip(records, reward)}
        labels = [f"seed {r.seed}" + (f", {r.error}" if r.error else "") for r in records]
        fig = prompt_figure(prompt, images, global_scores, maps, roles, labels, f'"{prompt}"\n{pid}')
        rows = ["| image | role | global score | head reward | error |", "|---|---|---|---|---|"]
        for r, role, g in zip(records, roles, global_scores.tolist()):
            hr = head_rewards.get(r.image_id)
            rows.append(f"| {r.image_id} | {role} | {g:.4f} | {'' if hr is None else f'{hr:.3f}'} | {r.error or ''} |")
        gallery = [((images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8),
                    f"{roles[i] or 'image'} {float(global_scores[i]):.3f}") for i in range(len(records))]
        return f"### {prompt}\n\n" + "\n".join(rows), gallery, figure_to_array(fig)

    def _head_scorer(self):
        if self._head is None:
            from xclip.faithfulness.tspo_head import TSPOScorer

            self._head = TSPOScorer(self.head_dir, self._scorer_backbone())
        return self._head

    def _scorer_backbone(self):
        if self._scorer is None:
            from xclip.backbones import load_backbone

            if not self.backbone_spec:
                raise ValueError("no backbone to score uploads with: start the app with --backbone <spec>")
            self._scorer = TiPAIScorer(load_backbone(self.backbone_spec), grid=int(self.config.get("grid") or 7))
        return self._scorer.backbone

    def score_upload(self, image: np.ndarray, prompt: str) -> tuple[str, np.ndarray]:
        """An uploaded RGB image (uint8 [H, W, 3]) against `prompt`: (markdown, figure)."""
        if image is None or not (prompt or "").strip():
            raise ValueError("upload an image and type a prompt")
        self._scorer_backbone()
        arr = torch.from_numpy(np.asarray(image)[..., :3].astype(np.float32) / 255.0).permute(2, 0, 1)[None]
        text = self._scorer.text_embeddings([prompt])
        out = self._scorer.score(arr, text)
        maps = dict(out.maps)
        lines = [f"global score (cosine with the prompt): **{float(out.global_score[0]):.4f}**"]
        if self.head_dir is not None:
            reward, prob = self._head_scorer().score(prompt, arr)
            maps["head"] = 1 - prob.cpu()
            lines.append(f"TSPO head reward: **{float(reward[0]):.3f}**")
        fig = prompt_figure(prompt, arr, out.global_score.cpu(), {k: v.cpu() for k, v in maps.items()}, [""],
                            ["uploaded"], f'"{prompt}"\nuploaded image')
        return "\n\n".join(lines), figure_to_array(fig)


def build_app(browser: Browser) -> Any:
    """The Gradio Blocks of the app."""
    import gradio as gr

    choices = browser.choices()
    with gr.Blocks(title=APP_TITLE) as demo:
        gr.Markdown(f"# {APP_TITLE}\n\n{browser.summary()}")
        with gr.Tab("Browse the database"):
            prompt = gr.Dropdown(choices=choices, value=None, label="prompt", elem_id="prompt-select")
            table = gr.Markdown(elem_id="prompt-table")
            gallery = gr.Gallery(label="images (role, global score)", columns=6, height=180, elem_id="prompt-images")
            heatmaps = gr.Image(label="heatmaps: red = bad, green = good", elem_id="prompt-heatmaps",
                                type="numpy", interactive=False)
            prompt.change(browser.prompt_view, inputs=prompt, outputs=[table, gallery, heatmaps])
        with gr.Tab("Score an image"):
            with gr.Row():
                upload = gr.Image(label="image", type="numpy", elem_id="upload-image")
                text = gr.Textbox(label="prompt", elem_id="upload-prompt")
            button = gr.Button("Score", elem_id="upload-score")
            result = gr.Markdown(elem_id="upload-result")
            figure = gr.Image(label="heatmaps", type="numpy", interactive=False, elem_id="upload-heatmaps")
            button.click(browser.score_upload, inputs=[upload, text], outputs=[result, figure])
    return demo


def main(argv: list[str]) -> int:
    """``xclip app --db PATH [--head DIR] [--backbone SPEC] [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(prog="xclip app", description="Browse a TiPAI database in a local web app (Gradio).")
    parser.add_argument("--db", required=True, help="the TiPAI database (tipai.db of a TiPAI run)")
    parser.add_argument("--head", default=None, help="an exported TSPO head directory (e.g. checkpoints/tspo-head-tiny-shapes)")
    parser.add_argument("--backbone", default=None, help="backbone spec for scoring uploads (default: the database's)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7860)
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print('xclip app needs Gradio: pip install "xclip[app]"')
        return 2
    browser = Browser(args.db, args.head, args.backbone)
    demo = build_app(browser)
    print(f"xclip app: {browser.summary()}\nserving on http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, ssr_mode=False, share=False, quiet=True)
    return 0
