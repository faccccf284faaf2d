"""Teacher/Student distillation (xclip.distill): the KD loss against a hand computation, the
projection layers trained, tower pooling per kind, fusions, the CSV layout's errors, the metrics
against scikit-learn, the checkpoint format."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch
from distill_fixtures import BERT, MOBILEVIT, STUDENT_ARGS, TASKS, VIT, shapes_csv_layout
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from xclip.data.shapes import BACKGROUNDS, SHAPES, ShapesNotes
from xclip.distill import (
    CSVFormatError,
    DistillDataModule,
    MultimodalClassifier,
    MultitaskClassificationMetrics,
    distillation_loss,
    label_fingerprint,
    load_classifier,
    load_tokenizer,
    save_classifier,
)
from xclip.distill.towers import TextTower, VisionTower


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("shapes-wordpiece")


def with_vocab(args, tokenizer):
    return {**args, "text": {**args["text"], "vocab_size": len(tokenizer)}}


# ----------------------------------------------------------------------------- KD loss


def _softmax(xs):
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def test_kd_loss_matches_a_hand_computation():
    s = {"a": [[1.0, 2.0, 0.0], [0.5, -1.0, 0.0]], "b": [[0.0, 3.0], [1.0, 1.0]]}
    t = {"a": [[0.5, 0.5, 3.0], [2.0, 0.0, -1.0]], "b": [[1.0, 0.0], [0.0, 2.0]]}
    y = {"a": [1, 0], "b": [1, 0]}
    fs, ft = [[1.0, 2.0], [0.0, -1.0]], [[0.5, 2.5], [1.0, -1.0]]
    alpha, beta, T = 0.7, 3.0, 2.0
    ce = sum(-math.log(_softmax(row)[label]) for task in s for row, label in zip(s[task], y[task])) / 2
    kd = 0.0
    for task, rows in s.items():
        for rs, rt in zip(rows, t[task]):
            ps, pt = _softmax([v / T for v in rs]), _softmax([v / T for v in rt])
            kd += sum(p * (math.log(p) - math.log(q)) for p, q in zip(pt, ps)) / 2  # batch mean
    kd *= T * T
    mse = sum((a - b) ** 2 for ra, rb in zip(fs, ft) for a, b in zip(ra, rb)) / 4
    out = distillation_loss(
        {k: torch.tensor(v) for k, v in s.items()},
        {k: torch.tensor(v) for k, v in t.items()},
        {k: torch.tensor(v) for k, v in y.items()},
        torch.tensor(fs),
        torch.tensor(ft),
        alpha=alpha,
        beta=beta,
        temperature=T,
    )
    assert out.ce.item() == pytest.approx(ce, rel=1e-6)
    assert out.kd.item() == pytest.approx(kd, rel=1e-6)
    assert out.mse.item() == pytest.approx(mse, rel=1e-6)
    assert out.total.item() == pytest.approx(ce + alpha * kd + beta * mse, rel=1e-6)


def test_kd_loss_without_kd_is_plain_cross_entropy_and_checks_inputs():
    logits = {"a": torch.tensor([[2.0, 0.0]])}
    out = distillation_loss(logits, None, {"a": torch.tensor([0])}, alpha=0.0, beta=0.0)
    assert out.total.item() == pytest.approx(-math.log(_softmax([2.0, 0.0])[0]))
    with pytest.raises(ValueError, match="teacher's logits"):
        distillation_loss(logits, None, {"a": torch.tensor([0])}, alpha=1.0, beta=0.0)
    with pytest.raises(ValueError, match="temperature"):
        distillation_loss(logits, logits, {"a": torch.tensor([0])}, temperature=0.0)
    with pytest.raises(KeyError, match="'a'"):
        distillation_loss(logits, logits, {"b": torch.tensor([0])}, beta=0.0)


# ----------------------------------------------------------------------------- towers and fusions


def test_mobilevit_tower_pools_with_pooler_output_not_channel_zero():
    tower = VisionTower(MOBILEVIT).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(tower.pixel_values(x))
        raw = tower.model(pixel_values=tower.pixel_values(x))
    assert tower.feature_size == MOBILEVIT["neck_hidden_sizes"][-1] == out.pooled.shape[1]
    assert raw.last_hidden_state.ndim == 4  # [B, C, h, w]: [:, 0] would be channel 0, a [B, h, w] map
    torch.testing.assert_close(out.pooled, raw.pooler_output)
    # MobileViT's pooler is the global average of the last feature map: an independent check
    torch.testing.assert_close(out.pooled, raw.last_hidden_state.mean(dim=(2, 3)))
    assert out.tokens.shape == (2, raw.last_hidden_state.shape[2] * raw.last_hidden_state.shape[3], 40)


def test_vit_tower_pools_the_cls_row_and_reads_its_width_from_the_config():
    tower = VisionTower({**VIT, "hidden_size": 48}).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = tower(tower.pixel_values(x))
        raw = tower.model(pixel_values=tower.pixel_values(x))
    assert tower.feature_size == 48 and getattr(tower.model, "pooler", None) is None
    torch.testing.assert_close(out.pooled, raw.last_hidden_state[:, 0])
    torch.testing.assert_close(tower.pixel_values(x), (x - 0.5) / 0.5)


def test_text_tower_embeds_path_equals_ids_path_and_mean_pooling_skips_padding(tokenizer):
    tower = TextTower({**BERT, "vocab_size": len(tokenizer)}, pooling="mean").eval()
    enc = tokenizer(["a red object on a sky background", "sand background"], padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        a = tower(ids, mask)
        b = tower.forward_embeds(tower.embed(ids), mask)
    torch.testing.assert_close(a.pooled, b.pooled)
    n = int(mask[1].sum())
    torch.testing.assert_close(a.pooled[1], a.tokens[1, :n].mean(0))


def test_tower_config_errors():
    with pytest.raises(ValueError, match="model_type"):
        VisionTower({"image_size": 64})
    with pytest.raises(ValueError, match="BERT-family"):
        TextTower({"model_type": "clip_text_model", "vocab_size": 10})
    with pytest.raises(FileNotFoundError, match="no such directory"):
        VisionTower("./does/not/exist")


@pytest.mark.parametrize(
    "fusion,options", [("concat", {}), ("cross_attention", {"heads": 2, "layers": 2}), ("gated", {})]
)
def test_every_fusion_gives_one_head_per_task_and_batch_independent_rows(fusion, options, tokenizer):
    model = MultimodalClassifier(
        VIT, {**BERT, "vocab_size": len(tokenizer)}, TASKS, fusion=fusion, fusion_dim=32, fusion_options=options
    ).eval()
    enc = tokenizer(["a red object", "on a water background: one small blue object"], padding=True, return_tensors="pt")
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        both = model(model.pixel_values(x), enc["input_ids"], enc["attention_mask"])
        one = model(model.pixel_values(x[:1]), enc["input_ids"][:1, :5], enc["attention_mask"][:1, :5])
    assert {t: v.shape for t, v in both.logits.items()} == {"shape": (2, 6), "background": (2, 5)}
    assert both.features.shape == (2, 32)
    for task in TASKS:  # padding changes nothing: row 0 alone, without its padding, is the same
        torch.testing.assert_close(one.logits[task][0], both.logits[task][0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown fusion"):
        MultimodalClassifier(VIT, {**BERT, "vocab_size": 10}, TASKS, fusion="film")


def test_checkpoint_round_trip_rebuilds_offline_and_refuses_to_overwrite(tmp_path, tokenizer):
    model = MultimodalClassifier(**with_vocab(STUDENT_ARGS, tokenizer), tasks=TASKS).eval()
    out = save_classifier(model, tokenizer, tmp_path / "ckpt", max_length=24, dtype=torch.float32)
    loaded, tok, config = load_classifier(out)
    assert config["max_length"] == 24 and loaded.tasks == TASKS
    assert tok.get_vocab() == tokenizer.get_vocab()
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    with pytest.raises(FileExistsError):
        save_classifier(model, tokenizer, out, max_length=24)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


# ----------------------------------------------------------------------------- data


def test_shapes_notes_truth_is_where_the_tasks_say():
    ds = ShapesNotes(60, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        words = item["text"].replace(",", " ").replace(";", " ").replace(":", " ").split()
        assert item["deciding_word"] == BACKGROUNDS[item["labels"]["background"]] and item["deciding_word"] in words
        assert not set(SHAPES) & set(words)  # the note never names the shape
        assert sum(w in BACKGROUNDS for w in words) == 1  # one deciding word
        image = (item["image"] * 255).round()
        plain = torch.tensor([200.0, 200.0, 200.0]).view(3, 1)
        outside = image.flatten(1)[:, ~item["mask"].flatten()]
        assert torch.equal(outside, plain.expand_as(outside))  # the pixels carry no background class
        assert item["mask"].sum() > 50


def test_csv_layout_vocabulary_from_train_and_batches(tmp_path):
    root = shapes_csv_layout(tmp_path)
    dm = DistillDataModule(source="csv", data_root=str(root), image_size=32, batch_size=4)
    dm.setup("fit")
    train_lines = (root / "metadata_train.csv").read_text().splitlines()[1:]
    assert dm.label_vocabulary == {
        "type": sorted({ln.split(",")[1] for ln in train_lines}),
        "severity": sorted({ln.split(",")[2] for ln in train_lines}),
    }
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["text"]) == 4
    assert set(batch["labels"]) == {"type", "severity"} and batch["skipped"] == 0


def _replace_cell(path, row, column, value):
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    cells = lines[row - 1].split(",", len(header) - 1)
    cells[header.index(column)] = value
    lines[row - 1] = ",".join(cells)
    path.write_text("\n".join(lines) + "\n")


def test_csv_unknown_dev_label_is_an_error_naming_file_row_and_value(tmp_path):
    root = shapes_csv_layout(tmp_path)
    _replace_cell(root / "metadata_dev.csv", 4, "severity", "lava")
    dm = DistillDataModule(source="csv", data_root=str(root), image_size=32)
    dm.setup("fit")
    with pytest.raises(
        CSVFormatError,
        match=r"metadata_dev\.csv, data row 3 \(line 4\): unknown 'severity' "
        r"label 'lava'; the training split's \(metadata_train\.csv\) "
        r"'severity' classes",
    ):
        dm.val_dataloader()
    # with a checkpoint's classes the message says they are the checkpoint's, not the training split's
    dm.use_label_vocabulary({"type": list(SHAPES), "severity": list(BACKGROUNDS)}, "the checkpoint xclip:x's")
    with pytest.raises(
        CSVFormatError,
        match=rf"data row 3 \(line 4\): unknown 'severity' label 'lava'; the checkpoint "
        rf"xclip:x's 'severity' classes are {re.escape(str(list(BACKGROUNDS)))}",
    ):
        dm.val_dataloader()


def test_csv_format_errors_name_the_file_and_field(tmp_path):
    root = shapes_csv_layout(tmp_path)
    text = (root / "metadata_train.csv").read_text()
    (root / "metadata_train.csv").write_text(text.replace("file_path", "path", 1))
    with pytest.raises(CSVFormatError, match=r"metadata_train\.csv: no image column"):
        DistillDataModule(source="csv", data_root=str(root)).setup("fit")
    (root / "metadata_train.csv").write_text(text.replace("file_path", "img_path", 1))  # the other accepted name
    DistillDataModule(source="csv", data_root=str(root)).setup("fit")
    (root / "metadata_train.csv").write_text(text)
    _replace_cell(root / "metadata_train.csv", 3, "type", " ")
    with pytest.raises(CSVFormatError, match=r"metadata_train\.csv, data row 2 \(line 3\): empty 'type'"):
        DistillDataModule(source="csv", data_root=str(root)).setup("fit")
    with pytest.raises(CSVFormatError, match=r"missing column\(s\) \['grade'\]"):
        DistillDataModule(source="csv", data_root=str(root), label_columns=["type", "grade"]).setup("fit")
    with pytest.raises(FileNotFoundError, match="metadata_train.csv"):
        DistillDataModule(source="csv", data_root=str(tmp_path / "nowhere")).setup("fit")


def _train_rows(root):
    return (root / "metadata_train.csv").read_text().splitlines()


def _setup_fit(root, **kwargs):
    dm = DistillDataModule(source="csv", data_root=str(root), image_size=32, **kwargs)
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("marker", ["NaN", "nan", "NA", "null", "<NA>"])
def test_csv_a_missing_value_marker_is_not_a_class(tmp_path, marker):
    root = shapes_csv_layout(tmp_path)
    _replace_cell(root / "metadata_train.csv", 5, "type", marker)
    with pytest.raises(
        CSVFormatError,
        match=rf"metadata_train\.csv, data row 4 \(line 5\): 'type' is '{marker}', a "
        "missing-value marker",
    ):
        _setup_fit(root)
    _replace_cell(root / "metadata_train.csv", 5, "type", "circle")  # a real class reads as before
    assert marker not in _setup_fit(root).label_vocabulary["type"]


def test_csv_a_row_with_more_or_fewer_fields_than_the_header_is_refused(tmp_path):
    root = shapes_csv_layout(tmp_path)
    lines = _train_rows(root)
    # an unquoted comma in the description: the csv module would put ", one small object" aside
    lines[3] = lines[3].split(',"')[0] + ",on a sand background, one small object"
    (root / "metadata_train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        CSVFormatError,
        match=r"metadata_train\.csv, data row 3 \(line 4\): 5 fields, the header has "
        r"4: an unquoted comma in a value\?",
    ):
        _setup_fit(root)
    lines[3] = "images/train_2.png,circle"
    (root / "metadata_train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(CSVFormatError, match=r"data row 3 \(line 4\): 2 fields, the header has 4"):
        _setup_fit(root)


def test_csv_a_repeated_column_name_is_refused(tmp_path):
    root = shapes_csv_layout(tmp_path)
    lines = _train_rows(root)
    lines = [lines[0] + ",type"] + [ln + ",square" for ln in lines[1:]]  # a second 'type' column
    (root / "metadata_train.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(
        CSVFormatError,
        match=r"metadata_train\.csv, line 1 \(header\): repeated column name\(s\): "
        r"'type' is columns \[2, 5\]",
    ):
        _setup_fit(root)


def test_csv_a_file_that_is_not_utf8_names_the_row_and_column(tmp_path):
    root = shapes_csv_layout(tmp_path)
    lines = _train_rows(root)
    lines[2] = lines[2].replace("background", "arri\u00e8re-plan", 1)
    (root / "metadata_train.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(
        CSVFormatError,
        match=r"metadata_train\.csv, data row 2 \(line 3\), column 'description': not "
        r"UTF-8 \(byte 0xe8\); save the file as UTF-8",
    ):
        _setup_fit(root)
    (root / "metadata_train.csv").write_bytes(("\n".join(lines) + "\n").encode("utf-8-sig"))  # UTF-8 with a BOM
    assert _setup_fit(root).label_vocabulary["type"]


def test_csv_data_rows_and_lines_differ_after_a_quoted_line_break(tmp_path):
    root = shapes_csv_layout(tmp_path)
    lines = _train_rows(root)
    lines[1] = lines[1][:-1] + '\nsecond line of the note"'  # data row 1 spans lines 2-3
    (root / "metadata_train.csv").write_text("\n".join(lines) + "\n")
    dm = _setup_fit(root)
    records = dm._split_records("train")
    assert [(r.row, r.line) for r in records[:3]] == [(1, 2), (2, 4), (3, 5)]
    assert records[0].text.endswith("second line of the note")
    _replace_cell(root / "metadata_train.csv", 6, "severity", "")  # file line 6: data row 4
    with pytest.raises(CSVFormatError, match=r"metadata_train\.csv, data row 4 \(line 6\): empty 'severity'"):
        _setup_fit(root)


def test_csv_unreadable_image_is_skipped_and_reported(tmp_path):
    root = shapes_csv_layout(tmp_path)
    (root / "images" / "dev_2.png").write_bytes(b"not a png")
    dm = DistillDataModule(source="csv", data_root=str(root), image_size=32, batch_size=6)
    dm.setup("validate")
    (batch,) = list(dm.val_dataloader())
    assert batch["skipped"] == 1 and batch["skipped_paths"] == ["images/dev_2.png"]
    assert batch["image"].shape[0] == 5 and 2 not in batch["index"].tolist()


def test_checkpoint_vocabulary_is_used_for_dev_labels(tmp_path):
    root = shapes_csv_layout(tmp_path)
    dm = DistillDataModule(source="csv", data_root=str(root), image_size=32)
    dm.use_label_vocabulary({"type": list(SHAPES), "severity": list(BACKGROUNDS)})
    labels = torch.cat([b["labels"]["type"] for b in dm.val_dataloader()])
    names = [ln.split(",")[1] for ln in (root / "metadata_dev.csv").read_text().splitlines()[1:]]
    assert labels.tolist() == [SHAPES.index(n) for n in names]
    with pytest.raises(ValueError, match="tasks"):
        dm.use_label_vocabulary({"type": list(SHAPES)})


# ----------------------------------------------------------------------------- metrics


def test_multitask_metrics_match_scikit_learn_and_drop_repeated_items():
    g = torch.Generator().manual_seed(0)
    n, k = 40, 4
    probs = torch.rand(n, k, generator=g).softmax(1)
    labels = torch.randint(0, k, (n,), generator=g)
    labels[:k] = torch.arange(k)
    metric = MultitaskClassificationMetrics({"t": k})
    metric.update_batch({"t": probs[:25]}, {"t": labels[:25]}, torch.arange(25))
    # a DistributedSampler repeats items to pad the last process: they must count once
    metric.update_batch({"t": probs[20:]}, {"t": labels[20:]}, torch.arange(20, n))
    scores = metric.scores()
    pred = probs.argmax(1).numpy()
    assert scores["n_items"] == n
    assert scores["t_acc"] == pytest.approx(accuracy_score(labels.numpy(), pred))
    assert scores["t_macro_f1"] == pytest.approx(f1_score(labels.numpy(), pred, average="macro", labels=range(k)))
    assert scores["t_auroc"] == pytest.approx(roc_auc_score(labels.numpy(), probs.numpy(), multi_class="ovr"), abs=1e-6)
    assert scores["mean_macro_f1"] == scores["t_macro_f1"]


def test_auroc_of_one_evaluated_class_is_undefined_not_zero():
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.7, 0.2, 0.1]])  # a perfect model, all class 0
    metric = MultitaskClassificationMetrics({"t": 3}, class_names={"t": ["a", "b", "c"]})
    metric.update_batch({"t": probs}, {"t": torch.zeros(3, dtype=torch.long)}, torch.arange(3))
    scores = metric.scores()
    assert math.isnan(scores["t_auroc"]) and scores["t_acc"] == 1.0
    assert metric.notes == {
        "t_auroc": "undefined: all 3 evaluated items are 'a'; one-vs-rest AUROC needs items of two classes or more"
    }


def test_metrics_with_absent_classes_match_scikit_learn_without_torchmetrics_warnings():
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(9, 5, generator=g).softmax(1)
    labels = torch.tensor([0, 2, 2, 0, 3, 2, 0, 3, 3])  # classes 1 and 4 absent
    metric = MultitaskClassificationMetrics({"t": 5})
    metric.update_batch({"t": probs}, {"t": labels}, torch.arange(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torchmetrics warned "No positive samples in targets" per absent class
        scores = metric.scores()
    per_class = [roc_auc_score((labels == c).numpy(), probs[:, c].numpy()) for c in (0, 2, 3)]
    assert scores["t_auroc"] == pytest.approx(sum(per_class) / 3, abs=1e-6) and not metric.notes
    pred = probs.argmax(1).numpy()
    assert scores["t_macro_f1"] == pytest.approx(f1_score(labels.numpy(), pred, average="macro"))


def test_nan_probabilities_are_refused_naming_the_items():
    probs = torch.full((3, 2), 0.5)
    probs[1] = float("nan")
    metric = MultitaskClassificationMetrics({"t": 2})
    with pytest.raises(ValueError, match=r"task 't': the class probabilities of items \[11\] are NaN"):
        metric.update_batch({"t": probs}, {"t": torch.tensor([0, 1, 0])}, torch.tensor([10, 11, 12]))


def test_a_task_may_be_named_like_a_module_attribute(tokenizer):
    # the CSV layout's default label columns are `type` and `severity`: nn.ModuleDict has a .type()
    tasks = {"type": ["a", "b"], "severity": ["x", "y", "z"], "a.b": ["u", "v"]}
    model = MultimodalClassifier(**with_vocab(STUDENT_ARGS, tokenizer), tasks=tasks).eval()
    enc = tokenizer(["a note", "another note"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(model.pixel_values(torch.rand(2, 3, 64, 64)), enc["input_ids"], enc["attention_mask"])
    assert {t: v.shape[1] for t, v in out.logits.items()} == {"type": 2, "severity": 3, "a.b": 2}
    assert "heads.severity.1.weight" in model.state_dict()  # names that fit keep their key (shipped checkpoints)
    assert model.explain_target("type").class_names == ["a", "b"]


# ----------------------------------------------------------------------------- label fingerprints


def _saved(tmp_path, tokenizer, tasks=None):
    model = MultimodalClassifier(**with_vocab(STUDENT_ARGS, tokenizer), tasks=tasks or TASKS).eval()
    return save_classifier(model, tokenizer, tmp_path / "ckpt", max_length=24, dtype=torch.float32)


def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_a_checkpoint_whose_config_lists_the_classes_in_another_order_is_refused(tmp_path, tokenizer):
    folder = _saved(tmp_path, tokenizer)
    config = json.loads((folder / "config.json").read_text())
    assert config["label_fingerprint"] == label_fingerprint(TASKS) and load_classifier(folder)[2]["label_order_checked"]
    swapped = ["square", "circle", *TASKS["shape"][2:]]
    _edit_config(folder, lambda c: c["model"]["tasks"].update(shape=swapped))
    with pytest.raises(
        ValueError,
        match=r"config\.json: `model.tasks` lists the classes .*'square', 'circle'.*but "
        r"model\.safetensors was saved with another label vocabulary .*'circle', "
        r"'square'.*reordered",
    ):
        load_classifier(folder)
    _edit_config(folder, lambda c: c.pop("label_fingerprint"))  # the weights still know
    with pytest.raises(ValueError, match="model.safetensors was saved with another label vocabulary"):
        load_classifier(folder)


def test_the_fingerprint_changes_with_any_class_or_order():
    assert label_fingerprint({"a": ["x", "y"]}) == label_fingerprint({"a": ("x", "y")})
    variants = [
        {"a": ["y", "x"]},
        {"a": ["x", "z"]},
        {"b": ["x", "y"]},
        {"a": ["x", "y", "z"]},
        {"a": ["x", "y"], "b": ["u", "v"]},
        {"a": ["x,y", ""]},
    ]
    prints = {label_fingerprint(v) for v in variants} | {label_fingerprint({"a": ["x", "y"]})}
    assert len(prints) == len(variants) + 1


@pytest.mark.parametrize("name", ["distill-teacher-shapes", "distill-student-shapes"])
def test_shipped_checkpoints_without_a_fingerprint_load_with_their_stored_order(name):
    model, _, config = load_classifier(f"xclip:{name}")
    assert "label_fingerprint" not in config and config["label_order_checked"] is False
    assert model.tasks == {"shape": list(SHAPES), "background": list(BACKGROUNDS)}


def test_a_checkpoint_without_a_fingerprint_must_list_the_datas_classes_in_order(tmp_path, tokenizer):
    root = shapes_csv_layout(tmp_path / "data")
    vocab = _setup_fit(root).label_vocabulary
    dm = DistillDataModule(source="csv", data_root=str(root))
    dm.use_label_vocabulary(vocab, "the checkpoint old's", check_order=True)  # the same order: accepted
    permuted = {"type": vocab["type"][::-1], "severity": vocab["severity"]}
    with pytest.raises(
        ValueError,
        match=r"the checkpoint old's classes .* differ from the training split's "
        r"\(metadata_train\.csv\) .*no label fingerprint",
    ):
        DistillDataModule(source="csv", data_root=str(root)).use_label_vocabulary(
            permuted, "the checkpoint old's", check_order=True
        )
    # with a fingerprint the checkpoint's order is trusted and labels are encoded by name
    dm = DistillDataModule(source="csv", data_root=str(root))
    dm.use_label_vocabulary(permuted, "the checkpoint new's")
    names = [r.labels["type"] for r in dm._split_records("val")]
    assert [permuted["type"][i] for i in (b["labels"]["type"] for b in dm.dataset("val"))] == names
    (root / "metadata_train.csv").unlink()
    with pytest.raises(FileNotFoundError, match="no label fingerprint .* checked against this data's training split"):
        DistillDataModule(source="csv", data_root=str(root)).use_label_vocabulary(vocab, "old", check_order=True)


def test_tiny_clip_image_tower_converts_exactly_and_keeps_chosen_blocks():
    from xclip.backbones import load_backbone

    bb = load_backbone("xclip:tiny-shapes")
    x = torch.rand(2, 3, 64, 64)
    full = VisionTower("xclip:tiny-shapes").eval()
    assert (full.model_type, full.pooling, full.feature_size) == ("clip_vision_model", "pooler", 192)
    with torch.no_grad():
        pooled = full(full.pixel_values(x)).pooled
        # open_clip's image embedding = ln_post(CLS) @ proj; the HF tower's pooler output is ln_post(CLS)
        torch.testing.assert_close(
            pooled @ bb.model.visual.proj, bb.model.visual(bb.normalize(x)), atol=1e-5, rtol=1e-5
        )
    part = VisionTower({"clip_checkpoint": "xclip:tiny-shapes", "layers": [0, 2, 4]})
    assert part.model.config.num_hidden_layers == 3
    encoder = getattr(part.model, "vision_model", part.model).encoder
    src, dst = bb.model.visual.transformer.resblocks[2], encoder.layers[1]
    torch.testing.assert_close(dst.self_attn.k_proj.weight, src.attn.in_proj_weight[192:384])
    torch.testing.assert_close(dst.mlp.fc2.bias, src.mlp.c_proj.bias)
    rebuilt = VisionTower(part.config_dict)  # the resolved config rebuilds the architecture offline
    assert rebuilt.model.config.num_hidden_layers == 3
    torch.testing.assert_close(rebuilt.mean, part.mean)
    with pytest.raises(ValueError, match=r"block indices in \[0, 6\)"):
        VisionTower({"clip_checkpoint": "xclip:tiny-shapes", "layers": [6]})
