"""SEARLE's textual-inversion network phi and its checkpoints.

phi maps an image's *unnormalised* CLIP image feature to a pseudo-word token embedding that the
text encoder reads at the ``$`` slot of a prompt (Baldrati et al., "Zero-Shot Composed Image
Retrieval with Textual Inversion", ICCV 2023; code: miccunifi/SEARLE).

Three sources of weights:
- SEARLE's released state dicts (``SEARLE_ViT-B32.pt``, ``SEARLE_ViT-L14.pt``: ``{"Phi": state_dict}``,
  Linear layers at ``layers.0``, ``layers.3``, ``layers.6``; training checkpoints also hold
  ``"epoch"``), read from a file or from the torch.hub cache where ``torch.hub.load`` puts them;
- xclip's model folder (`xclip.model_folder`: ``config.json`` + ``model.safetensors`` + a card),
  e.g. ``checkpoints/searle-phi-tiny-shapes`` (``"xclip:searle-phi-tiny-shapes"``);
- a fresh random init for a backbone (`Phi.for_backbone`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from xclip.backbones import Backbone, checkpoint_path
from xclip.model_folder import load_state, read_folder, save_folder

SEARLE_URL = "https://github.com/miccunifi/SEARLE/releases/download/weights/{file}"
# released backbone -> (input_dim, hidden_dim, output_dim, file name)
SEARLE_RELEASES: dict[str, tuple[int, int, int, str]] = {
    "ViT-B/32": (512, 2048, 512, "SEARLE_ViT-B32.pt"),
    "ViT-L/14": (768, 3072, 768, "SEARLE_ViT-L14.pt"),
}
ARCHITECTURE = "searle-phi"


class Phi(nn.Module):
    """``Linear(d_img, h), GELU, Dropout, Linear(h, h), GELU, Dropout, Linear(h, d_token)`` (h = 4 d_img).

    ``forward(image_features [N, d_img])`` -> pseudo tokens [N, d_token]. The input is the
    *unnormalised* ``encode_image`` output, as in SEARLE.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, dropout: float = 0.5):
        super().__init__()
        self.input_dim, self.hidden_dim, self.output_dim, self.dropout = input_dim, hidden_dim, output_dim, dropout
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, image_features: Tensor) -> Tensor:
        if image_features.ndim != 2 or image_features.shape[1] != self.input_dim:
            raise ValueError(f"phi expects image features [N, {self.input_dim}], got {tuple(image_features.shape)}")
        return self.layers(image_features.to(next(self.layers.parameters()).dtype))

    @classmethod
    def for_backbone(cls, backbone: Backbone, dropout: float = 0.5) -> Phi:
        """A randomly initialised phi sized for `backbone`: d_img = embed_dim, hidden 4 d_img,
        d_token = the width of its token embeddings."""
        d_img = backbone.embed_dim
        return cls(d_img, 4 * d_img, token_width(backbone), dropout)

    def config(self) -> dict:
        return {
            "architecture": ARCHITECTURE,
            "input_dim": self.input_dim,
            "hidden_dim": self.hidden_dim,
            "output_dim": self.output_dim,
            "dropout": self.dropout,
        }


def token_width(backbone: Backbone) -> int:
    """Width W of the backbone's token embeddings (what a pseudo token must have)."""
    return int(backbone.text.width)


def check_compatible(phi: Phi, backbone: Backbone) -> None:
    """Raise when `phi`'s input/output sizes do not fit `backbone` (e.g. SEARLE ViT-L/14 weights
    on a ViT-B/32)."""
    width = token_width(backbone)
    if phi.input_dim != backbone.embed_dim or phi.output_dim != width:
        raise ValueError(
            f"phi maps {phi.input_dim} -> {phi.output_dim} but the backbone has image features of "
            f"{backbone.embed_dim} and token embeddings of {width}: use the phi trained for this backbone"
        )


# ---- SEARLE's released state dicts --------------------------------------------------------------
def searle_hub_path(name: str) -> Path:
    """Where ``torch.hub`` caches SEARLE's released weights for `name` (``"ViT-B/32"``/``"ViT-L/14"``)."""
    if name not in SEARLE_RELEASES:
        raise ValueError(f"unknown SEARLE release {name!r}: choose from {sorted(SEARLE_RELEASES)} or pass a file path")
    return Path(torch.hub.get_dir()) / "checkpoints" / SEARLE_RELEASES[name][3]


def load_searle_state(path: str | Path) -> dict[str, Tensor]:
    """The ``'Phi'`` state dict of a SEARLE checkpoint file (released weights or a training checkpoint)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such SEARLE checkpoint file")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "Phi" not in blob:
        found = sorted(blob) if isinstance(blob, dict) else type(blob).__name__
        raise ValueError(
            f"{path}: not a SEARLE checkpoint (expected the state dict under the key 'Phi', found {found})"
        )
    state = blob["Phi"]
    expected = {f"layers.{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")}
    if set(state) != expected:
        raise ValueError(
            f"{path}: the 'Phi' state dict has keys {sorted(state)}, expected {sorted(expected)} "
            "(Linear layers at layers.0, layers.3, layers.6)"
        )
    return state


def phi_from_state(state: dict[str, Tensor], dropout: float = 0.5) -> Phi:
    """A Phi sized from a state dict with SEARLE's layout, weights loaded, in eval mode."""
    hidden, input_dim = state["layers.0.weight"].shape
    output_dim = state["layers.6.weight"].shape[0]
    phi = Phi(int(input_dim), int(hidden), int(output_dim), dropout)
    phi.load_state_dict({k: v.float() for k, v in state.items()})
    return phi.eval()


def load_searle_phi(source: str | Path = "ViT-B/32", download: bool = False) -> Phi:
    """SEARLE's phi from a released name (``"ViT-B/32"``, ``"ViT-L/14"``: read from the torch.hub
    cache) or a checkpoint file path. With `download`, a release missing from the cache is fetched
    with ``torch.hub.load_state_dict_from_url``; without it, a clear error says what to fetch and where."""
    if str(source) in SEARLE_RELEASES:
        name = str(source)
        in_dim, hidden, out_dim, file = SEARLE_RELEASES[name]
        path = searle_hub_path(name)
        if not path.is_file():
            url = SEARLE_URL.format(file=file)
            if not download:
                raise FileNotFoundError(
                    f"SEARLE {name} weights are not in the torch.hub cache ({path}): download {url} "
                    f"there (e.g. `curl -L -o {path} {url}`), or pass load_searle_phi(..., download=True)"
                )
            torch.hub.load_state_dict_from_url(url, map_location="cpu", file_name=file)
        phi = phi_from_state(load_searle_state(path))
        if (phi.input_dim, phi.hidden_dim, phi.output_dim) != (in_dim, hidden, out_dim):
            raise ValueError(
                f"{path}: phi {phi.input_dim}->{phi.hidden_dim}->{phi.output_dim} is not SEARLE {name} "
                f"({in_dim}->{hidden}->{out_dim})"
            )
        return phi
    return phi_from_state(load_searle_state(source))


def save_searle_state(phi: Phi, path: str | Path, epoch: int | None = None) -> Path:
    """Write `phi` in SEARLE's own layout (``{"Phi": state_dict[, "epoch"]}``), for SEARLE's scripts."""
    blob: dict[str, Any] = {"Phi": {k: v.detach().cpu() for k, v in phi.state_dict().items()}}
    if epoch is not None:
        blob["epoch"] = int(epoch)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    torch.save(blob, tmp)
    os.replace(tmp, path)
    return path


# ---- xclip's format ------------------------------------------------------------------------------
def save_phi(
    phi: Phi, directory: str | Path, extra: dict | None = None, overwrite: bool = False, card: str | None = None
) -> Path:
    """Write phi as a model folder (`xclip.model_folder`: ``architecture: searle-phi``, fp32 weights),
    atomically; `extra` goes into config.json (the backbone it was trained for, the recipe). A
    folder that already holds a model is replaced only with `overwrite`."""
    config = {k: v for k, v in phi.config().items() if k != "architecture"}
    return save_folder(
        directory,
        ARCHITECTURE,
        {**config, **(extra or {})},
        phi.state_dict(),
        card=card,
        dtype=torch.float32,
        overwrite=overwrite,
    )


def load_phi(spec: str | Path) -> Phi:
    """phi from any source, in eval mode: ``"xclip:<name>"`` or a model folder,
    ``"searle:ViT-B/32"`` / ``"searle:ViT-L/14"`` (SEARLE's releases from the torch.hub cache), or a
    SEARLE checkpoint file (``.pt``)."""
    spec = str(spec)
    if spec.startswith("searle:"):
        return load_searle_phi(spec.split(":", 1)[1])
    path = checkpoint_path(spec)
    if path.is_file():
        return load_searle_phi(path)
    folder = read_folder(path, ARCHITECTURE)
    config = folder.config
    phi = Phi(config["input_dim"], config["hidden_dim"], config["output_dim"], config.get("dropout", 0.5))
    return load_state(phi, folder).eval()
