"""Tokenizer adapters: the CLIP BPE shipped with open_clip, transformers tokenizers (also inside
open_clip's ``HFTokenizer``: SigLIP, SigLIP 2, CLIPA, the multilingual towers), and the warning for
texts longer than the text tower's context (every adapter counts tokens before truncating)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TypeGuard, overload

from torch import Tensor

from .base import TextTokenizer

log = logging.getLogger("xclip.backbones")


@lru_cache(maxsize=1)
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer

    # Parsing the BPE merges takes ~0.5 s; one shared instance serves every context length.
    return SimpleTokenizer()


class ClipBPETokenizer:
    """The CLIP BPE tokenizer shipped with open_clip (offline), padded/truncated to a length.

    Rows are ``SOT, tokens..., EOT, 0...``; a text longer than the context keeps its first
    ``context_length - 1`` tokens and ends with EOT (open_clip's truncation).
    """

    def __init__(self, context_length: int = 77, tokenizer=None):
        self._tok = tokenizer or _bpe()
        self.context_length = context_length
        self.sot_id = self._tok.sot_token_id
        self.eot_id = self._tok.eot_token_id
        self.pad_id = 0

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return self._tok(list(texts), context_length=self.context_length)

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text before truncation, SOT and EOT included."""
        return [len(self._tok.encode(t)) + 2 for t in texts]

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        return [self._tok.decode([i]).strip() for i in ids]


class HFTokenizerAdapter:
    """A transformers tokenizer padded/truncated to the model's context length.

    `clean` and `strip_sep` reproduce open_clip's ``HFTokenizer`` (its text cleaning; CLIPA's
    separator replaced by 0). Special ids: ``sot_id`` is BOS (or CLS) if the tokenizer adds one, else
    None (SigLIP adds only ``</s>``); ``eot_id`` is EOS (or SEP); ``pad_id`` the padding id.
    """

    def __init__(
        self, tokenizer, context_length: int, clean: Callable[[str], str] | None = None, strip_sep: bool = False
    ):
        self._tok = tokenizer
        self.context_length = context_length
        self._clean = clean
        self._strip_sep = strip_sep
        probe = tokenizer("a", add_special_tokens=True)["input_ids"]
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.cls_token_id
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.sot_id = bos if bos is not None and probe[:1] == [bos] else None
        self.eot_id = eos
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _texts(self, texts: Sequence[str]) -> list[str]:
        return [self._clean(t) for t in texts] if self._clean is not None else list(texts)

    def __call__(self, texts: Sequence[str]) -> Tensor:
        enc = self._tok(
            self._texts(texts),
            padding="max_length",
            max_length=self.context_length,
            truncation=True,
            return_tensors="pt",
        )
        ids = enc["input_ids"]
        if self._strip_sep:
            ids = ids.masked_fill(ids == self._tok.sep_token_id, 0)
        return ids

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text before truncation, special tokens included."""
        enc = self._tok(self._texts(texts), add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]

    def decode_tokens(self, ids: Sequence[int]) -> list[str]:
        # decode() (unlike convert_tokens_to_string) also strips the "</w>" end-of-word marker.
        return [self._tok.decode([i]).strip() for i in ids]


def _follows_protocol(tokenizer: object) -> TypeGuard[TextTokenizer]:
    return all(hasattr(tokenizer, a) for a in ("sot_id", "eot_id", "decode_tokens"))


@overload
def adapt_tokenizer(tokenizer: None, context_length: int) -> None: ...
@overload
def adapt_tokenizer(tokenizer: object, context_length: int) -> TextTokenizer: ...
def adapt_tokenizer(tokenizer: object | None, context_length: int) -> TextTokenizer | None:
    """An xclip tokenizer for what a user passes: None (the backend's default), an object that
    already follows `TextTokenizer`, an open_clip ``SimpleTokenizer`` / ``HFTokenizer``, or a
    transformers tokenizer."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if tokenizer is None or _follows_protocol(tokenizer):
        return tokenizer
    if isinstance(tokenizer, SimpleTokenizer):
        if tokenizer.reduction_fn is not None:
            raise NotImplementedError(
                "open_clip tokenizers with a reduction strategy (random/shuffle/syntax masks) "
                "are training-time augmentations: pass the plain SimpleTokenizer"
            )
        return ClipBPETokenizer(tokenizer.context_length or context_length, tokenizer)
    if isinstance(tokenizer, HFTokenizer):
        if tokenizer.tokenizer_mode:
            raise NotImplementedError(
                f"open_clip HFTokenizer mode {tokenizer.tokenizer_mode!r} (appends a class "
                "token after padding) is not supported: pass its .tokenizer instead"
            )
        return HFTokenizerAdapter(
            tokenizer.tokenizer,
            tokenizer.context_length or context_length,
            tokenizer.clean_fn,
            tokenizer.strip_sep_token,
        )
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return HFTokenizerAdapter(tokenizer, context_length)
    raise TypeError(
        f"unsupported tokenizer {type(tokenizer).__name__}: pass an open_clip or transformers tokenizer, "
        "or an object with context_length, sot_id, eot_id, __call__ and decode_tokens"
    )


def warn_truncated(tokenizer: TextTokenizer, texts: Sequence[str]) -> int:
    """Log one warning when texts exceed the tokenizer's context (they are cut, as every CLIP cuts
    them); returns how many were cut. Tokenizers without ``token_counts`` are not checked."""
    counts_fn = getattr(tokenizer, "token_counts", None)
    if counts_fn is None:
        return 0
    counts = counts_fn(texts)
    cut = [c for c in counts if c > tokenizer.context_length]
    if cut:
        log.warning(
            "%d of %d texts are longer than the text tower's context of %d tokens and were cut (the longest "
            "has %d tokens): shorten them, or the model reads only their beginning",
            len(cut),
            len(counts),
            tokenizer.context_length,
            max(cut),
        )
    return len(cut)
