"""Small random-init CLIP models built offline (open_clip and Hugging Face), shared by the tests of
several layers: both sequence layouts of open_clip's blocks and an offline CLIP tokenizer for HF."""

from __future__ import annotations

import gzip

import torch
from open_clip.model import CLIP
from open_clip.tokenizer import SimpleTokenizer, default_bpe
from open_clip.transformer import Transformer
from transformers import CLIPConfig, CLIPModel, CLIPTokenizerFast

VISION_CFG = dict(image_size=32, patch_size=8, width=64, layers=3, head_width=16, mlp_ratio=2)
TEXT_CFG = dict(context_length=16, vocab_size=49408, width=64, heads=4, layers=3)
MODEL_CFG = dict(embed_dim=32, vision_cfg=VISION_CFG, text_cfg=TEXT_CFG)


def tiny_clip(seed: int = 0, **overrides) -> CLIP:
    torch.manual_seed(seed)
    cfg = {**MODEL_CFG, **overrides}
    return CLIP(**cfg).eval()


def sequence_first_twin(model: CLIP) -> CLIP:
    """Same weights, blocks rebuilt as open_clip 3.3's Transformer(batch_first=False)."""
    twin = CLIP(**MODEL_CFG)
    v, t = VISION_CFG, TEXT_CFG
    twin.visual.transformer = Transformer(
        v["width"], v["layers"], v["width"] // v["head_width"], v["mlp_ratio"], batch_first=False
    )
    twin.transformer = Transformer(t["width"], t["layers"], t["heads"], 4.0, batch_first=False)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


def randomise_biases(model: torch.nn.Module) -> None:
    """Both libraries initialise biases (and LayerNorm gains) to 0 / 1; make them generic so that,
    e.g., leaving out the out_proj bias in the reference mode's q/k projection is detectable."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.ndim == 1 and ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.mul_(1 + 0.2 * torch.randn_like(p))


def tiny_hf_clip(seed: int = 0, text_layers: int = 3, generic_biases: bool = False, **text_overrides) -> CLIPModel:
    """A transformers CLIPModel (32 px, patch 8, width 64); `generic_biases`: see `randomise_biases`."""
    torch.manual_seed(seed)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=49408,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=text_layers,
            num_attention_heads=4,
            max_position_embeddings=16,
            **text_overrides,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
        ),
        projection_dim=32,
    )
    model = CLIPModel(cfg)
    if generic_biases:
        randomise_biases(model)
    return model.eval()


def clip_hf_tokenizer() -> CLIPTokenizerFast:
    """A transformers CLIP tokenizer built offline from the BPE file shipped with open_clip."""
    bpe = SimpleTokenizer()
    vocab = dict(bpe.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    return CLIPTokenizerFast(vocab=vocab, merges=[tuple(m.split()) for m in merges])
