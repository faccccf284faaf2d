"""Building backbones from spec strings, wrapping built models, and the xclip checkpoint format.

Specs: ``openclip:<arch>[/<tag or weights file>]``, ``hf:<hub id or dir>``, ``xclip:<name>`` (a
directory under ``checkpoints/``) or a local directory. Pretrained weights that are missing from
the local caches fail within seconds when the hub is unreachable, with a download hint.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import weakref
from difflib import get_close_matches
from pathlib import Path
from typing import Optional, Union
from urllib.parse import urlparse

import open_clip
import torch
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_directory
from .base import Backbone, PreprocessCfg, TextTokenizer
from .openclip import ClipBPETokenizer, OpenCLIPBackbone, openclip_tokenizer

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PROBE_TIMEOUT_S = 2.0
_TRUE = {"1", "ON", "YES", "TRUE"}
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt", ".npz")


class OfflineWeightsError(RuntimeError):
    """Pretrained weights are not cached locally and cannot be downloaded now."""


# ---- public entry points -----------------------------------------------------------------
def load_backbone(spec: str, device: Union[str, torch.device] = "cpu") -> Backbone:
    """Build a backbone from a spec string (see module docstring); returned in eval mode."""
    scheme, _, ref = spec.partition(":")
    if scheme == "openclip":
        backbone = _load_openclip(ref)
    elif scheme == "hf":
        backbone = _load_hf(ref)
    elif scheme == "xclip":
        backbone = load_checkpoint(_named_checkpoint(ref))
    else:
        backbone = _load_local(spec)
    backbone.spec = spec
    return backbone.to(device).eval()


_SHARED: "weakref.WeakValueDictionary[str, Backbone]" = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


def shared_backbone(spec: str) -> Backbone:
    """The process's frozen, eval-mode backbone for `spec`, loaded on first use.

    Evaluation modules load their backbone through it, so the members of an ``EvaluationSuite``
    (or any modules alive in one process) that name the same spec hold one model object: loaded
    once, moved once, in memory once. It lives as long as a module holds it. Never train or edit
    it in place: `load_backbone` gives a private copy for that.
    """
    with _SHARED_LOCK:
        backbone = _SHARED.get(spec)
        if backbone is None:
            backbone = load_backbone(spec)
            backbone.requires_grad_(False)
            _SHARED[spec] = backbone
        return backbone


def resolve_backbone(backbone: Union[str, Backbone]) -> tuple[Backbone, str]:
    """``(backbone, spec)`` for a module argument: a spec string is loaded with `shared_backbone`;
    a `Backbone` object is used as given (its ``spec`` if it has one, else its class name)."""
    if isinstance(backbone, Backbone):
        return backbone, getattr(backbone, "spec", None) or type(backbone).__name__
    if not isinstance(backbone, str):
        raise TypeError(f"backbone must be a spec string (e.g. 'xclip:tiny-shapes') or an xclip Backbone, "
                        f"got {type(backbone).__name__}")
    return shared_backbone(backbone), backbone


def wrap_model(
    model: nn.Module,
    tokenizer: Optional[object] = None,
    preprocess_cfg: Union[PreprocessCfg, dict, None] = None,
) -> Backbone:
    """Wrap a built open_clip CLIP/CustomTextCLIP or transformers CLIPModel (mode unchanged).

    ``tokenizer`` may be an open_clip SimpleTokenizer, a transformers tokenizer, or an object
    following :class:`~xclip.backbones.base.TextTokenizer`; default: the CLIP BPE.
    """
    if isinstance(preprocess_cfg, dict):
        preprocess_cfg = PreprocessCfg.from_dict(preprocess_cfg)
    if isinstance(model, (CLIP, CustomTextCLIP)):
        context_length = model.context_length
        return OpenCLIPBackbone(model, _adapt_tokenizer(tokenizer, context_length), preprocess_cfg)
    if type(model).__module__.startswith("transformers."):
        from .hf import HFCLIPBackbone

        context_length = model.config.text_config.max_position_embeddings
        return HFCLIPBackbone(model, _adapt_tokenizer(tokenizer, context_length), preprocess_cfg)
    if type(model).__module__.startswith("open_clip."):
        raise NotImplementedError(f"xclip backbones do not support open_clip {type(model).__name__} models")
    raise TypeError(f"cannot wrap {type(model).__name__}: expected an open_clip CLIP or a transformers CLIPModel")


def checkpoints_dir() -> Optional[Path]:
    """Root of named checkpoints: $XCLIP_CHECKPOINTS, else the first ``checkpoints/`` found
    walking up from the installed package (the repository's ``checkpoints/``)."""
    env = os.environ.get("XCLIP_CHECKPOINTS")
    if env:
        return Path(env).expanduser()
    for parent in Path(__file__).resolve().parents:
        if (parent / "checkpoints").is_dir():
            return parent / "checkpoints"
    return None


def is_checkpoint_dir(path: Union[str, Path]) -> bool:
    """Whether `path` is a directory holding an xclip checkpoint (config.json or model.safetensors)."""
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME))


def save_checkpoint(
    model: nn.Module,
    model_cfg: dict,
    preprocess_cfg: Union[PreprocessCfg, dict],
    context_length: int,
    path: Union[str, Path],
    dtype: torch.dtype = torch.float16,
    overwrite: bool = False,
) -> Path:
    """Write an open_clip CLIP as ``path/{config.json, model.safetensors}``; float tensors are
    stored as ``dtype``.

    Atomic: everything is written into a temporary sibling directory first. An existing checkpoint
    at `path` is replaced only with ``overwrite=True``; it is moved aside as a backup
    (``.<name>.backup-<id>``) and deleted only once the new directory is in place, so a crash
    leaves either the old or the new weights, never half of either. Other files in `path` (the
    model card, notes) are carried over.

    Raises:
        FileExistsError: `path` already holds a checkpoint and `overwrite` is False.
    """
    path = Path(path).expanduser()
    if is_checkpoint_dir(path) and not overwrite:
        raise FileExistsError(f"{path} already holds a checkpoint ({CONFIG_NAME} / {WEIGHTS_NAME}); export "
                              "somewhere else, or pass overwrite=True to replace it on purpose")
    if isinstance(preprocess_cfg, dict):
        preprocess_cfg = PreprocessCfg.from_dict(preprocess_cfg)
    config = {
        "architecture": "openclip",
        "model_cfg": model_cfg,
        "preprocess": preprocess_cfg.to_dict(),
        "tokenizer": {"context_length": int(context_length)},
    }
    config_text = json.dumps(config, indent=2)  # fail before touching the disk if not serialisable
    tensors = {
        k: (v.to(dtype) if v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in model.state_dict().items()
    }
    with atomic_directory(path) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(config_text)
    return path


def _read_json(file: Path) -> dict:
    """A JSON object from `file`; a corrupt file is an error naming it."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file}: not valid JSON ({err}); restore the file or re-export the checkpoint") from None
    if not isinstance(data, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(data).__name__}")
    return data


def load_checkpoint(path: Union[str, Path]) -> Backbone:
    """Load an xclip checkpoint directory (weights cast to fp32) as an eval-mode backbone.

    Every problem names the file: a missing or corrupt ``config.json`` / ``model.safetensors``,
    missing config keys, weights that do not fit the configured architecture.
    """
    path = Path(path).expanduser()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / name).is_file():
            raise FileNotFoundError(
                f"{path / name} not found: an xclip checkpoint is a directory with {CONFIG_NAME} + {WEIGHTS_NAME}"
            )
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    config = _read_json(config_file)
    if config.get("architecture") != "openclip":
        raise ValueError(f"{config_file}: unsupported architecture {config.get('architecture')!r}")
    missing = [k for k in ("model_cfg", "preprocess", "tokenizer") if k not in config]
    if missing:
        raise ValueError(f"{config_file}: missing key(s) {missing}")
    try:
        model = CLIP(**config["model_cfg"])
    except TypeError as err:
        raise ValueError(f"{config_file}: model_cfg does not describe an open_clip CLIP ({err})") from None
    try:
        tensors = load_file(str(weights_file))
    except Exception as err:  # safetensors raises its own error types for corrupt headers/data
        raise ValueError(f"{weights_file}: cannot read the weights ({err}); the file is truncated or corrupt: "
                         "restore it or re-export the checkpoint") from None
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights_file}: the weights do not fit the architecture in {config_file} ({err})") from None
    context_length = config["tokenizer"]["context_length"]
    if context_length != model.context_length:
        raise ValueError(f"{config_file}: tokenizer context_length {context_length} != model's {model.context_length}")
    preprocess_cfg = PreprocessCfg.from_dict(config["preprocess"])
    backbone = OpenCLIPBackbone(model, ClipBPETokenizer(context_length), preprocess_cfg, model_cfg=config["model_cfg"])
    return backbone.eval()


# ---- spec handlers -----------------------------------------------------------------------
def _load_openclip(ref: str) -> Backbone:
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
                "(use %s-quickgelu to silence this)", arch, weights, weights, arch,
            )
            model_cfg["quick_gelu"] = True
        file = _cached_openclip_weights(arch, weights, pretrained_cfg)
        preprocess = {k: pretrained_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained_cfg}
        model = open_clip.create_model(
            arch, pretrained=file, force_quick_gelu=model_cfg.get("quick_gelu", False), force_preprocess_cfg=preprocess
        )
    else:
        file = Path(weights).expanduser()
        if file.is_file():
            model = open_clip.create_model(arch, pretrained=str(file))
        elif _looks_like_path(weights) or "/" in weights:
            raise FileNotFoundError(f"openclip:{ref}: weights file {file} does not exist")
        else:
            raise ValueError(
                f"openclip:{ref}: {weights!r} is neither a pretrained tag of {arch} nor an existing file; "
                f"tags for {arch}: {open_clip.list_pretrained_tags_by_model(arch)} (see open_clip.list_pretrained())"
            )
    tokenizer = openclip_tokenizer(arch, model.context_length)
    return OpenCLIPBackbone(model, tokenizer, model_cfg=model_cfg)


def _load_hf(ref: str) -> Backbone:
    from transformers import CLIPModel, CLIPTokenizerFast

    from .hf import HFCLIPBackbone, HFTokenizerAdapter

    local_dir = Path(ref).expanduser()
    if local_dir.is_dir():
        source, local_only = str(local_dir), True
    elif _looks_like_path(ref) or ref.count("/") > 1:
        raise FileNotFoundError(f"hf:{ref}: directory {local_dir.absolute()} does not exist")
    else:
        source, local_only = ref, _hf_repo_cached(ref)
        if not local_only:
            _ensure_online(
                f"hf:{ref}: the model files are not in the local Hugging Face cache ({hf_constants.HF_HUB_CACHE}) "
                f"and there is no local directory {ref!r}",
                f"Download them on a connected machine with `hf download {ref}` and copy that machine's "
                f"Hugging Face cache here (set HF_HUB_CACHE if it lives elsewhere), or save the model with "
                f"CLIPModel.save_pretrained(dir) and CLIPTokenizerFast.save_pretrained(dir) and pass hf:/path/to/dir.",
                _hub_address(),
            )
    model = CLIPModel.from_pretrained(source, attn_implementation="eager", local_files_only=local_only)
    text_cfg = model.config.text_config
    try:
        hf_tokenizer = CLIPTokenizerFast.from_pretrained(source, local_files_only=local_only)
        problem = "" if len(hf_tokenizer) == text_cfg.vocab_size else f"{len(hf_tokenizer)} tokens"
    except (OSError, ValueError, TypeError) as err:
        problem = str(err)
    if problem:
        # transformers 5 builds a near-empty tokenizer instead of failing when the files are absent.
        log.warning("hf:%s: no usable tokenizer (%s); using the CLIP BPE tokenizer shipped with open_clip", ref, problem)
        tokenizer = None
    else:
        tokenizer = HFTokenizerAdapter(hf_tokenizer, text_cfg.max_position_embeddings)
    return HFCLIPBackbone(model, tokenizer, _hf_preprocess(source, model.config.vision_config.image_size))


def _load_local(spec: str) -> Backbone:
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{spec!r}: no such file or directory ({path}); expected an xclip checkpoint directory, "
            "or a spec starting with openclip:, hf: or xclip:"
        )
    config_file = path / CONFIG_NAME
    if config_file.is_file() and "model_type" in _read_json(config_file):
        return _load_hf(str(path))  # a transformers save_pretrained directory
    return load_checkpoint(path)


def checkpoint_path(spec: str | Path) -> Path:
    """The folder of a checkpoint spec: ``"xclip:<name>"`` -> the shipped ``checkpoints/<name>``
    (an error naming the available ones and the recipes if missing); anything else is a path."""
    spec = str(spec)
    return _named_checkpoint(spec.removeprefix("xclip:")) if spec.startswith("xclip:") else Path(spec).expanduser()


def _named_checkpoint(name: str) -> Path:
    root = checkpoints_dir()
    if root is None:
        raise FileNotFoundError(
            f"xclip:{name}: no checkpoints/ directory found above the xclip package; set XCLIP_CHECKPOINTS"
        )
    path = root / name
    if not path.is_dir():
        available = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
        close = get_close_matches(name, available, n=1)
        guess = f"; did you mean xclip:{close[0]}?" if close else ""
        raise FileNotFoundError(
            f"xclip:{name}: no checkpoint {path} (available in {root}: {available}{guess}). Each shipped "
            "checkpoint's README.md gives the recipe that made it (configs/<recipe>.yaml, run with `xclip fit`; "
            "e.g. configs/pretrain_tiny_shapes*.yaml for tiny-shapes); a fit exports into its run's log directory "
            "(runs/<name>/version_N/model): pass that directory as the backbone spec, or point "
            "XCLIP_CHECKPOINTS at a directory holding the checkpoint"
        )
    return path


def _adapt_tokenizer(tokenizer: Optional[object], context_length: int) -> Optional[TextTokenizer]:
    if tokenizer is None or all(hasattr(tokenizer, a) for a in ("sot_id", "eot_id", "decode_tokens")):
        return tokenizer
    if isinstance(tokenizer, SimpleTokenizer):
        return ClipBPETokenizer(context_length, tokenizer)
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # open_clip's HFTokenizer wraps a transformers one
    if hasattr(inner, "convert_ids_to_tokens"):
        from .hf import HFTokenizerAdapter

        return HFTokenizerAdapter(inner, context_length)
    raise TypeError(f"unsupported tokenizer {type(tokenizer).__name__}")


# ---- caches and the network --------------------------------------------------------------
def _cached_openclip_weights(arch: str, tag: str, pretrained_cfg: dict) -> str:
    """Local file of an open_clip pretrained tag; downloads only if the hub is reachable."""
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
    _ensure_online(
        f"openclip:{arch}/{tag}: the pretrained weights are not in the local cache",
        "Download them on a connected machine: " + ", or ".join(sources)
        + f"; or pass the weights file directly: openclip:{arch}//path/to/{filename}",
        _hub_address() if hub else _url_address(url),
    )
    return open_clip.download_pretrained(pretrained_cfg)


def _safetensors_alternatives(filename: str) -> list[str]:
    if filename == HF_WEIGHTS_NAME:
        return [HF_SAFE_WEIGHTS_NAME]
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors"]
    return []


def _hf_repo_cached(repo: str) -> bool:
    """config.json and a weights file of a hub model are in the local cache."""
    if not isinstance(try_to_load_from_cache(repo, "config.json"), str):
        return False
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
    return any(isinstance(try_to_load_from_cache(repo, w), str) for w in weights)


def _hf_preprocess(source: str, image_size: int) -> PreprocessCfg:
    """mean/std from preprocessor_config.json when available locally, else OpenAI's."""
    file = Path(source) / "preprocessor_config.json" if Path(source).is_dir() else try_to_load_from_cache(
        source, "preprocessor_config.json"
    )
    if isinstance(file, (str, Path)) and Path(file).is_file():
        cfg = json.loads(Path(file).read_text())
        if "image_mean" in cfg and "image_std" in cfg:
            return PreprocessCfg(image_size, tuple(cfg["image_mean"]), tuple(cfg["image_std"]))
    return PreprocessCfg(image_size)


def _hub_address() -> tuple[str, int]:
    return _url_address(hf_constants.ENDPOINT)


def _url_address(url: str) -> tuple[str, int]:
    parsed = urlparse(url)
    return parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)


def _ensure_online(problem: str, hint: str, address: tuple[str, int]) -> None:
    """Return if ``address`` answers within PROBE_TIMEOUT_S, else raise OfflineWeightsError.

    $XCLIP_PROBE_HOST (host:port) overrides the address, an https proxy replaces it (that is
    what downloads would connect to), and HF_HUB_OFFLINE / XCLIP_OFFLINE skip the probe.
    """
    if any(os.environ.get(k, "").strip().upper() in _TRUE for k in ("HF_HUB_OFFLINE", "XCLIP_OFFLINE")):
        reason = "offline mode is set (HF_HUB_OFFLINE or XCLIP_OFFLINE)"
    else:
        override = os.environ.get("XCLIP_PROBE_HOST")
        proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
        if override:
            host, _, port = override.rpartition(":")
            if not (host and port.isdigit()):
                raise ValueError(f"XCLIP_PROBE_HOST must be host:port, got {override!r}")
            address = (host, int(port))
        elif proxy:
            address = _url_address(proxy)
        if _reachable(address):
            return
        reason = f"{address[0]}:{address[1]} is unreachable"
    raise OfflineWeightsError(f"{problem}, and {reason}.\n{hint}")


def _reachable(address: tuple[str, int]) -> bool:
    """TCP connect within PROBE_TIMEOUT_S; run in a thread so slow DNS cannot stretch it."""
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection(address, timeout=PROBE_TIMEOUT_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT_S + 0.5)
    return bool(result and result[0])


def _looks_like_path(ref: str) -> bool:
    return ref.startswith(("/", ".", "~")) or ref.endswith(_WEIGHT_SUFFIXES)
