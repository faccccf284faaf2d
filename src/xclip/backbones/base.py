"""Backend-neutral CLIP interface: encoders, tokenizer, preprocessing and a traced forward.

Explainers only talk to :class:`Backbone`. A backend adapter (open_clip, HF) supplies the
embedding/head steps and a :class:`BlockView` per transformer block; the traced recompute of the
last blocks is written once, here, from those views.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .inputs import check_images01, check_model_input, check_texts

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PLACEHOLDER_TOKEN_ID = 259  # '$' in the CLIP BPE vocabulary: SEARLE's pseudo-token slot

Texts = Union[Tensor, Sequence[str]]


def resize_position_embedding(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """Position embeddings [1 + g*g, W] (class row first, square grid) for another patch grid
    (gh, gw) -> [1 + gh*gw, W]; returned unchanged when the grid is the same.

    Bicubic, align_corners=False, no antialiasing: the official Grad-ECLIP code's and HF's
    ``interpolate_pos_encoding`` choice (open_clip's ``resize_pos_embed`` antialiases by default,
    which gives slightly different values).
    """
    side = int(round((pos.shape[0] - 1) ** 0.5))
    if (side, side) == tuple(grid):
        return pos
    patches = pos[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patches.permute(0, 2, 3, 1).reshape(-1, pos.shape[1]).to(pos.dtype)])


@dataclass(frozen=True)
class PreprocessCfg:
    """Image preprocessing of a model: square input side and per-channel mean/std."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessCfg":
        return cls(int(d["image_size"]), tuple(map(float, d["mean"])), tuple(map(float, d["std"])))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


class TextTokenizer(Protocol):
    """What a backbone needs from a tokenizer (adapters live next to each backend)."""

    context_length: int
    sot_id: int
    eot_id: int

    def __call__(self, texts: Sequence[str]) -> Tensor:  # LongTensor [K, context_length]
        ...

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        ...


@dataclass
class BlockView:
    """One pre-LN transformer block seen through plain callables, on batch-first tensors.

    ``qkv(ln_1(x))`` returns the in-projected q, k, v, each [N, L, W]; ``native(x, mask)`` runs the
    library's own block (transposing for sequence-first models) with an additive [L, L] mask.
    """

    ln_1: nn.Module
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    num_heads: int
    out_proj: nn.Linear
    ls_1: nn.Module
    ln_2: nn.Module
    mlp: nn.Module
    ls_2: nn.Module
    native: Callable[[Tensor, Optional[Tensor]], Tensor]


@dataclass
class BlockTrace:
    """Intermediate tensors of one recomputed block (all batch-first, graphs kept).

    x_in, q, k, v, attn_out, x_out: [N, L, W]; q_heads, k_heads, v_heads: [N, H, L, W/H] views of
    q, k, v; attn_weights: [N, H, L, L] softmax probabilities; attn_out is the attention output
    before ``out_proj`` and feeds the rest of the forward.
    """

    x_in: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    q_heads: Tensor
    k_heads: Tensor
    v_heads: Tensor
    attn_weights: Tensor
    attn_out: Tensor
    x_out: Tensor


@dataclass
class ImageTrace:
    """Traced vision forward: embedding [N, D] (un-normalised), patch_tokens [N, gh*gw, W]
    (last block output, before ln_post), blocks = the traced last blocks in order."""

    blocks: list[BlockTrace]
    embedding: Tensor
    patch_tokens: Tensor


@dataclass
class TextTrace:
    """Traced text forward: embedding [K, D] (un-normalised), eot_index [K], tokens [K, L]."""

    blocks: list[BlockTrace]
    embedding: Tensor
    eot_index: Tensor
    tokens: Tensor


def trace_block(view: BlockView, x: Tensor, attn_mask: Optional[Tensor]) -> BlockTrace:
    """Recompute one block explicitly so q/k/v, attention probabilities and the pre-out_proj
    output exist as tensors in the graph (libraries call attention with need_weights=False)."""
    n, length, width = x.shape
    heads = view.num_heads
    q, k, v = view.qkv(view.ln_1(x))
    q_h, k_h, v_h = (t.view(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    scores = (q_h * (width // heads) ** -0.5) @ k_h.transpose(-1, -2)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    attn_out = (probs @ v_h).transpose(1, 2).reshape(n, length, width)
    x_mid = x + view.ls_1(view.out_proj(attn_out))
    x_out = x_mid + view.ls_2(view.mlp(view.ln_2(x_mid)))
    return BlockTrace(x, q, k, v, q_h, k_h, v_h, probs, attn_out, x_out)


def inject_pseudo_tokens(token_embeds: Tensor, tokens: Tensor, pseudo_tokens: Tensor) -> Tensor:
    """Replace the embedding at the first ``$`` of each row by that row's pseudo-token.

    token_embeds [K, L, W], tokens [K, L], pseudo_tokens [K, W] -> [K, L, W] (differentiable in
    both embeddings and pseudo-tokens).
    """
    is_slot = tokens == PLACEHOLDER_TOKEN_ID
    missing = (~is_slot.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"rows {missing} contain no '$' placeholder (token id {PLACEHOLDER_TOKEN_ID})")
    first = F.one_hot(is_slot.int().argmax(dim=1), tokens.shape[1]).bool().unsqueeze(-1)
    return torch.where(first, pseudo_tokens.to(token_embeds.dtype).unsqueeze(1), token_embeds)


class Backbone(nn.Module, metaclass=ABCMeta):
    """A CLIP model behind one interface. Holds the library model as ``.model``.

    Subclasses implement the embedding/head steps and the block views; tracing, pseudo-token
    text encoding, dense features, tokenising and preprocessing are shared.
    """

    spec: Optional[str] = None  # the `load_backbone` spec it was built from, if any

    def __init__(self, model: nn.Module, tokenizer: TextTokenizer, preprocess_cfg: PreprocessCfg):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess_cfg
        self._transform: Optional[Callable[[Image.Image], Tensor]] = None

    # ---- backend hooks -------------------------------------------------------------------
    @property
    @abstractmethod
    def patch_size(self) -> int: ...

    @property
    @abstractmethod
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""

    @property
    @abstractmethod
    def logit_scale(self) -> Tensor:
        """exp(learned log-scale): scalar multiplying cosine similarities."""

    @abstractmethod
    def _encode_image(self, images: Tensor) -> Tensor:
        """The library's own image encoder: [N, 3, S, S] -> [N, D]."""

    @abstractmethod
    def _encode_text(self, tokens: Tensor) -> Tensor:
        """The library's own text encoder: [K, L] -> [K, D]."""

    @abstractmethod
    def vision_blocks(self) -> list[BlockView]: ...

    @abstractmethod
    def text_blocks(self) -> list[BlockView]: ...

    @abstractmethod
    def _embed_image(self, images: Tensor) -> Tensor:
        """Patch embedding, CLS, positions, pre-norm: [N, 3, S, S] -> [N, 1 + gh*gw, W]."""

    @abstractmethod
    def image_head(self, tokens: Tensor) -> Tensor:
        """Final norm and projection of vision tokens (CLS or patches): [..., W] -> [..., D]."""

    @abstractmethod
    def token_embedding(self, tokens: Tensor) -> Tensor:
        """Token ids [K, L] -> token embeddings [K, L, W] (before positional embedding)."""

    @abstractmethod
    def _embed_text(self, token_embeds: Tensor) -> Tensor:
        """Add positional embeddings: [K, L, W] -> [K, L, W]."""

    @abstractmethod
    def causal_mask(self, length: int, like: Tensor) -> Tensor:
        """Additive causal mask [L, L] (-inf above the diagonal)."""

    @abstractmethod
    def eot_index(self, tokens: Tensor) -> Tensor:
        """Position of the pooled end-of-text token per row: [K, L] -> [K]."""

    @abstractmethod
    def text_head(self, x: Tensor, eot_index: Tensor) -> Tensor:
        """Pool at EOT, final norm, projection: [K, L, W], [K] -> [K, D]."""

    # ---- tokenizer -----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def sot_id(self) -> int:
        return self.tokenizer.sot_id

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """texts -> LongTensor [K, context_length] on the model's device (blank texts are an error)."""
        return self.tokenizer(check_texts(texts)).to(self.device)

    def decode_tokens(self, ids: Union[Tensor, Sequence[int]]) -> list[str]:
        """One row of token ids [L] -> one readable string per token (for charts)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode_tokens(ids)

    def _as_tokens(self, texts: Texts) -> Tensor:
        return texts.to(self.device) if isinstance(texts, Tensor) else self.tokenize(texts)

    # ---- images --------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return self.preprocess_cfg.image_size

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid (gh, gw) at the model's own input size."""
        side = self.image_size // self.patch_size
        return side, side

    def patch_grid(self, images: Tensor) -> tuple[int, int]:
        """The patch grid (gh, gw) of model inputs [N, 3, H, W]. Any H, W that are multiples of the
        patch size work (other sizes than `image_size` interpolate the position embeddings, as the
        official Grad-ECLIP code does to explain images at their native resolution)."""
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            fit = tuple(max(p, round(side / p) * p) for side in (h, w))
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}: resize it "
                             f"(e.g. to {fit[0]}x{fit[1]}, or use normalize(images01, size='native'))")
        return h // p, w // p

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.preprocess_cfg.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.preprocess_cfg.std

    def preprocess(self, images: Union[Image.Image, str, Path, Sequence[Union[Image.Image, str, Path]]],
                   size: Union[None, str, tuple[int, int]] = None) -> Tensor:
        """PIL images (or image files) -> model input.

        One image gives ``[3, S, S]``, a list ``[N, 3, S, S]``. Every image is decoded to RGB by
        `xclip.data.images.to_rgb` (16-bit, palette, alpha, CMYK, EXIF orientation). Default
        ``size``: CLIP's preprocessing (bicubic resize of the shorter side to S, centre crop,
        mean/std). ``size="native"``: no crop, each side rounded to a multiple of the patch size
        (explanations at the image's own resolution; the images of a list must then share a size);
        ``(h, w)``: resized to exactly that size.
        """
        from xclip.data.images import read_rgb, to_rgb

        single = isinstance(images, (Image.Image, str, Path))
        items = [images] if single else list(images)
        if not items:
            raise ValueError("preprocess needs at least one image")
        pil = [read_rgb(x) if isinstance(x, (str, Path)) else x for x in items]
        bad = [i for i, x in enumerate(pil) if not isinstance(x, Image.Image)]
        if bad:
            raise TypeError(f"preprocess takes PIL images or image paths; item {bad[0]} is a "
                            f"{type(pil[bad[0]]).__name__} (tensors in [0, 1] go through backbone.normalize)")
        pil = [to_rgb(x) for x in pil]
        if size is None:
            if self._transform is None:
                from open_clip import image_transform

                cfg = self.preprocess_cfg
                self._transform = image_transform(cfg.image_size, is_train=False, mean=cfg.mean, std=cfg.std)
            out = torch.stack([self._transform(x) for x in pil])
        else:
            from torchvision.transforms.functional import pil_to_tensor

            shapes = {x.size for x in pil}
            if len(shapes) > 1 and size == "native":
                raise ValueError(f"preprocess(size='native') of a list needs images of one size, got {sorted(shapes)}: "
                                 "preprocess them one at a time (maps follow each image's own grid)")
            out = torch.cat([self.normalize(pil_to_tensor(x).float().div(255.0)[None], size=size) for x in pil])
        return out[0] if single else out

    def normalize(self, images01: Tensor, size: Union[None, str, tuple[int, int]] = None) -> Tensor:
        """Float images in [0, 1], [N, 3, H, W] -> model input: [N, 3, S, S] at the model's size
        (default), or at `size` (h, w), or ``"native"``: each side rounded to the nearest multiple
        of the patch size (at least one patch), for explanations at the image's own resolution.

        uint8 images, values outside [0, 1], channels-last layouts and NaN/inf raise an error that
        says what to pass instead (see `xclip.backbones.inputs`).
        """
        check_images01(images01)
        if size is None:
            size = (self.image_size, self.image_size)
        elif size == "native":
            p = self.patch_size
            size = tuple(max(p, round(side / p) * p) for side in images01.shape[-2:])
        elif isinstance(size, str):
            raise ValueError(f"size must be None, 'native' or (h, w), got {size!r}")
        if tuple(images01.shape[-2:]) != tuple(size):
            images01 = F.interpolate(images01, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
        mean = images01.new_tensor(self.image_mean).view(1, 3, 1, 1)
        std = images01.new_tensor(self.image_std).view(1, 3, 1, 1)
        return (images01 - mean) / std

    def check_model_input(self, images: Tensor, name: str = "images") -> None:
        """Raise if `images` is not normalised model input [N, 3, H, W] (see `xclip.backbones.inputs`)."""
        check_model_input(images, self.image_mean, self.image_std, name)

    # ---- encoders ------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """[N, 3, S, S] -> [N, D], exactly the library's image encoder; other input sizes (see
        `patch_grid`) run xclip's own forward with interpolated position embeddings."""
        images = images.to(self.device)
        if self.patch_grid(images) == self.grid_size:
            emb = self._encode_image(images)
        else:
            emb = self.trace_image(images, n_blocks=0).embedding
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: Texts, normalize: bool = False) -> Tensor:
        """[K, L] token ids or K strings -> [K, D], exactly the library's text encoder."""
        emb = self._encode_text(self._as_tokens(tokens))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False,
                     progress: Optional[bool] = None) -> Tensor:
        """Any number of strings -> [K, D], `batch_size` strings per forward (bounded memory).

        `progress`: a progress bar on stderr (None: when there are more than 8 batches, e.g. a
        NegLabel vocabulary of tens of thousands of words).
        """
        if not texts:
            raise ValueError("encode_texts needs at least one text")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        starts = range(0, len(texts), batch_size)
        if progress if progress is not None else len(starts) > 8:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc=f"encoding {len(texts):,} texts", unit="batch", leave=False)
        return torch.cat([self.encode_text(list(texts[i : i + batch_size]), normalize=normalize) for i in starts])

    def encode_text_from_embeddings(
        self, token_embeds: Tensor, tokens: Tensor, pseudo_tokens: Optional[Tensor] = None
    ) -> Tensor:
        """Text forward from token embeddings [K, L, W] (ids [K, L] locate EOT) -> [K, D].

        With ``pseudo_tokens`` [K, W], the embedding at the first ``$`` of each row is replaced
        first (SEARLE). Gradients flow to ``token_embeds`` and ``pseudo_tokens``.
        """
        tokens = tokens.to(token_embeds.device)
        if pseudo_tokens is not None:
            token_embeds = inject_pseudo_tokens(token_embeds, tokens, pseudo_tokens)
        x = self._embed_text(token_embeds)
        x, _ = self._run_blocks(x, self.text_blocks(), self.causal_mask(x.shape[1], x), 0)
        return self.text_head(x, self.eot_index(tokens))

    def dense_image_features(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Patch tokens after the final norm and projection: [N, 3, S, S] -> [N, gh*gw, D]."""
        x, _ = self._run_blocks(self._embed_image(images.to(self.device)), self.vision_blocks(), None, 0)
        feats = self.image_head(x[:, 1:])
        return F.normalize(feats, dim=-1) if normalize else feats

    # ---- traced forward ------------------------------------------------------------------
    def trace_image(self, images: Tensor, n_blocks: int = 1) -> ImageTrace:
        """Vision forward recomputing the last ``n_blocks`` blocks explicitly (see BlockTrace)."""
        x, traces = self._run_blocks(self._embed_image(images.to(self.device)), self.vision_blocks(), None, n_blocks)
        return ImageTrace(blocks=traces, embedding=self.image_head(x[:, 0]), patch_tokens=x[:, 1:])

    def trace_text(self, tokens: Texts, n_blocks: int = 8, pseudo_tokens: Optional[Tensor] = None) -> TextTrace:
        """Text forward recomputing the last ``n_blocks`` blocks (capped at the depth) with the
        causal mask; the embedding is pooled at ``eot_index``. With ``pseudo_tokens`` [K, W], the
        embedding at the first ``$`` of each row is replaced first (SEARLE)."""
        tokens = self._as_tokens(tokens)
        token_embeds = self.token_embedding(tokens)
        if pseudo_tokens is not None:
            token_embeds = inject_pseudo_tokens(token_embeds, tokens, pseudo_tokens.to(token_embeds.device))
        x = self._embed_text(token_embeds)
        x, traces = self._run_blocks(x, self.text_blocks(), self.causal_mask(x.shape[1], x), n_blocks)
        eot = self.eot_index(tokens)
        return TextTrace(blocks=traces, embedding=self.text_head(x, eot), eot_index=eot, tokens=tokens)

    @staticmethod
    def _run_blocks(
        x: Tensor, blocks: list[BlockView], attn_mask: Optional[Tensor], n_traced: int
    ) -> tuple[Tensor, list[BlockTrace]]:
        """Run all but the last ``n_traced`` blocks natively, then recompute the rest traced."""
        if n_traced < 0:
            raise ValueError(f"n_blocks must be >= 0, got {n_traced}")
        split = len(blocks) - min(n_traced, len(blocks))
        for view in blocks[:split]:
            x = view.native(x, attn_mask)
        if split < len(blocks) and torch.is_grad_enabled() and not x.requires_grad:
            # Nothing upstream needs grad (frozen model, plain images): start the graph here so
            # explainers can still differentiate w.r.t. x_in / attn_out of the traced blocks.
            x = x.detach().requires_grad_(True)
        traces = []
        for view in blocks[split:]:
            traces.append(trace_block(view, x, attn_mask))
            x = traces[-1].x_out
        return x, traces
