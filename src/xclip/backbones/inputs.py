"""Input checks at the places images and texts enter xclip (`Backbone.normalize`, `preprocess`,
`tokenize`, every explainer): what would silently give wrong numbers fails with one message that
says what to pass instead.

The input contract:
- images for `Backbone.normalize`: float tensors ``[N, 3, H, W]`` with values in [0, 1];
- model input (`normalize` / `preprocess` output) for encoders and explainers: float
  ``[N, 3, H, W]``, finite, near the range normalisation of [0, 1] images produces (0-255 images
  are hundreds of units outside it);
- texts: non-empty strings with at least one non-space character.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

RANGE_TOLERANCE = 1e-3  # resampling can overshoot [0, 1] by rounding; more is a wrong value range


def _layout(images: Tensor, name: str) -> None:
    if not isinstance(images, Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor [N, 3, H, W], got {type(images).__name__}: load images with "
            "xclip.data.images.read_rgb and pass them through backbone.preprocess"
        )
    if images.ndim == 3 and images.shape[0] == 3:
        raise ValueError(f"{name} is one image [3, H, W]; pass a batch [N, 3, H, W] ({name}[None] for one image)")
    if images.ndim != 4:
        raise ValueError(f"{name} must be [N, 3, H, W], got shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        if images.shape[-1] == 3:
            raise ValueError(
                f"{name} has shape {tuple(images.shape)}: channels last [N, H, W, 3]; xclip takes "
                f"channels first [N, 3, H, W]: pass {name}.permute(0, 3, 1, 2)"
            )
        raise ValueError(f"{name} must have 3 (RGB) channels in dim 1, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(
            f"{name} has dtype {images.dtype}; pass float images in [0, 1] (for uint8 0-255 images: "
            f"{name}.float() / 255)"
        )
    finite = torch.isfinite(images)
    if not bool(finite.all()):
        bad = sorted({int(i) for i in (~finite).flatten(1).any(1).nonzero().flatten()})
        raise ValueError(f"{name} holds NaN or infinite values (images {bad[:10]}{' ...' if len(bad) > 10 else ''})")


def check_images01(images: Tensor, name: str = "images01") -> None:
    """Float ``[N, 3, H, W]`` in [0, 1], finite (see the module docstring)."""
    _layout(images, name)
    if images.numel():
        lo, hi = float(images.min()), float(images.max())
        if lo < -RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            hint = " (0-255 values: divide by 255)" if hi > 2 else ""
            raise ValueError(f"{name} values span [{lo:.4g}, {hi:.4g}]; pass float images in [0, 1]{hint}")


def check_model_input(images: Tensor, mean: Sequence[float], std: Sequence[float], name: str = "images") -> None:
    """Normalised model input: float ``[N, 3, H, W]``, finite, and within what normalising [0, 1]
    images with `mean` / `std` can produce (catches 0-255 images passed without normalisation)."""
    _layout(images, name)
    if images.numel():
        m = torch.tensor(mean, dtype=torch.float64)
        s = torch.tensor(std, dtype=torch.float64)
        lo_ok, hi_ok = float(((0 - m) / s).min()), float(((1 - m) / s).max())
        # generous: resampling overshoot, synthetic N(0, 1) inputs and other normalisations pass;
        # 0-255 images (normalised or not) land hundreds of units away
        margin = 8.0
        lo, hi = float(images.min()), float(images.max())
        if lo < lo_ok - margin or hi > hi_ok + margin:
            raise ValueError(
                f"{name} values span [{lo:.4g}, {hi:.4g}], outside what normalised [0, 1] images give "
                f"([{lo_ok:.3g}, {hi_ok:.3g}]): pass model input, i.e. backbone.normalize(images01) of "
                "float images in [0, 1], or backbone.preprocess(pil_images)"
            )


def check_texts(texts: Sequence[str], name: str = "texts") -> list[str]:
    """`texts` as a list of non-blank strings (a bare string is an error, not its characters)."""
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, got the single string {texts!r}: wrap it in a list")
    texts = list(texts)
    bad_type = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad_type:
        raise TypeError(f"{name}[{bad_type[0]}] is a {type(texts[bad_type[0]]).__name__}, not a string")
    blank = [i for i, t in enumerate(texts) if not t.strip()]
    if blank:
        raise ValueError(
            f"{name} {blank[:10]}{' ...' if len(blank) > 10 else ''} are empty or whitespace only: "
            "a blank text has no tokens to embed or explain; drop it or give it words"
        )
    return texts
