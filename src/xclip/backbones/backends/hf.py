"""The ``hf`` backend: ``hf:<hub id>`` (from the local Hugging Face cache, or downloaded when the
hub answers), ``hf:<dir>`` and local ``save_pretrained`` directories; `wrap_model` of a built
transformers model. transformers is imported only when this backend is used."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from torch import nn

from ..base import Backbone, PreprocessCfg
from ..network import ensure_online, hub_address
from ..registry import Backend, register_backend
from .openclip import looks_like_path

log = logging.getLogger(__name__)


def load_hf(ref: str) -> Backbone:
    """``<hub id or dir>`` -> an HF backbone (model class from the config, its tokenizer if usable)."""
    from huggingface_hub import constants as hf_constants
    from transformers import (  # type: ignore[attr-defined]  # CLIPTokenizerFast: a runtime-only alias in transformers 5
        AutoConfig,
        AutoTokenizer,
        CLIPModel,
        CLIPTokenizerFast,
        Siglip2Model,
        SiglipModel,
    )

    from ..hf import HFCLIPBackbone
    from ..tokenizers import HFTokenizerAdapter

    local_dir = Path(ref).expanduser()
    if local_dir.is_dir():
        source, local_only = str(local_dir), True
    elif looks_like_path(ref) or ref.count("/") > 1:
        raise FileNotFoundError(f"hf:{ref}: directory {local_dir.absolute()} does not exist")
    else:
        source, local_only = ref, _repo_cached(ref)
        if not local_only:
            ensure_online(
                f"hf:{ref}: the model files are not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}) "
                f"and there is no local directory {ref!r}",
                f"Download them on a connected machine with `hf download {ref}` and copy that machine's "
                f"Hugging Face cache here (set HF_HUB_CACHE if it lives elsewhere), or save the model with "
                f"CLIPModel.save_pretrained(dir) and CLIPTokenizerFast.save_pretrained(dir) and pass hf:/path/to/dir.",
                hub_address(),
            )
    model_type = AutoConfig.from_pretrained(source, local_files_only=local_only).model_type
    classes: dict[str, type[CLIPModel | SiglipModel | Siglip2Model]] = {
        "clip": CLIPModel,
        "siglip": SiglipModel,
        "siglip2": Siglip2Model,
    }
    if model_type not in classes:
        raise ValueError(
            f"hf:{ref}: model_type {model_type!r} is not a CLIP family xclip wraps (supported: {sorted(classes)})"
        )
    model = classes[model_type].from_pretrained(source, attn_implementation="eager", local_files_only=local_only)
    text_cfg = model.text_model.config
    if model_type == "clip":
        try:
            hf_tokenizer = CLIPTokenizerFast.from_pretrained(source, local_files_only=local_only)
            problem = "" if len(hf_tokenizer) == text_cfg.vocab_size else f"{len(hf_tokenizer)} tokens"
        except (OSError, ValueError, TypeError) as err:
            problem = str(err)
        if problem:
            # transformers 5 builds a near-empty tokenizer instead of failing when the files are absent.
            log.warning(
                "hf:%s: no usable tokenizer (%s); using the CLIP BPE tokenizer shipped with open_clip", ref, problem
            )
            tokenizer = None
        else:
            tokenizer = HFTokenizerAdapter(hf_tokenizer, text_cfg.max_position_embeddings)
    else:  # SigLIP's tokenizers have no offline stand-in: their files must be there
        if not _has_tokenizer_files(source, local_only):
            raise ValueError(
                f"hf:{ref}: no usable tokenizer (no tokenizer files next to the model); save the model's "
                "tokenizer with save_pretrained into the same directory, or wrap_model(model, tokenizer)"
            )
        hf_tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        if len(hf_tokenizer) > text_cfg.vocab_size:
            raise ValueError(
                f"hf:{ref}: no usable tokenizer: it has {len(hf_tokenizer)} tokens, the text tower "
                f"{text_cfg.vocab_size}"
            )
        tokenizer = HFTokenizerAdapter(hf_tokenizer, text_cfg.max_position_embeddings)
    backbone = HFCLIPBackbone(model, tokenizer)
    return HFCLIPBackbone(model, tokenizer, _preprocess(source, backbone.preprocess_cfg))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model")


def _has_tokenizer_files(source: str, local: bool) -> bool:
    from huggingface_hub import try_to_load_from_cache

    if Path(source).is_dir():
        return any((Path(source) / f).is_file() for f in TOKENIZER_FILES)
    return any(isinstance(try_to_load_from_cache(source, f), str) for f in TOKENIZER_FILES)


def _repo_cached(repo: str) -> bool:
    """config.json and a weights file of a hub model are in the local cache."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return False
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, w), str) for w in weights)


def _preprocess(source: str, default: PreprocessCfg) -> PreprocessCfg:
    """mean/std from preprocessor_config.json when available locally, else the family's default."""
    from huggingface_hub import try_to_load_from_cache

    file = (
        Path(source) / "preprocessor_config.json"
        if Path(source).is_dir()
        else try_to_load_from_cache(source, "preprocessor_config.json")
    )
    if isinstance(file, (str, Path)) and Path(file).is_file():
        cfg = json.loads(Path(file).read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return PreprocessCfg(default.image_size, tuple(cfg["image_mean"]), tuple(cfg["image_std"]))
    return default


def _claims_path(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return "model_type" in json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return False


def _claims_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("transformers.")


def _wrap(model: nn.Module, tokenizer: object | None, preprocess_cfg: PreprocessCfg | None) -> Backbone:
    from ..hf import HFCLIPBackbone, text_context_length
    from ..tokenizers import adapt_tokenizer

    return HFCLIPBackbone(model, adapt_tokenizer(tokenizer, text_context_length(model)), preprocess_cfg)


register_backend(
    Backend(
        scheme="hf",
        load=load_hf,
        describe="hf:<hub id or save_pretrained dir>",
        load_path=lambda path: load_hf(str(path)),
        claims_path=_claims_path,
        claims_model=_claims_model,
        wrap=_wrap,
    )
)
