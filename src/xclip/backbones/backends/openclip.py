"""The ``openclip`` backend: ``openclip:<arch>`` (random init, offline), ``openclip:<arch>/<tag>``
(a pretrained tag, from the local cache or downloaded when the hub answers) and
``openclip:<arch>//<weights file>``; `wrap_model` of any built open_clip model."""

from __future__ import annotations

import logging
import os
from difflib import get_close_matches
from pathlib import Path

from torch import nn

from ..base import Backbone, PreprocessCfg
from ..network import ensure_online, hub_address, url_address
from ..registry import Backend, register_backend

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt", ".npz")


def looks_like_path(ref: str) -> bool:
    """A spec reference that is meant as a file or directory (not a tag or hub id)."""
    return ref.startswith(("/", ".", "~")) or ref.endswith(_WEIGHT_SUFFIXES)


def load_openclip(ref: str) -> Backbone:
    """``<arch>[/<tag or weights file>]`` -> an `OpenCLIPBackbone` with the arch's tokenizer."""
    import open_clip

    from ..openclip import OpenCLIPBackbone, openclip_tokenizer, text_context_length

    arch, _, weights = ref.partition("/")
    if arch not in open_clip.list_models():
        close = get_close_matches(arch, open_clip.list_models(), n=5)
        raise ValueError(
            f"unknown open_clip architecture {arch!r} (close matches: {close}); see open_clip.list_models() "
            "for architectures and open_clip.list_pretrained() for (architecture, tag) pairs"
        )
    model_cfg = open_clip.get_model_config(arch)
    if not weights:
        model = open_clip.create_model(arch)
    elif pretrained_cfg := open_clip.get_pretrained_cfg(arch, weights):
        if pretrained_cfg.get("quick_gelu", False) and not model_cfg.get("quick_gelu", False):
            # open_clip only warns and builds GELU; weights trained with QuickGELU then drift.
            log.warning(
                "openclip:%s/%s: the %r weights were trained with QuickGELU; building with force_quick_gelu=True "
                "(use %s-quickgelu to silence this)",
                arch,
                weights,
                weights,
                arch,
            )
            model_cfg["quick_gelu"] = True
        file = _cached_weights(arch, weights, pretrained_cfg)
        preprocess = {
            k: pretrained_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained_cfg
        }
        model = open_clip.create_model(
            arch, pretrained=file, force_quick_gelu=model_cfg.get("quick_gelu", False), force_preprocess_cfg=preprocess
        )
    else:
        weights_file = Path(weights).expanduser()
        if weights_file.is_file():
            model = open_clip.create_model(arch, pretrained=str(weights_file))
        elif looks_like_path(weights) or "/" in weights:
            raise FileNotFoundError(f"openclip:{ref}: weights file {weights_file} does not exist")
        else:
            raise ValueError(
                f"openclip:{ref}: {weights!r} is neither a pretrained tag of {arch} nor an existing file; "
                f"tags for {arch}: {open_clip.list_pretrained_tags_by_model(arch)} (see open_clip.list_pretrained())"
            )
    tokenizer = openclip_tokenizer(arch, text_context_length(model))
    return OpenCLIPBackbone(model, tokenizer, model_cfg=model_cfg)


def _cached_weights(arch: str, tag: str, pretrained_cfg: dict) -> str:
    """Local file of an open_clip pretrained tag; downloads only if the hub is reachable."""
    import open_clip
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import try_to_load_from_cache
    from open_clip.constants import HF_WEIGHTS_NAME

    if pretrained_cfg.get("file"):
        return pretrained_cfg["file"]
    hub, url = pretrained_cfg.get("hf_hub", ""), pretrained_cfg.get("url", "")
    repo, filename = os.path.split(hub)
    filename = filename or HF_WEIGHTS_NAME
    if hub:
        for name in _safetensors_alternatives(filename) + [filename]:
            hit = try_to_load_from_cache(repo, name)
            if isinstance(hit, str):
                return hit
    url_cache = Path("~/.cache/clip").expanduser()
    if url and (url_cache / os.path.basename(url)).is_file():
        return str(url_cache / os.path.basename(url))
    sources = []
    if hub:
        sources.append(
            f"`hf download {repo} {filename}` and copy that machine's Hugging Face cache "
            f"({hf_constants.HF_HUB_CACHE}) here (set HF_HUB_CACHE if it lives elsewhere)"
        )
    if url:
        sources.append(f"{url} into {url_cache}/")
    ensure_online(
        f"openclip:{arch}/{tag}: the pretrained weights are not in the local cache",
        "Download them on a connected machine: "
        + ", or ".join(sources)
        + f"; or pass the weights file directly: openclip:{arch}//path/to/{filename}",
        hub_address() if hub else url_address(url),
    )
    return open_clip.download_pretrained(pretrained_cfg)


def _safetensors_alternatives(filename: str) -> list[str]:
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def _claims_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("open_clip.")


def _wrap(model: nn.Module, tokenizer: object | None, preprocess_cfg: PreprocessCfg | None) -> Backbone:
    from ..openclip import OpenCLIPBackbone, adapt_tokenizer, text_context_length

    return OpenCLIPBackbone(model, adapt_tokenizer(tokenizer, text_context_length(model)), preprocess_cfg)


register_backend(
    Backend(
        scheme="openclip",
        load=load_openclip,
        describe="openclip:<arch>[/<tag or weights file>]",
        claims_model=_claims_model,
        wrap=_wrap,
    )
)
