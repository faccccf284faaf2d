"""HuggingFace transformers adapter: ``CLIPModel`` (pre-LN encoder layers, q/k/v projections)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn
from transformers import CLIPModel

from .base import Backbone, BlockView, PreprocessCfg, TextTokenizer, resize_position_embedding
from .openclip import ClipBPETokenizer

CLIP_BPE_VOCAB = 49408


class HFTokenizerAdapter:
    """A transformers CLIP tokenizer padded/truncated to the model's context length."""

    def __init__(self, tokenizer, context_length: int):
        self._tok = tokenizer
        self.context_length = context_length
        self.sot_id = tokenizer.bos_token_id
        self.eot_id = tokenizer.eos_token_id

    def __call__(self, texts: Sequence[str]) -> Tensor:
        enc = self._tok(
            list(texts), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        )
        return enc["input_ids"]

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        # decode() (unlike convert_tokens_to_string) also strips the "</w>" end-of-word marker.
        return [self._tok.decode([i]).strip() for i in ids]


def _features(out) -> Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the projected features.
    return out if isinstance(out, Tensor) else out.pooler_output


def _block_view(layer: nn.Module) -> BlockView:
    attn = layer.self_attn

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    def native(x: Tensor, mask: Optional[Tensor]) -> Tensor:
        # HF layers take a broadcastable additive [N, 1, L, L] mask; older versions return tuples.
        out = layer(x, None if mask is None else mask.to(x.dtype)[None, None])
        return out[0] if isinstance(out, tuple) else out

    return BlockView(
        ln_1=layer.layer_norm1, qkv=qkv, num_heads=attn.num_heads, out_proj=attn.out_proj, ls_1=nn.Identity(),
        ln_2=layer.layer_norm2, mlp=layer.mlp, ls_2=nn.Identity(), native=native,
    )


class HFCLIPBackbone(Backbone):
    """Backbone over a transformers ``CLIPModel``.

    Without a tokenizer the open_clip CLIP BPE tokenizer is used (same vocabulary, offline) when
    the text vocabulary has 49408 entries.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Optional[TextTokenizer] = None,
        preprocess_cfg: Optional[PreprocessCfg] = None,
    ):
        if not isinstance(model, CLIPModel):
            raise NotImplementedError(
                f"xclip backbones support transformers CLIPModel only, not {type(model).__name__}"
            )
        vcfg, tcfg = model.config.vision_config, model.config.text_config
        if tokenizer is None:
            if tcfg.vocab_size != CLIP_BPE_VOCAB:
                raise ValueError(
                    f"text vocab size {tcfg.vocab_size} is not the CLIP BPE's {CLIP_BPE_VOCAB}: pass tokenizer="
                )
            tokenizer = ClipBPETokenizer(tcfg.max_position_embeddings)
        preprocess_cfg = preprocess_cfg or PreprocessCfg(vcfg.image_size)
        if preprocess_cfg.image_size != vcfg.image_size:
            raise ValueError(f"preprocess image_size {preprocess_cfg.image_size} != model input size {vcfg.image_size}")
        super().__init__(model, tokenizer, preprocess_cfg)

    # ---- properties ----------------------------------------------------------------------
    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def embed_dim(self) -> int:
        return self.model.config.projection_dim

    @property
    def logit_scale(self) -> Tensor:
        return self.model.logit_scale.exp()

    # ---- library encoders ----------------------------------------------------------------
    def _encode_image(self, images: Tensor) -> Tensor:
        return _features(self.model.get_image_features(pixel_values=images))

    def _encode_text(self, tokens: Tensor) -> Tensor:
        return _features(self.model.get_text_features(input_ids=tokens))

    # ---- blocks --------------------------------------------------------------------------
    def vision_blocks(self) -> list[BlockView]:
        return [_block_view(layer) for layer in self.model.vision_model.encoder.layers]

    def text_blocks(self) -> list[BlockView]:
        return [_block_view(layer) for layer in self.model.text_model.encoder.layers]

    # ---- vision steps --------------------------------------------------------------------
    def _embed_image(self, images: Tensor) -> Tensor:
        vm = self.model.vision_model
        grid = self.patch_grid(images)
        if grid == self.grid_size:
            return vm.pre_layrnorm(vm.embeddings(images))
        emb = vm.embeddings
        x = emb.patch_embedding(images.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resize_position_embedding(emb.position_embedding.weight, grid)
        return vm.pre_layrnorm(torch.cat([cls, x], dim=1) + pos.to(x.dtype))

    def image_head(self, tokens: Tensor) -> Tensor:
        return self.model.visual_projection(self.model.vision_model.post_layernorm(tokens))

    # ---- text steps ----------------------------------------------------------------------
    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self.model.text_model.embeddings.token_embedding(tokens.to(self.device))

    def _embed_text(self, token_embeds: Tensor) -> Tensor:
        pos = self.model.text_model.embeddings.position_embedding.weight[: token_embeds.shape[1]]
        return token_embeds + pos

    def causal_mask(self, length: int, like: Tensor) -> Tensor:
        return torch.full((length, length), float("-inf"), device=like.device, dtype=like.dtype).triu(1)

    def eot_index(self, tokens: Tensor) -> Tensor:
        eos = self.model.text_model.eos_token_id
        if eos == 2:  # legacy configs: EOT is the largest id
            return tokens.argmax(dim=-1)
        return (tokens == eos).int().argmax(dim=-1)

    def text_head(self, x: Tensor, eot_index: Tensor) -> Tensor:
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_index]
        return self.model.text_projection(self.model.text_model.final_layer_norm(pooled))
