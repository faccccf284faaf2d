"""CIRModule through `xclip validate` / `xclip test`: ShapesWorld numbers equal a brute-force
computation, two DDP processes equal one, the gallery cache, CIRR/CIRCO/FashionIQ fixtures end to
end (metrics and test submissions), and phi training through `xclip fit`."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cir_fixtures import write_circo, write_cirr, write_fashioniq
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from xclip.backbones import load_backbone
from xclip.backbones.base import PLACEHOLDER_TOKEN_ID
from xclip.cir.benchmark import ShapesCIRBenchmark, load_cir_image
from xclip.cir.phi import Phi, load_phi, save_phi
from xclip.cli import main
from xclip.engine.lightning_cli import XClipCLI
from xclip.results import run_directory

ROOT = Path(__file__).resolve().parents[2]
SHAPES, CIRR, CIRCO, FIQ, PHI_FIT = (
    ROOT / "configs" / f"cir_{n}.yaml" for n in ("shapes", "cirr", "circo", "fashioniq", "phi_shapes")
)
N, N_CIRCO = 45, 4  # 49 queries, odd: under DDP one process gets a padded repeat of a query
QUIET = ["--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def phi_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("phi") / "phi"
    save_phi(Phi.for_backbone(load_backbone("xclip:tiny-shapes")), out, {"backbone": "xclip:tiny-shapes"})
    return out


def shapes_args(root: Path, phi: Path, explain: bool = False) -> list[str]:
    return [
        "--config",
        str(SHAPES),
        "--trainer.logger.init_args.save_dir",
        str(root / "logs"),
        "--model.init_args.cache_dir",
        str(root / "cache"),
        "--model.init_args.phi",
        str(phi),
        "--data.init_args.n",
        str(N),
        "--data.init_args.n_circo",
        str(N_CIRCO),
        "--data.init_args.batch_size",
        "8",
        "--model.init_args.backbone",
        "xclip:tiny-shapes",
        "--model.init_args.methods",
        "[searle, image, text, image_text]",
        *([] if explain else ["--trainer.callbacks", "[]"]),
        *QUIET,
    ]


def results_of(root: Path) -> dict:
    return json.loads(next((root / "logs").glob("*/version_*/results.json")).read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory, phi_dir):
    root = tmp_path_factory.mktemp("single")
    main(["validate", *shapes_args(root, phi_dir, explain=True)])
    return results_of(root)


def brute_force(phi_path: Path) -> dict[str, dict[str, float]]:
    """The four methods' metrics from scratch: plain encoders, the injection written out by hand,
    a full argsort, CIRR's and CIRCO's definitions over Python lists."""
    bb, phi = load_backbone("xclip:tiny-shapes"), load_phi(phi_path)
    bench = ShapesCIRBenchmark(N, 1000, 64, "val", n_circo=N_CIRCO)
    n_q = len(bench)
    with torch.no_grad():
        gallery = F.normalize(
            bb.encode_image(bb.normalize(torch.stack([bench.gallery_image(i) for i in range(bench.n_gallery)]))), dim=-1
        )
        feats = bb.encode_image(bb.normalize(torch.stack([bench.reference_image(q) for q in range(n_q)])))
        captions = [q.captions[0] for q in bench.queries]
        tokens = bb.tokenize([f"a photo of $ that {c}" for c in captions])
        embeds = bb.token_embedding(tokens).clone()
        slot = (tokens == PLACEHOLDER_TOKEN_ID).int().argmax(1)
        embeds[torch.arange(n_q), slot] = phi(feats)
        searle = F.normalize(bb.encode_text_from_embeddings(embeds, tokens), dim=-1)
        text = F.normalize(bb.encode_text(captions), dim=-1)
    image = F.normalize(feats, dim=-1)
    queries = {"searle": searle, "image": image, "text": text, "image_text": F.normalize(image + text, dim=-1)}
    out = {}
    for name, q in queries.items():
        order = torch.argsort(q @ gallery.T, dim=1, descending=True, stable=True).tolist()
        hits = {f"R@{k}": 0 for k in (1, 5, 10, 50)} | {f"R_subset@{k}": 0 for k in (1, 2, 3)}
        aps: dict[int, list[float]] = {k: [] for k in (5, 10, 25, 50)}
        for i, row in enumerate(order):
            query = bench.queries[i]
            if query.ground_truth:  # CIRCO-style: AP@K over every image that satisfies the caption
                gts = {bench.index_of(g) for g in query.ground_truth}
                for k, values in aps.items():
                    values.append(
                        sum(sum(g in gts for g in row[: j + 1]) / (j + 1) for j in range(k) if row[j] in gts)
                        / min(len(gts), k)
                    )
                continue
            row = [g for g in row if g != bench.index_of(query.reference)]
            target = bench.index_of(query.target)
            for k in (1, 5, 10, 50):
                hits[f"R@{k}"] += target in row[:k]
            subset = [g for g in row if bench.gallery_keys[g] in query.members]
            for k in (1, 2, 3):
                hits[f"R_subset@{k}"] += target in subset[:k]
        out[name] = {k: v / N for k, v in hits.items()} | {f"mAP@{k}": sum(v) / N_CIRCO for k, v in aps.items()}
    return out


def test_shapes_validate_equals_brute_force(single, phi_dir):
    cir = single["cir"]
    gallery = 8 * 7 + N_CIRCO * 5
    assert cir["benchmark"] == {
        "name": "shapes",
        "split": "val",
        "n_queries": N + N_CIRCO,
        "n_evaluated": N + N_CIRCO,
        "n_gallery": gallery,
        "n_gallery_read": gallery,
        "not_evaluated": {"unreadable_reference": [], "not_loaded": []},
        "target_not_read": [],
    }
    expected = brute_force(phi_dir)
    for method, values in expected.items():
        for name, value in values.items():
            assert cir["metrics"][method][name] == pytest.approx(value, abs=1e-9), (method, name)
            assert single["metrics"][f"val/cir/{method}/{name}"] == pytest.approx(value, abs=1e-6)
    assert (
        set(cir["recall_at_1_per_kind"]["searle"])
        == set(cir["subset_recall_at_1_per_kind"]["searle"])
        == {"colour", "shape", "size", "count", "position", "background"}
    )
    assert cir["chance"] == pytest.approx({"R_subset@1": 1 / 6, "R_subset@2": 2 / 6, "R_subset@3": 3 / 6})
    assert cir["embedding_cache"]["status"] == "miss; written" and cir["skipped"] == {"gallery": [], "query": []}


def test_the_callback_writes_explanations_of_the_first_queries(single):
    run = Path(single["cir"]["embedding_cache"]["dir"]).parents[1] / "logs"
    folder = next(run.glob("*/version_*/explanations/cir/val"))
    index = json.loads((folder / "index.json").read_text())["items"]
    assert [e["query"] for e in index] == ["0", "1", "2", "3"]  # max_items: 4
    for entry in index:
        assert [c["rank"] for c in entry["candidates"]] == [1, 2, 3, 4, 5]
        assert all(c["file"] != entry["reference"] for c in entry["candidates"])  # the reference is never a candidate
        for c in entry["candidates"]:
            assert (folder / entry["query"] / c["files"]["BC"]).is_file()
            assert (folder / entry["query"] / c["files"]["C_npy"]).is_file()
    events = list(folder.parents[2].glob("events.out.tfevents.*"))
    assert events and max(e.stat().st_size for e in events) > 10_000  # the panels went to TensorBoard


def test_second_run_reads_the_gallery_cache(single, phi_dir, tmp_path):
    root = Path(single["cir"]["embedding_cache"]["dir"]).parents[0]
    args = shapes_args(tmp_path, phi_dir)
    args[args.index("--model.init_args.cache_dir") + 1] = str(root)
    main(["validate", *args])
    again = results_of(tmp_path)
    assert again["cir"]["embedding_cache"]["status"] == "hit"
    assert again["cir"]["metrics"] == single["cir"]["metrics"]


@pytest.mark.slow  # 45 s on 2 idle cores (the CIR tests' CI budget is ~90 s)
def test_ddp_two_processes_equal_single_process(single, phi_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MASTER_PORT", None)
    cmd = [
        sys.executable,
        "-m",
        "xclip.cli",
        "validate",
        *shapes_args(tmp_path, phi_dir),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stdout + proc.stderr
    results = results_of(tmp_path)
    assert results["cir"]["metrics"] == single["cir"]["metrics"]  # exact fractions
    assert results["metrics"] == single["metrics"]


def _fixture_run(tmp_path: Path, config: Path, phi_dir: Path, stage: str, source_root: Path, *extra: str) -> dict:
    """`stage` of a real-data config on a fixture folder with the tiny CLIP; its results.json."""
    main(
        [
            stage,
            "--config",
            str(config),
            "--model.init_args.backbone",
            "xclip:tiny-shapes",
            "--model.init_args.phi",
            str(phi_dir),
            "--model.init_args.cache_dir",
            "null",
            "--data.init_args.data_root",
            str(source_root),
            "--data.init_args.image_size",
            "64",
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.batch_size",
            "4",
            "--trainer.accelerator",
            "cpu",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "logs"),
            "--trainer.callbacks",
            "[]",
            *QUIET,
            *extra,
        ]
    )
    return json.loads(max((tmp_path / "logs").glob("*/version_*/results.json")).read_text())


def test_cirr_fixture_validate_and_test_submission(tmp_path, phi_dir):
    write_cirr(tmp_path / "CIRR")
    # the fixture's 9-image gallery cannot give Recall@50: ask for the K it can
    _fixture_run(tmp_path, CIRR, phi_dir, "validate", tmp_path / "CIRR", "--model.init_args.ks", "[1, 2, 5]")
    val = results_of(tmp_path)
    assert set(val["cir"]["metrics"]["searle"]) == {"R@1", "R@2", "R@5", "R_subset@1", "R_subset@2", "R_subset@3"}
    test = _fixture_run(tmp_path / "t", CIRR, phi_dir, "test", tmp_path / "CIRR")
    files = sorted(Path(p).name for p in test["cir"]["submissions"])
    assert files == [f"searle_vitb32_{m}.json" for m in ("image", "image_text", "searle", "text")] + [
        f"subset_searle_vitb32_{m}.json" for m in ("image", "image_text", "searle", "text")
    ]
    sub = json.loads(
        Path(next(p for p in test["cir"]["submissions"] if p.endswith("/searle_vitb32_searle.json"))).read_text()
    )
    assert (
        sub["version"] == "rc2"
        and sub["metric"] == "recall"
        and set(sub) - {"version", "metric"} == {"10", "11", "12", "13", "14"}
    )
    assert all(len(v) == 8 for k, v in sub.items() if k not in ("version", "metric"))  # 9 images minus the reference


def test_cirr_unreadable_reference_and_target_count_as_misses(tmp_path, phi_dir, capsys):
    names, entries = write_cirr(tmp_path / "CIRR")["val"]
    broken = {entries[0]["reference"], entries[3]["target_hard"]}  # query 10's reference, query 13's target
    for name in broken:
        (tmp_path / "CIRR" / "dev" / f"{name}.png").write_bytes(b"not a png")
    _fixture_run(
        tmp_path,
        CIRR,
        phi_dir,
        "validate",
        tmp_path / "CIRR",
        "--model.init_args.ks",
        "[1, 2, 5]",
        "--model.init_args.methods",
        "[image]",
    )  # an unreadable target ended the run ("rank the whole gallery")
    cir = results_of(tmp_path)["cir"]
    assert cir["benchmark"] == {
        "name": "cirr",
        "split": "val",
        "n_queries": 5,
        "n_evaluated": 4,
        "n_gallery": 9,
        "n_gallery_read": 7,
        "not_evaluated": {"unreadable_reference": ["10"], "not_loaded": []},
        "target_not_read": ["13"],
    }
    assert sorted(Path(p).name for p in cir["skipped"]["gallery"]) == sorted(f"{n}.png" for n in broken)
    assert [Path(p).name for p in cir["skipped"]["query"]] == [f"{entries[0]['reference']}.png"]
    assert (
        "[val; cirr val, 4 of 5 queries evaluated x 7 of 9 images read; misses: 1 not evaluated, 1 target not read]"
        in capsys.readouterr().out
    )  # the report row
    # brute force over the readable files, every query in the denominator
    bb = load_backbone("xclip:tiny-shapes")
    readable = [n for n in names if n not in broken]
    with torch.no_grad():
        emb = F.normalize(
            bb.encode_image(
                bb.normalize(
                    torch.stack([load_cir_image(tmp_path / "CIRR" / "dev" / f"{n}.png", 64) for n in readable])
                )
            ),
            dim=-1,
        )
    hits = dict.fromkeys(("R@1", "R@2", "R@5", "R_subset@1", "R_subset@2", "R_subset@3"), 0)
    for e in entries:
        if e["reference"] in broken:
            continue
        q = emb[readable.index(e["reference"])]
        order = [readable[i] for i in torch.argsort(emb @ q, descending=True, stable=True).tolist()]
        order = [n for n in order if n != e["reference"]]
        subset = [n for n in order if n in e["img_set"]["members"]]
        for k in (1, 2, 5):
            hits[f"R@{k}"] += e["target_hard"] in order[:k]
        for k in (1, 2, 3):
            hits[f"R_subset@{k}"] += e["target_hard"] in subset[:k]
    assert cir["metrics"]["image"] == pytest.approx({k: v / 5 for k, v in hits.items()}, abs=1e-9)


def test_cirr_test_submission_lists_a_query_with_an_unreadable_reference(tmp_path, phi_dir):
    names, entries = write_cirr(tmp_path / "CIRR")["test1"]
    (tmp_path / "CIRR" / "test1" / f"{entries[1]['reference']}.png").write_bytes(b"not a png")
    test = _fixture_run(tmp_path / "t", CIRR, phi_dir, "test", tmp_path / "CIRR")
    assert test["cir"]["benchmark"]["not_evaluated"] == {"unreadable_reference": ["11"], "not_loaded": []}
    sub = json.loads(
        Path(next(p for p in test["cir"]["submissions"] if p.endswith("/searle_vitb32_searle.json"))).read_text()
    )
    assert set(sub) - {"version", "metric"} == {"10", "11", "12", "13", "14"} and sub["11"] == []
    assert all(
        len(v) == 7 for k, v in sub.items() if k not in ("version", "metric", "11")
    )  # 8 read, minus the reference
    for name in names:
        (tmp_path / "CIRR" / "test1" / f"{name}.png").write_bytes(b"not a png")
    with pytest.raises(
        SystemExit, match=r"cirr test1: no gallery image could be read \(9 unreadable, e.g. .*test1-0-0-img0"
    ):
        _fixture_run(tmp_path / "u", CIRR, phi_dir, "test", tmp_path / "CIRR")


@pytest.mark.parametrize("side", ["gallery", "query"])
def test_nan_embeddings_are_refused_naming_the_image(tmp_path, phi_dir, monkeypatch, side):
    from xclip.cir.cir_module import CIRModule

    write_cirr(tmp_path / "CIRR")
    if side == "gallery":  # gallery image 0 embedded as NaN: it ranked first for every query
        step, embed = CIRModule.gallery_step, CIRModule.image_features

        def nan_first(self, batch):
            self.image_features = lambda images: torch.where(
                batch["index"][:, None] == 0, float("nan"), embed(self, images)
            )
            step(self, batch)
            del self.image_features

        monkeypatch.setattr(CIRModule, "gallery_step", nan_first)
        message = r"cirr val: the model gave NaN or infinite embeddings for 1 gallery images, e.g. .*dev-0-0-img0.png"
    else:
        features = CIRModule.query_features

        def nan_second(self, feats, batch):
            out = features(self, feats, batch)
            out["image"][batch["index"] == 1] = float("nan")
            return out

        monkeypatch.setattr(CIRModule, "query_features", nan_second)
        message = r"cirr val: method 'image' gave NaN or infinite query features for 1 queries \(ids 11; .*dev-1-0-img1"
    with pytest.raises(SystemExit, match=message):
        _fixture_run(tmp_path, CIRR, phi_dir, "validate", tmp_path / "CIRR")


def test_circo_and_fashioniq_fixtures_validate(tmp_path, phi_dir):
    write_circo(tmp_path / "CIRCO")
    _fixture_run(tmp_path, CIRCO, phi_dir, "validate", tmp_path / "CIRCO", "--model.init_args.ks", "[1, 5, 10]")
    circo = results_of(tmp_path)["cir"]["metrics"]["searle"]
    assert set(circo) == {"mAP@1", "mAP@5", "mAP@10", "R@1", "R@5", "R@10"}
    write_fashioniq(tmp_path / "FIQ")
    _fixture_run(tmp_path / "fiq", FIQ, phi_dir, "validate", tmp_path / "FIQ", "--model.init_args.ks", "[1, 5]")
    fiq = results_of(tmp_path / "fiq")["cir"]["metrics"]["text"]
    assert set(fiq) == {f"{c}_R@{k}" for c in ("dress", "shirt", "toptee") for k in (1, 5)} | {"R@1", "R@5"}
    assert fiq["R@5"] == pytest.approx((fiq["dress_R@5"] + fiq["shirt_R@5"] + fiq["toptee_R@5"]) / 3)


SHIPPED_PHI = ROOT / "checkpoints" / "searle-phi-tiny-shapes"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def short_phi_fit(root: Path, *extra: str) -> None:
    main(
        [
            "fit",
            "--config",
            str(PHI_FIT),
            "--data.init_args.n_train",
            "16",
            "--data.init_args.n",
            "48",
            "--data.init_args.batch_size",
            "8",
            "--model.init_args.oti",
            '{"steps": 2}',
            "--model.init_args.phrases_per_concept",
            "4",
            "--model.init_args.oti_cache_dir",
            str(root / "oti"),
            "--trainer.max_epochs",
            "1",
            "--trainer.check_val_every_n_epoch",
            "1",
            "--trainer.logger.init_args.save_dir",
            str(root / "logs"),
            *QUIET,
            *extra,
        ]
    )


def test_phi_fit_exports_into_the_run_by_default():
    cli = XClipCLI(args=["--config", str(PHI_FIT)], run=False, save_config_callback=None)
    cli.model.trainer = cli.trainer
    assert cli.model.export_path() == run_directory(cli.trainer) / "model"
    assert "checkpoints" not in cli.model.export_path().parts


def test_phi_fit_leaves_the_shipped_phi_and_overwrites_a_checkpoint_only_on_request(tmp_path):
    shipped = digests(SHIPPED_PHI)
    target = tmp_path / "copy"
    shutil.copytree(SHIPPED_PHI, target)
    before = digests(target)
    with pytest.raises(SystemExit, match=r"already exists.*overwrite: true"):
        short_phi_fit(tmp_path / "a", "--model.init_args.export_dir", str(target))
    assert digests(target) == before and not (tmp_path / "a" / "oti").exists()  # refused before the OTI targets
    short_phi_fit(tmp_path / "b", "--model.init_args.export_dir", str(target), "--model.init_args.overwrite", "true")
    assert digests(SHIPPED_PHI) == shipped
    after = digests(target)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert after["README.md"] == before["README.md"]  # the model card is carried over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "copy"]  # no backup or temp left
    config = json.loads((target / "config.json").read_text())
    recipe_backbone = next(
        line.split(":", 1)[1].strip()
        for line in PHI_FIT.read_text().splitlines()
        if line.strip().startswith("backbone:")
    )
    assert config["architecture"] == "searle-phi" and config["backbone"] == recipe_backbone
    assert (config["input_dim"], config["hidden_dim"], config["output_dim"]) == (128, 512, 128)
    assert len(list((tmp_path / "b" / "oti").glob("*.safetensors"))) == 1
    load_phi(target)
    # validation ran during the fit (it once had no benchmark): SEARLE's recall per epoch in TensorBoard
    (events,) = (tmp_path / "b" / "logs").rglob("events.out.tfevents.*")
    tags = EventAccumulator(str(events)).Reload().Tags()["scalars"]
    assert {"val/cir/searle/R@1", "val/cir/searle/R@5", "val/cir/searle/R@10"} <= set(tags)
