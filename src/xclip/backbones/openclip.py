"""open_clip adapter: every model of open_clip's registry, through its image and text towers.

Image towers: open_clip's ``VisionTransformer`` (class-token pooling; CLIPA's average pooling;
CoCa's attentional pooler), ``ModifiedResNet`` (RN50 ... RN50x64: the attention pool's mean-token
query) and ``TimmModel`` (SigLIP / SigLIP 2 / PE ``map`` heads, EVA, MobileCLIP, ConvNeXt, FastViT,
Swin, ViTamin: see `xclip.backbones.timm_towers`). Text towers: ``TextTransformer`` and CLIP's
built-in one (causal or not; argmax, EOS, last-token or CoCa class-token pooling) and
``HFTextEncoder`` (RoBERTa, XLM-R, mT5, NLLB).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, TypeAlias

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import (
    Attention,
    CustomResidualAttentionBlock,
    TextTransformer,
    VisionTransformer,
)
from torch import Tensor, nn

from .base import (
    OPENAI_MEAN,
    OPENAI_STD,
    Backbone,
    BlockView,
    ImageTrace,
    PoolAttention,
    PoolTrace,
    PreprocessCfg,
    TextTokenizer,
    TextTower,
    TextTrace,
    UnsupportedFamily,
    VisionTower,
    attention_readout,
    head_view,
    resize_position_embedding,
)
from .sequence import SequenceTextTower, SequenceVisionTower
from .tokenizers import ClipBPETokenizer, adapt_tokenizer

if TYPE_CHECKING:
    # open_clip ships no type information: mypy sees its classes as Any, so these annotations say
    # what a tower holds without checking the attribute access on it
    from open_clip.coca_model import CoCa
    from open_clip.hf_model import HFTextEncoder
    from open_clip.transformer import CustomTransformer, ResidualAttentionBlock, Transformer

    OpenCLIPModel: TypeAlias = CLIP | CustomTextCLIP | CoCa
    OpenCLIPTransformer: TypeAlias = Transformer | CustomTransformer
    OpenCLIPBlock: TypeAlias = ResidualAttentionBlock | CustomResidualAttentionBlock

__all__ = ["ClipBPETokenizer", "OpenCLIPBackbone", "adapt_tokenizer", "openclip_tokenizer"]


def _unsupported(what: str) -> UnsupportedFamily:
    return UnsupportedFamily(f"xclip backbones do not support open_clip models with {what}")


# ---- open_clip transformer blocks -----------------------------------------------------------------
def _is_batch_first(transformer: OpenCLIPTransformer, block: OpenCLIPBlock) -> bool:
    """Layout of the tensors a block consumes. nn.MultiheadAttention says it directly; open_clip's
    own Attention follows its Transformer (no ``batch_first`` attribute = <= 2.24 = sequence-first)."""
    if isinstance(block.attn, nn.MultiheadAttention):
        return block.attn.batch_first
    return getattr(transformer, "batch_first", False)


def check_block(block: OpenCLIPBlock) -> None:
    """Raise for open_clip blocks whose attention xclip cannot recompute exactly."""
    attn = block.attn
    if hasattr(block, "ln_1_kv"):
        raise _unsupported("cross-attention blocks")
    if isinstance(attn, nn.MultiheadAttention):
        if not attn._qkv_same_embed_dim or attn.bias_k is not None or attn.add_zero_attn:
            raise _unsupported("non-standard nn.MultiheadAttention (separate kdim/vdim, bias_kv, zero_attn)")
        return
    if not isinstance(attn, Attention):
        raise _unsupported(f"attention module {type(attn).__name__}")
    if getattr(attn, "logit_scale", None) is not None:
        raise _unsupported("scaled-cosine attention")
    if getattr(attn, "head_scale", None) is not None:
        raise _unsupported("per-head attention scaling")
    for name in ("ln_q", "ln_k", "ln_inner"):
        if not isinstance(getattr(attn, name, nn.Identity()), nn.Identity):
            raise _unsupported("qk-norm / inner attention norm")
    if isinstance(block, CustomResidualAttentionBlock) and not isinstance(block.ln_attn, nn.Identity):
        raise _unsupported("a norm after attention (scale_attn)")


def block_view(transformer: OpenCLIPTransformer, block: OpenCLIPBlock) -> BlockView:
    attn = block.attn
    batch_first = _is_batch_first(transformer, block)
    heads = attn.num_heads

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        return q, k, v

    def native(x: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None and mask.ndim == 4:  # per-sample masks: nn.MultiheadAttention wants [N*H, L, L]
            mask = mask.expand(x.shape[0], heads, -1, -1).flatten(0, 1)
        if batch_first:
            return block(x, attn_mask=mask)
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)

    return BlockView(
        ln_1=block.ln_1,
        qkv=qkv,
        num_heads=heads,
        out_proj=attn.out_proj,
        ls_1=block.ls_1,
        ln_2=block.ln_2,
        mlp=block.mlp,
        ls_2=block.ls_2,
        native=native,
    )


def _side(size) -> int:
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise _unsupported(f"non-square input size {tuple(size)}")
        return int(size[0])
    return int(size)


# ---- image towers ---------------------------------------------------------------------------------
class OpenCLIPViTTower(SequenceVisionTower):
    """open_clip ``VisionTransformer``: class-token pooling (OpenAI-style ViT), CLIPA's average pooling,
    or CoCa's attentional pooler (its first query is the contrastive one)."""

    prefix = 1
    module: VisionTransformer

    def __init__(self, visual: VisionTransformer, encode_fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__(visual, encode_fn)
        self._image_size = _side(visual.image_size)
        if (
            getattr(visual, "attn_pool_type", "") in ("parallel", "cascade")
            or getattr(visual, "attn_pool_contrastive", None) is not None
        ):
            raise _unsupported(f"the {visual.attn_pool_type!r} attentional pooler")
        if visual.attn_pool is not None:
            if visual.pool_type != "tok":
                raise _unsupported(f"an attentional pooler with pool_type={visual.pool_type!r} (a mean of queries)")
            self.pooling, self.family = "latent query", "CoCa-style ViT (attentional pooler)"
        elif visual.pool_type == "tok":
            self.pooling, self.family = "class token", "OpenAI-style ViT (class token)"
        elif visual.pool_type == "avg":
            self.pooling, self.family = "average", "CLIPA-style ViT (average pooling)"
        else:
            raise _unsupported(f"image pool_type={visual.pool_type!r}")
        for block in visual.transformer.resblocks:
            check_block(block)

    @staticmethod
    def matches(visual: nn.Module) -> bool:
        return isinstance(visual, VisionTransformer)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def patch_size(self) -> int:
        return _side(self.module.patch_size)

    @property
    def token_width(self) -> int:
        return self.module.conv1.out_channels

    @property
    def other_sizes(self) -> bool:
        return True

    def embed(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        v = self.module
        pos = resize_position_embedding(v.positional_embedding, grid)
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [N, gh*gw, W]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def blocks(self, grid: tuple[int, int]) -> list[BlockView]:
        transformer = self.module.transformer
        return [block_view(transformer, b) for b in transformer.resblocks]

    def _project(self, x: Tensor) -> Tensor:
        proj = self.module.proj
        return x if proj is None else x @ proj

    def head(self, x: Tensor) -> Tensor:
        return self._project(self.module.ln_post(x))

    # average pooling (CLIPA): ln_post before the mean, or after it (final_ln_after_pool)
    def final_norm(self, x: Tensor) -> Tensor:
        if self.pooling == "latent query":
            return x  # the pooler normalises its keys itself (ln_k, in pool_qkv)
        return x if self.module.final_ln_after_pool else self.module.ln_post(x)

    def pooled_head(self, pooled: Tensor) -> Tensor:
        v = self.module
        return self._project(v.ln_post(pooled) if v.final_ln_after_pool else pooled)

    # CoCa's attentional pooler: query 0 of ln_q(query), keys/values of ln_k(tokens)
    def pool_qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pooler = self.module.attn_pool
        attn = pooler.attn
        d = attn.embed_dim
        if attn._qkv_same_embed_dim:
            wq, wk, wv = attn.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight
        bq, bk, bv = attn.in_proj_bias.chunk(3) if attn.in_proj_bias is not None else (None, None, None)
        x = pooler.ln_k(tokens)
        q = F.linear(pooler.ln_q(pooler.query[:1]), wq, bq).expand(tokens.shape[0], d)
        k, v = F.linear(x, wk, bk), F.linear(x, wv, bv)
        heads = attn.num_heads
        return q.view(-1, heads, d // heads), head_view(k, heads), head_view(v, heads)

    def pool_tail(self, attn_out: Tensor) -> Tensor:
        return self.head(self.module.attn_pool.attn.out_proj(attn_out))


class ModifiedResNetTower(VisionTower):
    """open_clip ``ModifiedResNet`` (RN50 ... RN50x64): the attention pool's query is the mean of the
    last feature map's tokens (with its positional embedding), attending over the mean token and all
    HW tokens; ``c_proj`` projects the read-out."""

    family = "ResNet (attention pool, mean-token query)"
    pooling = "mean query"
    module: ModifiedResNet

    @staticmethod
    def matches(visual: nn.Module) -> bool:
        return isinstance(visual, ModifiedResNet)

    @property
    def image_size(self) -> int:
        return _side(self.module.image_size)

    @property
    def patch_size(self) -> int:
        return 32  # stem /4, then layers 2-4 halve the map each: the attention pool sees S/32 x S/32

    @property
    def token_width(self) -> int:
        return self.module.attnpool.k_proj.in_features

    def _features(self, images: Tensor) -> Tensor:
        m = self.module
        x = m.stem(images.to(m.conv1.weight.dtype))
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))

    def _attention(self, tokens: Tensor, key_weights: Tensor | None = None) -> PoolAttention:
        pool = self.module.attnpool
        x = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding.to(tokens.dtype)
        heads = pool.num_heads
        q = pool.q_proj(x[:, 0])
        k, v = head_view(pool.k_proj(x), heads), head_view(pool.v_proj(x), heads)
        q = q.view(q.shape[0], heads, -1)
        probs, out = attention_readout(q, k, v, key_weights)
        return PoolAttention(q, k, v, probs, out, 1, pool.c_proj)

    def _forward(self, tokens: Tensor) -> Tensor:
        attention = self._attention(tokens)
        return attention.tail(attention.attn_out)

    def trace(self, images: Tensor, n_blocks: int) -> ImageTrace:
        feats = self._features(images)  # [N, C, h, w]
        h, w = feats.shape[-2:]
        tokens = feats.flatten(2).transpose(1, 2)  # [N, h*w, C]
        attention = self._attention(tokens)
        pool = PoolTrace(tokens, 0, self._forward, attention)
        return ImageTrace([], attention.tail(attention.attn_out), tokens, (h, w), pool)

    def patch_features(self, trace: ImageTrace) -> Tensor:
        # MaskCLIP's dense ResNet features: each token's value through c_proj
        attention = trace.pool_attention()
        _, v = attention.grid_keys()
        return attention.tail(v.transpose(1, 2).flatten(2))

    def region_embedding(self, trace: ImageTrace, weights: Tensor) -> Tensor:
        attention = trace.pool_attention()
        keys = torch.cat([weights.new_zeros(weights.shape[0], 1), weights], dim=1)
        return attention.tail(attention_readout(attention.q, attention.k, attention.v, keys)[1])


# ---- text towers ----------------------------------------------------------------------------------
def _text_pool(text: TextTransformer | CLIP) -> tuple[str, int | None]:
    """(pool type, eos id): CLIP stores them as text_pool_type/text_eos_id, TextTransformer as
    pool_type/eos_id; open_clip < 2.23 had neither and always pooled at argmax."""
    if isinstance(text, TextTransformer):
        return text.pool_type, text.eos_id
    return getattr(text, "text_pool_type", "argmax"), getattr(text, "text_eos_id", None)


class OpenCLIPTextTower(SequenceTextTower):
    """open_clip ``TextTransformer`` or CLIP's built-in text tower: causal or not, a padding mask or
    not, pooled at argmax (EOT), the first EOS, the last position, or CoCa's appended class token."""

    module: TextTransformer | CLIP  # CLIP's built-in text tower is the model itself

    def __init__(self, text: TextTransformer | CLIP, encode_fn: Callable[[Tensor], Tensor]):
        super().__init__(text)
        self._encode_fn = encode_fn
        self.cls = getattr(text, "cls_emb", None) is not None
        self.pool_type, self.eos_id = _text_pool(text)
        if self.pool_type not in ("argmax", "eos", "last", "first") and not self.cls:
            raise _unsupported(f"text pool_type={self.pool_type!r}")
        self.causal = text.attn_mask is not None
        self.pad_mask = bool(getattr(text, "use_pad_mask", False)) or self.cls
        self.heads = text.transformer.resblocks[0].attn.num_heads
        for block in text.transformer.resblocks:
            check_block(block)
        pooling = (
            "appended class token"
            if self.cls
            else {"argmax": "EOT", "eos": "EOS", "last": "last-token", "first": "first-token"}[self.pool_type]
        )
        self.family = f"{'causal' if self.causal else 'non-causal'} text transformer ({pooling} pooling)"

    @property
    def width(self) -> int:
        return self.module.token_embedding.weight.shape[1]

    def encode(self, tokens: Tensor) -> Tensor:
        return self._encode_fn(tokens)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self.module.token_embedding(tokens)

    def embed(self, token_embeds: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        text = self.module
        dtype = text.transformer.get_cast_dtype()
        x = token_embeds.to(dtype)
        length = x.shape[1]
        if self.cls:
            x = torch.cat([x, text.cls_emb.to(dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)], dim=1)
            length += 1
        mask = None if text.attn_mask is None else text.attn_mask[:length, :length].to(x.device)
        if self.pad_mask:
            pad = text._build_additive_mask(tokens, length, x.dtype)  # [K*H, L', L'] from the library
            pad = pad.view(tokens.shape[0], self.heads, length, length)
            mask = pad if mask is None else mask + pad
        return x + text.positional_embedding[:length].to(dtype), mask

    def blocks(self) -> list[BlockView]:
        transformer = self.module.transformer
        return [block_view(transformer, b) for b in transformer.resblocks]

    def pool_index(self, tokens: Tensor) -> Tensor:
        if self.cls or self.pool_type == "last":
            return torch.full_like(tokens[:, 0], tokens.shape[1] - (0 if self.cls else 1))
        if self.pool_type == "first":
            return torch.zeros_like(tokens[:, 0])
        if self.pool_type == "eos":
            assert self.eos_id is not None  # open_clip's EOS pooling comes with its eos_id
            return (tokens == self.eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # EOT has the largest id in the CLIP vocabulary

    def head(self, x: Tensor, pool_index: Tensor) -> Tensor:
        # ln_final is per-token, so pooling first equals open_clip's normalise-then-pool.
        pooled = self.module.ln_final(x[torch.arange(x.shape[0], device=x.device), pool_index])
        proj = self.module.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj

    def trims_padding(self) -> bool:
        return self.causal and not self.cls and self.pool_type in ("argmax", "eos")


class HFTextEncoderTower(TextTower):
    """open_clip ``HFTextEncoder`` (RoBERTa, XLM-R, mT5, NLLB): the transformers encoder with a padding
    mask, mean or class-token pooling, a projection. Its blocks are the transformers model's own
    (post-norm, relative positions): Grad-ECLIP text maps are refused, SEARLE injection works through
    ``inputs_embeds``."""

    causal = False
    module: HFTextEncoder

    def __init__(self, text: HFTextEncoder, encode_fn: Callable[[Tensor], Tensor]):
        super().__init__(text)
        self._encode_fn = encode_fn
        self.family = f"{text.config.model_type} text encoder ({type(text.pooler).__name__})"

    @property
    def width(self) -> int:
        return self.module.transformer.get_input_embeddings().weight.shape[1]

    def encode(self, tokens: Tensor) -> Tensor:
        return self._encode_fn(tokens)

    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self.module.transformer.get_input_embeddings()(tokens)

    def encode_embeddings(self, token_embeds: Tensor, tokens: Tensor, n_blocks: int) -> TextTrace:
        if n_blocks:
            raise UnsupportedFamily(
                f"{self.family}: its transformers blocks are not traced; Grad-ECLIP text maps "
                "are not available (explain the image side, or use SHAP/Captum on the tokens)"
            )
        text = self.module
        mask = (tokens != text.config.pad_token_id).long()
        out = text.transformer(inputs_embeds=token_embeds, attention_mask=mask)
        emb = text.proj(text.pooler(out, mask))
        index = torch.zeros_like(tokens[:, 0])
        return TextTrace([], emb, index, tokens)


# ---- the backbone ---------------------------------------------------------------------------------
def _vision_towers() -> list[type[VisionTower]]:
    from .timm_towers import TIMM_TOWERS

    return [OpenCLIPViTTower, ModifiedResNetTower, *TIMM_TOWERS]


def _vision_tower(model: OpenCLIPModel) -> VisionTower:
    for cls in _vision_towers():
        if cls.matches(model.visual):
            return cls(model.visual, partial(model.encode_image, normalize=False))  # CoCa normalises by default
    raise _unsupported(f"a {type(model.visual).__name__} image tower")


def _text_tower(model: OpenCLIPModel) -> TextTower:
    from open_clip.hf_model import HFTextEncoder

    if isinstance(model, CustomTextCLIP) or hasattr(model, "text"):
        text = model.text
        encode = partial(model.encode_text, normalize=False)
        if isinstance(text, HFTextEncoder):
            return HFTextEncoderTower(text, encode)
        if isinstance(text, TextTransformer):
            return OpenCLIPTextTower(text, encode)
        raise _unsupported(f"a {type(text).__name__} text tower")
    return OpenCLIPTextTower(model, partial(model.encode_text, normalize=False))


class OpenCLIPBackbone(Backbone):
    """Backbone over any open_clip model of its registry (``CLIP``, ``CustomTextCLIP``, ``CoCa``).

    ``model_cfg`` (the CLIP constructor kwargs) is kept when known so the model can be re-saved
    with :func:`xclip.backbones.save_checkpoint`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer | None = None,
        preprocess_cfg: PreprocessCfg | None = None,
        model_cfg: dict | None = None,
    ):
        if not isinstance(model, (CLIP, CustomTextCLIP)) and not hasattr(model, "visual"):
            raise _unsupported(f"model class {type(model).__name__}")
        vision = _vision_tower(model)
        text = _text_tower(model)
        if preprocess_cfg is None:
            oc_cfg = getattr(model.visual, "preprocess_cfg", None) or {}
            preprocess_cfg = PreprocessCfg(
                vision.image_size, tuple(oc_cfg.get("mean", OPENAI_MEAN)), tuple(oc_cfg.get("std", OPENAI_STD))
            )
        if tokenizer is None:
            tokenizer = default_tokenizer(model)
        embed_dim = _embed_dim(model)
        super().__init__(model, tokenizer, preprocess_cfg, vision, text, embed_dim)
        self.model_cfg = model_cfg


def _embed_dim(model: OpenCLIPModel) -> int:
    with torch.no_grad():
        proj = getattr(model, "text_projection", None)
        if isinstance(proj, nn.Linear):
            return proj.out_features
        if isinstance(proj, Tensor):
            return proj.shape[1]
        text = getattr(model, "text", None)
        if text is not None and hasattr(text, "output_dim"):
            return int(text.output_dim)
        if text is not None and getattr(text, "text_projection", None) is not None:
            p = text.text_projection
            return p.out_features if isinstance(p, nn.Linear) else p.shape[1]
        return int(model.visual.output_dim)


def default_tokenizer(model: OpenCLIPModel) -> TextTokenizer:
    """The CLIP BPE when the text vocabulary is CLIP's (offline); otherwise the caller must pass the
    model's tokenizer (SigLIP's, the HF ones need a download)."""
    text = getattr(model, "text", model)
    vocab = getattr(text, "vocab_size", None)
    if vocab == 49408 and hasattr(model, "context_length"):
        return ClipBPETokenizer(text_context_length(model))
    raise ValueError(
        f"the text tower's vocabulary ({vocab} tokens) is not the CLIP BPE's: pass tokenizer= "
        "(e.g. open_clip.get_tokenizer('<arch>'), or any transformers tokenizer)"
    )


def text_context_length(model: OpenCLIPModel) -> int:
    """The context the tokenizer pads to: the model's, except for Hugging Face text towers, whose
    ``context_length`` is their position table (514 for RoBERTa, none for mT5): open_clip
    tokenizes those to 77 tokens."""
    from open_clip.hf_model import HFTextEncoder

    if isinstance(getattr(model, "text", None), HFTextEncoder):
        return min(model.context_length, 77) if model.context_length else 77
    return int(model.context_length)


def openclip_tokenizer(arch: str, context_length: int) -> TextTokenizer:
    """The tokenizer open_clip configures for ``arch``, adapted (the CLIP BPE offline; an HF
    tokenizer from the local cache, or downloaded when the hub answers)."""
    from open_clip.tokenizer import SimpleTokenizer

    cfg = open_clip.get_model_config(arch) or {}
    text_cfg = cfg.get("text_cfg", {})
    name = text_cfg.get("hf_tokenizer_name") or text_cfg.get("hf_model_name")
    if name:
        _ensure_hf_tokenizer(arch, name)
    tok = open_clip.get_tokenizer(arch, context_length=context_length)
    if isinstance(tok, SimpleTokenizer):
        return ClipBPETokenizer(context_length, tok)
    return adapt_tokenizer(tok, context_length)


def _ensure_hf_tokenizer(arch: str, repo: str) -> None:
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import try_to_load_from_cache

    from .network import ensure_online, hub_address

    if any(isinstance(try_to_load_from_cache(repo, f), str) for f in ("tokenizer.json", "tokenizer_config.json")):
        return
    ensure_online(
        f"openclip:{arch}: its tokenizer {repo!r} is not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE})",
        f"Download it on a connected machine with `hf download {repo}` and copy the cache here, or build the "
        "model yourself and pass its tokenizer: wrap_model(model, tokenizer)",
        hub_address(),
    )
