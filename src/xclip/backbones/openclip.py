"""open_clip adapter: CLIP / CustomTextCLIP with a ViT image tower and a causal text tower."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import Attention, CustomResidualAttentionBlock, TextTransformer, VisionTransformer
from torch import Tensor, nn

from .base import OPENAI_MEAN, OPENAI_STD, Backbone, BlockView, PreprocessCfg, TextTokenizer, resize_position_embedding


@lru_cache(maxsize=1)
def _bpe() -> SimpleTokenizer:
    # Parsing the BPE merges takes ~0.5 s; one shared instance serves every context length.
    return SimpleTokenizer()


class ClipBPETokenizer:
    """The CLIP BPE tokenizer shipped with open_clip (offline), padded/truncated to a length."""

    def __init__(self, context_length: int = 77, tokenizer: Optional[SimpleTokenizer] = None):
        self._tok = tokenizer or _bpe()
        self.context_length = context_length
        self.sot_id = self._tok.sot_token_id
        self.eot_id = self._tok.eot_token_id

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return self._tok(list(texts), context_length=self.context_length)

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.decode([i]).strip() for i in ids]


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"xclip backbones do not support open_clip models with {what}")


def _is_batch_first(transformer: nn.Module, block: nn.Module) -> bool:
    """Layout of the tensors a block consumes. nn.MultiheadAttention says it directly; open_clip's
    own Attention follows its Transformer (no ``batch_first`` attribute = <= 2.24 = sequence-first)."""
    if isinstance(block.attn, nn.MultiheadAttention):
        return block.attn.batch_first
    return getattr(transformer, "batch_first", False)


def _check_block(block: nn.Module) -> None:
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


def _block_view(transformer: nn.Module, block: nn.Module) -> BlockView:
    attn = block.attn
    batch_first = _is_batch_first(transformer, block)

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)

    def native(x: Tensor, mask: Optional[Tensor]) -> Tensor:
        if batch_first:
            return block(x, attn_mask=mask)
        return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)

    return BlockView(
        ln_1=block.ln_1, qkv=qkv, num_heads=attn.num_heads, out_proj=attn.out_proj, ls_1=block.ls_1,
        ln_2=block.ln_2, mlp=block.mlp, ls_2=block.ls_2, native=native,
    )


class OpenCLIPBackbone(Backbone):
    """Backbone over an open_clip ``CLIP`` or ``CustomTextCLIP`` (ViT image tower, causal text).

    ``model_cfg`` (the CLIP constructor kwargs) is kept when known so the model can be re-saved
    with :func:`xclip.backbones.save_checkpoint`.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Optional[TextTokenizer] = None,
        preprocess_cfg: Optional[PreprocessCfg] = None,
        model_cfg: Optional[dict] = None,
    ):
        visual, text = self._validate(model)
        size = visual.image_size
        image_size = size[0] if isinstance(size, (tuple, list)) else size
        if preprocess_cfg is None:
            oc_cfg = getattr(visual, "preprocess_cfg", None) or {}
            preprocess_cfg = PreprocessCfg(
                image_size,
                tuple(oc_cfg.get("mean", OPENAI_MEAN)),
                tuple(oc_cfg.get("std", OPENAI_STD)),
            )
        if preprocess_cfg.image_size != image_size:
            raise ValueError(f"preprocess image_size {preprocess_cfg.image_size} != model input size {image_size}")
        super().__init__(model, tokenizer or ClipBPETokenizer(text.context_length), preprocess_cfg)
        self._text = text
        self.model_cfg = model_cfg

    @staticmethod
    def _validate(model: nn.Module) -> tuple[VisionTransformer, nn.Module]:
        """Return (vision tower, text tower) or raise NotImplementedError for unsupported variants."""
        if not isinstance(model, (CLIP, CustomTextCLIP)):
            raise _unsupported(f"model class {type(model).__name__} (CoCa and others)")
        visual = model.visual
        if not isinstance(visual, VisionTransformer):
            raise _unsupported(f"a {type(visual).__name__} image tower (only VisionTransformer)")
        if visual.attn_pool is not None:
            raise _unsupported("attention pooling in the image tower")
        if visual.pool_type != "tok":
            raise _unsupported(f"image pool_type={visual.pool_type!r} (only the CLS token, 'tok')")
        size = visual.image_size
        if isinstance(size, (tuple, list)) and size[0] != size[1]:
            raise _unsupported(f"non-square input size {tuple(size)}")
        text = model.text if isinstance(model, CustomTextCLIP) else model
        if isinstance(model, CustomTextCLIP) and not isinstance(text, TextTransformer):
            raise _unsupported(f"a {type(text).__name__} text tower (only TextTransformer)")
        if getattr(text, "cls_emb", None) is not None:
            raise _unsupported("an appended text CLS token (CoCa)")
        if text.attn_mask is None or getattr(text, "use_pad_mask", False):
            raise _unsupported("a non-causal or padding-masked text tower")
        if _text_pool(text)[0] not in ("argmax", "eos"):
            raise _unsupported(f"text pool_type={_text_pool(text)[0]!r} (only 'argmax' / 'eos')")
        for block in [*visual.transformer.resblocks, *text.transformer.resblocks]:
            _check_block(block)
        return visual, text

    # ---- properties ----------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        size = self.model.visual.patch_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def embed_dim(self) -> int:
        return self.model.visual.output_dim

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    # ---- library encoders ----------------------------------------------------------------
    def _encode_image(self, images: Tensor) -> Tensor:
        return self.model.encode_image(images)

    def _encode_text(self, tokens: Tensor) -> Tensor:
        return self.model.encode_text(tokens)

    # ---- blocks --------------------------------------------------------------------------
    def vision_blocks(self) -> list[BlockView]:
        transformer = self.model.visual.transformer
        return [_block_view(transformer, b) for b in transformer.resblocks]

    def text_blocks(self) -> list[BlockView]:
        transformer = self._text.transformer
        return [_block_view(transformer, b) for b in transformer.resblocks]

    # ---- vision steps --------------------------------------------------------------------
    def _embed_image(self, images: Tensor) -> Tensor:
        v = self.model.visual
        pos = resize_position_embedding(v.positional_embedding, self.patch_grid(images))
        x = v.conv1(images).flatten(2).transpose(1, 2)  # [N, gh*gw, W]
        cls = v.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + pos.to(x.dtype)
        return v.ln_pre(v.patch_dropout(x))

    def image_head(self, tokens: Tensor) -> Tensor:
        v = self.model.visual
        x = v.ln_post(tokens)
        return x if v.proj is None else x @ v.proj

    # ---- text steps ----------------------------------------------------------------------
    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self._text.token_embedding(tokens.to(self.device))

    def _embed_text(self, token_embeds: Tensor) -> Tensor:
        dtype = self._text.transformer.get_cast_dtype()
        x = token_embeds.to(dtype)
        return x + self._text.positional_embedding[: x.shape[1]].to(dtype)

    def causal_mask(self, length: int, like: Tensor) -> Tensor:
        return self._text.attn_mask[:length, :length].to(like.device)

    def eot_index(self, tokens: Tensor) -> Tensor:
        pool_type, eos_id = _text_pool(self._text)
        if pool_type == "eos":
            return (tokens == eos_id).int().argmax(dim=-1)
        return tokens.argmax(dim=-1)  # EOT has the largest id in the CLIP vocabulary

    def text_head(self, x: Tensor, eot_index: Tensor) -> Tensor:
        # ln_final is per-token, so pooling first equals open_clip's normalise-then-pool.
        pooled = self._text.ln_final(x[torch.arange(x.shape[0], device=x.device), eot_index])
        proj = self._text.text_projection
        if proj is None:
            return pooled
        return proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj


def _text_pool(text: nn.Module) -> tuple[str, Optional[int]]:
    """(pool type, eos id): CLIP stores them as text_pool_type/text_eos_id, TextTransformer as
    pool_type/eos_id; open_clip < 2.23 had neither and always pooled at argmax."""
    if isinstance(text, TextTransformer):
        return text.pool_type, text.eos_id
    return getattr(text, "text_pool_type", "argmax"), getattr(text, "text_eos_id", None)


def openclip_tokenizer(arch: str, context_length: int) -> TextTokenizer:
    """The tokenizer open_clip configures for ``arch``, adapted; only the CLIP BPE is supported."""
    tok = open_clip.get_tokenizer(arch, context_length=context_length)
    if not isinstance(tok, SimpleTokenizer):
        raise _unsupported(f"a {type(tok).__name__} tokenizer (only the CLIP BPE SimpleTokenizer)")
    return ClipBPETokenizer(context_length, tok)
