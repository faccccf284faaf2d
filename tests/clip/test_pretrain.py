"""ClipPretrainModule: a short fit lowers the loss, exports an xclip checkpoint, and a second stage
warm-starts from it; no recipe can overwrite the shipped checkpoint by accident."""

import hashlib
import math
import shutil
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from xclip.backbones import load_checkpoint
from xclip.cli import main
from xclip.clip import ClipPretrainModule, clip_contrastive_loss
from xclip.data import ShapesWorldDataModule

MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def batch_loss(module, batch) -> float:
    with torch.no_grad():
        scale = module.model.logit_scale.exp()
        return clip_contrastive_loss(module.embed_images(batch["image"]), module.embed_texts(batch["texts"]), scale)[
            0
        ].item()


def fit(module, tmp_path, steps):
    data = ShapesWorldDataModule(
        train_task="pretrain",
        val_tasks=["classification", "retrieval"],
        image_size=32,
        n_train=10_000,
        n_val=16,
        batch_size=16,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        val_check_interval=steps,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    return trainer


def test_fit_exports_and_second_stage_warm_starts(tmp_path):
    torch.manual_seed(0)
    export = tmp_path / "tiny"
    module = ClipPretrainModule(MODEL_CFG, lr=1e-3, warmup_steps=2, export_dir=str(export))
    batch = next(iter(ShapesWorldDataModule(train_task="pretrain", image_size=32, batch_size=16).train_dataloader()))
    before = batch_loss(module, batch)
    fit(module, tmp_path, steps=12)
    after = batch_loss(module, batch)
    assert after < before  # twelve steps of InfoNCE already separate this batch better

    backbone = load_checkpoint(export)
    assert backbone.model_cfg["vision_cfg"] == MODEL_CFG["vision_cfg"]
    for name, param in module.model.state_dict().items():  # fp16 storage of the trained weights
        torch.testing.assert_close(backbone.model.state_dict()[name], param.float(), atol=2e-3, rtol=2e-3)

    stage2 = ClipPretrainModule(MODEL_CFG, init_checkpoint=str(export))
    for name, param in backbone.model.state_dict().items():
        assert torch.equal(stage2.model.state_dict()[name], param)


def test_init_checkpoint_with_another_architecture_is_rejected(tmp_path):
    export = tmp_path / "tiny"
    fit(ClipPretrainModule(MODEL_CFG, export_dir=str(export)), tmp_path, steps=1)
    other = {**MODEL_CFG, "embed_dim": 16}
    with pytest.raises(ValueError, match="model_cfg"):
        ClipPretrainModule(other, init_checkpoint=str(export))


def test_lock_image_tower_trains_the_text_tower_only(tmp_path):
    torch.manual_seed(0)
    module = ClipPretrainModule(MODEL_CFG, lr=1e-3, warmup_steps=2, export=False, lock_image_tower=True)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit(module, tmp_path, steps=3)
    changed = {k for k, v in module.model.state_dict().items() if not torch.equal(before[k], v)}
    assert not {k for k in changed if k.startswith("visual.")}
    assert {"token_embedding.weight", "text_projection", "logit_scale"} <= changed
    assert any(k.startswith("transformer.") for k in changed)


def test_tokenize_equals_open_clip_and_caches_plain_ints():
    """The per-caption cache once held 200k small tensors, which pinned the allocator's heap: a
    2,000-step run on fresh captions grew by ~5 MB a step until the out-of-memory killer ended it."""
    import open_clip

    module = ClipPretrainModule(MODEL_CFG, export=False)
    texts = ["a red circle", "two small blue stars on water", "a red circle"]
    ids = module.tokenize(texts)
    assert ids.dtype == torch.long and torch.equal(ids, open_clip.tokenizer.SimpleTokenizer(context_length=32)(texts))
    assert all(type(module._tokens(t)) is tuple for t in texts)


def test_context_length_must_match_the_text_config():
    with pytest.raises(ValueError, match="context_length"):
        ClipPretrainModule(MODEL_CFG, context_length=16)


# ---- recipes never destroy shipped weights ----------------------------------------------------
ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "checkpoints" / "tiny-shapes"
RECIPES = [
    ("pretrain_tiny_shapes.yaml",),
    ("pretrain_tiny_shapes.yaml", "pretrain_tiny_shapes_stage2.yaml"),
    ("pretrain_tiny_shapes.yaml", "pretrain_tiny_shapes_stage3.yaml"),
    ("pretrain_tiny_shapes.yaml", "pretrain_tiny_shapes_cir.yaml"),
]


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def short_fit(tmp_path: Path, configs: tuple[str, ...], *extra: str) -> None:
    args = ["fit"]
    for name in configs:
        args += ["--config", str(ROOT / "configs" / name)]
    main(
        args
        + [
            "--trainer.max_steps",
            "2",
            "--trainer.precision",
            "32",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--data.init_args.batch_size",
            "8",
            "--data.init_args.n_val",
            "8",
            *extra,
        ]
    )


@pytest.mark.parametrize("configs", RECIPES, ids=["stage1", "stage2", "stage3", "cir"])
def test_a_short_fit_of_every_recipe_leaves_the_shipped_weights_unchanged(tmp_path, configs):
    before = digests(SHIPPED)
    short_fit(tmp_path, configs)
    assert digests(SHIPPED) == before
    (run,) = [p for p in tmp_path.rglob("version_0") if (p / "model").is_dir()]
    exported = load_checkpoint(run / "model")  # the export went into the run's log directory
    assert exported.model_cfg == load_checkpoint(SHIPPED).model_cfg


def test_exporting_over_a_checkpoint_needs_overwrite_and_is_checked_before_training(tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(SHIPPED, target)
    before = digests(target)
    with pytest.raises(SystemExit, match=r"already exists.*overwrite: true"):
        short_fit(tmp_path / "runs", RECIPES[0], "--model.init_args.export_dir", str(target))
    assert digests(target) == before and not list((tmp_path / "runs").rglob("*.ckpt"))  # no step was taken
    short_fit(
        tmp_path / "runs2",
        RECIPES[0],
        "--model.init_args.export_dir",
        str(target),
        "--model.init_args.overwrite",
        "true",
    )
    after = digests(target)
    assert after["model.safetensors"] != before["model.safetensors"]
    assert after["README.md"] == before["README.md"]  # the model card is carried over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "runs", "runs2"]  # no backup or temp left


def test_save_checkpoint_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    import xclip.model_folder as model_folder
    from xclip.backbones import save_checkpoint

    target = tmp_path / "copy"
    shutil.copytree(SHIPPED, target)
    before = digests(target)
    model = ClipPretrainModule(MODEL_CFG, export=False).model
    pre = {"image_size": 32, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(FileExistsError, match="already holds a model"):
        save_checkpoint(model, MODEL_CFG, pre, 32, target)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(model_folder, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, MODEL_CFG, pre, 32, target, overwrite=True)
    assert digests(target) == before  # a failed export leaves the old weights untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # and no temporary directory behind


def test_sigmoid_loss_is_the_mean_per_image_sum_of_pairwise_log_sigmoids():
    from xclip.clip import sigmoid_contrastive_loss

    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-10.0)
    brute = 0.0
    for i in range(4):
        for j in range(4):
            z = 1.0 if i == j else -1.0
            brute -= math.log(1 / (1 + math.exp(-z * (scale.item() * float(img[i] @ txt[j]) + bias.item()))))
    loss, acc = sigmoid_contrastive_loss(img, txt, scale, bias)
    assert loss.item() == pytest.approx(brute / 4, rel=1e-5)
    assert 0.0 <= acc.item() <= 1.0


def test_warm_start_renames_an_openclip_vit_into_a_timm_trunk_and_keeps_the_loss_parameters_fresh():
    import yaml

    cfg = yaml.safe_load(
        (Path(__file__).resolve().parents[2] / "configs" / "pretrain_tiny_shapes_siglip.yaml").read_text()
    )
    model_cfg = cfg["model"]["init_args"]["model_cfg"]
    from xclip.backbones import checkpoint_path

    shipped = checkpoint_path("xclip:tiny-shapes")
    module = ClipPretrainModule(model_cfg, export=False, warm_start=str(shipped))
    source = load_checkpoint(shipped).model.state_dict()
    own = module.model.state_dict()
    assert torch.equal(
        own["visual.trunk.blocks.4.attn.qkv.weight"], source["visual.transformer.resblocks.4.attn.in_proj_weight"]
    )
    assert "visual.trunk.blocks.5.attn.qkv.weight" not in own  # the sixth block is left out
    assert torch.equal(own["visual.trunk.pos_embed"][0], source["visual.positional_embedding"][1:])  # class row dropped
    assert torch.equal(own["visual.head.proj.weight"], source["visual.proj"].T)
    assert torch.equal(
        own["transformer.resblocks.0.attn.in_proj_weight"], source["transformer.resblocks.0.attn.in_proj_weight"]
    )
    assert own["logit_scale"].item() == pytest.approx(math.log(10), rel=1e-5)  # SigLIP's init, not the CLIP temperature
    assert own["logit_bias"].item() == -10.0
