"""`xclip cir-query` end to end on a folder of PNGs: ranking, cache, explanations, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from file_fixtures import write_bomb_png

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
    code = main(
        [
            "cir-query",
            "--reference",
            str(reference),
            "--caption",
            "is blue instead of red",
            "--gallery",
            str(gallery),
            "--top-k",
            "4",
            "--phi",
            str(root / "phi"),
            "--cache-dir",
            str(root / "cache"),
            "--out",
            str(root / out),
            *extra,
        ]
    )
    assert code is None
    return json.loads((root / out / "results.json").read_text())


def test_registered():
    assert COMMANDS["cir-query"][0] == "xclip.cir.cli:main"


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
        q = query_features(
            bb, phi(bb.encode_image(bb.normalize(load_image01(reference, 64)[None]))), [["is blue instead of red"]]
        )
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
        main(
            [
                "cir-query",
                "--reference",
                str(root / "missing.png"),
                "--caption",
                "x",
                "--gallery",
                str(gallery),
                "--phi",
                str(root / "phi"),
                "--cache-dir",
                str(root / "cache"),
                "--out",
                str(root / "o"),
            ]
        )
    assert err.value.code == 1 and "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(
            [
                "cir-query",
                "--reference",
                str(reference),
                "--caption",
                "x",
                "--gallery",
                str(root / "nope"),
                "--phi",
                str(root / "phi"),
                "--out",
                str(root / "o"),
            ]
        )
    assert err.value.code == 2 and "is not a folder" in capsys.readouterr().err


def query(root: Path, gallery: Path, reference: Path, *extra: str) -> list[str]:
    return [
        "cir-query",
        "--reference",
        str(reference),
        "--caption",
        "is blue instead of red",
        "--gallery",
        str(gallery),
        "--phi",
        str(root / "phi"),
        "--cache-dir",
        str(root / "cache"),
        *extra,
    ]


@pytest.mark.parametrize("explain", [False, True])
def test_a_gallery_holding_only_the_reference_is_an_error(folder, tmp_path, capsys, explain):
    root, _, reference = folder
    gallery = tmp_path / "only"
    gallery.mkdir()
    (gallery / "ref.png").write_bytes(reference.read_bytes())
    with pytest.raises(SystemExit) as err:  # was: 0 results and exit 0; with --explain a RuntimeError from torch.stack
        main(
            query(
                root, gallery, gallery / "ref.png", "--out", str(tmp_path / "out"), *(["--explain"] if explain else [])
            )
        )
    message = capsys.readouterr().err
    assert err.value.code == 1
    assert f"{gallery} holds no image besides the reference" in message and "add images" in message
    assert not (tmp_path / "out").exists()


def test_top_k_beyond_the_gallery_says_how_many_were_returned(folder, tmp_path, capsys):
    root, gallery, reference = folder
    small = tmp_path / "small"
    small.mkdir()
    for name in ("target_0.png", "target_1.png", "target_2.png"):
        (small / name).write_bytes((gallery / name).read_bytes())
    code = main(query(root, small, reference, "--top-k", "10", "--out", str(tmp_path / "out")))
    assert code is None
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["results"]) == 3 and results["top_k"] == 10
    note = "--top-k 10: the gallery holds 3 images besides the reference, so 3 are returned"
    assert results["note"] == note and note in capsys.readouterr().out


def test_an_image_bomb_in_the_gallery_is_skipped_and_named(folder, tmp_path, capsys):
    root, gallery, reference = folder
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for name in ("target_0.png", "target_1.png"):
        (mixed / name).write_bytes((gallery / name).read_bytes())
    bomb = write_bomb_png(mixed / "bomb.png")  # declares 30000 x 30000 pixels
    code = main(query(root, mixed, reference, "--out", str(tmp_path / "out")))
    assert code is None
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["skipped"] == [str(bomb.resolve())] and results["gallery_size"] == 2
    assert {Path(r["file"]).name for r in results["results"]} == {"target_0.png", "target_1.png"}
    assert f"skipped 1 unreadable file: {bomb.resolve()}" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:  # the reference itself: named, exit 1
        main(query(root, mixed, bomb, "--out", str(tmp_path / "out2")))
    assert err.value.code == 1 and str(bomb) in capsys.readouterr().err


def test_default_output_is_a_new_folder_under_runs(folder, tmp_path, monkeypatch):
    root, gallery, reference = folder
    monkeypatch.chdir(tmp_path)
    for expected in ("version_0", "version_1"):
        assert main(query(root, gallery, reference, "--top-k", "2")) is None
        assert (tmp_path / "runs" / "cir_query" / expected / "results.json").is_file()
    assert not (tmp_path / "cir_query_out").exists()


@pytest.mark.parametrize("caption", ["", "   "])
def test_an_empty_caption_says_what_to_pass(folder, capsys, caption):
    root, gallery, reference = folder
    with pytest.raises(SystemExit) as err:
        main(
            [
                "cir-query",
                "--reference",
                str(reference),
                "--caption",
                caption,
                "--gallery",
                str(gallery),
                "--phi",
                str(root / "phi"),
                "--out",
                str(root / "o"),
            ]
        )
    message = capsys.readouterr().err
    assert err.value.code == 2 and "--caption is empty" in message and '--caption "is blue instead of red"' in message
    assert "compose_query" not in message


@pytest.mark.parametrize("side", ["gallery", "query"])
def test_nan_embeddings_are_refused_naming_the_files(folder, tmp_path, monkeypatch, capsys, side):
    from xclip.cir import folder_query

    root, gallery, reference = folder
    if side == "gallery":
        embed = folder_query.gallery_embeddings

        def nan_row(*args, **kwargs):
            files, emb, skipped, status = embed(*args, **kwargs)
            emb = emb.clone()
            emb[3] = float("nan")  # ranked first before the check
            return files, emb, skipped, status

        monkeypatch.setattr(folder_query, "gallery_embeddings", nan_row)
        expected = "NaN or infinite embeddings for 1 gallery images, e.g. " + str(sorted(gallery.rglob("*.png"))[3])
    else:
        monkeypatch.setattr(folder_query, "query_features", lambda *a, **k: torch.full((1, 128), float("nan")))
        expected = f"NaN or infinite embeddings for the query (reference {reference})"
    with pytest.raises(SystemExit) as err:
        main(query(root, gallery, reference, "--out", str(tmp_path / "out")))
    assert err.value.code == 1 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
