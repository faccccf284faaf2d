"""Every shipped config builds its model and datamodule and serves a batch: the embedded ones as they
are, the real-data ones on fixtures in the real on-disk formats (pretrained weights cannot be
downloaded here, so their backbone spec is swapped for the same architecture at random init)."""

import json
from pathlib import Path

import pytest
from cir_fixtures import write_circo, write_cirr, write_fashioniq
from file_fixtures import write_coco
from ood_fixtures import write_placesbg, write_waterbirds

from xclip.cir.phi import Phi, save_phi
from xclip.engine.lightning_cli import XClipCLI
from xclip.ood.vocabulary import builtin_wordlist

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# used on top of stage 1 (the SigLIP-style and the relative-caption recipes too: same data and schedule keys)
OVERLAYS = {
    "pretrain_tiny_shapes_stage2.yaml",
    "pretrain_tiny_shapes_stage3.yaml",
    "pretrain_tiny_shapes_siglip.yaml",
    "pretrain_tiny_shapes_cir.yaml",
}
STAGES = {"pretrain_tiny_shapes_stage2.yaml", "pretrain_tiny_shapes_stage3.yaml"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    words = root / "wordnet"  # the layout `xclip vocab wordnet` writes; here the shipped ShapesWorld lists
    words.mkdir()
    for name in ("nouns", "adjectives"):
        (words / f"{name}.txt").write_text(builtin_wordlist(name).read_text())
    phis = {}  # SEARLE's released phi (torch.hub) cannot be downloaded: a random one of its shape
    for width in (512, 768):
        phis[width] = save_phi(Phi(width, 4 * width, width), root / f"phi{width}")
    write_cirr(root / "CIRR")
    write_circo(root / "CIRCO")
    write_fashioniq(root / "FashionIQ")
    return {
        "waterbirds": write_waterbirds(root / "waterbirds"),
        "placesbg": write_placesbg(root / "placesbg"),
        "coco": write_coco(root / "coco"),
        "words": words,
        "phi": phis,
        "cir": root,
    }


def overrides(name: str, data: dict, tmp: Path) -> list[str]:
    common = ["--trainer.logger.init_args.save_dir", str(tmp)]
    if name == "ood_waterbirds.yaml":
        return common + [
            "--data.init_args.data_root",
            str(data["waterbirds"]),
            "--data.init_args.ood_dirs",
            json.dumps({"placesbg": str(data["placesbg"])}),
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.image_size",
            "224",
            "--model.init_args.backbone",
            "openclip:ViT-B-16",
            "--model.init_args.nouns",
            str(data["words"] / "nouns.txt"),
            "--model.init_args.adjectives",
            str(data["words"] / "adjectives.txt"),
            "--model.init_args.n_groups",
            "2",
            "--model.init_args.m1_topk",
            "2",
            "--model.init_args.m2",
            "false",
            "--model.init_args.text_cache_dir",
            "null",
        ]
    if name == "retrieval_coco.yaml":
        return common + [
            "--data.init_args.data_root",
            str(data["coco"]),
            "--data.init_args.n",
            "null",
            "--data.init_args.num_workers",
            "0",
            "--model.init_args.backbone",
            "openclip:ViT-B-32-quickgelu",
            "--model.init_args.cache_dir",
            "null",
        ]
    if name.startswith("tipai"):  # the database goes to the test's folder; the folder config reads the shipped example
        return common + ["--model.init_args.db_path", str(tmp / "tipai.db")]
    if name == "tspo_head_shapes.yaml":  # a few prompts, features cached in the test's folder
        return common + [
            "--data.init_args.n_train",
            "2",
            "--data.init_args.n_val",
            "3",
            "--data.init_args.cache_dir",
            str(tmp / "cache"),
        ]
    if name in CIR_REAL:
        folder, backbone, width = CIR_REAL[name]
        return common + [
            "--data.init_args.data_root",
            str(data["cir"] / folder),
            "--data.init_args.num_workers",
            "0",
            "--model.init_args.backbone",
            backbone,
            "--model.init_args.phi",
            str(data["phi"][width]),
            "--model.init_args.cache_dir",
            "null",
        ]
    if name == "cir_phi_shapes.yaml":
        return common + ["--data.init_args.batch_size", "4", "--data.init_args.n_train", "8", "--data.init_args.n", "8"]
    return common + ["--data.init_args.batch_size", "4"] if name.startswith("pretrain") else common


# real-data CIR configs: fixture folder, the same architecture at random init, its phi width
CIR_REAL = {
    "cir_cirr.yaml": ("CIRR", "openclip:ViT-B-32-quickgelu", 512),
    "cir_circo.yaml": ("CIRCO", "openclip:ViT-L-14-quickgelu", 768),
    "cir_fashioniq.yaml": ("FashionIQ", "openclip:ViT-B-32-quickgelu", 512),
}
FIT_CONFIGS = ("pretrain", "cir_phi")


def build(configs: list[str], extra: list[str]) -> XClipCLI:
    args = [a for name in configs for a in ("--config", str(CONFIGS / name))] + extra
    return XClipCLI(args=args, run=False, save_config_callback=None)


def test_every_config_is_covered():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")}
    assert shipped - OVERLAYS == set(CASES), "add the new config to CASES (with fixtures if it reads real data)"


CASES = [
    "demo.yaml",
    "ood_shapes.yaml",
    "ood_waterbirds.yaml",
    "retrieval_shapes.yaml",
    "retrieval_coco.yaml",
    "pretrain_tiny_shapes.yaml",
    "distill_teacher_shapes.yaml",
    "distill_student_shapes.yaml",
    "distill_student_nokd_shapes.yaml",
    "distill_explain_shapes.yaml",
    "tipai_shapes.yaml",
    "tipai_folder.yaml",
    "tspo_head_shapes.yaml",
    "cir_shapes.yaml",
    "cir_phi_shapes.yaml",
    "cir_cirr.yaml",
    "cir_circo.yaml",
    "cir_fashioniq.yaml",
]


@pytest.mark.parametrize("name", CASES)
def test_config_builds_model_and_datamodule_and_serves_a_batch(name, data, tmp_path):
    cli = build([name], overrides(name, data, tmp_path))
    assert cli.model is not None and cli.datamodule is not None
    dm = cli.datamodule
    fit = name.startswith(FIT_CONFIGS)
    dm.setup("fit" if fit else "validate")
    loaders = dm.train_dataloader() if fit else dm.val_dataloader()
    loaders = loaders if isinstance(loaders, list) else [loaders]
    for loader in loaders:
        batch = next(iter(loader))
        if name == "tspo_head_shapes.yaml":  # cached frozen-backbone features, not pixels
            assert batch["image"].is_floating_point() and bool(batch["image"].isfinite().all())
            assert len(batch["image"]) == len(batch["text"]) > 0
            continue
        if batch.get("cached"):  # a gallery whose embeddings are already cached: indices only
            assert len(batch["index"]) > 0
            continue
        if name == "cir_phi_shapes.yaml":  # phi trains on (image index, concepts); images come from its OTI cache
            assert len(batch["index"]) == len(batch["concepts"]) > 0 and all(batch["concepts"])
            continue
        # TiPAI batches hold a prompt's renders, CIR query batches the reference image
        images = batch.get("image", batch.get("images", batch.get("reference")))
        assert batch.get("skipped") or (images.ndim >= 4 and images.shape[-3] == 3 and len(images) > 0)
    if name == "ood_waterbirds.yaml":  # the word lists are read (embedding them with ViT-B/16 takes minutes)
        nouns, adjectives, mine = cli.model._vocabulary()
        assert mine and len(nouns) > 300 and len(adjectives) > 150


@pytest.mark.parametrize("overlay", sorted(STAGES))
def test_recipe_stages_build_on_top_of_stage_one(overlay, tmp_path):
    cli = build(["pretrain_tiny_shapes.yaml", overlay], overrides("pretrain_tiny_shapes.yaml", {}, tmp_path))
    assert cli.model.hparams.init_checkpoint == "checkpoints/tiny-shapes"  # read only, never exported over
    assert cli.model.export_path is not None and cli.model.export_dir is None


def test_siglip_recipe_builds_a_sigmoid_model_warm_started_from_tiny_shapes(tmp_path):
    cli = build(
        ["pretrain_tiny_shapes.yaml", "pretrain_tiny_shapes_siglip.yaml"],
        overrides("pretrain_tiny_shapes.yaml", {}, tmp_path),
    )
    module = cli.model
    assert module.hparams.warm_start == "checkpoints/tiny-shapes" and module.hparams.init_checkpoint is None
    assert module.model.logit_bias is not None and module.model.visual.trunk.attn_pool is not None
    assert module.model.text_pool_type == "last" and module.model.attn_mask is None  # non-causal, last position
    assert module.export_path is not None and module.export_dir is None  # never over the shipped folder
