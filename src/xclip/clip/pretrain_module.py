"""`ClipPretrainModule`: contrastive training of an open_clip CLIP from scratch (the tiny
ShapesWorld checkpoints are made with it): CLIP's InfoNCE, or SigLIP's sigmoid loss for a model
with a learned ``logit_bias`` (``init_logit_bias`` in `model_cfg`)."""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from torch import Tensor

from xclip.backbones import load_checkpoint, save_checkpoint
from xclip.backbones.tiny_towers import timm_vit_state_from_openclip
from xclip.clip.contrastive import clip_contrastive_loss, sigmoid_contrastive_loss
from xclip.clip.zeroshot_module import ZeroShotEvaluation, normalized
from xclip.engine import EXPORT_ARGUMENTS, ExportMixin, warmup_cosine_scheduler

log = logging.getLogger(__name__)


class ClipPretrainModule(ExportMixin, ZeroShotEvaluation):
    """Train ``open_clip.model.CLIP(**model_cfg)`` with the symmetric InfoNCE loss, or with SigLIP's
    pairwise sigmoid loss when `model_cfg` has ``init_logit_bias`` (the model then learns a bias).

    Batches are ``{"image": [B,3,S,S] in [0,1], "texts": list[str]}``; validation reuses the
    zero-shot evaluation (shape/colour accuracy, Recall@K). At the end of fit the final weights are
    exported as a model folder (`xclip.engine.ExportMixin`): by default into the run's log
    directory (``<log dir>/model``). Exporting into a directory that already holds a
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
        warm_start: an xclip checkpoint of *another* architecture whose tensors initialise every
            parameter with the same name and shape (e.g. the SigLIP-style model's ViT trunk and
            text tower from tiny-shapes; an open_clip ViT is renamed for a timm ViT trunk first);
            the rest keep their fresh init and are listed in the log.
        lock_image_tower: train the text tower (and the temperature) only, the image tower frozen
            (LiT, Zhai et al., CVPR 2022): about 3x fewer FLOPs per step, image features unchanged.
    """

    shipped_folder = "checkpoints/tiny-shapes"
    not_hyperparameters = EXPORT_ARGUMENTS
    mean: Tensor
    std: Tensor

    def __init__(
        self,
        model_cfg: dict[str, Any],
        context_length: int = 32,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        warmup_steps: int = 200,
        image_mean: tuple[float, ...] = OPENAI_DATASET_MEAN,
        image_std: tuple[float, ...] = OPENAI_DATASET_STD,
        export: bool = True,
        export_dir: str | None = None,
        overwrite: bool = False,
        init_checkpoint: str | None = None,
        class_names: dict[str, list[str]] | None = None,
        prompts: dict[str, list[str]] | None = None,
        warm_start: str | None = None,
        lock_image_tower: bool = False,
    ):
        super().__init__(class_names=class_names, prompts=prompts)
        self.set_export(export, export_dir, overwrite)
        text_cfg = dict(model_cfg.get("text_cfg", {}))
        if text_cfg.get("context_length", context_length) != context_length:
            raise ValueError("model_cfg.text_cfg.context_length must equal context_length")
        text_cfg["context_length"] = context_length
        self.model_cfg = {**model_cfg, "text_cfg": text_cfg}
        self.model = open_clip.model.CLIP(**self.model_cfg)
        if init_checkpoint and warm_start:
            raise ValueError("pass init_checkpoint (same architecture) or warm_start (matching tensors), not both")
        if init_checkpoint:
            self._load_initial_weights(Path(init_checkpoint))
        if warm_start:
            self._warm_start(Path(warm_start))
        self.lock_image_tower, self.context_length = lock_image_tower, context_length
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        if lock_image_tower:
            self.model.visual.requires_grad_(False)
        self.register_buffer("mean", torch.tensor(image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std).view(1, 3, 1, 1), persistent=False)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        # per instance (a cache on the class would keep every module alive): captions repeat a lot
        self._tokens = lru_cache(maxsize=200_000)(self._token_ids)

    def _load_initial_weights(self, path: Path) -> None:
        start = load_checkpoint(path)
        if start.model_cfg != self.model_cfg:
            raise ValueError(f"init_checkpoint {path} has model_cfg {start.model_cfg}, expected {self.model_cfg}")
        self.model.load_state_dict(start.model.state_dict())

    def _warm_start(self, path: Path) -> None:
        source = load_checkpoint(path).model.state_dict()
        own = self.model.state_dict()
        if "visual.conv1.weight" in source and "visual.trunk.patch_embed.proj.weight" in own:
            # an open_clip ViT into a timm ViT trunk (e.g. the SigLIP-style tiny model)
            source = timm_vit_state_from_openclip(source, cls_token="visual.trunk.cls_token" in own)
        # the temperature (and a bias) belong to the loss being trained, not to the towers
        taken = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape and not k.startswith("logit_")}
        self.model.load_state_dict(taken, strict=False)
        fresh = sorted(set(own) - set(taken))
        log.info("warm start from %s: %d of %d tensors loaded; fresh init: %s", path, len(taken), len(own), fresh)

    def _token_ids(self, text: str) -> tuple[int, ...]:
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
        with torch.set_grad_enabled(not self.lock_image_tower):
            img = self.embed_images(batch["image"])
        txt = self.embed_texts(batch["texts"])
        scale = self.model.logit_scale.exp().clamp(max=100.0)
        bias = getattr(self.model, "logit_bias", None)
        if bias is None:
            loss, acc = clip_contrastive_loss(img, txt, scale)
        else:
            loss, acc = sigmoid_contrastive_loss(img, txt, scale, bias)
            self.log("train/logit_bias", bias.detach().squeeze())
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
            (no_decay if p.ndim < 2 or "embedding" in name or name.startswith("logit_") else decay).append(p)
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.hparams.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.hparams.lr,
            betas=(0.9, 0.98),
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        return {"optimizer": opt, "lr_scheduler": warmup_cosine_scheduler(opt, total, self.hparams.warmup_steps)}

    def export_model(self, path: Path) -> None:
        save_checkpoint(
            self.model,
            self.model_cfg,
            {
                "image_size": self.model_cfg["vision_cfg"]["image_size"],
                "mean": self.image_mean,
                "std": self.image_std,
            },
            self.context_length,
            path,
            overwrite=self.overwrite,
        )
