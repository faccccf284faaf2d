"""`xclip cir-query` end to end on a folder of PNGs: ranking, cache, explanations, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from xclip.backbones import load_backbone
from xclip.cir.phi import Phi, load_phi, save_phi
from xclip.cir.query import query_features
from xclip.cli import COMMANDS, main
from xclip.data.images import load_image01
from xclip.data.shapes import ShapesCIR
from xclip.explain.render import load_map_npy, save_png


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("cirq")
    ds = ShapesCIR(7, seed=11, split="val")
    gallery = root / "gallery"
    for i in range(7):
        item = ds[i]
        save_png(item["target"], gallery / f"target_{i}.png")
        save_png(item["reference"], gallery / "sub" / f"reference_{i}.png")
    torch.manual_seed(0)
    save_phi(Phi.for_backbone(load_backbone("xclip:tiny-shapes")), root / "phi", {"backbone": "xclip:tiny-shapes"})
    return root, gallery, gallery / "sub" / "reference_0.png"


def run(root: Path, gallery: Path, reference: Path, out: str, *extra: str) -> dict:
    code = main(["cir-query", "--reference", str(reference), "--caption", "is blue instead of red", "--gallery", str(gallery),
                 "--top-k", "4", "--phi", str(root / "phi"), "--cache-dir", str(root / "cache"), "--out", str(root / out),
                 *extra])
    assert code is None
    return json.loads((root / out / "results.json").read_text())


def test_registered():
    assert COMMANDS["cir-query"] == "xclip.cir.query_cli:main"


def test_query_ranks_the_folder_explains_and_caches(folder, capsys):
    root, gallery, reference = folder
    first = run(root, gallery, reference, "out1", "--explain")
    assert first["gallery_size"] == 14 and first["gallery_cache"] == "miss; written"
    files = [r["file"] for r in first["results"]]
    assert len(files) == 4 and str(reference.resolve()) not in files  # the reference is removed
    # independent ranking: every file embedded on its own
    bb, phi = load_backbone("xclip:tiny-shapes"), load_phi(root / "phi")
    paths = sorted(p for p in gallery.rglob("*.png") if p != reference)
    with torch.no_grad():
        emb = F.normalize(bb.encode_image(bb.normalize(torch.stack([load_image01(p, 64) for p in paths]))), dim=-1)
        q = query_features(bb, phi(bb.encode_image(bb.normalize(load_image01(reference, 64)[None]))), [["is blue instead of red"]])
    scores = (emb @ q[0]).tolist()
    expected = sorted(range(len(paths)), key=lambda i: -scores[i])[:4]
    assert files == [str(paths[i].resolve()) for i in expected]
    assert [r["score"] for r in first["results"]] == pytest.approx([scores[i] for i in expected], abs=1e-5)
    folder_out = Path(first["explanation"])
    index = json.loads((folder_out / "explanation.json").read_text())
    assert [c["rank"] for c in index["candidates"]] == [1, 2, 3, 4]
    assert [c["file"] for c in index["candidates"]] == files
    for c in index["candidates"]:
        for key in ("BC", "D"):
            assert (folder_out / c["files"][key]).stat().st_size > 1000
        arr, meta = load_map_npy(folder_out / c["files"]["C_npy"])
        assert arr.shape == (8, 8) and meta["grid_size"] == [8, 8] and meta["rank"] == c["rank"]
        assert (folder_out / c["files"]["B_npy"]).stat().st_size < 1024  # patch-grid maps, never upsampled
    assert "$" in [w for w, _ in index["candidates"][0]["words"]]
    second = run(root, gallery, reference, "out2")
    assert second["gallery_cache"] == "hit" and [r["file"] for r in second["results"]] == files
    entry = next((root / "cache").iterdir())
    third = run(root, entry, reference, "out3")  # the cache entry itself as the gallery
    assert third["gallery_cache"] == "hit" and [r["file"] for r in third["results"]] == files
    assert "explanations" in capsys.readouterr().out


def test_errors_are_readable(folder, capsys):
    root, gallery, reference = folder
    with pytest.raises(SystemExit) as err:
        main(["cir-query", "--reference", str(root / "missing.png"), "--caption", "x", "--gallery", str(gallery),
              "--phi", str(root / "phi"), "--cache-dir", str(root / "cache"), "--out", str(root / "o")])
    assert err.value.code == 1 and "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["cir-query", "--reference", str(reference), "--caption", "x", "--gallery", str(root / "nope"),
              "--phi", str(root / "phi"), "--out", str(root / "o")])
    assert err.value.code == 2 and "is not a folder" in capsys.readouterr().err
