"""Hugging Face transformers adapter: ``CLIPModel``, ``SiglipModel`` and ``Siglip2Model``.

All three have pre-LN encoder layers with q/k/v projections. CLIP pools the vision tower at the
class token and the text tower at EOT behind a causal mask; SigLIP pools the vision tower with
``SiglipMultiheadAttentionPoolingHead`` (a learned probe attending over all patch tokens through
``nn.MultiheadAttention``, then ``x + mlp(layernorm(x))``) and the text tower at the last position
of the padded sequence, without a causal mask; SigLIP 2 takes NaFlex inputs (patches, their
spatial shape and a padding mask), which xclip builds from ``[N, 3, H, W]`` images.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import (
    Backbone,
    BlockView,
    PreprocessCfg,
    TextTokenizer,
    UnsupportedFamily,
    _features,
    head_view,
    resize_position_embedding,
)
from .sequence import SequenceTextTower, SequenceVisionTower
from .tokenizers import ClipBPETokenizer, HFTokenizerAdapter

if TYPE_CHECKING:
    # transformers ships type information: the towers name the classes they read so that mypy checks
    # the attribute access; a branch that holds one family only (by the tower's `kind`) casts to it
    from transformers import CLIPModel, Siglip2Model, SiglipModel
    from transformers.models.clip.modeling_clip import (
        CLIPEncoderLayer,
        CLIPTextModel,
        CLIPVisionConfig,
        CLIPVisionModel,
    )
    from transformers.models.siglip.modeling_siglip import (
        SiglipEncoderLayer,
        SiglipMultiheadAttentionPoolingHead,
        SiglipTextModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )
    from transformers.models.siglip2.modeling_siglip2 import (
        Siglip2EncoderLayer,
        Siglip2MultiheadAttentionPoolingHead,
        Siglip2TextModel,
        Siglip2VisionConfig,
        Siglip2VisionModel,
    )

    HFModel: TypeAlias = CLIPModel | SiglipModel | Siglip2Model
    HFEncoderLayer: TypeAlias = CLIPEncoderLayer | SiglipEncoderLayer | Siglip2EncoderLayer

__all__ = ["HFCLIPBackbone", "HFTokenizerAdapter"]

CLIP_BPE_VOCAB = 49408
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


def _block_view(layer: HFEncoderLayer) -> BlockView:
    attn = layer.self_attn

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)

    def native(x: Tensor, mask: Tensor | None) -> Tensor:
        # HF layers take a broadcastable additive [N, 1|H, L, L] mask; older versions return tuples.
        if mask is not None and mask.ndim == 2:
            mask = mask[None, None]
        out = layer(x, None if mask is None else mask.to(x.dtype))
        return out[0] if isinstance(out, tuple) else out

    return BlockView(
        ln_1=layer.layer_norm1,
        qkv=qkv,
        num_heads=attn.num_heads,
        out_proj=attn.out_proj,
        ls_1=nn.Identity(),
        ln_2=layer.layer_norm2,
        mlp=layer.mlp,
        ls_2=nn.Identity(),
        native=native,
    )


def _block_views(layers: nn.ModuleList) -> list[BlockView]:
    # an encoder's ModuleList holds the encoder layers of its own family
    return [_block_view(cast("HFEncoderLayer", layer)) for layer in layers]


def _config_int(value: int | list[int] | tuple[int, int] | None, name: str) -> int:
    """A vision config's size, which xclip reads as one int (square images and patches)."""
    if value is None or isinstance(value, (list, tuple)):
        raise UnsupportedFamily(f"HF vision config with {name}={value!r}: xclip reads one int (square inputs)")
    return int(value)


def _kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name not in ("CLIPModel", "SiglipModel", "Siglip2Model"):
        raise UnsupportedFamily(
            f"xclip backbones support transformers CLIPModel, SiglipModel and Siglip2Model, not {name}"
        )
    return name


def text_context_length(model: nn.Module) -> int:
    """The text position table's length of a CLIPModel / SiglipModel / Siglip2Model."""
    _kind(model)
    return cast("HFModel", model).text_model.config.max_position_embeddings


# ---- image towers -------------------------------------------------------------------------------------
class HFVisionTower(SequenceVisionTower):
    """The vision model of a CLIPModel (class token) or SiglipModel / Siglip2Model (attention-pool head)."""

    module: CLIPVisionModel | SiglipVisionModel | Siglip2VisionModel
    model: HFModel

    def __init__(self, model: HFModel, kind: str):
        super().__init__(model.vision_model)
        self.model, self.kind = model, kind
        self.cfg: CLIPVisionConfig | SiglipVisionConfig | Siglip2VisionConfig = self.module.config
        if kind == "CLIPModel":
            self.prefix, self.pooling, self.family = 1, "class token", "HF CLIP ViT (class token)"
        else:
            if not getattr(self.module, "use_head", True):
                raise UnsupportedFamily(f"{kind} without its attention-pool head (vision_use_head=False)")
            self.prefix, self.pooling = 0, "latent query"
            self.family = f"HF {'SigLIP 2' if kind == 'Siglip2Model' else 'SigLIP'} ViT (probe attention pool)"

    @property
    def image_size(self) -> int:
        if self.kind == "Siglip2Model":
            return round(cast("Siglip2VisionConfig", self.cfg).num_patches ** 0.5) * self.patch_size
        return _config_int(cast("CLIPVisionConfig | SiglipVisionConfig", self.cfg).image_size, "image_size")

    @property
    def patch_size(self) -> int:
        return _config_int(self.cfg.patch_size, "patch_size")

    @property
    def token_width(self) -> int:
        return int(self.cfg.hidden_size)

    @property
    def other_sizes(self) -> bool:
        return True

    def _naflex(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """[N, 3, H, W] -> SigLIP 2's (patches [N, P, p*p*3], attention mask [N, P], spatial shapes
        [N, 2]); patches row-major, each flattened (p, p, C) as its image processor does."""
        n, c, h, w = images.shape
        p = self.patch_size
        patches = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(n, -1, p * p * c)
        mask = torch.ones(patches.shape[:2], dtype=torch.long, device=images.device)
        shapes = torch.tensor([[h // p, w // p]] * n, device=images.device)
        return patches, mask, shapes

    def encode(self, images: Tensor) -> Tensor:
        if self.kind == "Siglip2Model":
            patches, mask, shapes = self._naflex(images)
            siglip2 = cast("Siglip2Model", self.model)
            return _features(
                siglip2.get_image_features(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes)
            )
        out = _features(self.model.get_image_features(pixel_values=images))
        return out

    def embed(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        vm = self.module
        emb = vm.embeddings
        if self.kind == "Siglip2Model":
            patches, _, shapes = self._naflex(images)
            return emb(patches, shapes)
        default = (self.image_size // self.patch_size,) * 2
        if self.kind == "SiglipModel":
            return emb(images, interpolate_pos_encoding=grid != default)
        clip = cast("CLIPVisionModel", vm)  # the SigLIP kinds returned above
        if grid == default:
            return clip.pre_layrnorm(emb(images))
        clip_emb = clip.embeddings
        x = clip_emb.patch_embedding(images.to(clip_emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = clip_emb.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        pos = resize_position_embedding(clip_emb.position_embedding.weight, grid)
        return clip.pre_layrnorm(torch.cat([cls, x], dim=1) + pos.to(x.dtype))

    def blocks(self, grid: tuple[int, int]) -> list[BlockView]:
        return _block_views(self.module.encoder.layers)

    # CLIP: post_layernorm + visual_projection on the class token
    def head(self, x: Tensor) -> Tensor:
        return cast("CLIPModel", self.model).visual_projection(self.module.post_layernorm(x))

    # SigLIP: post_layernorm, then the probe's attention pool; no projection after it
    def final_norm(self, x: Tensor) -> Tensor:
        return self.module.post_layernorm(x)

    def _pool_head(self) -> SiglipMultiheadAttentionPoolingHead | Siglip2MultiheadAttentionPoolingHead:
        # SigLIP towers only: __init__ refused one without its head (vision_use_head=False)
        return cast("SiglipVisionModel | Siglip2VisionModel", self.module).head

    def pool_qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        pool = self._pool_head()
        attn = pool.attention
        heads = attn.num_heads
        wq, wk, wv = attn.in_proj_weight.chunk(3)
        bq, bk, bv = attn.in_proj_bias.chunk(3)
        q = F.linear(pool.probe[0, 0], wq, bq).view(1, heads, -1).expand(tokens.shape[0], -1, -1)
        return q, head_view(F.linear(tokens, wk, bk), heads), head_view(F.linear(tokens, wv, bv), heads)

    def pool_tail(self, attn_out: Tensor) -> Tensor:
        pool = self._pool_head()
        x = pool.attention.out_proj(attn_out)
        return x + pool.mlp(pool.layernorm(x))


# ---- text towers --------------------------------------------------------------------------------------
class HFTextTower(SequenceTextTower):
    """CLIPTextModel (causal, EOT pooling, projection) or the SigLIP text model (no causal mask,
    the last position of the padded sequence, a linear head)."""

    module: CLIPTextModel | SiglipTextModel | Siglip2TextModel
    model: HFModel

    def __init__(self, model: HFModel, kind: str):
        super().__init__(model.text_model)
        self.model, self.kind = model, kind
        self.causal = kind == "CLIPModel"
        self.family = (
            "HF CLIP text transformer (causal, EOT pooling)"
            if self.causal
            else "HF SigLIP text transformer (non-causal, last-token pooling)"
        )

    @property
    def width(self) -> int:
        return int(self.module.config.hidden_size)

    def encode(self, tokens: Tensor) -> Tensor:
        return _features(self.model.get_text_features(input_ids=tokens))

    def token_embedding(self, tokens: Tensor) -> Tensor:
        return self.module.embeddings.token_embedding(tokens)

    def embed(self, token_embeds: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor | None]:
        length = token_embeds.shape[1]
        x = token_embeds + self.module.embeddings.position_embedding.weight[:length]
        if not self.causal:
            return x, None
        return x, torch.full((length, length), float("-inf"), device=x.device, dtype=x.dtype).triu(1)

    def blocks(self) -> list[BlockView]:
        return _block_views(self.module.encoder.layers)

    def pool_index(self, tokens: Tensor) -> Tensor:
        if not self.causal:
            return torch.full_like(tokens[:, 0], tokens.shape[1] - 1)
        eos = cast("CLIPTextModel", self.module).eos_token_id
        if eos == 2:  # legacy configs: EOT is the largest id
            return tokens.argmax(dim=-1)
        if not isinstance(eos, int):
            raise ValueError(f"HF CLIP text config eos_token_id={eos!r}: EOT pooling needs one token id")
        return (tokens == eos).int().argmax(dim=-1)

    def head(self, x: Tensor, pool_index: Tensor) -> Tensor:
        pooled = self.module.final_layer_norm(x[torch.arange(x.shape[0], device=x.device), pool_index])
        if self.causal:
            return cast("CLIPModel", self.model).text_projection(pooled)
        return cast("SiglipTextModel | Siglip2TextModel", self.module).head(pooled)

    def trims_padding(self) -> bool:
        return self.causal


class HFCLIPBackbone(Backbone):
    """Backbone over a transformers ``CLIPModel``, ``SiglipModel`` or ``Siglip2Model``.

    Without a tokenizer the open_clip CLIP BPE tokenizer is used (same vocabulary, offline) when
    the text vocabulary has 49408 entries; SigLIP's need `tokenizer=` (or a local hub cache).
    """

    def __init__(
        self, model: nn.Module, tokenizer: TextTokenizer | None = None, preprocess_cfg: PreprocessCfg | None = None
    ):
        kind = _kind(model)
        hf_model = cast("HFModel", model)  # _kind refused any other class
        vision, text = HFVisionTower(hf_model, kind), HFTextTower(hf_model, kind)
        tcfg = text.module.config
        if tokenizer is None:
            if tcfg.vocab_size != CLIP_BPE_VOCAB:
                raise ValueError(
                    f"text vocab size {tcfg.vocab_size} is not the CLIP BPE's {CLIP_BPE_VOCAB}: "
                    "pass tokenizer= (the model's own, e.g. AutoTokenizer.from_pretrained(<id>))"
                )
            tokenizer = ClipBPETokenizer(tcfg.max_position_embeddings)
        if preprocess_cfg is None:
            clip = kind == "CLIPModel"
            preprocess_cfg = (
                PreprocessCfg(vision.image_size) if clip else PreprocessCfg(vision.image_size, SIGLIP_MEAN, SIGLIP_STD)
            )
        if kind == "CLIPModel":
            embed_dim = cast("CLIPModel", hf_model).projection_dim
            assert embed_dim is not None  # CLIPModel built its projections with it
        else:
            embed_dim = cast("SiglipTextModel | Siglip2TextModel", text.module).head.out_features
        super().__init__(model, tokenizer, preprocess_cfg, vision, text, int(embed_dim))
