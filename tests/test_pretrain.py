"""ClipPretrainModule: a short fit lowers the loss, exports an xclip checkpoint, and a second stage
warm-starts from it."""

import lightning.pytorch as pl
import pytest
import torch

from xclip.backbones import load_checkpoint
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
        return clip_contrastive_loss(module.embed_images(batch["image"]), module.embed_texts(batch["texts"]), scale)[0].item()


def fit(module, tmp_path, steps):
    data = ShapesWorldDataModule(train_task="pretrain", val_tasks=["classification", "retrieval"], image_size=32,
                                 n_train=10_000, n_val=16, batch_size=16)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=1, val_check_interval=steps, default_root_dir=tmp_path)
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


def test_context_length_must_match_the_text_config():
    with pytest.raises(ValueError, match="context_length"):
        ClipPretrainModule(MODEL_CFG, context_length=16)
