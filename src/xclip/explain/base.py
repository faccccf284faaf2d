"""What every explainer shares: model-state restoration, text resolution, batched target gradients."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor

from xclip.backbones import Backbone
from xclip.backbones.inputs import check_texts
from xclip.explain.targets import Target, resolve_target

Texts = Sequence[str] | Tensor

# Lightning's precision names (and short forms) -> the autocast dtype (None: full precision)
PRECISIONS: dict[str, torch.dtype | None] = {
    "32": None,
    "32-true": None,
    "64": None,
    "64-true": None,
    "bf16": torch.bfloat16,
    "bf16-mixed": torch.bfloat16,
    "16": torch.float16,
    "16-mixed": torch.float16,
}


def autocast_dtype(precision: str | int | None) -> torch.dtype | None:
    """The autocast dtype of a precision setting (``trainer.precision`` or an explainer argument):
    ``None``/``"32"``/``"32-true"`` -> None (no autocast), ``"bf16"``/``"bf16-mixed"`` ->
    bfloat16, ``"16"``/``"16-mixed"`` -> float16."""
    if precision is None:
        return None
    key = str(precision)
    if key not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or None, got {precision!r}")
    return PRECISIONS[key]


def autocast(device: torch.device, precision: str | int | None) -> AbstractContextManager:
    """``torch.autocast`` for `precision` on `device` (a no-op context for full precision). Pure
    bf16/fp16 weights are not needed: the model stays fp32 and matmuls run in the low dtype."""
    dtype = autocast_dtype(precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextmanager
def explaining(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode and frozen parameters while explaining; the caller's train/eval flags and
    ``requires_grad`` flags come back afterwards, also when the explanation raises."""
    modes = {m: m.training for m in module.modules()}
    flags = {p: p.requires_grad for p in module.parameters()}
    module.eval()
    module.requires_grad_(False)
    try:
        yield
    finally:
        for m, mode in modes.items():
            m.training = mode
        for p, flag in flags.items():
            p.requires_grad_(flag)


def as_text_list(texts: Sequence[str]) -> list[str]:
    """`texts` as a non-empty list of non-blank strings (a bare string is an error, not K characters)."""
    texts = check_texts(texts)
    if not texts:
        raise ValueError("no texts to explain: pass at least one string or a [K, D] embedding tensor")
    return texts


class Explainer:
    """Base of the image explainers: ``image_maps(images [N,3,S,S], texts) -> [N, K, gh, gw]``.

    `images` are model-ready (``backbone.preprocess`` / ``backbone.normalize`` output); `texts` are
    K strings or K precomputed text embeddings [K, D]. `precision` (``"bf16-mixed"``,
    ``"16-mixed"``, ``"32"`` or None; Lightning's names) runs the explanation under autocast; the
    explanation callbacks pass ``trainer.precision``. Maps are returned in float32 either way.
    """

    name = "explainer"

    def __init__(self, backbone: Backbone, precision: str | int | None = None):
        self.backbone = backbone
        autocast_dtype(precision)  # fail on an unknown name now, not at the first explanation
        self.precision = None if precision is None else str(precision)

    def target_fn(self, target: str | Target) -> Target:
        """The scalar target: ``"cosine"``, ``"softmax"``, a callable, or ``"probability"``: the
        backbone's own pair probability (a softmax over the texts for CLIP, SigLIP's
        ``sigmoid(logit_scale * cos + logit_bias)`` per pair; `Backbone.probabilities`)."""
        if target == "probability":
            return self.backbone.probabilities
        return resolve_target(target)

    def autocast(self) -> AbstractContextManager:
        """The autocast context of this explainer's `precision` on the backbone's device."""
        return autocast(self.backbone.device, self.precision)

    def text_embeddings(self, texts: Texts) -> Tensor:
        """[K, D] text embeddings (un-normalised, no graph) for strings or pass-through tensors."""
        if isinstance(texts, Tensor):
            if texts.ndim != 2 or texts.shape[1] != self.backbone.embed_dim:
                raise ValueError(f"text embeddings must be [K, {self.backbone.embed_dim}], got {tuple(texts.shape)}")
            return texts.to(self.backbone.device).float()
        texts = as_text_list(texts)
        with torch.no_grad():
            return self.backbone.encode_text(texts).float()

    def check_inputs(self, images: Tensor, texts: Texts) -> None:
        """Raise before any model call on inputs that would give wrong maps: images that are not
        normalised model input (uint8, 0-255 floats, channels last, NaN/inf) and blank texts."""
        self.backbone.check_model_input(images)
        if not isinstance(texts, Tensor):
            as_text_list(texts)
        elif not bool(torch.isfinite(texts).all()):
            raise ValueError("text embeddings hold NaN or infinite values")

    def image_maps(self, images: Tensor, texts: Texts, target: str | Target = "cosine") -> Tensor:
        """Every image with every text: [N, K, gh, gw]."""
        self.check_inputs(images, texts)
        with self.autocast():
            return self._maps(images, texts, target, pairs=False).float()

    def pair_maps(self, images: Tensor, texts: Texts, target: str | Target = "cosine") -> Tensor:
        """Image n with text n only: [N, gh, gw], the diagonal of `image_maps` without computing
        the rest (the gradient explainers take one backward instead of N)."""
        self.check_inputs(images, texts)
        check_pairs(images, texts)
        with self.autocast():
            return self._maps(images, texts, target, pairs=True)[:, 0].float()

    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        """[N, K, gh, gw], or [N, 1, gh, gw] with image n explained for text n when `pairs`."""
        raise NotImplementedError

    def __call__(self, images: Tensor, texts: Texts, target: str | Target = "cosine") -> Tensor:
        return self.image_maps(images, texts, target)


def check_pairs(images: Tensor, texts: Texts) -> None:
    """Pairing image n with text n needs as many texts as images."""
    k = texts.shape[0] if isinstance(texts, Tensor) else len(as_text_list(texts))
    if k != images.shape[0]:
        raise ValueError(f"pairing image n with text n: got {images.shape[0]} images and {k} texts")


def per_text_gradients(scores: Tensor, inputs: Sequence[Tensor], pairs: bool = False) -> list[Tensor]:
    """d scores[n, k] / d inputs for every k, in one batched backward.

    `scores` [N, K] must have row n depend on image n only (true in eval mode), so summing over n
    separates the images exactly. Returns one tensor per input, shaped [K, *input.shape]; with
    `pairs` (K == N) only d scores[n, n], shaped [1, *input.shape], from one plain backward.
    """
    if pairs:
        return [g[None] for g in torch.autograd.grad(scores.diagonal().sum(), list(inputs))]
    k = scores.shape[1]
    eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
    grad_outputs = eye[:, None, :].expand(k, *scores.shape)  # [K, N, K]: select column k
    return list(torch.autograd.grad(scores, list(inputs), grad_outputs=grad_outputs, is_grads_batched=True))


def minmax(x: Tensor, dim: int = -1, mask: Tensor | None = None) -> Tensor:
    """Min-max normalise along `dim` to [0, 1] (0 where the values are constant). With `mask`,
    min and max are taken over the masked entries only and the others are set to 0."""
    if mask is not None:
        lo = x.masked_fill(~mask, float("inf")).amin(dim, keepdim=True)
        hi = x.masked_fill(~mask, float("-inf")).amax(dim, keepdim=True)
    else:
        lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    span = hi - lo
    out = torch.where(span > 0, (x - lo) / span.clamp_min(torch.finfo(x.dtype).tiny), torch.zeros_like(x))
    return out.masked_fill(~mask, 0.0) if mask is not None else out
