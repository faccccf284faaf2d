"""The TSPO head: an MLP on frozen CLIP features that scores a prompt's faithfulness globally and
per patch (plain ``nn.Module``; training lives in ``tspo_module.py``).

Features of an (image, prompt) pair, all from one traced forward of the frozen backbone:
``text`` [D] (normalised prompt embedding), ``image`` [D] (normalised image embedding),
``tokens`` [P, W] (the last block's patch tokens *before* ``ln_post``, as HPSv2's region head reads
them) and ``patch_sim`` [P] (each patch token's cosine with the prompt after the model's own
``ln_post`` + projection, the dense TiPAI map).

Outputs: a reward ``r = scale * cos(image, text) + g(...)`` whose MLP ``g`` starts at zero (so an
untrained head ranks exactly like the zero-shot CLIP score) and per-patch error logits from a
text-conditioned MLP with a learned position per patch (HPSv2's regional head is a
``Linear(width -> 1)`` without the text); the reward also reads the mean and max of the
text-conditioned patch features and the whole maps of error logits and patch similarities.

Export format: a model folder (`xclip.model_folder`, architecture ``tspo-head``): float32
``model.safetensors``, ``config.json`` (``"head": {...}, "backbone": spec,
"backbone_weights_sha256", ...``) and a ``README.md`` card.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xclip.backbones import Backbone, checkpoint_path, load_backbone
from xclip.backbones.base import ImageTrace
from xclip.data.embedding_cache import weights_fingerprint
from xclip.explain import explaining
from xclip.model_folder import load_state, read_folder, save_folder
from xclip.model_folder import read_config as read_model_config

ARCHITECTURE = "tspo-head"


@dataclass
class HeadFeatures:
    """Frozen features of N (image, prompt) pairs: text, image [N, D]; tokens [N, P, W];
    patch_sim [N, P]."""

    text: Tensor
    image: Tensor
    tokens: Tensor
    patch_sim: Tensor

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> HeadFeatures:
        return HeadFeatures(
            *(t.to(device=device, dtype=dtype) for t in (self.text, self.image, self.tokens, self.patch_sim))
        )


def features_from_trace(backbone: Backbone, trace: ImageTrace, text_emb: Tensor) -> HeadFeatures:
    """The head's features from a ``backbone.trace_image`` pass and each image's prompt embedding
    [N, D] (any norm)."""
    text = F.normalize(text_emb.float(), dim=-1)
    image = F.normalize(trace.embedding.float(), dim=-1)
    projected = F.normalize(backbone.patch_features(trace).float(), dim=-1)
    return HeadFeatures(text, image, trace.patch_tokens.float(), (projected * text[:, None]).sum(-1))


def extract_features(backbone: Backbone, images01: Tensor, text_emb: Tensor, batch_size: int = 256) -> HeadFeatures:
    """Run the frozen backbone once over images [N, 3, H, W] in [0, 1] (each with its prompt's
    embedding [N, D]) in batches: `HeadFeatures` on the CPU."""
    parts = []
    with torch.no_grad(), explaining(backbone):
        for s in range(0, images01.shape[0], batch_size):
            x = backbone.normalize(images01[s : s + batch_size].to(backbone.device))
            trace = backbone.trace_image(x, n_blocks=0)
            f = features_from_trace(backbone, trace, text_emb[s : s + batch_size].to(backbone.device))
            parts.append(f.to("cpu"))
    return HeadFeatures(*(torch.cat([getattr(p, k) for p in parts]) for k in ("text", "image", "tokens", "patch_sim")))


class TSPOHead(nn.Module):
    """Global reward and per-patch error logits from `HeadFeatures`.

    Args:
        embed_dim: D, the joint embedding size.
        token_width: W, the vision width of the patch tokens.
        patch_grid: (gh, gw), the ViT grid of the tokens (P = gh * gw).
        hidden: width of both MLPs.
        dropout: dropout inside the MLPs.
        init_scale: the starting weight of the zero-shot cosine in the reward.
    """

    def __init__(
        self,
        embed_dim: int,
        token_width: int,
        patch_grid: tuple[int, int],
        hidden: int = 256,
        dropout: float = 0.1,
        init_scale: float = 10.0,
    ):
        super().__init__()
        self.config = {
            "embed_dim": int(embed_dim),
            "token_width": int(token_width),
            "patch_grid": [int(patch_grid[0]), int(patch_grid[1])],
            "hidden": int(hidden),
            "dropout": float(dropout),
            "init_scale": float(init_scale),
        }
        self.patch_grid = (int(patch_grid[0]), int(patch_grid[1]))
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        self.token_norm = nn.LayerNorm(token_width)
        self.token_proj = nn.Linear(token_width, hidden)
        self.text_proj = nn.Linear(embed_dim, hidden)
        self.sim_proj = nn.Linear(1, hidden)
        patches = self.patch_grid[0] * self.patch_grid[1]
        self.position = nn.Parameter(torch.zeros(patches, hidden))  # where a patch is (position errors)
        self.patch_mlp = nn.Sequential(
            nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )
        self.global_mlp = nn.Sequential(
            nn.Linear(embed_dim + 2 * hidden + 2 * patches, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2),
            nn.GELU(),
            nn.Linear(hidden // 2, 1),
        )
        last = self.global_mlp[-1]
        assert isinstance(last, nn.Linear)  # built just above
        nn.init.zeros_(last.weight)  # start exactly at the zero-shot ranking
        nn.init.zeros_(last.bias)

    def forward(self, f: HeadFeatures) -> tuple[Tensor, Tensor]:
        """-> (reward [N], patch error logits [N, P])."""
        t = self.text_proj(f.text)[:, None]  # [N, 1, H]
        tok = self.token_proj(self.token_norm(f.tokens))  # [N, P, H]
        h = tok * t + tok + t + self.sim_proj(f.patch_sim[..., None]) + self.position  # text-conditioned
        logits = self.patch_mlp(h)[..., 0]
        # the reward reads the pooled patch features and the whole error-logit and similarity maps
        pooled = torch.cat([h.mean(1), h.amax(1), logits, f.patch_sim], dim=-1)
        # the image and prompt embeddings enter only through their product: on their own they let
        # the MLP memorise prompts (measured: train pair accuracy 0.999, validation 0.84)
        g = self.global_mlp(torch.cat([f.image * f.text, pooled], dim=-1))[:, 0]
        reward = self.scale * (f.image * f.text).sum(-1) + g
        return reward, logits

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the head's weights (what a TiPAI database's ``head`` scores depend on)."""
        return weights_fingerprint(self)

    def check_backbone(self, backbone: Backbone) -> None:
        """Refuse a backbone whose embedding size or patch grid differs from the head's."""
        if backbone.embed_dim != self.config["embed_dim"] or tuple(backbone.grid_size) != self.patch_grid:
            raise ValueError(
                f"the TSPO head expects a backbone with embed_dim {self.config['embed_dim']} and patch grid "
                f"{self.patch_grid}, got {backbone.embed_dim} and {tuple(backbone.grid_size)}"
            )

    def score_trace(self, backbone: Backbone, trace: ImageTrace, text_emb: Tensor) -> tuple[Tensor, Tensor]:
        """Reward [N] and error probability [N, gh, gw] from a traced forward (eval mode)."""
        was = self.training
        self.eval()
        try:
            f = features_from_trace(backbone, trace, text_emb).to(next(self.parameters()).device)
            reward, logits = self(f)
        finally:
            self.train(was)
        return reward, logits.sigmoid().unflatten(1, self.patch_grid)


class TSPOScorer:
    """A trained head with its backbone: ``score(prompt, images) -> (global [N], patch_grid [N, gh, gw])``.

    Args:
        head: an exported head directory or a `TSPOHead`.
        backbone: the backbone (default: the spec stored in the head's config).
    """

    def __init__(self, head: str | Path | TSPOHead, backbone: Backbone | str | None = None):
        if not isinstance(head, TSPOHead):
            spec = read_config(head)["backbone"]
            head = load_head(head)
            backbone = backbone if backbone is not None else spec
        if backbone is None:
            raise ValueError("a TSPOHead object needs its backbone (a spec or a Backbone)")
        self.backbone = load_backbone(backbone) if isinstance(backbone, str) else backbone
        self.head = head.eval()
        self.head.check_backbone(self.backbone)

    @torch.no_grad()
    def score(self, prompt: str, images01: Tensor) -> tuple[Tensor, Tensor]:
        """One prompt against images [N, 3, H, W] in [0, 1]: the head's reward [N] (higher = more
        faithful; comparable within a prompt) and each patch's error probability [N, gh, gw]."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
        if images01.ndim != 4 or images01.shape[1] != 3 or not images01.is_floating_point():
            raise ValueError(
                f"images must be floats [N, 3, H, W] in [0, 1], got {tuple(images01.shape)} {images01.dtype}"
            )
        with explaining(self.backbone):
            text = self.backbone.encode_text([prompt], normalize=True).float()
            trace = self.backbone.trace_image(self.backbone.normalize(images01.to(self.backbone.device)), n_blocks=0)
            return self.head.score_trace(self.backbone, trace, text.expand(images01.shape[0], -1))


# ---- export / load ----------------------------------------------------------------------------
def read_config(path: str | Path) -> dict[str, Any]:
    """config.json of an exported head (``xclip:<name>`` or a model folder), checked."""
    return read_model_config(checkpoint_path(path), ARCHITECTURE)


def head_from_config(config: dict[str, Any]) -> TSPOHead:
    """A freshly initialised head of the architecture in `config` (a head's ``config`` or an
    export's ``config.json`` ``head`` entry)."""
    cfg = dict(config)
    return TSPOHead(cfg.pop("embed_dim"), cfg.pop("token_width"), tuple(cfg.pop("patch_grid")), **cfg)


def with_weights(head: TSPOHead, weights: dict[str, Tensor]) -> TSPOHead:
    """A copy of `head` (eval mode) holding `weights` (e.g. the best validation epoch's)."""
    copy = head_from_config(head.config)
    copy.load_state_dict(weights)
    return copy.eval()


def load_head(path: str | Path) -> TSPOHead:
    """An exported head (eval mode)."""
    folder = read_folder(checkpoint_path(path), ARCHITECTURE)
    return load_state(head_from_config(folder.config["head"]), folder).eval()


def export_head(
    head: TSPOHead,
    path: str | Path,
    backbone: Backbone,
    backbone_spec: str,
    extra: dict[str, Any] | None = None,
    card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `head` as a model folder (`xclip.model_folder`: float32 weights, config.json, a card),
    atomically. A folder that already holds a model is replaced only with `overwrite`; a card
    already there (hand-written) is kept.

    Raises:
        FileExistsError: `path` holds a model and `overwrite` is False.
    """
    config = {
        "head": head.config,
        "backbone": backbone_spec,
        "backbone_weights_sha256": weights_fingerprint(backbone),
        "features": "prompt + image embeddings (normalised), patch tokens before ln_post, patch-token cosine",
        **(extra or {}),
    }
    return save_folder(
        path,
        ARCHITECTURE,
        config,
        head.state_dict(),
        dtype=torch.float32,
        overwrite=overwrite,
        card=card or f"# TSPO head\n\nBackbone: `{backbone_spec}`.\n",
    )


def head_card(spec: str, val: dict[str, Any], steps: int) -> str:
    """The model card written with an export (the recipe's validation numbers)."""
    metrics = val.get("metrics", {})
    lines = [
        "# TSPO head",
        "",
        (
            f"An MLP on frozen `{spec}` features (see `xclip.faithfulness.tspo_head`), trained "
            f"{steps} steps with `xclip fit --config configs/tspo_head_shapes.yaml`; exported: the "
            f"weights of validation epoch {val.get('epoch', '?')} (step {val.get('step', '?')}), "
            "the best head pair accuracy."
        ),
        "",
        f"Validation ({val.get('n_prompts', '?')} prompts, {val.get('n_error_images', '?')} erroneous images):",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    return (
        "\n".join(lines) + "\n\nTest numbers: run `xclip test --config configs/tspo_head_shapes.yaml "
        "--model.init_args.head_checkpoint <this directory>`.\n"
    )
