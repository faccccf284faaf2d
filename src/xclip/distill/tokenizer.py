"""Text tokenizers of the Teacher/Student models: a hub tokenizer by id, a saved one by folder, or
the offline default, a WordPiece vocabulary trained with the `tokenizers` library on ShapesWorld
notes (deterministic: the same notes always give the same vocabulary). Every one is a
``transformers`` fast tokenizer, saved next to the weights of a checkpoint."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SHAPES_WORDPIECE = "shapes-wordpiece"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def train_wordpiece(texts: list[str], vocab_size: int = 160) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (lower-case, ``[CLS] text [SEP]``, ``##`` continuation
    pieces) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if not texts:
        raise ValueError("train_wordpiece needs at least one text")
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(
        texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


@lru_cache(maxsize=4)
def shapes_wordpiece(n_notes: int = 3000, seed: int = 0, vocab_size: int = 160) -> PreTrainedTokenizerFast:
    """The offline default: WordPiece trained on `n_notes` ShapesWorld training notes."""
    from xclip.data.shapes import ShapesNotes

    notes = ShapesNotes(n_notes, seed=seed, split="train")
    return train_wordpiece([notes.note(i) for i in range(n_notes)], vocab_size)


def load_tokenizer(spec: str | Path) -> PreTrainedTokenizerBase:
    """``"shapes-wordpiece"`` (trained offline, see `shapes_wordpiece`), a folder written by
    ``save_pretrained`` (e.g. a shipped checkpoint), or a Hugging Face hub id such as
    ``"prajjwal1/bert-mini"`` (from the local cache, else downloaded; offline it fails fast with
    what to download)."""
    spec = str(spec)
    if spec == SHAPES_WORDPIECE:
        return shapes_wordpiece()
    path = Path(spec).expanduser()
    if path.is_dir():
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if spec.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"tokenizer {spec!r}: no such directory ({path.absolute()})")
    from xclip.distill.towers import ensure_hub_files

    local_only = ensure_hub_files(spec, "tokenizer", "tokenizer_config.json")
    return AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
