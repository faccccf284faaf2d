"""Backend-neutral CLIP interface: encoders, tokenizer, preprocessing, similarity and a traced forward.

Explainers and workflows only talk to :class:`Backbone`. A backbone is a library model seen through
two towers: a :class:`VisionTower` (patch tokens and their grid, the *pooling step* traced, dense
patch features) and a :class:`TextTower` (token embeddings, the blocks, the pooled row). A tower
family (the OpenAI-style ViT, SigLIP's attention-pool head, ResNet's attention pool, a ConvNeXt...)
supplies those hooks once; the traced recompute of transformer blocks is written once, here, from
:class:`BlockView` objects.

The pooling step is what turns the image tower's tokens into the embedding. Where it is an attention
read-out of one query over the patch tokens (a ViT's class token in its last block, SigLIP / PE's
learned latent query, ResNet's mean-token query, CoCa's contrastive query) it is traced as a
:class:`PoolAttention`; where it is a plain average (ConvNeXt, FastViT, Swin, ViTamin, CLIPA) there
is no query and only :attr:`PoolTrace.forward` exists (what Grad-CAM differentiates).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from .inputs import check_images01, check_model_input, check_texts

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
PLACEHOLDER_TOKEN_ID = 259  # '$' in the CLIP BPE vocabulary: SEARLE's pseudo-token slot
PLACEHOLDER = "$"

Texts = Tensor | Sequence[str]


class UnsupportedFamily(NotImplementedError):
    """A model family cannot do what was asked; the message names the family and what to use instead."""


def resize_position_embedding(pos: Tensor, grid: tuple[int, int], prefix: int = 1) -> Tensor:
    """Position embeddings [prefix + g*g, W] (prefix rows first, square grid) for another patch grid
    (gh, gw) -> [prefix + gh*gw, W]; returned unchanged when the grid is the same.

    Bicubic, align_corners=False, no antialiasing: the official Grad-ECLIP code's and HF's
    ``interpolate_pos_encoding`` choice (open_clip's ``resize_pos_embed`` antialiases by default,
    which gives slightly different values).
    """
    side = int(round((pos.shape[0] - prefix) ** 0.5))
    if (side, side) == tuple(grid):
        return pos
    patches = pos[prefix:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    patches = F.interpolate(patches, size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:prefix], patches.permute(0, 2, 3, 1).reshape(-1, pos.shape[1]).to(pos.dtype)])


def _rgb(values: Sequence[float], name: str) -> tuple[float, float, float]:
    if len(values) != 3:
        raise ValueError(f"preprocessing {name} needs one value per RGB channel, got {list(values)}")
    r, g, b = map(float, values)
    return r, g, b


@dataclass(frozen=True)
class PreprocessCfg:
    """Image preprocessing of a model: square input side and per-channel mean/std."""

    image_size: int
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessCfg:
        return cls(int(d["image_size"]), _rgb(d["mean"], "mean"), _rgb(d["std"], "std"))

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "mean": list(self.mean), "std": list(self.std)}


class TextTokenizer(Protocol):
    """What a backbone needs from a tokenizer (adapters: `xclip.backbones.tokenizers`).

    ``sot_id`` is None for tokenizers that add no start token (SigLIP); adapters also offer
    ``pad_id`` and ``token_counts(texts)`` (the untruncated lengths behind the truncation warning).
    """

    context_length: int
    sot_id: int | None
    eot_id: int

    def __call__(self, texts: Sequence[str]) -> Tensor:  # LongTensor [K, context_length]
        ...

    def decode_tokens(self, ids: Sequence[int]) -> list[str]: ...


# ---- transformer blocks ------------------------------------------------------------------------
@dataclass
class BlockView:
    """One pre-LN transformer block seen through plain callables, on batch-first tensors.

    ``qkv(ln_1(x))`` returns the q, k, v each [N, L, W] exactly as the attention uses them (per-head
    norms and rotary embeddings applied, heads concatenated); ``out_proj`` maps the attention output
    back (inner norms included); ``native(x, mask)`` runs the library's own block with an additive
    mask broadcastable to [N, H, L, L] (or None).
    """

    ln_1: Callable[[Tensor], Tensor]
    qkv: Callable[[Tensor], tuple[Tensor, Tensor, Tensor]]
    num_heads: int
    out_proj: Callable[[Tensor], Tensor]
    ls_1: Callable[[Tensor], Tensor]
    ln_2: Callable[[Tensor], Tensor]
    mlp: Callable[[Tensor], Tensor]
    ls_2: Callable[[Tensor], Tensor]
    native: Callable[[Tensor, Tensor | None], Tensor]


@dataclass
class BlockTrace:
    """Intermediate tensors of one recomputed block (all batch-first, graphs kept).

    x_in, x_out: [N, L, W]; q, k, v, attn_out: [N, L, W'] (W' = the attention width); q_heads,
    k_heads, v_heads: [N, H, L, W'/H] views of q, k, v; attn_weights: [N, H, L, L] softmax
    probabilities; attn_out is the attention output before ``out_proj`` and feeds the rest.
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


def head_view(t: Tensor, heads: int) -> Tensor:
    """[N, L, W] -> [N, H, L, W/H]."""
    n, length, width = t.shape
    return t.view(n, length, heads, width // heads).transpose(1, 2)


def trace_block(view: BlockView, x: Tensor, attn_mask: Tensor | None) -> BlockTrace:
    """Recompute one block explicitly so q/k/v, attention probabilities and the pre-out_proj
    output exist as tensors in the graph (libraries call attention with need_weights=False)."""
    n, length, _ = x.shape
    heads = view.num_heads
    q, k, v = view.qkv(view.ln_1(x))
    q_h, k_h, v_h = (head_view(t, heads) for t in (q, k, v))
    scores = (q_h * q_h.shape[-1] ** -0.5) @ k_h.transpose(-1, -2)
    if attn_mask is not None:
        scores = scores + attn_mask.to(scores.dtype)
    probs = scores.softmax(dim=-1)
    attn_out = (probs @ v_h).transpose(1, 2).reshape(n, length, -1)
    x_mid = x + view.ls_1(view.out_proj(attn_out))
    x_out = x_mid + view.ls_2(view.mlp(view.ln_2(x_mid)))
    return BlockTrace(x, q, k, v, q_h, k_h, v_h, probs, attn_out, x_out)


def run_blocks(
    x: Tensor, blocks: list[BlockView], attn_mask: Tensor | None, n_traced: int
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


# ---- the pooling step --------------------------------------------------------------------------
@dataclass
class PoolAttention:
    """The pooling step as one attention read-out of a query over the tokens (graphs kept).

    q [N, H, dh]: the pooling query (the class token's row in the last block, a learned latent,
    ResNet's mean token); k, v [N, H, L, dh] over all L keys, the first `prefix` of which are not
    grid tokens (class / register tokens, ResNet's mean token); probs [N, H, L]; attn_out [N, H*dh]:
    the read-out before the output projection; ``tail(attn_out [..., H*dh]) -> [..., D]``: the rest
    of the pooling step and the head (out-projection, residual, MLP, norms, projection), applied
    per vector.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    probs: Tensor
    attn_out: Tensor
    prefix: int
    tail: Callable[[Tensor], Tensor]

    def grid_keys(self) -> tuple[Tensor, Tensor]:
        """k, v of the grid tokens only: [N, H, P, dh] each."""
        return self.k[:, :, self.prefix :], self.v[:, :, self.prefix :]


def attention_readout(q: Tensor, k: Tensor, v: Tensor, key_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One query per image and head over L keys: q [N, H, dh], k, v [N, H, L, dh] -> (probs
    [N, H, L], out [N, H*dh]). `key_weights` [N, L] >= 0 restricts the read-out to some keys
    (probabilities re-weighted and renormalised: a softmax over the kept keys for 0/1 weights)."""
    probs = (torch.einsum("nhd,nhld->nhl", q, k) * q.shape[-1] ** -0.5).softmax(-1)
    if key_weights is not None:
        probs = probs * key_weights[:, None].to(probs.dtype)
        probs = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny)
    out = torch.einsum("nhl,nhld->nhd", probs, v).flatten(1)
    return probs, out


@dataclass
class PoolTrace:
    """The image tower's pooling step, traced.

    tokens [N, L, C]: what the pooling step reads (prefix tokens first; for a ViT the last block's
    normalised input, for SigLIP / PE the trunk's normalised output, for ResNet the last feature map,
    for ConvNeXt / FastViT / Swin the last stage's features): the activations Grad-CAM weighs.
    ``forward(tokens) -> embedding [N, D]`` recomputes the pooling step and the head from them (for
    the trace's own N images: a class-token row keeps its residual). attention: the read-out when
    the pooling is attention (None for average pooling).
    """

    tokens: Tensor
    prefix: int
    forward: Callable[[Tensor], Tensor]
    attention: PoolAttention | None


@dataclass
class ImageTrace:
    """Traced vision forward.

    embedding [N, D] (un-normalised); patch_tokens [N, gh*gw, W]: the tower's final grid tokens
    before any final norm (a ViT's last block output, ResNet's last feature map); blocks: the traced
    last transformer blocks in order; grid (gh, gw); pool: the pooling step (None when a ViT's
    class-token pooling was not traced, i.e. ``n_blocks=0``).
    """

    blocks: list[BlockTrace]
    embedding: Tensor
    patch_tokens: Tensor
    grid: tuple[int, int] = (0, 0)
    pool: PoolTrace | None = None

    def traced_pool(self) -> PoolTrace:
        """`pool`, or a readable error when the pooling step was not traced."""
        if self.pool is None:
            raise ValueError("the trace has no pooling step: trace the images with n_blocks >= 1")
        return self.pool

    def pool_attention(self) -> PoolAttention:
        """The pooling step's attention read-out (towers that pool with attention; see `PoolAttention`)."""
        attention = self.traced_pool().attention
        if attention is None:
            raise ValueError("the trace's pooling step is an average: it has no attention read-out")
        return attention


@dataclass
class TextTrace:
    """Traced text forward: embedding [K, D] (un-normalised), eot_index [K] (the pooled row),
    tokens [K, L], content [K, L'] bool (the positions holding the text's own tokens, no start,
    end or padding), attn_mask (additive, broadcastable to [K, H, L', L'], or None)."""

    blocks: list[BlockTrace]
    embedding: Tensor
    eot_index: Tensor
    tokens: Tensor
    content: Tensor | None = None
    attn_mask: Tensor | None = None


def inject_pseudo_tokens(
    token_embeds: Tensor, tokens: Tensor, pseudo_tokens: Tensor, placeholder_id: int = PLACEHOLDER_TOKEN_ID
) -> Tensor:
    """Replace the embedding at the first placeholder (``$``) of each row by that row's pseudo-token.

    token_embeds [K, L, W], tokens [K, L], pseudo_tokens [K, W] -> [K, L, W] (differentiable in
    both embeddings and pseudo-tokens).
    """
    is_slot = tokens == placeholder_id
    missing = (~is_slot.any(dim=1)).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"rows {missing} contain no '$' placeholder (token id {placeholder_id})")
    first = F.one_hot(is_slot.int().argmax(dim=1), tokens.shape[1]).bool().unsqueeze(-1)
    return torch.where(first, pseudo_tokens.to(token_embeds.dtype).unsqueeze(1), token_embeds)


# ---- towers --------------------------------------------------------------------------------------
class VisionTower(ABC):
    """One image-tower family behind the hooks the explainers and workflows need.

    Attributes:
        family: a short name for messages (``"SigLIP-style ViT (latent-query attention pool)"``).
        pooling: ``"class token"``, ``"latent query"``, ``"mean query"`` (attention) or ``"average"``.
        image_size, patch_size: the input side and the input pixels per grid cell (the total stride
            for convolutional towers).
        token_width: width C of the pooling step's input tokens.
    """

    family: str = "image tower"
    pooling: str = "average"

    def __init__(self, module: nn.Module, encode_fn: Callable[[Tensor], Tensor] | None = None):
        self.module = module
        self._encode_fn = encode_fn

    @staticmethod
    def matches(visual: nn.Module) -> bool:
        """Whether this family reads the library's image tower `visual` (an adapter tries its families in order)."""
        return False

    @property
    def has_attention_pool(self) -> bool:
        return self.pooling != "average"

    @property
    @abstractmethod
    def image_size(self) -> int: ...

    @property
    @abstractmethod
    def patch_size(self) -> int: ...

    @property
    @abstractmethod
    def token_width(self) -> int: ...

    @property
    def other_sizes(self) -> bool:
        """Whether inputs of other sizes than `image_size` are supported (interpolated positions)."""
        return False

    def encode(self, images: Tensor) -> Tensor:
        """The library's own image encoder at the model's input size: [N, 3, S, S] -> [N, D]."""
        return self._encode_fn(images) if self._encode_fn is not None else self.module(images)

    @abstractmethod
    def trace(self, images: Tensor, n_blocks: int) -> ImageTrace:
        """Forward recomputing the last `n_blocks` transformer blocks and the pooling step."""

    def blocks(self, grid: tuple[int, int]) -> list[BlockView]:
        """The tower's transformer blocks as views (for a grid: rotary embeddings depend on it)."""
        raise UnsupportedFamily(f"{self.family} has no transformer blocks xclip can trace")

    @abstractmethod
    def patch_features(self, trace: ImageTrace) -> Tensor:
        """Dense features in the joint space, one per grid cell: [N, gh*gw, D]."""

    @abstractmethod
    def region_embedding(self, trace: ImageTrace, weights: Tensor) -> Tensor:
        """The embedding of a region: the pooling step restricted to grid cells with `weights`
        [N, gh*gw] >= 0 (an average for average pooling, the attention re-weighted otherwise) -> [N, D]."""

    def refusal(self, what: str, instead: str) -> UnsupportedFamily:
        """The error for an explainer this tower cannot support: names the family, why, and what
        to use instead."""
        return UnsupportedFamily(
            f"{what} is not available for {self.family}: it pools without attention (no query, "
            f"so no spatial weights); use {instead}"
        )

    def image_head(self, tokens: Tensor) -> Tensor:
        """Final norm and projection of tokens [..., W] -> [..., D] (class-token towers only)."""
        raise UnsupportedFamily(
            f"{self.family} pools with its {self.pooling}, not a per-token head: use "
            "backbone.patch_features(trace) for dense features"
        )


class TextTower(ABC):
    """One text-tower family: token embeddings, blocks, the pooled row and the head."""

    family: str = "text tower"
    causal: bool = True

    def __init__(self, module: nn.Module):
        self.module = module

    @property
    @abstractmethod
    def width(self) -> int:
        """Width W of the token embeddings (what a pseudo token must have)."""

    @abstractmethod
    def encode(self, tokens: Tensor) -> Tensor:
        """The library's own text encoder: [K, L] -> [K, D]."""

    @abstractmethod
    def token_embedding(self, tokens: Tensor) -> Tensor:
        """Token ids [K, L] -> token embeddings [K, L, W] (before positions)."""

    @abstractmethod
    def encode_embeddings(self, token_embeds: Tensor, tokens: Tensor, n_blocks: int) -> TextTrace:
        """Text forward from token embeddings [K, L, W] (ids [K, L] give the mask and the pooled
        row), recomputing the last `n_blocks` blocks."""

    def blocks(self) -> list[BlockView]:
        raise UnsupportedFamily(f"{self.family} has no transformer blocks xclip can trace")

    def pool_index(self, tokens: Tensor) -> Tensor:
        """The pooled row of each sequence: [K, L] -> [K]."""
        raise UnsupportedFamily(f"{self.family} pools over all tokens (no single pooled row)")

    def trims_padding(self) -> bool:
        """Whether positions after the pooled row never reach the output (causal, pooled at EOT)."""
        return False


def _features(out) -> Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output holds the pooled features.
    return out if isinstance(out, Tensor) else out.pooler_output


class Backbone(nn.Module):
    """A CLIP-family model behind one interface. Holds the library model as ``.model``, its towers
    as ``.vision`` / ``.text``.

    Backend adapters (open_clip, HF) build the towers; tracing, pseudo-token text encoding, dense
    features, tokenising, preprocessing and the similarity are shared.
    """

    spec: str | None = None  # the `load_backbone` spec it was built from, if any

    def __init__(
        self,
        model: nn.Module,
        tokenizer: TextTokenizer,
        preprocess_cfg: PreprocessCfg,
        vision: VisionTower,
        text: TextTower,
        embed_dim: int,
    ):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.preprocess_cfg = preprocess_cfg
        self.vision = vision
        self.text = text
        self._embed_dim = embed_dim
        self._transform: Callable[[Image.Image], Tensor] | None = None
        self._placeholder_id: int | None = None
        if preprocess_cfg.image_size != vision.image_size:
            raise ValueError(
                f"preprocess image_size {preprocess_cfg.image_size} != model input size {vision.image_size}"
            )

    @property
    def family(self) -> str:
        """The model family in words: its image tower's and its text tower's."""
        return f"{self.vision.family} + {self.text.family}"

    # ---- model properties ------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def patch_size(self) -> int:
        return self.vision.patch_size

    @property
    def embed_dim(self) -> int:
        """Dimension D of the joint embedding space."""
        return self._embed_dim

    @property
    def token_width(self) -> int:
        """Width of the image tower's final tokens (`ImageTrace.patch_tokens`)."""
        return self.vision.token_width

    @property
    def logit_scale(self) -> Tensor:
        """exp(learned log-scale): scalar multiplying cosine similarities."""
        return self.model.get_parameter("logit_scale").exp()

    @property
    def logit_bias(self) -> Tensor | None:
        """SigLIP's learned bias (None for softmax-trained CLIPs)."""
        return getattr(self.model, "logit_bias", None)

    # ---- similarity ------------------------------------------------------------------------
    def logits(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """The model's own logits: ``logit_scale * cos (+ logit_bias)``: [N, D], [K, D] -> [N, K]."""
        cos = F.normalize(image_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).T
        bias = self.logit_bias
        return self.logit_scale.float() * cos + (0.0 if bias is None else bias.float())

    def probabilities(self, image_emb: Tensor, text_emb: Tensor) -> Tensor:
        """Each image's probability for each text, as the model was trained: a softmax over the K
        texts for CLIP (InfoNCE), an independent ``sigmoid(logit_scale * cos + logit_bias)`` per
        pair for SigLIP (no competition between texts): [N, K]."""
        logits = self.logits(image_emb, text_emb)
        return logits.sigmoid() if self.logit_bias is not None else logits.softmax(dim=-1)

    # ---- tokenizer -------------------------------------------------------------------------
    @property
    def context_length(self) -> int:
        return self.tokenizer.context_length

    @property
    def sot_id(self) -> int | None:
        return self.tokenizer.sot_id

    @property
    def eot_id(self) -> int:
        return self.tokenizer.eot_id

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """texts -> LongTensor [K, context_length] on the model's device (blank texts are an error;
        texts longer than the context are cut, with one warning per call saying how many)."""
        from .tokenizers import warn_truncated

        texts = check_texts(texts)
        warn_truncated(self.tokenizer, texts)
        return self.tokenizer(texts).to(self.device)

    def decode_tokens(self, ids: Tensor | Sequence[int]) -> list[str]:
        """One row of token ids [L] -> one readable string per token (for charts)."""
        ids = ids.tolist() if isinstance(ids, Tensor) else list(ids)
        return self.tokenizer.decode_tokens(ids)

    def _as_tokens(self, texts: Texts) -> Tensor:
        return texts.to(self.device) if isinstance(texts, Tensor) else self.tokenize(texts)

    def content_mask(self, tokens: Tensor) -> Tensor:
        """The positions of each row that hold the text's own tokens (no start token, end token or
        padding): [K, L] -> bool [K, L]."""
        tokens = tokens.to(self.device)
        length = tokens.shape[1]
        pos = torch.arange(length, device=tokens.device)
        sot = self.sot_id
        start = (tokens[:, 0] == sot).long() if sot is not None else torch.zeros_like(tokens[:, 0])
        is_end = tokens == self.eot_id
        pad = getattr(self.tokenizer, "pad_id", None)
        if pad is not None and pad != self.eot_id:
            # tokenizers whose pad id is a real token (the CLIP BPE's 0 is "!") always end with EOT
            is_end = is_end | ((tokens == pad) & ~is_end.any(1, keepdim=True))
        end = torch.where(is_end.any(1), is_end.int().argmax(1), torch.full_like(start, length))
        return (pos[None] >= start[:, None]) & (pos[None] < end[:, None])

    @property
    def placeholder_id(self) -> int:
        """The token id of SEARLE's ``$`` placeholder in this tokenizer (one token, or an error)."""
        if self._placeholder_id is None:
            tokens = self.tokenizer([f"a {PLACEHOLDER}"]).to(self.device)
            ids = tokens[0][self.content_mask(tokens)[0]].tolist()
            alone = self.tokenizer([PLACEHOLDER]).to(self.device)
            own = alone[0][self.content_mask(alone)[0]].tolist()
            if len(own) != 1 or not ids or ids[-1] != own[0]:
                raise UnsupportedFamily(
                    f"this tokenizer does not make '{PLACEHOLDER}' one token of its own "
                    f"({own}): SEARLE's pseudo-token slot needs a one-token placeholder"
                )
            self._placeholder_id = own[0]
        return self._placeholder_id

    # ---- images ----------------------------------------------------------------------------
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
        patch size work for towers with interpolable positions (the official Grad-ECLIP code explains
        images at their native resolution); the others take the model's own input size only."""
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            fit = tuple(max(p, round(side / p) * p) for side in (h, w))
            raise ValueError(
                f"image size {h}x{w} is not a multiple of the patch size {p}: resize it "
                f"(e.g. to {fit[0]}x{fit[1]}, or use normalize(images01, size='native'))"
            )
        grid = (h // p, w // p)
        if grid != self.grid_size and not self.vision.other_sizes:
            raise UnsupportedFamily(
                f"{self.vision.family} takes {self.image_size}x{self.image_size} inputs only, "
                f"got {h}x{w}: resize with backbone.normalize(images01) (no size)"
            )
        return grid

    @property
    def image_mean(self) -> tuple[float, float, float]:
        return self.preprocess_cfg.mean

    @property
    def image_std(self) -> tuple[float, float, float]:
        return self.preprocess_cfg.std

    def preprocess(
        self,
        images: Image.Image | str | Path | Sequence[Image.Image | str | Path],
        size: None | str | tuple[int, int] = None,
    ) -> Tensor:
        """PIL images (or image files) -> model input.

        One image gives ``[3, S, S]``, a list ``[N, 3, S, S]``. Every image is decoded to RGB by
        `xclip.data.images.to_rgb` (16-bit, palette, alpha, CMYK, EXIF orientation). Default
        ``size``: CLIP's preprocessing (bicubic resize of the shorter side to S, centre crop,
        mean/std). ``size="native"``: no crop, each side rounded to a multiple of the patch size
        (explanations at the image's own resolution; the images of a list must then share a size);
        ``(h, w)``: resized to exactly that size.
        """
        from xclip.data.images import read_rgb, to_rgb

        if isinstance(images, (Image.Image, str, Path)):
            return self.preprocess([images], size)[0]
        items = list(images)
        if not items:
            raise ValueError("preprocess needs at least one image")
        pil = [read_rgb(x) if isinstance(x, (str, Path)) else x for x in items]
        bad = [i for i, x in enumerate(pil) if not isinstance(x, Image.Image)]
        if bad:
            raise TypeError(
                f"preprocess takes PIL images or image paths; item {bad[0]} is a "
                f"{type(pil[bad[0]]).__name__} (tensors in [0, 1] go through backbone.normalize)"
            )
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
                raise ValueError(
                    f"preprocess(size='native') of a list needs images of one size, got {sorted(shapes)}: "
                    "preprocess them one at a time (maps follow each image's own grid)"
                )
            out = torch.cat([self.normalize(pil_to_tensor(x).float().div(255.0)[None], size=size) for x in pil])
        return out

    def normalize(self, images01: Tensor, size: None | str | tuple[int, int] = None) -> Tensor:
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
            h, w = images01.shape[-2:]
            size = (max(p, round(h / p) * p), max(p, round(w / p) * p))
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

    # ---- encoders --------------------------------------------------------------------------
    def encode_image(self, images: Tensor, normalize: bool = False) -> Tensor:
        """[N, 3, S, S] -> [N, D], exactly the library's image encoder; other input sizes (see
        `patch_grid`) run xclip's own forward with interpolated position embeddings."""
        images = images.to(self.device)
        if self.patch_grid(images) == self.grid_size:
            emb = self.vision.encode(images)
        else:
            emb = self.trace_image(images, n_blocks=0).embedding
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_text(self, tokens: Texts, normalize: bool = False) -> Tensor:
        """[K, L] token ids or K strings -> [K, D], exactly the library's text encoder."""
        emb = self.text.encode(self._as_tokens(tokens))
        return F.normalize(emb, dim=-1) if normalize else emb

    def encode_texts(
        self, texts: Sequence[str], batch_size: int = 256, normalize: bool = False, progress: bool | None = None
    ) -> Tensor:
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

    def token_embedding(self, tokens: Tensor) -> Tensor:
        """Token ids [K, L] -> token embeddings [K, L, W] (before positional embedding)."""
        return self.text.token_embedding(tokens.to(self.device))

    def encode_text_from_embeddings(
        self, token_embeds: Tensor, tokens: Tensor, pseudo_tokens: Tensor | None = None
    ) -> Tensor:
        """Text forward from token embeddings [K, L, W] (ids [K, L] give the pooled row and masks)
        -> [K, D].

        With ``pseudo_tokens`` [K, W], the embedding at the first ``$`` of each row is replaced
        first (SEARLE). Gradients flow to ``token_embeds`` and ``pseudo_tokens``.
        """
        tokens = tokens.to(token_embeds.device)
        if pseudo_tokens is not None:
            token_embeds = inject_pseudo_tokens(token_embeds, tokens, pseudo_tokens, self.placeholder_id)
        return self.text.encode_embeddings(token_embeds, tokens, 0).embedding

    def trim_padding(self, tokens: Tensor) -> Tensor:
        """Drop the padding after the longest row's pooled token where it never reaches the output
        (causal towers pooled at EOT): [K, L] -> [K, L']; other towers get `tokens` unchanged."""
        if tokens.shape[0] == 0 or not self.text.trims_padding():
            return tokens
        return tokens[:, : int(self.eot_index(tokens).max()) + 1]

    # ---- dense features --------------------------------------------------------------------
    def dense_image_features(self, images: Tensor, normalize: bool = False) -> Tensor:
        """Dense features in the joint space, one per grid cell: [N, 3, S, S] -> [N, gh*gw, D]
        (see `patch_features`)."""
        feats = self.patch_features(self.trace_image(images.to(self.device), n_blocks=0))
        return F.normalize(feats, dim=-1) if normalize else feats

    def patch_features(self, trace: ImageTrace) -> Tensor:
        """Dense features of a traced forward: [N, gh*gw, D]. Class-token towers: each final patch
        token through the final norm and projection; attention pools (SigLIP, PE, CoCa, ResNet):
        each token's value through the rest of the pooling step (the read-out if all attention were
        on that token, as MaskCLIP does for ResNet); average pools: each location through the head."""
        return self.vision.patch_features(trace)

    def region_embedding(self, trace: ImageTrace, weights: Tensor) -> Tensor:
        """The embedding of a region of grid cells (`weights` [N, gh*gw] >= 0) of a traced
        forward: [N, D]. Class-token towers: the head of the weighted mean patch token; average
        pools: the head of the weighted mean; attention pools: the read-out restricted to the region."""
        return self.vision.region_embedding(trace, weights.to(trace.patch_tokens.device))

    def image_head(self, tokens: Tensor) -> Tensor:
        """Final norm and projection of vision tokens [..., W] -> [..., D] (class-token towers)."""
        return self.vision.image_head(tokens)

    # ---- traced forward --------------------------------------------------------------------
    def vision_blocks(self) -> list[BlockView]:
        """The image tower's transformer blocks at the model's own grid."""
        return self.vision.blocks(self.grid_size)

    def text_blocks(self) -> list[BlockView]:
        return self.text.blocks()

    def trace_image(self, images: Tensor, n_blocks: int = 1) -> ImageTrace:
        """Vision forward recomputing the last ``n_blocks`` transformer blocks explicitly (see
        BlockTrace) and the pooling step (see PoolTrace)."""
        images = images.to(self.device)
        self.patch_grid(images)
        return self.vision.trace(images, n_blocks)

    def trace_text(self, tokens: Texts, n_blocks: int = 8, pseudo_tokens: Tensor | None = None) -> TextTrace:
        """Text forward recomputing the last ``n_blocks`` blocks (capped at the depth) with the
        tower's own mask; the embedding is pooled at ``eot_index``. With ``pseudo_tokens`` [K, W],
        the embedding at the first ``$`` of each row is replaced first (SEARLE)."""
        tokens = self._as_tokens(tokens)
        token_embeds = self.text.token_embedding(tokens)
        if pseudo_tokens is not None:
            token_embeds = inject_pseudo_tokens(
                token_embeds, tokens, pseudo_tokens.to(token_embeds.device), self.placeholder_id
            )
        trace = self.text.encode_embeddings(token_embeds, tokens, n_blocks)
        if trace.content is None:
            trace.content = self.content_mask(tokens)
        return trace

    def eot_index(self, tokens: Tensor) -> Tensor:
        """Position of the pooled token per row (EOT, the last position, an appended class token):
        [K, L] -> [K]."""
        return self.text.pool_index(tokens.to(self.device))

    def causal_mask(self, length: int, like: Tensor) -> Tensor | None:
        """Additive causal mask [L, L] (-inf above the diagonal) of causal text towers, else None."""
        if not self.text.causal:
            return None
        return torch.full((length, length), float("-inf"), device=like.device, dtype=like.dtype).triu(1)
