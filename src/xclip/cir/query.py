"""Composed queries: prompts with the ``$`` slot, their encoding with pseudo tokens, FashionIQ's
two-caption combination. Plain functions on tensors (no Lightning).

SEARLE's prompt is ``"a photo of $ that {caption}"`` with the caption as given (CIRR, CIRCO,
ShapesWorld). FashionIQ has two captions per query: each is stripped of ``.?, `` at both ends,
they are joined both ways (``"{c1} and {c2}"``, ``"{c2} and {c1}"``), each goes through the
template, each query feature is L2-normalised, the two are averaged and normalised again.

The pseudo token replaces the token embedding at the FIRST ``$`` of each row (id 259 in the CLIP
BPE; `Backbone.placeholder_id` in other tokenizers; `xclip.backbones.base.inject_pseudo_tokens`;
a row without ``$`` is an error naming the row).
A prompt with several ``$`` keeps the later ones as the plain ``$`` token: SEARLE's bookkeeping
reads one slot per row (LinCIR's port replaces every ``$``; use one ``$`` per prompt to avoid the
question).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone

QUERY_TEMPLATE = "a photo of $ that {}"
FASHIONIQ_STRIP = ".?, "


EXAMPLE_CAPTION = "is blue instead of red"


def _check_caption(caption: str, what: str = "the relative caption", strip: str | None = None) -> str:
    """`caption` if it is a string with something left once `strip` (default: whitespace) is stripped."""
    if not isinstance(caption, str):
        raise TypeError(
            f"{what} must be a string (the change to make, e.g. {EXAMPLE_CAPTION!r}), got {type(caption).__name__}"
        )
    if not caption.strip(strip):
        left = "empty" if strip is None else f"empty once {strip!r} are stripped"
        raise ValueError(
            f"{what} {caption!r} is {left}: pass the change to make to the reference image, e.g. {EXAMPLE_CAPTION!r}"
        )
    return caption


def compose_query(caption: str, template: str = QUERY_TEMPLATE) -> str:
    """``"a photo of $ that {caption}"`` (the caption unstripped, as SEARLE does for CIRR/CIRCO)."""
    return template.format(_check_caption(caption))


def fashioniq_queries(first: str, second: str, template: str = QUERY_TEMPLATE) -> tuple[str, str]:
    """FashionIQ's two prompts: both captions stripped of ``.?, ``, joined both ways."""
    a = _check_caption(first, "FashionIQ's first caption", FASHIONIQ_STRIP).strip(FASHIONIQ_STRIP)
    b = _check_caption(second, "FashionIQ's second caption", FASHIONIQ_STRIP).strip(FASHIONIQ_STRIP)
    return template.format(f"{a} and {b}"), template.format(f"{b} and {a}")


def trim_to_eot(backbone: Backbone, tokens: Tensor) -> Tensor:
    """Drop the padding after the longest row's end-of-text token: [K, L] -> [K, L'].

    CLIP's text tower is causal and pooled at EOT, so positions after EOT never reach the output:
    the embedding is unchanged (tested) and short prompts run on ~10 positions instead of 77.
    Towers where padding matters (SigLIP pools the last position; no causal mask) keep every
    position (`Backbone.trim_padding`).
    """
    return backbone.trim_padding(tokens)


def tokenize_prompts(backbone: Backbone, prompts: Sequence[str]) -> Tensor:
    """Token ids [K, L'] of prompts that each hold a ``$``, trimmed after the last EOT."""
    if isinstance(prompts, str):
        raise TypeError("tokenize_prompts expects a list of prompts, not one string")
    return trim_to_eot(backbone, backbone.tokenize(list(prompts)))


def encode_with_pseudo_tokens(
    backbone: Backbone, prompts: Sequence[str] | Tensor, pseudo_tokens: Tensor, normalize: bool = False
) -> Tensor:
    """Text features of prompts with each row's first ``$`` replaced by its pseudo token.

    prompts: K strings or token ids [K, L]; pseudo_tokens [K, W] -> [K, D] (unnormalised unless
    `normalize`). Differentiable in `pseudo_tokens`.
    """
    tokens = prompts.to(backbone.device) if isinstance(prompts, Tensor) else tokenize_prompts(backbone, prompts)
    tokens = trim_to_eot(backbone, tokens)
    if pseudo_tokens.ndim != 2 or pseudo_tokens.shape[0] != tokens.shape[0]:
        raise ValueError(f"pseudo_tokens must be [K={tokens.shape[0]}, W], got {tuple(pseudo_tokens.shape)}")
    feats = backbone.encode_text_from_embeddings(backbone.token_embedding(tokens), tokens, pseudo_tokens)
    return F.normalize(feats, dim=-1) if normalize else feats


def encode_plain(backbone: Backbone, texts: Sequence[str] | Tensor, normalize: bool = False) -> Tensor:
    """Text features without pseudo tokens on trimmed tokens (equal to ``encode_text``): [K, D]."""
    tokens = texts.to(backbone.device) if isinstance(texts, Tensor) else backbone.tokenize(list(texts))
    tokens = trim_to_eot(backbone, tokens)
    feats = backbone.encode_text_from_embeddings(backbone.token_embedding(tokens), tokens)
    return F.normalize(feats, dim=-1) if normalize else feats


def query_features(
    backbone: Backbone, pseudo_tokens: Tensor, captions: Sequence[Sequence[str]], template: str = QUERY_TEMPLATE
) -> Tensor:
    """L2-normalised query features [Q, D] of Q queries, each with one caption (CIRR, CIRCO,
    ShapesWorld) or two (FashionIQ's combination); `pseudo_tokens` [Q, W] are the references'."""
    if len(captions) != pseudo_tokens.shape[0]:
        raise ValueError(f"{len(captions)} queries for {pseudo_tokens.shape[0]} pseudo tokens")
    counts = {len(c) for c in captions}
    if counts == {1}:
        return encode_with_pseudo_tokens(
            backbone, [compose_query(c[0], template) for c in captions], pseudo_tokens, normalize=True
        )
    if counts == {2}:
        forward, backward = zip(*[fashioniq_queries(a, b, template) for a, b in captions])
        prompts = list(forward) + list(backward)
        feats = encode_with_pseudo_tokens(backbone, prompts, torch.cat([pseudo_tokens, pseudo_tokens]), normalize=True)
        q = pseudo_tokens.shape[0]
        return F.normalize((feats[:q] + feats[q:]) / 2, dim=-1)
    raise ValueError(f"every query needs 1 caption (CIRR, CIRCO) or 2 (FashionIQ), got counts {sorted(counts)}")


def caption_features(backbone: Backbone, captions: Sequence[Sequence[str]], batch_size: int = 256) -> Tensor:
    """L2-normalised features [Q, D] of the captions alone (the text-only baseline); two captions
    are joined as FashionIQ does (``"{c1} and {c2}"`` both ways, averaged)."""
    texts = []
    for c in captions:
        if len(c) == 1:
            texts.append([_check_caption(c[0])])
        else:
            a, b = (_check_caption(x, "a FashionIQ caption", FASHIONIQ_STRIP).strip(FASHIONIQ_STRIP) for x in c)
            texts.append([f"{a} and {b}", f"{b} and {a}"])
    flat = [t for group in texts for t in group]
    feats = torch.cat(
        [encode_plain(backbone, flat[i : i + batch_size], normalize=True) for i in range(0, len(flat), batch_size)]
    )
    owner = torch.tensor([q for q, group in enumerate(texts) for _ in group], device=feats.device)
    summed = torch.zeros(len(texts), feats.shape[1], device=feats.device, dtype=feats.dtype).index_add_(0, owner, feats)
    return F.normalize(summed, dim=-1)
