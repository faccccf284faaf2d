"""open_clip ``TimmModel`` image towers: a timm trunk plus open_clip's head.

- `TimmViTTower`: timm ``VisionTransformer`` and ``Eva`` trunks: SigLIP / SigLIP 2 and PE-Core
  (``map``: `AttentionPoolLatent`, a learned latent query), EVA01 / EVA02, MobileCLIP-B and
  MobileCLIP2-L (class token; EVA's and PE's rotary embeddings are applied to q and k as the trunk
  does), ViTamin and ``vit_medium_patch16_gap`` (average).
- `TimmFeatureMapTower`: convolutional or windowed trunks pooled by a global average (ConvNeXt,
  FastViT / MobileCLIP-S, Swin): the last feature map is what Grad-CAM weighs.

Relative-position ViTs (``vit_relpos_*``) add a learned bias inside every attention: they load and
encode, and every map explainer refuses them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import torch
from torch import Tensor, nn

from .base import (
    BlockView,
    ImageTrace,
    PoolTrace,
    UnsupportedFamily,
    VisionTower,
    head_view,
)
from .sequence import SequenceVisionTower

if TYPE_CHECKING:
    from open_clip.timm_model import TimmModel
    from timm.models.convnext import ConvNeXt
    from timm.models.eva import Eva, EvaBlock, EvaBlockPostNorm
    from timm.models.fastvit import FastVit
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import Block, VisionTransformer


def _unsupported(what: str) -> UnsupportedFamily:
    return UnsupportedFamily(f"xclip backbones do not support timm image towers with {what}")


def _trunk_class(visual: nn.Module) -> str:
    trunk = getattr(visual, "trunk", None)
    return type(trunk).__name__ if trunk is not None else ""


def _is_timm_model(visual: nn.Module) -> bool:
    return type(visual).__name__ == "TimmModel" and type(visual).__module__.startswith("open_clip.")


def _side(size) -> int:
    return int(size[0]) if isinstance(size, (tuple, list)) else int(size)


# ---- timm attention and blocks ----------------------------------------------------------------------
def _num_heads(attn: nn.Module) -> int:
    heads = attn.num_heads
    if not isinstance(heads, int):
        raise _unsupported(f"a {type(attn).__name__} without an int num_heads")
    return heads


def _attention_qkv(attn: nn.Module, rope: Tensor | None) -> Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]:
    """q, k, v [N, L, W] of a timm ``Attention`` / ``EvaAttention`` / ``AttentionRope``, per-head norms
    and rotary embeddings applied exactly as the module does."""
    if getattr(attn, "gate", None) is not None:
        raise _unsupported("gated attention")
    if getattr(attn, "num_kv_groups", 1) > 1:
        raise _unsupported("grouped-query attention")
    heads = _num_heads(attn)
    npt = getattr(attn, "num_prefix_tokens", 0)
    half = getattr(attn, "rotate_half", False)

    def qkv(h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        from timm.layers import apply_rot_embed_cat

        n, length, _ = h.shape
        fused_proj = getattr(attn, "qkv", None)
        if fused_proj is not None:
            q_bias = getattr(attn, "q_bias", None)
            if q_bias is None:
                fused = fused_proj(h)
            else:
                bias = torch.cat((q_bias, attn.get_buffer("k_bias"), attn.get_parameter("v_bias")))
                fused = (
                    fused_proj(h) + bias
                    if getattr(attn, "qkv_bias_separate", False)
                    else nn.functional.linear(h, fused_proj.weight, bias)
                )
            q, k, v = fused.reshape(n, length, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            projections = (attn.get_submodule(name) for name in ("q_proj", "k_proj", "v_proj"))
            q, k, v = (head_view(p(h), heads) for p in projections)
        q, k = attn.get_submodule("q_norm")(q), attn.get_submodule("k_norm")(k)
        if rope is not None:
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2).type_as(v)
        q, k, v = (t.transpose(1, 2).reshape(n, length, -1) for t in (q, k, v))
        return q, k, v

    return qkv


def _scale(gamma: Tensor | None) -> Callable[[Tensor], Tensor]:
    return (lambda x: x) if gamma is None else (lambda x: gamma * x)


def timm_block_view(block: nn.Module, rope: Tensor | None) -> BlockView:
    """A timm ``Block``, ``EvaBlock`` or ``EvaBlockPostNorm`` as a view. A post-norm block
    (``x + norm1(attn(x))``, ``x + norm2(mlp(x))``, EVA02-E) is the same recompute with identity
    pre-norms and its norms in the residual branches' scale slots."""
    name = type(block).__name__
    if name not in ("Block", "EvaBlock", "EvaBlockPostNorm"):
        raise _unsupported(f"{name} blocks (only Block / EvaBlock / EvaBlockPostNorm)")
    attn = block.get_submodule("attn")
    heads = _num_heads(attn)
    identity = nn.Identity()

    def out_proj(a):
        return attn.proj(attn.norm(a))

    qkv = _attention_qkv(attn, rope)
    if name == "Block":
        vit_block = cast("Block", block)  # by its class name
        return BlockView(
            ln_1=vit_block.norm1,
            qkv=qkv,
            num_heads=heads,
            out_proj=out_proj,
            ls_1=vit_block.ls1,
            ln_2=vit_block.norm2,
            mlp=vit_block.mlp,
            ls_2=vit_block.ls2,
            native=lambda x, mask: block(x),
        )  # vision blocks run without a mask

    def native(x, mask):
        return block(x, rope=rope)

    if name == "EvaBlockPostNorm":
        post_norm = cast("EvaBlockPostNorm", block)  # by its class name
        return BlockView(
            ln_1=identity,
            qkv=qkv,
            num_heads=heads,
            out_proj=out_proj,
            ls_1=post_norm.norm1,
            ln_2=identity,
            mlp=post_norm.mlp,
            ls_2=post_norm.norm2,
            native=native,
        )
    eva_block = cast("EvaBlock", block)  # the remaining accepted class name
    return BlockView(
        ln_1=eva_block.norm1,
        qkv=qkv,
        num_heads=heads,
        out_proj=out_proj,
        ls_1=_scale(eva_block.gamma_1),
        ln_2=eva_block.norm2,
        mlp=eva_block.mlp,
        ls_2=_scale(eva_block.gamma_2),
        native=native,
    )


# ---- ViT / Eva trunks ---------------------------------------------------------------------------------
class TimmViTTower(SequenceVisionTower):
    """A timm ``VisionTransformer`` or ``Eva`` trunk (see the module docstring)."""

    module: TimmModel

    def __init__(self, visual: TimmModel, encode_fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__(visual, encode_fn)
        trunk: VisionTransformer | Eva = visual.trunk
        self.trunk = trunk
        self.eva = type(trunk).__name__ == "Eva"
        if any(
            isinstance(m, nn.Module) and type(m).__name__ in ("RotAttentionPool2d", "AttentionPool2d")
            for m in visual.head
        ):
            raise _unsupported("open_clip's custom attention pooling head")
        self.prefix = int(trunk.num_prefix_tokens)
        pool = getattr(trunk, "global_pool", "")
        if getattr(trunk, "attn_pool", None) is not None:
            ap = trunk.attn_pool
            if ap.pos_embed is not None or (ap.latent_len > 1 and ap.pool != "token"):
                raise _unsupported("an attention pool with position embeddings or averaged latent queries")
            self.pooling = "latent query"
            self.family = "SigLIP/PE-style ViT (latent-query attention pool)"
        elif pool == "token":
            self.pooling, self.family = "class token", f"{'EVA' if self.eva else 'timm'} ViT (class token)"
        elif pool == "avg":
            self.pooling, self.family = "average", "timm ViT (average pooling)"
        else:
            raise _unsupported(f"global_pool={pool!r}")
        self.blocks(self.grid_size)  # refuse unsupported blocks now, not at the first explanation

    @staticmethod
    def matches(visual: nn.Module) -> bool:
        return _is_timm_model(visual) and _trunk_class(visual) in ("VisionTransformer", "Eva")

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def image_size(self) -> int:
        return _side(self.module.image_size)

    @property
    def patch_size(self) -> int:
        return self.image_size // self.grid_size[0]

    @property
    def token_width(self) -> int:
        return int(self.trunk.embed_dim)

    def _rope(self, grid: tuple[int, int]) -> Tensor | None:
        rope = getattr(self.trunk, "rope", None)
        if rope is None:
            return None
        if getattr(self.trunk, "rope_mixed", False):
            raise _unsupported("depth-mixed rotary embeddings")
        return rope.get_embed() if hasattr(rope, "feat_shape") else rope.get_embed(shape=grid)

    def embed(self, images: Tensor, grid: tuple[int, int]) -> Tensor:
        t = self.trunk
        x = t.patch_embed(images)
        if self.eva:
            x, _ = t._pos_embed(x)
        else:
            x = t.patch_drop(t._pos_embed(x))
        return t.norm_pre(x)

    def blocks(self, grid: tuple[int, int]) -> list[BlockView]:
        rope = self._rope(grid) if self.eva else None
        return [timm_block_view(b, rope) for b in self.trunk.blocks]

    def _after_pool(self, x: Tensor) -> Tensor:
        t = self.trunk
        return self.module.head(t.head(t.head_drop(t.fc_norm(x))))

    def head(self, x: Tensor) -> Tensor:
        return self._after_pool(self.trunk.norm(x))

    def final_norm(self, x: Tensor) -> Tensor:
        return self.trunk.norm(x)

    def pooled_head(self, pooled: Tensor) -> Tensor:
        return self._after_pool(pooled)

    def _pool_includes_prefix(self) -> bool:
        return self.eva or bool(getattr(self.trunk, "pool_include_prefix", False))

    def pool_prefix(self) -> int:
        return self.prefix if self._pool_includes_prefix() else 0

    def pool_keys(self, tokens: Tensor) -> Tensor:
        return tokens if self._pool_includes_prefix() else tokens[:, self.prefix :]

    def pool_qkv(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ap = self.trunk.attn_pool
        n, length, _ = tokens.shape
        heads = ap.num_heads
        q = ap.q(ap.latent[:, :1]).reshape(1, 1, heads, -1).transpose(1, 2)  # [1, H, 1, dh]
        k, v = ap.kv(tokens).reshape(n, length, 2, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = ap.q_norm(q), ap.k_norm(k)
        return q[:, :, 0].expand(n, -1, -1), k, v

    def pool_tail(self, attn_out: Tensor) -> Tensor:
        ap = self.trunk.attn_pool
        x = ap.proj_drop(ap.proj(attn_out))
        if ap.mlp is not None:
            x = x + ap.mlp(ap.norm(x))
        return self._after_pool(x)


# ---- feature-map trunks -------------------------------------------------------------------------------
class TimmFeatureMapTower(VisionTower):
    """A timm trunk whose head is a global average pool of its last feature map followed by
    per-vector layers (ConvNeXt, FastViT / MobileCLIP-S, Swin): no pooling attention."""

    pooling = "average"
    module: TimmModel

    def __init__(self, visual: TimmModel, encode_fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__(visual, encode_fn)
        self.trunk: ConvNeXt | FastVit | SwinTransformer = visual.trunk
        name = type(self.trunk).__name__
        self.family = {"ConvNeXt": "ConvNeXt", "FastVit": "FastViT (MobileCLIP-S)", "SwinTransformer": "Swin"}.get(
            name, name
        ) + " (average pooling)"
        pool = getattr(getattr(self.trunk, "head", None), "global_pool", None)
        pool_type = getattr(pool, "pool_type", None)
        if pool_type != "avg":
            raise _unsupported(f"a {name} trunk whose head pools with {pool_type!r} (only a global average)")
        if any(type(m).__name__ in ("RotAttentionPool2d", "AttentionPool2d") for m in visual.head):
            raise _unsupported("open_clip's custom attention pooling head")
        self.channels_last = name == "SwinTransformer"

    @staticmethod
    def matches(visual: nn.Module) -> bool:
        return _is_timm_model(visual) and _trunk_class(visual) in ("ConvNeXt", "FastVit", "SwinTransformer")

    @property
    def image_size(self) -> int:
        return _side(self.module.image_size)

    @property
    def patch_size(self) -> int:
        reduction = self.trunk.feature_info[-1]["reduction"]  # timm types feature_info as dicts of objects
        if not isinstance(reduction, int):
            raise _unsupported(f"a {type(self.trunk).__name__} trunk whose last stage has no int reduction")
        return reduction

    @property
    def token_width(self) -> int:
        return int(self.trunk.num_features)

    def _to_map(self, tokens: Tensor, grid: tuple[int, int]) -> Tensor:
        x = tokens.unflatten(1, grid)  # [N, h, w, C]
        return x if self.channels_last else x.permute(0, 3, 1, 2)

    def _head(self, feature_map: Tensor) -> Tensor:
        return self.module.head(self.trunk.forward_head(feature_map))

    def _pooled_head(self, vectors: Tensor) -> Tensor:
        """The head on pooled vectors [..., C] (a 1 x 1 map's average is itself) -> [..., D]."""
        flat = vectors.reshape(-1, 1, 1, vectors.shape[-1])
        out = self._head(flat if self.channels_last else flat.permute(0, 3, 1, 2))
        return out.view(*vectors.shape[:-1], -1)

    def trace(self, images: Tensor, n_blocks: int) -> ImageTrace:
        feats = self.trunk.forward_features(images)
        if not self.channels_last:
            feats = feats.permute(0, 2, 3, 1)
        h, w = feats.shape[1:3]
        grid = (h, w)
        tokens = feats.flatten(1, 2)  # [N, h*w, C]

        def forward(t: Tensor) -> Tensor:
            return self._head(self._to_map(t, grid))

        return ImageTrace([], forward(tokens), tokens, grid, PoolTrace(tokens, 0, forward, None))

    def patch_features(self, trace: ImageTrace) -> Tensor:
        return self._pooled_head(trace.patch_tokens)

    def region_embedding(self, trace: ImageTrace, weights: Tensor) -> Tensor:
        w = weights.to(trace.patch_tokens.dtype)
        mean = torch.einsum("np,npc->nc", w, trace.patch_tokens) / w.sum(1, keepdim=True).clamp_min(1e-12)
        return self._pooled_head(mean)


class TimmEncodeOnlyTower(VisionTower):
    """A timm trunk xclip can encode with but not trace (relative-position ViTs and other trunks):
    encoding, retrieval and zero-shot work; map explainers and dense features are refused."""

    pooling = "untraced"
    module: TimmModel

    def __init__(self, visual: TimmModel, encode_fn: Callable[[Tensor], Tensor] | None = None):
        super().__init__(visual, encode_fn)
        self.family = f"timm {type(visual.trunk).__name__}"

    @staticmethod
    def matches(visual: nn.Module) -> bool:
        return _is_timm_model(visual)

    @property
    def has_attention_pool(self) -> bool:
        return False

    @property
    def image_size(self) -> int:
        return _side(self.module.image_size)

    @property
    def patch_size(self) -> int:
        info = getattr(self.module.trunk, "feature_info", None)
        return int(info[-1]["reduction"]) if info else self.image_size

    @property
    def token_width(self) -> int:
        return int(self.module.trunk.num_features)

    def _refuse(self, what: str) -> UnsupportedFamily:
        return UnsupportedFamily(
            f"{what} is not available for {self.family}: its attention adds a learned "
            "relative-position bias xclip does not recompute; use encode_image (retrieval, "
            "zero-shot, crop scores) or SHAP/Captum on the pixels"
        )

    def refusal(self, what: str, instead: str) -> UnsupportedFamily:
        return self._refuse(what)

    def trace(self, images: Tensor, n_blocks: int) -> ImageTrace:
        raise self._refuse("the traced forward (maps, dense features, NegAlign's CAM)")

    def patch_features(self, trace: ImageTrace) -> Tensor:
        raise self._refuse("dense patch features")

    def region_embedding(self, trace: ImageTrace, weights: Tensor) -> Tensor:
        raise self._refuse("region embeddings")


TIMM_TOWERS = [TimmViTTower, TimmFeatureMapTower, TimmEncodeOnlyTower]
