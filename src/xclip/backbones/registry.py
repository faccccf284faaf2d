"""The backend registry: `load_backbone` and `wrap_model` dispatch through it.

A backend is one module under ``xclip/backbones/backends/`` that calls `register_backend` with a
`Backend`: its spec scheme (``openclip``, ``hf``, ``xclip``) and loader, optionally the local paths
it recognises and the built models it wraps. Adding a backend = adding its module name to
`BACKEND_MODULES`; nothing here or in the other backends changes. The modules are imported on first
use (the HF backend imports transformers only when an HF spec or model is actually used).
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xclip.io import stranded_backups
from xclip.model_folder import missing_folder_error

from .base import Backbone, PreprocessCfg

# registration order = the order local paths and built models are offered to the backends
BACKEND_MODULES: tuple[str, ...] = (
    "xclip.backbones.backends.xclip_checkpoint",
    "xclip.backbones.backends.openclip",
    "xclip.backbones.backends.hf",
)


@dataclass(frozen=True)
class Backend:
    """One way of making a backbone.

    Attributes:
        scheme: the spec prefix it answers (``"<scheme>:<ref>"``).
        load: ``ref -> Backbone`` for its own specs.
        load_path: ``path -> Backbone`` for a local path it recognises (None: it loads none).
        claims_path: whether a local path is one of its formats (checked before `load_path`).
        claims_model: whether a built model is one it wraps (cheap: no heavy imports).
        wrap: ``(model, tokenizer or None, PreprocessCfg or None) -> Backbone``.
        describe: one line for error messages (what its specs look like).
    """

    scheme: str
    load: Callable[[str], Backbone]
    describe: str
    load_path: Callable[[Path], Backbone] | None = None
    claims_path: Callable[[Path], bool] | None = None
    claims_model: Callable[[nn.Module], bool] | None = None
    wrap: Callable[[nn.Module, Any, PreprocessCfg | None], Backbone] | None = None


_REGISTRY: dict[str, Backend] = {}
_LOADED = False
_LOCK = threading.RLock()


def register_backend(backend: Backend) -> Backend:
    """Add a backend (its module calls this at import); a scheme can be registered once."""
    with _LOCK:
        if backend.scheme in _REGISTRY and _REGISTRY[backend.scheme] is not backend:
            raise ValueError(f"a backend for scheme {backend.scheme!r} is already registered")
        _REGISTRY[backend.scheme] = backend
    return backend


def backends() -> list[Backend]:
    """Every registered backend, in registration order (importing `BACKEND_MODULES` once)."""
    global _LOADED
    with _LOCK:
        if not _LOADED:
            for module in BACKEND_MODULES:
                importlib.import_module(module)
            _LOADED = True
        return list(_REGISTRY.values())


def load_backbone(spec: str, device: str | torch.device = "cpu") -> Backbone:
    """Build a backbone from a spec string, returned in eval mode on `device`.

    ``openclip:<arch>[/<tag or weights file>]``, ``hf:<hub id or dir>``, ``xclip:<name>`` (a
    directory under ``checkpoints/``) or a local directory (an xclip checkpoint or a transformers
    ``save_pretrained`` directory). Pretrained weights missing from the local caches fail within
    seconds when the hub is unreachable, with a download hint.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a backbone spec is a string such as 'xclip:tiny-shapes', got {type(spec).__name__}")
    scheme, sep, ref = spec.partition(":")
    by_scheme = {b.scheme: b for b in backends()}
    if sep and scheme in by_scheme:
        backbone = by_scheme[scheme].load(ref)
    else:
        backbone = _load_local(spec)
    backbone.spec = spec
    return backbone.to(device).eval()


def _load_local(spec: str) -> Backbone:
    path = Path(spec).expanduser()
    if not path.exists():
        if stranded_backups(path):  # an export was killed after moving this folder aside
            raise missing_folder_error(path)
        kinds = "; ".join(b.describe for b in backends())
        raise FileNotFoundError(
            f"{spec!r}: no such file or directory ({path}); expected an xclip checkpoint "
            f"directory (or a save_pretrained one), or a spec with a known scheme ({kinds})"
        )
    candidates = [(b, b.load_path) for b in backends() if b.load_path is not None]
    for backend, load_path in candidates:
        if backend.claims_path is not None and backend.claims_path(path):
            return load_path(path)
    # nothing recognised the directory: the fallback backend (the first that loads paths) names the problem
    return candidates[0][1](path)


def wrap_model(
    model: nn.Module, tokenizer: object | None = None, preprocess_cfg: PreprocessCfg | dict | None = None
) -> Backbone:
    """Wrap an already-built model (mode unchanged): any open_clip model of its registry or a
    transformers ``CLIPModel`` / ``SiglipModel`` / ``Siglip2Model``.

    ``tokenizer`` may be an open_clip tokenizer, a transformers tokenizer, or an object following
    :class:`~xclip.backbones.base.TextTokenizer`; default: the model's own where it is offline (the
    CLIP BPE), else an error saying what to pass.
    """
    if isinstance(preprocess_cfg, dict):
        preprocess_cfg = PreprocessCfg.from_dict(preprocess_cfg)
    for backend in backends():
        if backend.claims_model is not None and backend.wrap is not None and backend.claims_model(model):
            return backend.wrap(model, tokenizer, preprocess_cfg)
    kinds = [b.scheme for b in backends() if b.claims_model is not None]
    raise TypeError(
        f"cannot wrap {type(model).__name__}: no backend ({', '.join(kinds)}) takes it; expected an "
        "open_clip model or a transformers CLIPModel / SiglipModel / Siglip2Model"
    )


_SHARED: weakref.WeakValueDictionary[str, Backbone] = weakref.WeakValueDictionary()
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


def resolve_backbone(backbone: str | Backbone) -> tuple[Backbone, str]:
    """``(backbone, spec)`` for a module argument: a spec string is loaded with `shared_backbone`;
    a `Backbone` object is used as given (its ``spec`` if it has one, else its class name)."""
    if isinstance(backbone, Backbone):
        return backbone, getattr(backbone, "spec", None) or type(backbone).__name__
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone must be a spec string (e.g. 'xclip:tiny-shapes') or an xclip Backbone, "
            f"got {type(backbone).__name__}"
        )
    return shared_backbone(backbone), backbone
