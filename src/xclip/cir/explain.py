"""The four explanations of a composed query, batched over its candidates (plain tensors, no Lightning).

For a reference image r, its pseudo token v = phi(f_r) (f_r the unnormalised image feature), the
prompt "a photo of $ that {caption}" encoded with v (q), and K candidates c_k:

- A : target ||phi(f_r)||_2 -> Grad-ECLIP map on the reference (one per query); A': target
      cos(text("a photo of $", v), f_r) -> map on the reference, with its token bars;
- B : s_k = cos(f_{c_k}, q) -> Grad-ECLIP map on candidate k;
- C : the same s_k -> map on the reference, through phi and the text encoder (one per candidate);
- D : the same s_k -> Grad-ECLIP token scores over the prompt *including* the ``$`` pseudo token,
      sub-words merged into words.

Cost: one forward of the reference and one of the candidates up to their last vision block, one
text forward of the two prompts, then ONE batched vector-Jacobian product (K + 2 columns: A, A',
s_1..s_K) that gives every image gradient at once; D adds one batched VJP over the K candidates
through the traced text blocks (`GradECLIP.text_maps`). No Python loop over candidates.

The Grad-ECLIP image map of a target t on an image (see `xclip.explain.gradeclip`) needs
dt/do (o: the pooling attention's read-out before its out-projection: a ViT's class-token row, a
SigLIP head's latent query): the pooling step's tail is re-run from o (`PoolAttention.tail`), and
everything after it (phi, the text encoder, the cosines) is ordinary differentiable code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone
from xclip.backbones.base import PoolAttention
from xclip.cir.phi import Phi, check_compatible
from xclip.cir.query import compose_query, encode_with_pseudo_tokens
from xclip.explain import GradECLIP, TextMaps, explaining
from xclip.explain.gradeclip import combine_terms, grad_eclip_terms

SELF_PROMPT = "a photo of $"


@dataclass
class CIRExplanation:
    """Explanations of one query with K candidates (maps are raw, non-negative, on the patch grid).

    scores [K]: s_k = cos(candidate k, query); phi_norm: ||phi(f_r)||; self_score: cos(text("a
    photo of $"), f_r); reference_norm_map [gh, gw] (A); reference_self_map [gh, gw] (A');
    candidate_maps [K, gh', gw'] (B); reference_maps [K, gh, gw] (C); prompt_words (D):
    `TextMaps` of the prompt for each candidate (``word_pairs(k, 0)``); self_words: `TextMaps`
    of "a photo of $" for the reference (A''s bars); candidate_emb [K, D] (unnormalised).
    """

    prompt: str
    scores: Tensor
    phi_norm: float
    self_score: float
    reference_norm_map: Tensor
    reference_self_map: Tensor
    candidate_maps: Tensor
    reference_maps: Tensor
    prompt_words: TextMaps
    self_words: TextMaps
    candidate_emb: Tensor


def _maps(attention: PoolAttention, grad: Tensor, grid: tuple[int, int]) -> Tensor:
    """Grad-ECLIP maps from gradients at the pooling read-out: grad [N, T, W] -> [N, T, gh, gw]."""
    spatial, channel = grad_eclip_terms(grad, attention.q, *attention.grid_keys())
    return combine_terms(spatial, channel).float().unflatten(-1, grid)


class CIRExplainer:
    """A-D for SEARLE queries (see the module docstring).

    Args:
        backbone: the CLIP backbone phi was trained for.
        phi: SEARLE's textual-inversion network.
        text_blocks: text blocks D's token scores sum over (8, as Grad-ECLIP).
        precision: autocast precision (None / ``"32"`` / ``"bf16-mixed"`` / ``"16-mixed"``).
    """

    def __init__(
        self,
        backbone: Backbone,
        phi: Phi,
        text_blocks: int = 8,
        precision: str | None = None,
        self_prompt: str = SELF_PROMPT,
    ):
        check_compatible(phi, backbone)
        self.backbone, self.phi, self.self_prompt = backbone, phi, self_prompt
        self.grad_eclip = GradECLIP(backbone, text_blocks=text_blocks, precision=precision)
        self.grad_eclip.require_attention_pool()

    def explain(self, reference: Tensor, caption: str, candidates: Tensor) -> CIRExplanation:
        """A-D for one query: reference [1, 3, H, W] and candidates [K, 3, H', W'] are model inputs
        (``backbone.normalize`` output), `caption` the relative caption (the prompt is built here)."""
        if reference.ndim != 4 or reference.shape[0] != 1:
            raise ValueError(f"reference must be one model input [1, 3, H, W], got {tuple(reference.shape)}")
        if candidates.ndim != 4 or candidates.shape[0] == 0:
            raise ValueError(f"candidates must be model inputs [K, 3, H, W] with K >= 1, got {tuple(candidates.shape)}")
        prompt = compose_query(caption)
        bb, k = self.backbone, candidates.shape[0]
        reference, candidates = reference.to(bb.device), candidates.to(bb.device)
        with explaining(bb.model), explaining(self.phi), self.grad_eclip.autocast():
            with torch.no_grad():
                ref_pool = bb.trace_image(reference, n_blocks=1).pool_attention()
                cand_pool = bb.trace_image(candidates, n_blocks=1).pool_attention()
            cls_r = ref_pool.attn_out.detach().requires_grad_(True)
            cls_c = cand_pool.attn_out.detach().requires_grad_(True)
            with torch.enable_grad():
                f_r = ref_pool.tail(cls_r)  # [1, D]
                f_c = cand_pool.tail(cls_c)  # [K, D]
                token = self.phi(f_r.float())  # [1, W]
                texts = encode_with_pseudo_tokens(bb, [prompt, self.self_prompt], token.expand(2, -1))
                query, self_text = texts[:1], texts[1:]
                scores = F.normalize(f_c.float(), dim=-1) @ F.normalize(query.float(), dim=-1)[0]  # [K]
                targets = torch.cat(
                    [token.float().norm(dim=-1), F.cosine_similarity(self_text.float(), f_r.float(), dim=-1), scores]
                )  # [K + 2]
                eye = torch.eye(k + 2, dtype=targets.dtype, device=targets.device)
                g_r, g_c = torch.autograd.grad(
                    targets, [cls_r, cls_c], grad_outputs=eye, is_grads_batched=True, materialize_grads=True
                )  # [K+2, 1, W], [K+2, K, W]
            rows = torch.arange(k, device=g_c.device)
            ref_maps = _maps(ref_pool, g_r.transpose(0, 1), bb.patch_grid(reference))[0]  # [K+2, gh, gw]
            cand_maps = _maps(cand_pool, g_c[2 + rows, rows][:, None], bb.patch_grid(candidates))[:, 0]  # [K, gh, gw]
            token, f_r, f_c = token.detach(), f_r.detach().float(), f_c.detach().float()
        prompt_words = self.grad_eclip.text_maps(f_c, [prompt], pseudo_tokens=token)
        self_words = self.grad_eclip.text_maps(f_r, [self.self_prompt], pseudo_tokens=token)
        return CIRExplanation(
            prompt=prompt,
            scores=scores.detach().float(),
            phi_norm=float(targets[0].detach()),
            self_score=float(targets[1].detach()),
            reference_norm_map=ref_maps[0],
            reference_self_map=ref_maps[1],
            candidate_maps=cand_maps,
            reference_maps=ref_maps[2:],
            prompt_words=prompt_words,
            self_words=self_words,
            candidate_emb=f_c,
        )
