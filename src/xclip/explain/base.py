"""What every explainer shares: model-state restoration, text resolution, batched target gradients."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from xclip.backbones import Backbone
from xclip.explain.targets import Target

Texts = Sequence[str] | Tensor


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
    """`texts` as a non-empty list of strings (a bare string is an error, not K characters)."""
    if isinstance(texts, str):
        raise TypeError(f"texts must be a list of strings, got the single string {texts!r}: wrap it in a list")
    texts = list(texts)
    if not texts:
        raise ValueError("no texts to explain: pass at least one string or a [K, D] embedding tensor")
    return texts


class Explainer:
    """Base of the image explainers: ``image_maps(images [N,3,S,S], texts) -> [N, K, gh, gw]``.

    `images` are model-ready (``backbone.preprocess`` / ``backbone.normalize`` output); `texts` are
    K strings or K precomputed text embeddings [K, D].
    """

    name = "explainer"

    def __init__(self, backbone: Backbone):
        self.backbone = backbone

    def text_embeddings(self, texts: Texts) -> Tensor:
        """[K, D] text embeddings (un-normalised, no graph) for strings or pass-through tensors."""
        if isinstance(texts, Tensor):
            if texts.ndim != 2 or texts.shape[1] != self.backbone.embed_dim:
                raise ValueError(f"text embeddings must be [K, {self.backbone.embed_dim}], got {tuple(texts.shape)}")
            return texts.to(self.backbone.device).float()
        texts = as_text_list(texts)
        with torch.no_grad():
            return self.backbone.encode_text(texts).float()

    def image_maps(self, images: Tensor, texts: Texts, target: str | Target = "cosine") -> Tensor:
        """Every image with every text: [N, K, gh, gw]."""
        return self._maps(images, texts, target, pairs=False)

    def pair_maps(self, images: Tensor, texts: Texts, target: str | Target = "cosine") -> Tensor:
        """Image n with text n only: [N, gh, gw], the diagonal of `image_maps` without computing
        the rest (the gradient explainers take one backward instead of N)."""
        check_pairs(images, texts)
        return self._maps(images, texts, target, pairs=True)[:, 0]

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
