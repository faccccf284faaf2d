"""Image and text towers of the Teacher/Student models: any Hugging Face ``transformers`` vision or
BERT-family text model, built from a hub id (real use) or from a small config (offline: tests and
ShapesWorld), pooled the right way for its kind, with its feature size read from its config.

Pooling, per ``model_type``:

- MobileViT (v1 and v2), CLIP / SigLIP vision towers: ``pooler_output`` (MobileViT's
  ``last_hidden_state`` is a ``[B, C, h, w]`` feature map: ``[:, 0]`` would be channel 0, the
  reference project's defect);
- ViT, DeiT, DINOv2: the [CLS] row ``last_hidden_state[:, 0]``;
- any other vision model: ``pooler_output`` when its output is a feature map, else the [CLS] row;
- text (BERT, DistilBERT, RoBERTa, ...): the [CLS] row, or the masked mean (``text_pooling="mean"``);
  SigLIP's text tower (no [CLS]: use ``"mean"``) runs from token embeddings through its own
  embeddings, blocks and final norm, so SHAP / Captum reach its tokens too.

A tower spec is a hub id or ``save_pretrained`` folder (``"google/vit-base-patch16-224"``,
``"apple/mobilevit-small"``, ``"prajjwal1/bert-mini"``), an xclip open_clip checkpoint for the image
tower (``"xclip:tiny-shapes"``, or ``{"clip_checkpoint": "xclip:tiny-shapes", "layers": [0, 2, 4]}`` to
keep some of its blocks: converted to a ``CLIPVisionModel``), or a config dict with ``model_type`` and
that config's fields (``{"model_type": "vit", "image_size": 64, "patch_size": 8, ...}``; vision
dicts may add ``image_mean`` / ``image_std``). Checkpoints store the resolved config dict, so a
model fine-tuned from the hub is rebuilt offline.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import try_to_load_from_cache
from torch import Tensor, nn

from xclip.distill.clip_tower import is_openclip_checkpoint, load_clip_vision_tower

if TYPE_CHECKING:
    from transformers import PreTrainedModel

VISION_POOLING = {
    "mobilevit": "pooler",
    "mobilevitv2": "pooler",
    "clip_vision_model": "pooler",
    "siglip_vision_model": "pooler",
    "vit": "cls",
    "deit": "cls",
    "dinov2": "cls",
}
# the towers' own poolers are never used: do not build them (no dead, untrained parameters)
NO_POOLER = {"vit", "deit", "bert", "roberta", "xlm-roberta", "camembert", "electra"}
# composite hub configs -> the tower class to take out of them
COMPOSITE = {"clip": ("CLIPVisionModel", "CLIPTextModel"), "siglip": ("SiglipVisionModel", "SiglipTextModel")}
# text models whose pooled output needs the token ids (no `inputs_embeds` path for SHAP)
TEXT_NEEDS_IDS = {"clip", "clip_text_model"}
# text models whose forward takes ids only: xclip runs their modules from token embeddings itself
EMBEDS_BY_MODULES = {"siglip_text_model"}
# tower configs AutoModel does not map to a class
TOWER_CLASSES = {"siglip_text_model": "SiglipTextModel"}


def ensure_hub_files(repo: str, what: str, filename: str = "config.json") -> bool:
    """True when `repo`'s `filename` is in the local Hugging Face cache (load with
    ``local_files_only``); otherwise check that the hub is reachable, and fail fast with what to
    download and where when it is not."""
    from huggingface_hub import constants

    from xclip.backbones.network import ensure_online, hub_address  # the backbones' offline probe

    if isinstance(try_to_load_from_cache(repo, filename), str):
        return True
    ensure_online(
        f"{what} {repo!r}: not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and no such local directory",
        f"Download it on a connected machine with `hf download {repo}` and copy the cache here (set "
        "HF_HUB_CACHE if it lives elsewhere), or pass a config dict with `model_type` to build the "
        "tower offline.",
        hub_address(),
    )
    return False


def _config_from_dict(spec: dict[str, Any]):
    from transformers import AutoConfig

    fields = {k: v for k, v in spec.items() if k not in ("model_type", "image_mean", "image_std", "flip_channel_order")}
    if "model_type" not in spec:
        raise ValueError(
            f"a tower config dict needs `model_type` (e.g. 'vit', 'mobilevit', 'bert'), got keys {sorted(spec)}"
        )
    return AutoConfig.for_model(spec["model_type"], **fields)


def _load_model(spec: str | dict[str, Any], kind: str) -> tuple[PreTrainedModel, str | None]:
    """(the tower's model, where it was loaded from: a folder or hub id, or None when built from a config)."""
    import transformers
    from transformers import AutoConfig, AutoModel

    if isinstance(spec, dict):
        config = _config_from_dict(spec)
        if config.model_type in TOWER_CLASSES:
            return getattr(transformers, TOWER_CLASSES[config.model_type])(config), None
        model = AutoModel.from_config(
            config, **({"add_pooling_layer": False} if config.model_type in NO_POOLER else {})
        )
        return model, None
    path = Path(spec).expanduser()
    if path.is_dir():
        source, local_only = str(path), True
    elif spec.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{kind} tower {spec!r}: no such directory ({path.absolute()})")
    else:
        source, local_only = spec, ensure_hub_files(spec, f"{kind} tower")
    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    if config.model_type in COMPOSITE:
        cls = getattr(transformers, COMPOSITE[config.model_type][0 if kind == "vision" else 1])
        return cls.from_pretrained(source, local_files_only=local_only), source
    if config.model_type in NO_POOLER:
        return AutoModel.from_pretrained(source, local_files_only=local_only, add_pooling_layer=False), source
    return AutoModel.from_pretrained(source, local_files_only=local_only), source


def _image_preprocessing(source: str | None, spec: str | dict[str, Any]) -> tuple[list[float], list[float], bool]:
    """(mean, std, flip RGB->BGR) of a tower: the dict's own fields, else the hub model's
    ``preprocessor_config.json`` (MobileViT: no normalisation, BGR input), else 0.5 / 0.5."""
    if isinstance(spec, dict):
        return (
            list(spec.get("image_mean", (0.5, 0.5, 0.5))),
            list(spec.get("image_std", (0.5, 0.5, 0.5))),
            bool(spec.get("flip_channel_order", False)),
        )
    assert source is not None  # _load_model names where a str spec was loaded from
    file = (
        Path(source) / "preprocessor_config.json"
        if Path(source).is_dir()
        else try_to_load_from_cache(source, "preprocessor_config.json")
    )
    if not (isinstance(file, (str, Path)) and Path(file).is_file()):
        return [0.5] * 3, [0.5] * 3, False
    cfg = json.loads(Path(file).read_text())
    normalise = cfg.get("do_normalize", "image_mean" in cfg)
    mean = list(cfg.get("image_mean", (0.0,) * 3)) if normalise else [0.0] * 3
    std = list(cfg.get("image_std", (1.0,) * 3)) if normalise else [1.0] * 3
    return mean, std, bool(cfg.get("do_flip_channel_order", False))


def feature_size(config) -> int:
    """The pooled feature width of a tower, read from its config."""
    if config.model_type == "mobilevit":
        return int(config.neck_hidden_sizes[-1])
    if config.model_type == "mobilevitv2":
        return _make_divisible(512 * config.width_multiplier)
    size = getattr(config, "hidden_size", None)
    if size is None:
        raise ValueError(
            f"cannot read the feature size of a {config.model_type!r} tower from its config (no hidden_size)"
        )
    return int(size)


def _make_divisible(value: float, divisor: int = 8) -> int:
    # MobileViTV2's channel rounding (transformers' make_divisible)
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return int(new + divisor if new < 0.9 * value else new)


@dataclass
class TowerOutput:
    """A tower's pooled features [B, F] and its token sequence [B, L, F] with a validity mask [B, L]."""

    pooled: Tensor
    tokens: Tensor
    mask: Tensor


class VisionTower(nn.Module):
    """An HF vision model: ``pixel_values(images01)`` normalises [0, 1] images the model's way;
    ``forward(pixel_values [B,3,H,W])`` -> `TowerOutput` (pooled [B, F], tokens [B, L, F])."""

    mean: Tensor  # [1, 3, 1, 1] buffers
    std: Tensor

    def __init__(self, spec: str | dict[str, Any]):
        super().__init__()
        if isinstance(spec, str) and (spec.startswith("xclip:") or is_openclip_checkpoint(Path(spec).expanduser())):
            spec = {"clip_checkpoint": spec}
        if isinstance(spec, dict) and "clip_checkpoint" in spec:  # an xclip open_clip CLIP's image tower
            self.model, mean, std = load_clip_vision_tower(spec["clip_checkpoint"], spec.get("layers"))
            flip = False
        else:
            self.model, source = _load_model(spec, "vision")
            mean, std, flip = _image_preprocessing(source, spec)
        config = self.model.config
        self.model_type = config.model_type
        self.pooling = VISION_POOLING.get(self.model_type, "auto")
        self.feature_size = feature_size(config)
        self.image_size = int(getattr(config, "image_size", 224))
        self.flip_channel_order = flip
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.config_dict = {
            **config.to_dict(),
            "image_mean": mean,
            "image_std": std,
            "flip_channel_order": self.flip_channel_order,
        }

    def pixel_values(self, images01: Tensor) -> Tensor:
        """[B, 3, H, W] floats in [0, 1] -> the model's input [B, 3, H, W]."""
        if images01.ndim != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ValueError(
                f"images must be float [B, 3, H, W] in [0, 1], got {images01.dtype} {tuple(images01.shape)}"
            )
        x = images01.flip(1) if self.flip_channel_order else images01
        return (x - self.mean) / self.std

    def forward(self, pixel_values: Tensor) -> TowerOutput:
        out = self.model(pixel_values=pixel_values)
        hidden = out.last_hidden_state
        if hidden.ndim == 4:  # a feature map [B, C, h, w] (MobileViT): its tokens are the positions
            tokens = hidden.flatten(2).transpose(1, 2)
        else:
            tokens = hidden
        if self.pooling == "pooler" or (self.pooling == "auto" and hidden.ndim == 4):
            if getattr(out, "pooler_output", None) is None:
                raise ValueError(f"{self.model_type} tower returned no pooler_output")
            pooled = out.pooler_output.reshape(hidden.shape[0], -1)
        else:
            pooled = hidden[:, 0]
        mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return TowerOutput(pooled, tokens, mask)


class TextTower(nn.Module):
    """An HF BERT-family text model. ``forward(input_ids, attention_mask)`` or, for gradient
    explanations over token embeddings, ``forward_embeds(token_embeds [B,T,D], attention_mask)``
    (token embeddings = ``word_embeddings(input_ids)``; position and type embeddings are added
    inside, as for ids). ``embedding_layer`` is the module whose output Captum's LayerIG attributes to."""

    model: PreTrainedModel

    def __init__(self, spec: str | dict[str, Any], pooling: str = "cls"):
        super().__init__()
        model_type = spec.get("model_type") if isinstance(spec, dict) else None
        if model_type in TEXT_NEEDS_IDS:
            raise ValueError(
                f"text tower {model_type!r}: its pooled output is read at token ids (no "
                "inputs_embeds path for gradient explanations); use a BERT-family model"
            )
        if pooling not in ("cls", "mean"):
            raise ValueError(f"text_pooling must be 'cls' or 'mean', got {pooling!r}")
        self.model, _ = _load_model(spec, "text")
        config = self.model.config
        if config.model_type in TEXT_NEEDS_IDS or not hasattr(self.model, "embeddings"):
            raise ValueError(
                f"text tower {config.model_type!r} is not a BERT-family encoder (it needs "
                "`embeddings` and an inputs_embeds path); use e.g. bert, distilbert or roberta"
            )
        self.model_type, self.pooling = config.model_type, pooling
        self.feature_size = feature_size(config)
        self.config_dict = config.to_dict()

    @property
    def word_embeddings(self) -> nn.Embedding:
        embeddings = self.model.get_input_embeddings()
        if not isinstance(embeddings, nn.Embedding):
            raise ValueError(
                f"text tower {self.model_type!r}: its input embeddings are a {type(embeddings).__name__}, "
                "not an nn.Embedding; use a BERT-family model"
            )
        return embeddings

    @property
    def embedding_layer(self) -> nn.Module:
        return self.model.get_submodule("embeddings")

    def embed(self, input_ids: Tensor) -> Tensor:
        """[B, T] ids -> [B, T, D] token embeddings (the input of `forward_embeds`)."""
        return self.word_embeddings(input_ids)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TowerOutput:
        return self._pool(
            self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state, attention_mask
        )

    def forward_embeds(self, token_embeds: Tensor, attention_mask: Tensor) -> TowerOutput:
        if self.model_type in EMBEDS_BY_MODULES:  # SigLIP: its forward insists on ids
            from transformers.masking_utils import create_bidirectional_mask

            m = self.model
            hidden = m.get_submodule("embeddings")(inputs_embeds=token_embeds)
            mask = create_bidirectional_mask(config=m.config, inputs_embeds=hidden, attention_mask=attention_mask)
            encoded = m.get_submodule("encoder")(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
            hidden = m.get_submodule("final_layer_norm")(encoded)
            return self._pool(hidden, attention_mask)
        return self._pool(
            self.model(inputs_embeds=token_embeds, attention_mask=attention_mask).last_hidden_state, attention_mask
        )

    def _pool(self, hidden: Tensor, attention_mask: Tensor) -> TowerOutput:
        mask = attention_mask.bool()
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            weights = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return TowerOutput(pooled, hidden, mask)
