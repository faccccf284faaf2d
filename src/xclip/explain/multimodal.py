"""What the attribution explainers (SHAP, Captum) share: the model they explain
(`MultimodalTarget`), the inputs (`MultimodalInputs`), their result (`MultimodalAttribution`) and
how a result becomes an image map, token / word scores and per-modality totals.

Any model with an image input and a token input can be explained: it hands the explainers a
`MultimodalTarget` per output head (a forward from pixel values + token embeddings with the
attention mask fixed, the embedding layer, the normalisation of [0, 1] images). Modules that want
the generic callbacks (`xclip.callbacks.SHAPCallback`, `CaptumCallback`) implement
`MultimodalExplainable`.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xclip.backbones.inputs import check_images01, check_texts

SPECIAL_TOKENS = frozenset({"[CLS]", "[SEP]", "[PAD]", "<s>", "</s>", "<pad>", "[MASK]"})


@dataclass
class MultimodalTarget:
    """One output head of a multimodal model, as the explainers see it.

    forward_embeds: ``(pixel_values [N,3,H,W], token_embeds [N,T,D], attention_mask [N,T]) -> [N, K]``.
    forward_ids: the same from token ids ``[N, T]`` (Captum's LayerIG patches `embedding_layer`).
    embed: ``input_ids [N,T] -> token_embeds [N,T,D]``.
    embedding_layer: the module whose output LayerIG attributes to (BERT: ``model.embeddings``).
    pixel_values: ``images01 [N,3,H,W] -> pixel_values`` (the model's normalisation).
    module: the model (put in eval mode and frozen while explaining).
    class_names: the K outputs' names.
    """

    name: str
    module: nn.Module
    forward_embeds: Callable[[Tensor, Tensor, Tensor], Tensor]
    forward_ids: Callable[[Tensor, Tensor, Tensor], Tensor]
    embed: Callable[[Tensor], Tensor]
    embedding_layer: nn.Module
    pixel_values: Callable[[Tensor], Tensor]
    class_names: list[str] = field(default_factory=list)


@dataclass
class MultimodalInputs:
    """A batch to explain: ``images01`` [N,3,H,W] in [0, 1] (shown in figures), ``pixel_values``
    (the model's input), ``input_ids`` / ``attention_mask`` [N, T], the token strings of each row
    (``tokens[i]`` has T entries), the texts and item ids (what output files are named by: the
    image file's name, see `item_id`, or the dataset index of a generated item), and optionally
    each item's dataset index (its explanation's seed) and image file (None for generated items)."""

    images01: Tensor
    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    tokens: list[list[str]]
    texts: list[str]
    ids: list[str]
    pad_token_id: int = 0
    indexes: list[int] | None = None
    paths: list[str | None] | None = None

    def __post_init__(self):
        check_images01(self.images01, "images01")  # NaN, uint8, 0-255 floats, channels last
        check_texts(self.texts)
        n = self.pixel_values.shape[0]
        if self.input_ids.shape != self.attention_mask.shape or self.input_ids.ndim != 2:
            raise ValueError(
                f"input_ids {tuple(self.input_ids.shape)} and attention_mask "
                f"{tuple(self.attention_mask.shape)} must both be [N, T]"
            )
        if not (
            self.images01.shape[0]
            == self.input_ids.shape[0]
            == len(self.tokens)
            == len(self.texts)
            == len(self.ids)
            == n
        ):
            raise ValueError("images01, pixel_values, input_ids, tokens, texts and ids must have one entry per sample")
        for name in ("indexes", "paths"):
            if getattr(self, name) is not None and len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per sample ({n}), got {len(getattr(self, name))}")

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def select(self, rows: Sequence[int] | slice) -> MultimodalInputs:
        """The rows `rows` (a slice or indices), trimmed to their longest text."""
        idx = list(range(len(self)))[rows] if isinstance(rows, slice) else list(rows)
        index = torch.tensor(idx, dtype=torch.long)
        mask = self.attention_mask[index]
        t = int(mask.sum(1).max()) if len(idx) else 0
        return MultimodalInputs(
            self.images01[index],
            self.pixel_values[index],
            self.input_ids[index, :t],
            mask[:, :t],
            [self.tokens[i][:t] for i in idx],
            [self.texts[i] for i in idx],
            [self.ids[i] for i in idx],
            self.pad_token_id,
            None if self.indexes is None else [self.indexes[i] for i in idx],
            None if self.paths is None else [self.paths[i] for i in idx],
        )


def item_id(path: str | None, index: int, max_chars: int = 60) -> str:
    """What an item's explanation files are named by: its image file's name without the suffix
    (characters outside ``[A-Za-z0-9._-]`` replaced, a long name shortened with a hash of it), or
    its dataset index when it has no file (a generated item)."""
    if not path:
        return str(int(index))
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", PurePath(path).stem) or "item"
    if len(stem) > max_chars:
        stem = f"{stem[: max_chars - 9]}-{hashlib.sha1(path.encode('utf-8')).hexdigest()[:8]}"
    return stem


@runtime_checkable
class MultimodalExplainable(Protocol):
    """What the generic attribution callbacks need from a LightningModule."""

    def attribution_targets(self) -> dict[str, MultimodalTarget]:
        """One target per explained output head (e.g. per task)."""

    def attribution_inputs(self, batch) -> MultimodalInputs | None:
        """The batch's items as explainer inputs (None: nothing to explain in this batch)."""


@dataclass
class MultimodalAttribution:
    """Attributions of N samples to their pixels and tokens, for K' explained outputs each.

    image: [N, 3, H, W, K'] and tokens: [N, T, D, K'] (token embeddings, or the embedding layer's
    output for LayerIG), the output axis last as shap >= 0.45 returns it. classes: [N, K'] the
    class each slot explains; output: [N, K'] the model's output f(x) there. references: what
    the attributions are measured against, per path ([N, K'] each): SHAP ``{"joint": mean output
    over the background rows}`` (one path through both inputs), Captum ``{"image": f(baseline
    image, text), "text": f(image, baseline text)}``. deltas: the completeness gap of each path,
    ``sum(its attributions) - (output - reference)``, [N, K'].
    """

    explainer: str
    target: str
    image: Tensor
    tokens: Tensor
    attention_mask: Tensor
    classes: Tensor
    output: Tensor
    references: dict[str, Tensor]
    deltas: dict[str, Tensor]

    def image_map(self, slot: int = 0, cell: int | None = None) -> Tensor:
        """|attribution| summed over channels: [N, H, W], or sum-pooled over `cell` x `cell`
        pixel cells ([N, H/cell, W/cell], e.g. the patch grid)."""
        heat = self.image[..., slot].abs().sum(1)
        if cell is None or cell == 1:
            return heat
        h, w = heat.shape[-2:]
        if h % cell or w % cell:
            raise ValueError(f"image {h}x{w} is not a multiple of the cell size {cell}")
        return F.avg_pool2d(heat.unsqueeze(1), cell).squeeze(1) * (cell * cell)

    def token_scores_all(self) -> Tensor:
        """Signed attribution per token, summed over the embedding dims: [N, T, K'] (0 at padding)."""
        return self.tokens.sum(2) * self.attention_mask.unsqueeze(-1).to(self.tokens.dtype)

    def token_scores(self, slot: int = 0) -> Tensor:
        """[N, T] signed token scores of output slot `slot`."""
        return self.token_scores_all()[..., slot]

    def modality_totals(self, slot: int = 0) -> dict[str, Tensor]:
        """Per sample [N]: ``image`` / ``text`` signed sums, ``image_abs`` / ``text_abs`` sums of
        absolute values, and ``image_share`` = |image| / (|image| + |text|) of the signed sums."""
        image = self.image[..., slot].sum(dim=(1, 2, 3))
        text = self.token_scores(slot).sum(1)
        denom = (image.abs() + text.abs()).clamp_min(torch.finfo(image.dtype).tiny)
        return {
            "image": image,
            "text": text,
            "image_abs": self.image[..., slot].abs().sum(dim=(1, 2, 3)),
            "text_abs": self.tokens[..., slot].abs().sum(dim=(1, 2)),
            "image_share": image.abs() / denom,
        }


def merge_subwords(
    tokens: Sequence[str], scores: Sequence[float], special: frozenset[str] = SPECIAL_TOKENS
) -> list[tuple[str, float]]:
    """Words and their summed scores from sub-word tokens: WordPiece ``##`` pieces join the word
    before them (``play ##ing`` -> ``playing``), SentencePiece words start with ``▁``; special
    tokens and padding are dropped."""
    if len(tokens) != len(scores):
        raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
    words: list[list] = []
    for token, score in zip(tokens, scores):
        if token in special:
            continue
        score = float(score)
        if token.startswith("##") and words:
            words[-1][0] += token[2:]
            words[-1][1] += score
        elif words and not token.startswith("▁") and any(t.startswith("▁") for t in tokens):
            words[-1][0] += token  # SentencePiece continuation
            words[-1][1] += score
        else:
            words.append([token.lstrip("▁"), score])
    return [(w, s) for w, s in words]


def word_rank(words: Sequence[tuple[str, float]], word: str) -> int | None:
    """1-based rank of `word` among the other words of its text by |score| (a tie counts against
    it; a repeated word counts once, with its largest |score|), or None when it is not in the text."""
    key = word.lower()
    own = [abs(s) for w, s in words if w.lower() == key]
    if not own:
        return None
    return 1 + sum(abs(s) >= max(own) for w, s in words if w.lower() != key)


def explained_classes(classes: str | Tensor | None, output: Tensor) -> Tensor:
    """The output columns to explain per sample, `[N, k]` ids into `output` `[N, K]`: every
    column (None), the predicted one ("predicted") or one given id per sample (`[N]`)."""
    n, k = output.shape
    if classes is None:
        return torch.arange(k, device=output.device).expand(n, k).contiguous()
    if isinstance(classes, str):
        if classes != "predicted":
            raise ValueError(f"classes must be 'predicted', a [N] tensor or None, got {classes!r}")
        return output.argmax(1, keepdim=True)
    classes = torch.as_tensor(classes, device=output.device).long().view(-1, 1)
    if classes.shape[0] != n or classes.min() < 0 or classes.max() >= k:
        raise ValueError(f"classes must be {n} ids in [0, {k}), got {classes.view(-1).tolist()}")
    return classes
