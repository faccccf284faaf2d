"""Small random-init instances of open_clip architectures, built offline (tests, the support matrix).

`reduced_openclip(arch)` builds ``arch`` from open_clip's own registry config with its width, depth
and input size cut down (the same classes, pooling, masks and tokenizer interface; just small):
open_clip towers through their config, timm towers through their entry point with smaller
arguments, and Hugging Face text towers (RoBERTa, XLM-R, mT5, NLLB) from small ``transformers``
configs instead of the hub's. `offline_tokenizer` stands in for tokenizers that need a download.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypedDict

import open_clip
import torch
from torch import nn

SIDE_PATCHES = 4  # reduced inputs are 4 x 4 patches of the arch's own patch size (64 px for strided towers)
WIDTH = 32

# timm entry-point module -> arguments that shrink it (the rest of the arch's own args stay)
_TIMM_REDUCTIONS: dict[str, dict[str, Any]] = {
    "timm.models.vision_transformer": dict(embed_dim=WIDTH * 2, depth=2, num_heads=2),
    "timm.models.eva": dict(embed_dim=WIDTH * 2, depth=2, num_heads=2),
    "timm.models.vision_transformer_relpos": dict(embed_dim=WIDTH * 2, depth=2, num_heads=2),
    "timm.models.vision_transformer_hybrid": dict(depth=1),  # the conv stem fixes the width
    "timm.models.vitamin": dict(depth=1),  # the MbConv stages fix the width
    "timm.models.convnext": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
    "timm.models.fastvit": dict(layers=(1, 1, 1, 1), embed_dims=(32, 32, 64, 64)),
    "timm.models.swin_transformer": dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), window_size=2),
}


def _timm_entry_module(name: str) -> str:
    import timm.models._registry as registry

    return registry._model_entrypoints[name].__module__


def _input_side(cfg: dict) -> int:
    v = cfg["vision_cfg"]
    name = v.get("timm_model_name")
    if name is None:
        if isinstance(v.get("layers"), (list, tuple)):
            return 64  # ModifiedResNet: stride 32
        return SIDE_PATCHES * int(v.get("patch_size", 16))
    module = _timm_entry_module(name)
    if module in ("timm.models.vision_transformer", "timm.models.eva", "timm.models.vision_transformer_relpos"):
        import re

        match = re.search(r"patch(\d+)", name)
        return SIDE_PATCHES * int(match.group(1)) if match else 64
    if module == "timm.models.swin_transformer":
        return 64
    return 64


def reduced_config(arch: str) -> dict:
    """open_clip's config of `arch` with small towers (width, depth, input size, embedding)."""
    cfg = copy.deepcopy(open_clip.get_model_config(arch))
    if cfg is None:
        raise ValueError(f"unknown open_clip architecture {arch!r}")
    side = _input_side(cfg)
    v = cfg["vision_cfg"]
    # a timm trunk without projection ("none") outputs its own width as the embedding
    cfg["embed_dim"] = WIDTH * 2 if v.get("timm_proj") == "none" else WIDTH
    v["image_size"] = side
    if v.get("timm_model_name") is None:
        if isinstance(v.get("layers"), (list, tuple)):
            v.update(layers=[1, 1, 1, 1], width=8)
        else:
            v.update(layers=2, width=WIDTH * 2, head_width=WIDTH)
            v.pop("heads", None)
            if v.get("attentional_pool"):
                v["attn_pooler_heads"] = 2
                v["attn_pooler_queries"] = min(int(v.get("attn_pooler_queries", 256)), 8)
    t = cfg["text_cfg"]
    if t.get("hf_model_name") is None:
        # a text tower without projection outputs its own width as the embedding
        t.update(width=cfg["embed_dim"] if t.get("proj_type") == "none" else WIDTH, heads=2, layers=2)
        t.pop("mlp_ratio", None)
        if t.get("vocab_size", 49408) != 49408:
            t["vocab_size"] = OFFLINE_VOCAB_SIZE  # the offline stand-in tokenizer's
    else:
        t["hf_model_pretrained"] = False
    if "multimodal_cfg" in cfg:
        cfg["multimodal_cfg"].update(width=WIDTH, heads=2, layers=1)
        if cfg["multimodal_cfg"].get("vocab_size", 49408) != 49408:
            cfg["multimodal_cfg"]["vocab_size"] = OFFLINE_VOCAB_SIZE
    return cfg


@contextmanager
def _small_builders(cfg: dict) -> Iterator[None]:
    """timm.create_model and transformers' AutoConfig made small while open_clip builds `cfg`."""
    from open_clip import hf_model, timm_model

    create = timm_model.timm.create_model
    side = cfg["vision_cfg"]["image_size"]

    def small_create(name: str, **kwargs):
        module = _timm_entry_module(name)
        if module not in _TIMM_REDUCTIONS:
            raise NotImplementedError(f"no reduced build for the timm model {name} ({module})")
        kwargs.update(_TIMM_REDUCTIONS[module])
        if module in ("timm.models.eva",):
            kwargs.setdefault("ref_feat_shape", (side // _patch(name), side // _patch(name)))
        if module not in ("timm.models.convnext", "timm.models.fastvit"):
            kwargs["img_size"] = side
        return create(name, **kwargs)

    class SmallAutoConfig:
        @staticmethod
        def from_pretrained(name: str, **_: Any):
            return small_hf_text_config(name)

    timm_model.timm.create_model = small_create
    saved = hf_model.AutoConfig
    hf_model.AutoConfig = SmallAutoConfig
    try:
        yield
    finally:
        timm_model.timm.create_model = create
        hf_model.AutoConfig = saved


def _patch(name: str) -> int:
    import re

    match = re.search(r"patch(\d+)", name)
    return int(match.group(1)) if match else 16


def small_hf_text_config(name: str):
    """A small transformers config of the model family behind a hub name (offline)."""
    from transformers import M2M100Config, MT5Config, RobertaConfig, XLMRobertaConfig

    ids = offline_special_ids("t5" if "mt5" in name else "xlmr")
    if "mt5" in name:
        return MT5Config(
            d_model=WIDTH,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_decoder_layers=1,
            num_heads=2,
            decoder_start_token_id=ids["pad_token_id"],
            vocab_size=OFFLINE_VOCAB_SIZE,
            **ids,
        )
    if "nllb" in name:
        return M2M100Config(
            d_model=WIDTH,
            encoder_layers=2,
            decoder_layers=1,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=64,
            decoder_ffn_dim=64,
            max_position_embeddings=128,
            vocab_size=OFFLINE_VOCAB_SIZE,
            **ids,
        )
    if "xlm-roberta" in name:
        return XLMRobertaConfig(
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=80,
            vocab_size=OFFLINE_VOCAB_SIZE,
            **ids,
        )
    if "roberta" in name:
        return RobertaConfig(
            hidden_size=WIDTH,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=80,
            vocab_size=OFFLINE_VOCAB_SIZE,
            **ids,
        )
    raise NotImplementedError(f"no small config for the Hugging Face text tower {name!r}")


def reduced_openclip(arch: str, seed: int = 0) -> nn.Module:
    """A small random-init eval-mode instance of open_clip's `arch` (see the module docstring)."""
    cfg = reduced_config(arch)
    torch.manual_seed(seed)
    overrides = {k: cfg[k] for k in ("embed_dim", "vision_cfg", "text_cfg", "multimodal_cfg") if k in cfg}
    with _small_builders(cfg):
        model = open_clip.create_model(arch, pretrained=None, pretrained_hf=False, **overrides)
    return model.eval()


HF_CLASSES = ("CLIPModel", "SiglipModel", "Siglip2Model")

# one architecture per family of towers, reduced for the family tests and the support matrix
# ("hf:<class>": a transformers model of that class)
FAMILIES = {
    "openai-vit": "ViT-B-32",
    "siglip": "ViT-B-16-SigLIP",
    "pe-core": "PE-Core-B-16",
    "eva02": "EVA02-B-16",
    "eva02-postnorm": "EVA02-E-14",
    "mobileclip-vit": "MobileCLIP-B",
    "mobileclip-fastvit": "MobileCLIP-S1",
    "convnext": "convnext_base",
    "swin": "swin_base_patch4_window7_224",
    "vitamin": "ViTamin-S",
    "resnet": "RN50",
    "coca": "coca_ViT-B-32",
    "clipa": "ViT-H-14-CLIPA",
    "worldwide-eos": "ViT-L-14-worldwide",
    "roberta-text": "roberta-ViT-B-32",
    "mt5-text": "mt5-base-ViT-B-32",
    "nllb-text-siglip": "nllb-clip-base-siglip",
    "hf-clip": "hf:CLIPModel",
    "hf-siglip": "hf:SiglipModel",
    "hf-siglip2": "hf:Siglip2Model",
}


def reduced_hf(kind: str, seed: int = 0) -> tuple[nn.Module, Any]:
    """A small random-init transformers ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model`` (eval
    mode) and a tokenizer for it (None: the CLIP BPE, offline; SigLIP's: `offline_tokenizer`)."""
    import transformers

    if kind not in HF_CLASSES:
        raise ValueError(f"kind must be one of {HF_CLASSES}, got {kind!r}")
    torch.manual_seed(seed)
    text = dict(
        hidden_size=WIDTH,
        intermediate_size=2 * WIDTH,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
    )
    vision = dict(
        patch_size=8, hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=2, num_attention_heads=2
    )
    if kind == "CLIPModel":
        clip_config = transformers.CLIPConfig(
            text_config={**text, "vocab_size": 49408}, vision_config={**vision, "image_size": 32}, projection_dim=16
        )
        return transformers.CLIPModel(clip_config).eval(), None
    ids = offline_special_ids("siglip")
    special = dict(
        vocab_size=OFFLINE_VOCAB_SIZE,
        pad_token_id=ids["pad_token_id"],
        eos_token_id=ids["eos_token_id"],
        bos_token_id=None,
    )
    config: transformers.SiglipConfig | transformers.Siglip2Config
    if kind == "SiglipModel":
        config = transformers.SiglipConfig(text_config={**text, **special}, vision_config={**vision, "image_size": 32})
    else:
        config = transformers.Siglip2Config(
            text_config={**text, **special}, vision_config={**vision, "num_patches": 16}
        )
    return getattr(transformers, kind)(config).eval(), offline_tokenizer("siglip")


# ---- an offline stand-in for tokenizers that need a download -------------------------------------
_WORDS = (
    "a photo of the an and that with on in red green blue yellow purple orange circle square triangle star "
    "cross heart left right above below big small two three one background water sky sand grass $ cat dog "
    "is are it this picture"
).split()
OFFLINE_VOCAB_SIZE = 4 + len(_WORDS) + 4
# kind -> (the four special tokens in id order, the template, the pad token): the real tokenizers'
# conventions (SigLIP: "</s>" appended and padded with; T5/mT5: "<pad>" = 0, "</s>" = 1;
# BERT-style (CLIPA): start and end tokens; XLM-R / XLM-V / NLLB: "<s>" = 0, "<pad>" = 1, "</s>" = 2)
_KINDS = {
    "siglip": (["<pad>", "</s>", "<unk>", "<s>"], "$A </s>", "</s>"),
    "t5": (["<pad>", "</s>", "<unk>", "<s>"], "$A </s>", "<pad>"),
    "bert": (["<pad>", "</s>", "<unk>", "<s>"], "<s> $A </s>", "<pad>"),
    "xlmr": (["<s>", "<pad>", "</s>", "<unk>"], "<s> $A </s>", "<pad>"),
}


class SpecialIds(TypedDict):
    """The special token ids of a transformers config."""

    pad_token_id: int
    eos_token_id: int
    bos_token_id: int


def offline_special_ids(kind: str) -> SpecialIds:
    """pad / eos / bos ids of an offline stand-in kind."""
    specials, _, pad = _KINDS[kind]
    return {
        "pad_token_id": specials.index(pad),
        "eos_token_id": specials.index("</s>"),
        "bos_token_id": specials.index("<s>"),
    }


def offline_tokenizer(kind: str = "siglip"):
    """A transformers fast tokenizer built in memory with the interface of the real one it stands
    for (see `_KINDS`: which special tokens it adds and pads with, at which ids). A word-level
    vocabulary of ShapesWorld's words; unknown words map to ``<unk>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if kind not in _KINDS:
        raise ValueError(f"kind must be one of {sorted(_KINDS)}, got {kind!r}")
    specials, template, pad = _KINDS[kind]
    vocab = {w: i for i, w in enumerate(specials + list(_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    used = [t for t in ("<s>", "</s>") if t in template]
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[(t, vocab[t]) for t in used])
    extra = {"bos_token": "<s>", "cls_token": "<s>", "sep_token": "</s>"} if "<s>" in template else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token=pad, unk_token="<unk>", **extra)


def offline_tokenizer_kind(arch: str) -> str | None:
    """Which stand-in `arch`'s tokenizer needs, or None when it is the CLIP BPE (offline already)."""
    t = open_clip.get_model_config(arch)["text_cfg"]
    name = str(t.get("hf_tokenizer_name") or t.get("hf_model_name") or "")
    if not name and t.get("vocab_size", 49408) == 49408:
        return None
    if "mt5" in name:
        return "t5"
    if "bert-base" in name:
        return "bert"
    if "xlm" in name or "roberta" in name or "nllb" in name:
        return "xlmr"
    return "siglip"


def offline_tokenizer_for(arch: str):
    """The offline stand-in for `arch`'s tokenizer, or None when it is the CLIP BPE."""
    kind = offline_tokenizer_kind(arch)
    return None if kind is None else offline_tokenizer(kind)
