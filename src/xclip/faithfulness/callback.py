"""`FaithfulnessExplanationCallback`: one comparison figure per prompt (its images sorted by global
score, chosen and rejected marked, every patch map as a red-yellow-green heatmap / overlay) for
the first `max_items` prompts of a validate/test run, to TensorBoard
(``<stage>/faithfulness/tipai/<prompt_id>``) and as PNG under ``<run dir>/<subdir>/<stage>/``, with
an ``index.json`` there. The maps drawn are those the module scored and stored, so nothing is
recomputed."""

from __future__ import annotations

from xclip.engine import StageCallback
from xclip.explain.render import explanation_title, figure_to_array, save_png
from xclip.faithfulness.figures import prompt_figure


class FaithfulnessExplanationCallback(StageCallback):
    """Args: max_items: prompts drawn per run; alpha: overlay opacity; subdir: folder under the
    run directory."""

    workflow = "faithfulness"

    def __init__(self, max_items: int = 8, alpha: float = 0.5, subdir: str = "explanations/tipai"):
        if max_items < 0:
            raise ValueError("max_items must be >= 0")
        super().__init__(subdir)
        self.max_items, self.alpha = max_items, alpha

    def on_batch(self, trainer, pl_module, outputs, batch, dataloader_idx: int, stage: str) -> None:
        if not isinstance(outputs, dict) or "maps" not in outputs:
            return
        out_dir = self.stage_dir(trainer, stage)
        chosen = {int(c) for c, _ in outputs["pairs"].tolist()}
        rejected = {int(r) for _, r in outputs["pairs"].tolist()}
        for b, pid in enumerate(outputs["prompt_id"]):
            if len(self.records) >= self.max_items:
                return
            rows = (outputs["prompt_of"] == b).nonzero().flatten()
            if rows.numel() == 0:
                continue
            roles = ["chosen" if int(i) in chosen else "rejected" if int(i) in rejected else "" for i in rows]
            labels = [
                "seed "
                + outputs["image_id"][int(i)].rsplit("_", 1)[-1]
                + (f", {outputs['error'][int(i)]}" if outputs["error"][int(i)] else "")
                for i in rows
            ]
            title = explanation_title(outputs["prompt"][b], "TiPAI " + ", ".join(outputs["maps"]), pid, stage)
            fig = prompt_figure(
                outputs["prompt"][b],
                outputs["images"][rows],
                outputs["global"][rows],
                {k: v[rows] for k, v in outputs["maps"].items()},
                roles,
                labels,
                title,
                alpha=self.alpha,
            )
            array = figure_to_array(fig)
            png = save_png(array, out_dir / f"{pid}.png", text={"Title": title})
            self.log_image(trainer, stage, "tipai", pid, array)
            self.records.append(
                {
                    "prompt_id": pid,
                    "prompt": outputs["prompt"][b],
                    "png": png.name,
                    "title": title,
                    "images": [outputs["image_id"][int(i)] for i in rows],
                    "roles": roles,
                    "global": [float(outputs["global"][int(i)]) for i in rows],
                }
            )
