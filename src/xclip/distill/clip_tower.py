"""An open_clip ViT image tower in xclip's checkpoint format (e.g. the shipped tiny CLIP,
``xclip:tiny-shapes``) as a Hugging Face ``CLIPVisionModel``: the same network, weights renamed
(open_clip's fused ``in_proj`` split into q/k/v), so a pretrained CLIP tower serves as the image
tower of a Teacher/Student model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file


def xclip_clip_directory(spec: str) -> Path:
    """The folder of ``xclip:<name>`` (under the repository's ``checkpoints/``) or of a path."""
    if spec.startswith("xclip:"):
        from xclip.backbones import checkpoints_dir

        root = checkpoints_dir()
        if root is None:
            raise FileNotFoundError(f"{spec}: no checkpoints/ directory found; set XCLIP_CHECKPOINTS")
        return root / spec.removeprefix("xclip:")
    return Path(spec).expanduser()


def is_openclip_checkpoint(path: Path) -> bool:
    config = path / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("architecture") == "openclip"


def clip_vision_config(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``CLIPVisionConfig`` fields of an open_clip ``model_cfg`` (a plain ViT tower)."""
    v = model_cfg["vision_cfg"]
    unsupported = sorted(set(v) - {"image_size", "patch_size", "width", "layers", "head_width", "mlp_ratio"})
    if unsupported:
        raise ValueError(f"open_clip vision_cfg fields {unsupported} have no CLIPVisionModel equivalent")
    width, head_width = int(v["width"]), int(v.get("head_width", 64))
    return {
        "model_type": "clip_vision_model",
        "image_size": int(v["image_size"]),
        "patch_size": int(v["patch_size"]),
        "hidden_size": width,
        "num_hidden_layers": int(v["layers"]),
        "num_attention_heads": width // head_width,
        "intermediate_size": int(width * float(v.get("mlp_ratio", 4.0))),
        "hidden_act": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "layer_norm_eps": 1e-5,
    }


def clip_vision_state_dict(openclip_state: dict[str, torch.Tensor], layers: list[int]) -> dict[str, torch.Tensor]:
    """open_clip ``visual.*`` weights renamed to a ``CLIPVisionModel`` state dict (fp32), keeping
    the transformer blocks `layers` (in that order; block ``layers[i]`` becomes layer i)."""
    s = {k.removeprefix("visual."): v.float() for k, v in openclip_state.items() if k.startswith("visual.")}
    out = {
        "embeddings.class_embedding": s["class_embedding"],
        "embeddings.patch_embedding.weight": s["conv1.weight"],
        "embeddings.position_embedding.weight": s["positional_embedding"],
        "pre_layrnorm.weight": s["ln_pre.weight"],
        "pre_layrnorm.bias": s["ln_pre.bias"],
        "post_layernorm.weight": s["ln_post.weight"],
        "post_layernorm.bias": s["ln_post.bias"],
    }
    for i, source in enumerate(layers):
        src, dst = f"transformer.resblocks.{source}.", f"encoder.layers.{i}."
        for part, w, b in zip("qkv", s[src + "attn.in_proj_weight"].chunk(3), s[src + "attn.in_proj_bias"].chunk(3)):
            out[f"{dst}self_attn.{part}_proj.weight"], out[f"{dst}self_attn.{part}_proj.bias"] = w, b
        pairs = {
            "attn.out_proj": "self_attn.out_proj",
            "ln_1": "layer_norm1",
            "ln_2": "layer_norm2",
            "mlp.c_fc": "mlp.fc1",
            "mlp.c_proj": "mlp.fc2",
        }
        for oc_name, hf_name in pairs.items():
            for kind in ("weight", "bias"):
                out[f"{dst}{hf_name}.{kind}"] = s[f"{src}{oc_name}.{kind}"]
    return out


def load_clip_vision_tower(spec: str, layers: list[int] | None = None):
    """(a ``CLIPVisionModel`` with the checkpoint's image tower, its preprocessing mean and std).

    `layers`: keep only these transformer blocks (e.g. ``[0, 2, 4]``: every other block, the
    DistilBERT way of initialising a shallower student from its teacher); None keeps all."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    path = xclip_clip_directory(spec)
    if not is_openclip_checkpoint(path):
        raise FileNotFoundError(
            f"vision tower {spec!r}: {path.absolute()} is not an xclip open_clip checkpoint "
            "(config.json with architecture 'openclip' + model.safetensors)"
        )
    config = json.loads((path / "config.json").read_text())
    fields = clip_vision_config(config["model_cfg"])
    depth = fields["num_hidden_layers"]
    layers = list(range(depth)) if layers is None else [int(i) for i in layers]
    if not layers or any(not 0 <= i < depth for i in layers):
        raise ValueError(f"{spec}: layers must be block indices in [0, {depth}), got {layers}")
    fields["num_hidden_layers"] = len(layers)
    model = CLIPVisionModel(CLIPVisionConfig(**{k: v for k, v in fields.items() if k != "model_type"}))
    state = clip_vision_state_dict(load_file(str(path / "model.safetensors")), layers)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in model.state_dict()) else ""
    missing, unexpected = model.load_state_dict({prefix + k: v for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{spec}: converting the open_clip tower left missing {missing} / unexpected {unexpected}")
    preprocess = config.get("preprocess", {})
    return model, list(preprocess.get("mean", (0.5,) * 3)), list(preprocess.get("std", (0.5,) * 3))
