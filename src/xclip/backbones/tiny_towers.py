"""timm entry points of xclip's own small image towers, so that an open_clip config names them
(``vision_cfg.timm_model_name``) like any timm model and `open_clip.model.CLIP(**cfg)` builds them.

Importing `xclip.backbones` registers them; the shipped ``checkpoints/tiny-shapes-siglip`` uses
``xclip_vit_siglip_shapes_64_reg4``.
"""

from __future__ import annotations

from functools import partial

from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, _create_vision_transformer
from torch import Tensor, nn

# timm looks these up by the entry point's module (no pretrained weights: random init only)
_SHAPES_CFG = {
    "input_size": (3, 64, 64),
    "num_classes": 0,
    "mean": (0.48145466, 0.4578275, 0.40821073),
    "std": (0.26862954, 0.26130258, 0.27577711),
}
default_cfgs = generate_default_cfgs(
    {"xclip_vit_siglip_shapes_64": _SHAPES_CFG, "xclip_vit_siglip_shapes_64_reg4": _SHAPES_CFG}
)


@register_model
def xclip_vit_siglip_shapes_64(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A SigLIP-style ViT for 64 x 64 ShapesWorld images: patch 8 (8 x 8 grid), width 192, 5 blocks,
    3 heads, no class token, pre-norm (as CLIP's ``ln_pre``, so a CLIP ViT trunk can warm-start it)
    and timm's ``map`` head (`AttentionPoolLatent`: one learned latent query over the patch tokens).

    Five blocks, not tiny-shapes' six: a CLIP ViT's last block is trained only through its class
    token, so its patch outputs carry no trained features; the warm start takes the first five
    blocks, whose outputs the sixth block's attention was trained to read, and the pool reads those."""
    args = dict(
        img_size=64,
        patch_size=8,
        embed_dim=192,
        depth=5,
        num_heads=3,
        class_token=False,
        global_pool="map",
        pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
    )
    return _create_vision_transformer("xclip_vit_siglip_shapes_64", pretrained=pretrained, **dict(args, **kwargs))


@register_model
def xclip_vit_siglip_shapes_64_reg4(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """`xclip_vit_siglip_shapes_64` with four register tokens (Darcet et al., ICLR 2024, "Vision
    Transformers Need Registers"): prefix tokens without position embeddings that the blocks can
    use as scratch space; the ``map`` head attends the patch tokens only."""
    args = dict(
        img_size=64,
        patch_size=8,
        embed_dim=192,
        depth=5,
        num_heads=3,
        class_token=False,
        reg_tokens=4,
        no_embed_class=True,
        global_pool="map",
        pre_norm=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-5),
    )
    return _create_vision_transformer("xclip_vit_siglip_shapes_64_reg4", pretrained=pretrained, **dict(args, **kwargs))


_BLOCK_NAMES = {
    "ln_1": "norm1",
    "ln_2": "norm2",
    "attn.in_proj_weight": "attn.qkv.weight",
    "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj": "attn.proj",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def timm_vit_state_from_openclip(state: dict[str, Tensor], cls_token: bool = False) -> dict[str, Tensor]:
    """An open_clip CLIP's ``visual.*`` ViT tensors renamed for a timm ViT trunk (``visual.trunk.*``,
    plus the tower's ``visual.head.proj``): patch embedding, positions (the class row dropped
    unless `cls_token`), ``ln_pre`` -> ``norm_pre``, the blocks, ``ln_post`` -> ``norm``, ``proj``
    -> ``head.proj.weight`` (transposed). Other keys are returned unchanged."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith("visual."):
            out[key] = value
            continue
        name = key.removeprefix("visual.")
        if name == "conv1.weight":
            out["visual.trunk.patch_embed.proj.weight"] = value
        elif name == "positional_embedding":
            out["visual.trunk.pos_embed"] = (value if cls_token else value[1:])[None]
        elif name == "class_embedding":
            if cls_token:
                out["visual.trunk.cls_token"] = value.view(1, 1, -1)
        elif name.startswith(("ln_pre.", "ln_post.")):
            out["visual.trunk." + name.replace("ln_pre", "norm_pre").replace("ln_post", "norm")] = value
        elif name == "proj":
            out["visual.head.proj.weight"] = value.T.contiguous()
        elif name.startswith("transformer.resblocks."):
            index, rest = name.removeprefix("transformer.resblocks.").split(".", 1)
            for old, new in _BLOCK_NAMES.items():
                if rest.startswith(old):
                    rest = new + rest[len(old) :]
                    break
            out[f"visual.trunk.blocks.{index}.{rest}"] = value
        else:
            out[key] = value
    return out
