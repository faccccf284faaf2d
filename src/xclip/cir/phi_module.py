"""`PhiTrainingModule`: SEARLE's phi distilled from OTI pseudo tokens on ShapesWorld, against a
frozen CLIP (``xclip fit --config configs/cir_phi_shapes.yaml``)."""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from xclip.backbones import Backbone
from xclip.cir.concepts import PhraseBank, replace_concept
from xclip.cir.evaluation import CIREvaluation
from xclip.cir.losses import cosine_loss, nt_xent
from xclip.cir.oti import OTIConfig, oti_invert
from xclip.cir.phi import Phi, save_phi
from xclip.cir.query import encode_with_pseudo_tokens, query_features
from xclip.data.embedding_cache import weights_fingerprint
from xclip.engine import EXPORT_ARGUMENTS, ExportMixin
from xclip.io import atomic_write_bytes

log = logging.getLogger(__name__)


class PhiTrainingModule(ExportMixin, CIREvaluation):
    """Train phi (SEARLE) on ShapesWorld images; validate with SEARLE's CIR recall on ShapesWorld.

    Before the first step (``on_fit_start``) the module embeds every training image of the
    datamodule (`CIRDataModule.training_images`) and computes its OTI pseudo token (batched,
    `oti_invert`), cached in `oti_cache_dir` under a key of the backbone weights, the images and
    the OTI settings. Each step then draws, per image, one of its concepts and one of that
    concept's phrases and minimises

        lambda_distil * NT-Xent(OTI tokens, phi(f); temperature) + lambda_reg * L_reg

    (L_reg with EVERY occurrence of the concept replaced by ``$``; see `xclip.cir.losses`).
    At the end of fit the trained phi is exported as a model folder (`xclip.engine.ExportMixin`):
    by default into ``<run dir>/model``, never into ``checkpoints/``. An `export_dir` that already
    holds a model (the shipped ``checkpoints/searle-phi-tiny-shapes``) needs ``overwrite: true``;
    without it fit refuses at setup, before any training.

    Args:
        backbone: the frozen CLIP (spec or object).
        dropout: phi's dropout (0.5 in SEARLE).
        lr, weight_decay: AdamW (SEARLE: 1e-4, 0.01).
        temperature: NT-Xent temperature (0.25).
        lambda_distil, lambda_reg: loss weights (1, 0.75).
        oti: OTI settings for the distillation targets (`OTIConfig` fields).
        oti_batch_size: images inverted together.
        phrases_per_concept: phrases per concept (SEARLE: 256 GPT phrases).
        oti_cache_dir: where OTI tokens are cached (None: recompute every fit).
        export: export the trained phi at the end of fit.
        export_dir: where (None: ``<run dir>/model``).
        overwrite: allow `export_dir` to be an existing checkpoint directory (replaced atomically;
            other files there, such as a README card, are kept).
        seed: the seed of the per-step concept and phrase draws.
    """

    shipped_folder = "checkpoints/searle-phi-tiny-shapes"
    not_hyperparameters = EXPORT_ARGUMENTS

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        dropout: float = 0.5,
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        temperature: float = 0.25,
        lambda_distil: float = 1.0,
        lambda_reg: float = 0.75,
        oti: dict[str, Any] | None = None,
        oti_batch_size: int = 512,
        phrases_per_concept: int = 256,
        oti_cache_dir: str | None = "runs/oti_cache",
        export: bool = True,
        export_dir: str | None = None,
        overwrite: bool = False,
        seed: int = 0,
        cache_dir: str | None = None,
    ):
        super().__init__(backbone, ("searle",), None, cache_dir)
        self.set_export(export, export_dir, overwrite)
        known = {f.name for f in fields(OTIConfig)}
        if oti and set(oti) - known:
            raise ValueError(f"unknown OTI settings {sorted(set(oti) - known)}: use {sorted(known)}")
        self.oti_config = OTIConfig(**(oti or {}))
        self.lr, self.weight_decay, self.temperature = lr, weight_decay, temperature
        self.lambda_distil, self.lambda_reg = lambda_distil, lambda_reg
        self.oti_batch_size, self.phrases_per_concept = oti_batch_size, phrases_per_concept
        self.oti_cache_dir = oti_cache_dir
        self.phi = Phi.for_backbone(self.backbone, dropout)
        self.features: Tensor | None = None
        self.oti_tokens: Tensor | None = None
        self.bank: PhraseBank | None = None
        self._rng = random.Random(seed)

    # ---- the distillation targets ------------------------------------------------------------
    def _oti_key(self, data) -> str:
        images = data.training_images
        key = {
            "backbone": self.backbone_spec,
            "weights_sha256": weights_fingerprint(self.backbone),
            "images": {
                "n": len(images),
                "seed": images.scenes.seed,
                "image_size": images.scenes.image_size,
                "max_objects": images.scenes.max_objects,
                "concepts": images.concept_kind,
            },
            "oti": self.oti_config.to_dict(),
            "phrases_per_concept": self.phrases_per_concept,
        }
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def prepare_targets(self) -> None:
        """Image features, the phrase bank and the OTI tokens of every training image."""
        data = self.trainer.datamodule
        images = data.training_images
        bb = self.backbone
        with torch.no_grad():
            feats = [
                bb.encode_image(
                    bb.normalize(
                        torch.stack([images.image(i) for i in range(s, min(s + 256, len(images)))]).to(self.device)
                    )
                ).float()
                for s in range(0, len(images), 256)
            ]
        self.features = torch.cat(feats)
        self.bank = PhraseBank.build(bb, images.concept_kind, self.phrases_per_concept, seed=self.oti_config.seed)
        cache = Path(self.oti_cache_dir) / f"{self._oti_key(data)}.safetensors" if self.oti_cache_dir else None
        if cache is not None and cache.is_file():
            self.oti_tokens = load_file(str(cache))["oti_tokens"].to(self.device)
            log.info("OTI tokens read from %s", cache)
            return
        chunks, n = [], len(images)
        for s in range(0, n, self.oti_batch_size):
            idx = list(range(s, min(s + self.oti_batch_size, n)))
            chunks.append(
                oti_invert(
                    bb,
                    self.features[idx],
                    idx,
                    [images.concepts(i) for i in idx],
                    self.bank,
                    self.oti_config,
                    precision=str(self.trainer.precision),
                )
            )
            log.info("OTI: %d / %d images", idx[-1] + 1, n)
        self.oti_tokens = torch.cat(chunks)
        if cache is not None and self.trainer.is_global_zero:
            atomic_write_bytes(cache, safetensors_bytes({"oti_tokens": self.oti_tokens.cpu().contiguous()}))

    def on_fit_start(self) -> None:
        self.prepare_targets()

    def on_train_epoch_start(self) -> None:
        self.backbone.eval()  # Lightning's train() reaches the frozen CLIP too: keep it in eval mode

    # ---- training ----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        features, oti_tokens, bank = self.features, self.oti_tokens, self.bank
        assert features is not None and oti_tokens is not None and bank is not None  # made in on_fit_start
        idx = batch["index"].to(features.device)
        self.phi.train()
        pred = self.phi(features[idx])
        distil = nt_xent(oti_tokens[idx], pred, self.temperature)
        concepts = [self._rng.choice(c) for c in batch["concepts"]]
        phrase_ids = [
            int(bank.start[bank.index_of(c)]) + self._rng.randrange(int(bank.count[bank.index_of(c)])) for c in concepts
        ]
        pseudo = [replace_concept(bank.phrases[p], c, every=True) for p, c in zip(phrase_ids, concepts)]
        reg = cosine_loss(
            encode_with_pseudo_tokens(self.backbone, pseudo, pred), bank.features[phrase_ids].to(pred.device)
        )
        loss = self.lambda_distil * distil + self.lambda_reg * reg
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/distil", distil)
        self.log("train/reg", reg)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.phi.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    # ---- validation: SEARLE's recall on ShapesWorld ------------------------------------------
    def query_features(self, features: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        self.phi.eval()
        return {"searle": query_features(self.backbone, self.phi(features), batch["captions"]).float()}

    def export_model(self, path: Path) -> None:
        extra = {
            "backbone": self.backbone_spec,
            "backbone_weights_sha256": weights_fingerprint(self.backbone),
            "recipe": {k: v for k, v in self.hparams.items() if k not in ("oti_cache_dir", "cache_dir")},
            "oti": self.oti_config.to_dict(),
            "n_train": len(self.trainer.datamodule.training_images),
        }
        save_phi(self.phi, path, extra, overwrite=self.overwrite)
