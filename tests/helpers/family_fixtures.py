"""One small random-init instance of every CLIP family xclip wraps (built offline), and the
plain-autograd Grad-ECLIP references the family tests compare with."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from xclip.backbones import Backbone, wrap_model
from xclip.backbones.reduced import FAMILIES, offline_tokenizer_for, reduced_hf, reduced_openclip

AVERAGE_POOLED = {"mobileclip-fastvit", "convnext", "swin", "vitamin", "clipa"}
UNTRACED_TEXT = {"roberta-text", "mt5-text", "nllb-text-siglip"}


@functools.cache
def family_backbone(family: str) -> Backbone:
    """The family's small instance, wrapped (cached per test session: tests must not edit it)."""
    arch = FAMILIES[family]
    if arch.startswith("hf:"):
        model, tokenizer = reduced_hf(arch.removeprefix("hf:"))
    else:
        model, tokenizer = reduced_openclip(arch), offline_tokenizer_for(arch)
    return wrap_model(model, tokenizer).eval()


def library_image_features(bb: Backbone, images: torch.Tensor) -> torch.Tensor:
    """The library's own image encoder, called directly (not through xclip)."""
    model = bb.model
    if hasattr(model, "get_image_features"):
        if type(model).__name__ == "Siglip2Model":
            patches, mask, shapes = bb.vision._naflex(images)
            out = model.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
        else:
            out = model.get_image_features(pixel_values=images)
        return out.pooler_output
    return model.encode_image(images, normalize=False)


def library_text_features(bb: Backbone, tokens: torch.Tensor) -> torch.Tensor:
    model = bb.model
    if hasattr(model, "get_text_features"):
        return model.get_text_features(input_ids=tokens).pooler_output
    return model.encode_text(tokens, normalize=False)


def _minmax(x: torch.Tensor) -> torch.Tensor:
    span = x.max() - x.min()
    return (x - x.min()) / span if span > 0 else torch.zeros_like(x)


def plain_image_maps(bb: Backbone, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Grad-ECLIP image maps by the book: per (image, text) pair a full traced forward with its
    graph, g = d cos / d(read-out) by autograd, then the formula with explicit loops over heads
    and grid tokens. [N, K, gh, gw]."""
    maps = []
    for n in range(images.shape[0]):
        row = []
        for k in range(text_emb.shape[0]):
            with torch.enable_grad():
                trace = bb.trace_image(images[n : n + 1], n_blocks=1)
                attention = trace.pool.attention
                target = F.cosine_similarity(trace.embedding, text_emb[k : k + 1])[0]
                if bb.vision.pooling == "class token":  # the read-out is row 0 of the last block's attention output
                    g = torch.autograd.grad(target, trace.blocks[-1].attn_out)[0][0, 0]
                else:
                    g = torch.autograd.grad(target, attention.attn_out)[0][0]
            heads, dh = attention.q.shape[1:]
            p = attention.prefix
            keys, values = attention.k[0, :, p:].detach(), attention.v[0, :, p:].detach()
            total = torch.zeros(keys.shape[1])
            for h in range(heads):
                q = attention.q[0, h].detach()
                lam = _minmax(torch.stack([F.cosine_similarity(q, kj, dim=0) for kj in keys[h]]))
                channel = values[h] @ g[h * dh : (h + 1) * dh]
                total = total + lam * channel
            row.append(total.clamp_min(0).view(trace.grid))
        maps.append(torch.stack(row))
    return torch.stack(maps)


def plain_text_scores(bb: Backbone, image_emb: torch.Tensor, texts: list[str], n_blocks: int = 8) -> list[torch.Tensor]:
    """Grad-ECLIP token scores by the book, per (image, text) pair: [N] lists of [K] tensors over
    each text's own tokens (summed over the last blocks, ReLU, normalised to sum 1)."""
    out = []
    for n in range(image_emb.shape[0]):
        row = []
        for text in texts:
            tokens = bb.tokenize([text])
            with torch.enable_grad():
                trace = bb.trace_text(tokens, n_blocks=n_blocks)
                target = F.cosine_similarity(image_emb[n : n + 1], trace.embedding)[0]
                grads = torch.autograd.grad(target, [b.attn_out for b in trace.blocks])
            pooled = int(trace.eot_index[0])
            mask = trace.attn_mask
            if mask is None:
                allowed = torch.ones(trace.blocks[0].x_in.shape[1], dtype=torch.bool)
            else:
                m = mask if mask.ndim == 2 else mask[0, 0]
                allowed = torch.isfinite(m[pooled]) & (m[pooled] > -1e4)
            score = torch.zeros(trace.blocks[0].x_in.shape[1])
            for block, grad in zip(trace.blocks, grads):
                heads = block.q_heads.shape[1]
                dh = block.q_heads.shape[-1]
                for h in range(heads):
                    q = block.q_heads[0, h, pooled].detach()
                    cos = torch.stack([F.cosine_similarity(q, kj, dim=0) for kj in block.k_heads[0, h].detach()])
                    lam = torch.zeros_like(cos)
                    lam[allowed] = _minmax(cos[allowed])
                    g = grad[0, pooled, h * dh : (h + 1) * dh]
                    score = score + lam * (block.v_heads[0, h].detach() @ g)
            # CoCa appends a class token after the text: the text's positions come first
            score = score.clamp_min(0)[: tokens.shape[1]][bb.content_mask(tokens)[0]]
            row.append(score / score.sum() if score.sum() > 0 else score)
        out.append(row)
    return out
