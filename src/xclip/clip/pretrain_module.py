"""`ClipPretrainModule`: contrastive training of an open_clip CLIP from scratch (the tiny
ShapesWorld checkpoint is made with it)."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from xclip.backbones import load_checkpoint, save_checkpoint
from xclip.clip.contrastive import clip_contrastive_loss
from xclip.clip.zeroshot_module import ZeroShotEvaluation, normalized
from xclip.results import export_target, refuse_export_over


class ClipPretrainModule(ZeroShotEvaluation):
    """Train ``open_clip.model.CLIP(**model_cfg)`` with the symmetric InfoNCE loss.

    Batches are ``{"image": [B,3,S,S] in [0,1], "texts": list[str]}``; validation reuses the
    zero-shot evaluation (shape/colour accuracy, Recall@K). At the end of fit the final weights are
    exported in xclip's checkpoint format (config.json + model.safetensors): by default into the
    run's log directory (``<log dir>/model``). Exporting into a directory that already holds a
    checkpoint (the shipped ``checkpoints/tiny-shapes``) needs ``overwrite: true``; without it the
    run stops before the first step, not after hours of training.

    Args:
        model_cfg: open_clip CLIP kwargs (embed_dim, vision_cfg, text_cfg, quick_gelu).
        context_length: tokenizer context (captions are short; fewer positions = faster text tower).
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay to 0.
        export: export the trained weights at the end of fit.
        export_dir: where (None: ``<log dir>/model``).
        overwrite: allow `export_dir` to be an existing checkpoint directory (replaced atomically,
            the old weights kept as a backup until the new ones are complete).
        init_checkpoint: an xclip checkpoint directory to start from (a warm restart of an
            earlier stage); its architecture must equal `model_cfg`.
        lock_image_tower: train the text tower (and the temperature) only, the image tower frozen
            (LiT, Zhai et al., CVPR 2022): about 3x fewer FLOPs per step, image features unchanged.
    """

    def __init__(self, model_cfg: dict[str, Any], context_length: int = 32, lr: float = 1e-3,
                 weight_decay: float = 0.1, warmup_steps: int = 200, image_mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
                 image_std: tuple[float, ...] = OPENAI_DATASET_STD, export: bool = True, export_dir: str | None = None,
                 overwrite: bool = False, init_checkpoint: str | None = None, classes: dict[str, list[str]] | None = None,
                 prompts: dict[str, list[str]] | None = None, lock_image_tower: bool = False):
        super().__init__(classes=classes, prompts=prompts)
        self.save_hyperparameters()
        text_cfg = dict(model_cfg.get("text_cfg", {}))
        if text_cfg.get("context_length", context_length) != context_length:
            raise ValueError("model_cfg.text_cfg.context_length must equal context_length")
        text_cfg["context_length"] = context_length
        self.model_cfg = {**model_cfg, "text_cfg": text_cfg}
        self.model = open_clip.model.CLIP(**self.model_cfg)
        if init_checkpoint:
            self._load_initial_weights(Path(init_checkpoint))
        if lock_image_tower:
            self.model.visual.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)

    def _load_initial_weights(self, path: Path) -> None:
        start = load_checkpoint(path)
        if start.model_cfg != self.model_cfg:
            raise ValueError(f"init_checkpoint {path} has model_cfg {start.model_cfg}, expected {self.model_cfg}")
        self.model.load_state_dict(start.model.state_dict())

    @lru_cache(maxsize=200_000)
    def _tokens(self, text: str) -> tuple[int, ...]:
        # plain ints: 200k cached small tensors pinned the allocator's heap (RSS grew ~5 MB a step
        # on fresh captions until the out-of-memory killer stopped a long run)
        return tuple(self._tokenizer([text])[0].tolist())

    def tokenize(self, texts: list[str]) -> Tensor:
        """[K, context_length] token ids (cached per string: captions repeat a lot)."""
        return torch.tensor([self._tokens(t) for t in texts], dtype=torch.long, device=self.device)

    def embed_images(self, images: Tensor) -> Tensor:
        return normalized(self.model.encode_image((images - self.mean) / self.std))

    def embed_texts(self, texts: list[str]) -> Tensor:
        return normalized(self.model.encode_text(self.tokenize(texts)))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        with torch.set_grad_enabled(not self.hparams.lock_image_tower):
            img = self.embed_images(batch["image"])
        txt = self.embed_texts(batch["texts"])
        scale = self.model.logit_scale.exp().clamp(max=100.0)
        loss, acc = clip_contrastive_loss(img, txt, scale)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", acc, prog_bar=True)
        self.log("train/logit_scale", scale)
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # norms, biases, embeddings and the temperature are not weight-decayed (CLIP recipe)
            (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr, betas=(0.9, 0.98))
        total = max(self.trainer.estimated_stepping_batches, 1)
        warm = min(self.hparams.warmup_steps, total // 2)

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(total - warm, 1))))

        return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, schedule),
                                                    "interval": "step"}}

    def export_path(self) -> Path | None:
        """Where fit exports (None: `export` is off); see `xclip.results.export_target`."""
        return export_target(self.trainer, self.hparams.export, self.hparams.export_dir)

    def setup(self, stage: str) -> None:
        if stage == "fit":  # refuse an export that would replace weights before training, not after it
            refuse_export_over(self.export_path(), self.hparams.overwrite, "checkpoints/tiny-shapes")

    def on_fit_end(self) -> None:
        target = self.export_path()
        if target is not None and self.trainer.is_global_zero:
            save_checkpoint(self.model, self.model_cfg,
                            {"image_size": self.model_cfg["vision_cfg"]["image_size"],
                             "mean": list(self.hparams.image_mean), "std": list(self.hparams.image_std)},
                            self.hparams.context_length, target, overwrite=self.hparams.overwrite)
            print(f"exported the trained model to {target}")
