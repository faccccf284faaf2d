"""EvaluationSuite routes batches by task to its members; CombinedDataModule concatenates loaders."""

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from xclip.data import CombinedDataModule
from xclip.suite import EvaluationSuite


class Counting(pl.LightningModule):
    """Sums the values of the batches it receives and logs the sum at epoch end."""

    def __init__(self, name: str):
        super().__init__()
        self.name, self.seen, self.epochs = name, [], 0

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.seen.append(float(batch["x"].sum()))

    def on_validation_epoch_end(self):
        self.epochs += 1
        self.log(f"val/{self.name}_sum", sum(self.seen))

    def extra_results(self):
        return {"batches": len(self.seen)}


class Tagged(pl.LightningDataModule):
    def __init__(self, task: str, values: list[float]):
        super().__init__()
        self.task, self.values = task, values

    def val_dataloader(self):
        return DataLoader([{"x": torch.tensor(v)} for v in self.values], batch_size=2,
                          collate_fn=lambda items: {"x": torch.stack([i["x"] for i in items]), "task": self.task})


def test_batches_reach_the_member_of_their_task_and_members_log():
    suite = EvaluationSuite({"a": Counting("a"), "b": Counting("b")}, routes={"cls": "a", "ood": "b"})
    data = CombinedDataModule({"one": Tagged("cls", [1, 2, 3]), "two": Tagged("ood", [10, 20])})
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(suite, datamodule=data)
    assert suite.members["a"].seen == [3.0, 3.0] and suite.members["b"].seen == [30.0]
    assert suite.members["a"].epochs == suite.members["b"].epochs == 1
    assert trainer.callback_metrics["val/a_sum"].item() == 6.0
    assert trainer.callback_metrics["val/b_sum"].item() == 30.0
    assert suite.extra_results() == {"routes": {"cls": "a", "ood": "b"}, "backbones": [], "a": {"batches": 2},
                                     "b": {"batches": 1}}


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
