"""`CIRModule`: zero-shot composed image retrieval (eval only) with SEARLE and the usual baselines."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone
from xclip.cir.benchmark import ShapesCIRBenchmark
from xclip.cir.concepts import PhraseBank
from xclip.cir.evaluation import CIREvaluation
from xclip.cir.oti import OTIConfig, oti_invert
from xclip.cir.phi import Phi, check_compatible, load_phi
from xclip.cir.query import caption_features, query_features

NEEDS_PHI = ("searle",)


class CIRModule(CIREvaluation):
    """Rank a `CIRDataModule` benchmark's gallery for every composed query, per method:

    - ``searle``: phi(reference feature) as the ``$`` of "a photo of $ that {caption}";
    - ``searle_oti``: the reference's pseudo token by OTI (350 AdamW steps per batch of references,
      each reference once; slow on a CPU); on ShapesWorld its regulariser uses the reference's scene
      concepts, on the other datasets it runs without the regulariser (their concept lists are not
      shipped);
    - ``image``: the reference's image embedding; ``text``: the caption's; ``image_text``: their
      normalised sum.

    Logs ``{stage}/{method}/{metric}`` (CIRR/ShapesWorld ``R@k`` with the reference removed,
    CIRR ``R_subset@k``, CIRCO ``mAP@k``, FashionIQ ``{category}_R@k`` and the average); on a test
    split with hidden targets it writes the submission files instead (run directory, ``submissions/``).

    Args:
        backbone: a ``load_backbone`` spec or a `Backbone`.
        phi: a phi spec (`xclip.cir.phi.load_phi`: ``xclip:searle-phi-tiny-shapes``,
            ``searle:ViT-B/32``, a directory or a SEARLE ``.pt``) or a `Phi`; needed by ``searle``.
        methods: which rankings to compute.
        ks: the K of the metrics (default: the dataset's official ones).
        oti: OTI hyper-parameter overrides (see `OTIConfig`), e.g. ``{"steps": 350}``.
        oti_phrases_per_concept: phrases per ShapesWorld concept for OTI's regulariser.
        concept_kind: ShapesWorld concepts of OTI's regulariser (``shape`` or ``object``).
        cache_dir: root of the gallery embedding cache (None: no cache).
    """

    def __init__(
        self,
        backbone: str | Backbone = "xclip:tiny-shapes",
        phi: str | Phi | None = "xclip:searle-phi-tiny-shapes",
        methods: Sequence[str] = ("searle", "image", "text", "image_text"),
        ks: Sequence[int] | None = None,
        oti: dict[str, Any] | None = None,
        oti_phrases_per_concept: int = 256,
        concept_kind: str = "shape",
        cache_dir: str | None = None,
        submission_name: str = "submission",
    ):
        super().__init__(backbone, methods, ks, cache_dir, submission_name)
        self.phi: Phi | None = None
        if any(m in NEEDS_PHI for m in self.methods):
            if phi is None:
                raise ValueError("method 'searle' needs phi (e.g. phi: xclip:searle-phi-tiny-shapes)")
            self.phi = (phi if isinstance(phi, Phi) else load_phi(phi)).eval().requires_grad_(False)
            check_compatible(self.phi, self.backbone)
        self.phi_spec = phi if isinstance(phi, str) or phi is None else type(phi).__name__
        known = {f.name for f in fields(OTIConfig)}
        if oti and set(oti) - known:
            raise ValueError(f"unknown OTI settings {sorted(set(oti) - known)}: use {sorted(known)}")
        self.oti_config = OTIConfig(**(oti or {}))
        self.oti_phrases_per_concept, self.concept_kind = oti_phrases_per_concept, concept_kind
        self._bank: PhraseBank | None = None
        self._oti_memo: dict[str, Tensor] = {}

    def _oti_tokens(self, features: Tensor, index: Tensor) -> Tensor:
        """OTI pseudo tokens [B, W] of the batch's references, each reference inverted once per run
        (ShapesWorld queries share references) and its random draws keyed by the reference's name."""
        refs = [self.benchmark.queries[int(i)].reference if self.benchmark is not None else str(int(i)) for i in index]
        todo = list(dict.fromkeys(r for r in refs if r not in self._oti_memo))
        if todo:
            rows = [refs.index(r) for r in todo]
            keys = [int(hashlib.sha256(r.encode()).hexdigest()[:15], 16) for r in todo]
            # Lightning evaluates under inference mode; OTI optimises, so it leaves it (and every
            # tensor it keeps for backward, the phrase bank included, is made outside it)
            with torch.inference_mode(False), torch.enable_grad():
                concepts, bank = None, None
                if isinstance(self.benchmark, ShapesCIRBenchmark):
                    concepts = [self.benchmark.concepts(int(index[row]), self.concept_kind) for row in rows]
                    if self._bank is None:
                        self._bank = PhraseBank.build(
                            self.backbone, self.concept_kind, self.oti_phrases_per_concept, seed=self.oti_config.seed
                        )
                    bank = self._bank
                tokens = oti_invert(
                    self.backbone,
                    features[rows].clone(),
                    keys,
                    concepts,
                    bank,
                    self.oti_config,
                    precision=str(self.trainer.precision),
                )
            self._oti_memo.update(zip(todo, tokens))
        return torch.stack([self._oti_memo[r] for r in refs])

    def setup(self, stage: str) -> None:
        super().setup(stage)
        self._oti_memo = {}

    def query_features(self, features: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Each method's normalised query features [B, D] from the references' features [B, D]."""
        captions = batch["captions"]
        out: dict[str, Tensor] = {}
        text = caption_features(self.backbone, captions) if {"text", "image_text"} & set(self.methods) else None
        image = F.normalize(features, dim=-1)
        for method in self.methods:
            if method == "searle":
                assert self.phi is not None  # __init__ loads phi for every method in NEEDS_PHI
                out[method] = query_features(self.backbone, self.phi(features), captions)
            elif method == "searle_oti":
                out[method] = query_features(self.backbone, self._oti_tokens(features, batch["index"]), captions)
            elif method == "image":
                out[method] = image
            elif method == "text":
                assert text is not None  # embedded above whenever text or image_text is a method
                out[method] = text
            else:
                assert text is not None
                out[method] = F.normalize(image + text, dim=-1)
        return {k: v.float() for k, v in out.items()}

    def extra_results(self) -> dict[str, Any]:
        extra = super().extra_results()
        extra["cir"]["phi"] = self.phi_spec
        if "searle_oti" in self.methods:
            extra["cir"]["oti"] = self.oti_config.to_dict()
        return extra
