"""EvaluationSuite routes batches by task to its members; CombinedDataModule concatenates loaders."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from xclip.data import CombinedDataModule
from xclip.engine import EvaluationModule
from xclip.suite import EvaluationSuite


class Counting(EvaluationModule):
    """Sums the values of the batches it receives and logs the sum at epoch end."""

    workflow = "counting"

    def __init__(self, name: str):
        super().__init__()
        self.name, self.seen, self.epochs = name, [], 0

    def step(self, batch, stage):
        self.seen.append(float(batch["x"].sum()))

    def finish(self, stage):
        self.epochs += 1
        self.log_metric(stage, f"{self.name}_sum", sum(self.seen))

    def extra_results(self):
        return {"batches": len(self.seen)}


class Tagged(pl.LightningDataModule):
    def __init__(self, task: str, values: list[float]):
        super().__init__()
        self.task, self.values = task, values

    def val_dataloader(self):
        return DataLoader(
            [{"x": torch.tensor(v)} for v in self.values],
            batch_size=2,
            collate_fn=lambda items: {"x": torch.stack([i["x"] for i in items]), "task": self.task},
        )


def test_batches_reach_the_member_of_their_task_and_members_log():
    suite = EvaluationSuite({"a": Counting("a"), "b": Counting("b")}, routes={"cls": "a", "ood": "b"})
    data = CombinedDataModule({"one": Tagged("cls", [1, 2, 3]), "two": Tagged("ood", [10, 20])})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(suite, datamodule=data)
    assert suite.members["a"].seen == [3.0, 3.0] and suite.members["b"].seen == [30.0]
    assert suite.members["a"].epochs == suite.members["b"].epochs == 1
    assert trainer.callback_metrics["val/counting/a_sum"].item() == 6.0
    assert trainer.callback_metrics["val/counting/b_sum"].item() == 30.0
    assert suite.extra_results() == {
        "routes": {"cls": "a", "ood": "b"},
        "backbones": [],
        "a": {"batches": 2},
        "b": {"batches": 1},
    }


def test_a_member_that_is_not_an_evaluation_module_is_refused():
    with pytest.raises(TypeError, match=r"suite member\(s\) \['plain'\] are not xclip evaluation modules"):
        EvaluationSuite({"plain": pl.LightningModule()}, routes={"cls": "plain"})


def test_a_batch_without_a_route_is_an_error():
    suite = EvaluationSuite({"a": Counting("a")}, routes={"cls": "a"})
    data = CombinedDataModule({"one": Tagged("cls", [1]), "two": Tagged("cir", [2])})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(ValueError, match="no member module for batches of task 'cir'"):
        trainer.validate(suite, datamodule=data)


def test_routes_must_match_the_members():
    with pytest.raises(ValueError, match=r"not in `modules`"):
        EvaluationSuite({"a": Counting("a")}, routes={"cls": "b"})
    with pytest.raises(ValueError, match=r"\['b'\] receive no batches"):
        EvaluationSuite({"a": Counting("a"), "b": Counting("b")}, routes={"cls": "a"})
    with pytest.raises(ValueError, match="at least one member"):
        EvaluationSuite({}, routes={})


# ---- real members: one backbone per spec, explanations from the routed member's model ------
def _shapes_suite(retrieval_backbone):
    from xclip.clip import ZeroShotModule
    from xclip.retrieval import RetrievalModule

    return EvaluationSuite(
        {
            "zeroshot": ZeroShotModule(backbone="xclip:tiny-shapes"),
            "retrieval": RetrievalModule(backbone=retrieval_backbone),
        },
        routes={"classification": "zeroshot", "retrieval": "retrieval"},
    )


def _shapes_data(n=6):
    from xclip.data import ShapesWorldDataModule
    from xclip.retrieval import RetrievalDataModule

    return CombinedDataModule(
        {
            "classification": ShapesWorldDataModule(val_tasks=["classification"], n_val=n, batch_size=n),
            "retrieval": RetrievalDataModule(source="shapes", n=n, seed=0, batch_size=n),
        }
    )


def test_members_naming_the_same_spec_share_one_backbone_object():
    suite = _shapes_suite("xclip:tiny-shapes")
    zeroshot, retrieval = suite.members["zeroshot"], suite.members["retrieval"]
    assert zeroshot.backbone is retrieval.backbone is suite.backbone
    n_params = sum(p.numel() for p in zeroshot.backbone.parameters())
    assert sum(p.numel() for p in suite.parameters()) == n_params  # held once, not twice
    assert suite.extra_results()["backbones"] == [{"spec": "xclip:tiny-shapes", "members": ["zeroshot", "retrieval"]}]


def test_explanations_use_the_backbone_of_the_member_each_batch_is_routed_to(tmp_path):
    import json

    import numpy as np
    import open_clip
    from lightning.pytorch.loggers import TensorBoardLogger

    from xclip.backbones import load_backbone, wrap_model
    from xclip.callbacks import GradECLIPCallback
    from xclip.explain import GradECLIP

    trained = load_backbone("xclip:tiny-shapes")
    torch.manual_seed(0)
    other = wrap_model(open_clip.model.CLIP(**trained.model_cfg).eval(), preprocess_cfg=trained.preprocess_cfg)
    suite, data = _shapes_suite(other), _shapes_data()
    assert suite.backbone_for({"task": "classification"}) is suite.members["zeroshot"].backbone
    assert suite.backbone_for({"task": "retrieval"}) is other
    with pytest.raises(RuntimeError, match="2 different backbones"):
        suite.backbone  # noqa: B018
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        callbacks=[GradECLIPCallback(max_items=12, text_maps=False)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(suite, datamodule=data, verbose=False)
    out = tmp_path / "run" / "version_0" / "explanations" / "grad_eclip" / "val"
    index = json.loads((out / "index.json").read_text())
    assert sorted(i["task"] for i in index["items"]) == ["classification"] * 6 + ["retrieval"] * 6
    cls = data.datamodules["classification"].dataset("classification", "val")
    gallery = data.datamodules["retrieval"].gallery
    for item in index["items"]:
        i = int(item["id"])
        if item["task"] == "classification":
            bb, image, text = suite.members["zeroshot"].backbone, cls[i]["image"], cls[i]["caption"]
        else:
            bb, image, text = other, gallery.image(i), gallery.captions(i)[0]
        assert item["text"] == text
        expected = GradECLIP(bb).pair_maps(bb.normalize(image[None]), [text])[0]
        np.testing.assert_allclose(np.load(out / item["npy"]), expected.numpy(), rtol=1e-4, atol=1e-7)


def test_failure_analysis_finds_the_retrieval_member_of_a_suite(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from xclip.retrieval import RetrievalExplanationCallback

    suite, data = _shapes_suite("xclip:tiny-shapes"), _shapes_data(n=40)
    callback = RetrievalExplanationCallback(max_items=4, per_annotator=1, overlap=1, improvements=False, cards=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(suite, datamodule=data, verbose=False)
    summary = callback.analyse(trainer, suite)
    emb = suite.members["retrieval"].gallery_embeddings
    top1 = (emb.text_emb @ emb.image_emb.T).argmax(1)  # brute force: every top-1 text->image miss
    assert summary["n_failures"] == int((top1 != emb.text_to_image).sum()) > 0
    assert len(list((tmp_path / "run" / "version_0" / "failures" / "val" / "cards").glob("*.png"))) == min(
        4, summary["n_failures"]
    )


def test_cam_callback_writes_the_grad_cam_maps_of_the_explained_items(tmp_path):
    import json

    import numpy as np
    from lightning.pytorch.loggers import TensorBoardLogger

    from xclip.callbacks import CAMCallback
    from xclip.explain import GradCAM

    suite, data = _shapes_suite("xclip:tiny-shapes"), _shapes_data()
    trainer = pl.Trainer(
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="run"),
        callbacks=[CAMCallback(max_items=4)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(suite, datamodule=data, verbose=False)
    out = tmp_path / "run" / "version_0" / "explanations" / "grad_cam" / "val"
    index = json.loads((out / "index.json").read_text())
    assert index["explainer"] == "grad_cam" and len(index["items"]) == 4
    cls = data.datamodules["classification"].dataset("classification", "val")
    bb = suite.members["zeroshot"].backbone
    cam = GradCAM(bb)
    for item in index["items"]:
        sample = cls[int(item["id"])]
        want = cam.pair_maps(bb.normalize(sample["image"][None]), [sample["caption"]])[0]
        np.testing.assert_allclose(np.load(out / item["npy"]), want.numpy(), atol=1e-5)
