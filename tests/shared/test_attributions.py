"""SHAP expected gradients and Captum Integrated Gradients over (pixels, token embeddings):
additivity on a linear model where the answer is known, equality with shap.GradientExplainer
itself, output shapes, IG completeness, word merging, and the callbacks writing TensorBoard images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from distill_fixtures import TASKS, TEACHER_ARGS, tiny_inputs
from torch import nn

from xclip.distill import MultimodalClassifier, load_tokenizer
from xclip.explain import CaptumExplainer, MultimodalInputs, MultimodalTarget, SHAPExplainer, merge_subwords, word_rank
from xclip.explain.shap_explainer import expected_gradient_draws


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("shapes-wordpiece")


@pytest.fixture(scope="module")
def classifier(tokenizer):
    torch.manual_seed(0)
    args = {**TEACHER_ARGS, "text": {**TEACHER_ARGS["text"], "vocab_size": len(tokenizer)}}
    return MultimodalClassifier(**args, tasks=TASKS).eval()


# ----------------------------------------------------------------------------- a linear model


class Linear2(nn.Module):
    """f(x_img, x_emb) = W_img . x_img + W_txt . (x_emb at valid tokens) + b, K outputs."""

    def __init__(self, image_shape=(3, 4, 4), tokens=5, dim=3, k=2):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.w_img = nn.Parameter(torch.randn(k, *image_shape, generator=g))
        self.w_txt = nn.Parameter(torch.randn(k, tokens, dim, generator=g))
        self.b = nn.Parameter(torch.randn(k, generator=g))
        self.table = nn.Embedding(20, dim)
        self.table.weight.data = torch.randn(20, dim, generator=g)

    def forward_embeds(self, pv, emb, mask):
        t = emb.shape[1]
        return (
            torch.einsum("nchw,kchw->nk", pv, self.w_img)
            + torch.einsum("ntd,ktd->nk", emb * mask.unsqueeze(-1), self.w_txt[:, :t])
            + self.b
        )


def linear_target(model: Linear2) -> MultimodalTarget:
    return MultimodalTarget(
        "linear",
        model,
        model.forward_embeds,
        lambda pv, ids, mask: model.forward_embeds(pv, model.table(ids), mask),
        model.table,
        model.table,
        lambda x: x,
        ["a", "b"],
    )


def linear_inputs(n: int, seed: int, lengths=None) -> MultimodalInputs:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 3, 4, 4, generator=g)
    ids = torch.randint(1, 20, (n, 5), generator=g)
    mask = torch.ones(n, 5, dtype=torch.long)
    for i, length in enumerate(lengths or []):
        mask[i, length:] = 0
        ids[i, length:] = 0
    return MultimodalInputs(images, images, ids, mask, [["w"] * 5] * n, ["t"] * n, [str(i) for i in range(n)], 0)


@pytest.mark.parametrize("engine", ["batched", "shap"])
def test_shap_on_a_linear_model_with_one_background_row_is_exactly_x_minus_bg_times_w(engine):
    model = Linear2()
    target = linear_target(model)
    x, bg = linear_inputs(3, seed=2, lengths=[5, 3, 4]), linear_inputs(1, seed=3)
    att = SHAPExplainer(target, bg, nsamples=7, batch_size=4, engine=engine).explain(x, classes=None)
    assert att.image.shape == (3, 3, 4, 4, 2) and att.tokens.shape == (3, 5, 3, 2)  # output axis last
    with torch.no_grad():
        emb_x, emb_bg = model.table(x.input_ids), model.table(bg.input_ids)
    for k in range(2):
        expected_img = (x.pixel_values - bg.pixel_values) * model.w_img[k]
        expected_txt = (emb_x - emb_bg) * model.w_txt[k] * x.attention_mask.unsqueeze(-1)
        torch.testing.assert_close(att.image[..., k], expected_img.double(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(att.tokens[..., k], expected_txt.double(), rtol=1e-5, atol=1e-6)
    # so the values add up to f(x) - f(bg) exactly, and padding gets nothing
    assert att.deltas["joint"].abs().max() < 1e-4
    assert att.tokens[1, 3:].abs().max() == 0


def test_shap_with_a_larger_background_adds_up_only_in_expectation():
    model = Linear2()
    x, bg = linear_inputs(2, seed=4), linear_inputs(30, seed=5)
    att = SHAPExplainer(linear_target(model), bg, nsamples=200, seed=11).explain(x, classes=torch.tensor([0, 1]))
    assert att.image.shape == (2, 3, 4, 4, 1)  # one explained output: the axis is still there
    # for a linear model each value is (x - mean of the drawn background rows) * w: check that
    # against the draws shap's own sampler makes for these seeds
    with torch.no_grad():
        emb_bg = model.table(bg.input_ids)
        full_mean = model.forward_embeds(
            bg.pixel_values.mean(0, keepdim=True), emb_bg.mean(0, keepdim=True), bg.attention_mask[:1]
        )
    for i, cls in enumerate((0, 1)):
        rows = torch.from_numpy(expected_gradient_draws(11 + i, 30, 200)[0])
        drawn, drawn_emb = bg.pixel_values[rows].mean(0), emb_bg[rows].mean(0)
        torch.testing.assert_close(
            att.image[i, ..., 0], ((x.pixel_values[i] - drawn) * model.w_img[cls]).double(), rtol=1e-4, atol=1e-6
        )
        with torch.no_grad():
            expected_txt = (model.table(x.input_ids[i]) - drawn_emb) * model.w_txt[cls]
            drawn_out = model.forward_embeds(drawn[None], drawn_emb[None], bg.attention_mask[:1])
        torch.testing.assert_close(att.tokens[i, ..., 0], expected_txt.double(), rtol=1e-4, atol=1e-6)
        # so the values add up to f(x) - f(mean of the drawn rows), not to f(x) - mean f(background):
        # the gap is f(mean of all rows) - f(mean of the drawn rows), zero only in expectation
        gap = float(full_mean[0, cls] - drawn_out[0, cls])
        assert float(att.deltas["joint"][i, 0]) == pytest.approx(gap, abs=1e-4) and abs(gap) > 1e-3


def test_batched_shap_equals_shap_gradient_explainer_on_a_transformer(classifier, tokenizer):
    x = tiny_inputs(classifier, tokenizer, n=2, seed=0)
    bg = tiny_inputs(classifier, tokenizer, n=4, seed=1)
    target = classifier.explain_target("shape")
    state = np.random.get_state()
    ref = SHAPExplainer(target, bg, nsamples=8, batch_size=5, engine="shap").explain(x, seeds=[3, 4])
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:3], state[1:3]))  # numpy's RNG untouched
    ours = SHAPExplainer(target, bg, nsamples=8, batch_size=7).explain(x, seeds=[3, 4])
    torch.testing.assert_close(ours.image, ref.image, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(ours.tokens, ref.tokens, rtol=1e-3, atol=1e-7)
    assert torch.equal(ours.classes, ref.classes)
    # an item's explanation does not depend on the batch it is in (per-item seeds)
    alone = SHAPExplainer(target, bg, nsamples=8, batch_size=7).explain(x.select([1]), seeds=[4])
    n = int(x.attention_mask[1].sum())
    torch.testing.assert_close(alone.image[0], ours.image[1], rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(alone.tokens[0, :n], ours.tokens[1, :n], rtol=1e-4, atol=1e-8)


def test_shap_rejects_bad_arguments(classifier, tokenizer):
    x = tiny_inputs(classifier, tokenizer, n=2)
    target = classifier.explain_target("shape")
    with pytest.raises(ValueError, match="engine"):
        SHAPExplainer(target, x, engine="kernel")
    with pytest.raises(ValueError, match=r"ids in \[0, 6\)"):
        SHAPExplainer(target, x, nsamples=2).explain(x, classes=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="seeds"):
        SHAPExplainer(target, x, nsamples=2).explain(x, seeds=[1])


def test_images_and_texts_are_checked_where_they_enter(classifier, tokenizer):
    x = tiny_inputs(classifier, tokenizer, n=2)
    images = x.images01
    with pytest.raises(TypeError, match=r"uint8.*\.float\(\) / 255"):
        classifier.pixel_values((images * 255).to(torch.uint8))
    with pytest.raises(ValueError, match="divide by 255"):
        classifier.pixel_values(images * 255)
    with pytest.raises(ValueError, match=r"channels last.*permute\(0, 3, 1, 2\)"):
        classifier.pixel_values(images.permute(0, 2, 3, 1))
    nan = images.clone()
    nan[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*\[1\]"):
        MultimodalInputs(nan, x.pixel_values, x.input_ids, x.attention_mask, x.tokens, x.texts, x.ids)
    with pytest.raises(ValueError, match=r"texts \[1\] are empty"):
        MultimodalInputs(images, x.pixel_values, x.input_ids, x.attention_mask, x.tokens, [x.texts[0], "  "], x.ids)


# ----------------------------------------------------------------------------- Captum


def test_integrated_gradients_completeness_per_sample_and_internal_batching(classifier, tokenizer):
    x = tiny_inputs(classifier, tokenizer, n=2)
    target = classifier.explain_target("background")
    att = CaptumExplainer(target, n_steps=64).explain(x)
    assert att.image.shape == (2, 3, 64, 64, 1) and att.tokens.shape[:2] == (2, x.input_ids.shape[1])
    for path, attribution_sum in (("image", att.image.sum(dim=(1, 2, 3))), ("text", att.token_scores_all().sum(1))):
        change = att.output - att.references[path]
        # Captum's delta is sum(attributions) - (f(x) - f(baseline)), per sample: recompute it
        torch.testing.assert_close(att.deltas[path], attribution_sum - change, atol=1e-4, rtol=1e-3)
        assert (att.deltas[path].abs() <= 0.02 * change.abs() + 1e-3).all(), (path, att.deltas[path], change)
    # the text baseline keeps [CLS] / [SEP] / padding, so only words get attribution
    special = torch.tensor([[t in ("[CLS]", "[SEP]", "[PAD]") for t in row] for row in x.tokens])
    assert att.token_scores(0)[special].abs().max() == 0
    split = CaptumExplainer(target, n_steps=64, internal_batch_size=40).explain(x)
    torch.testing.assert_close(split.image, att.image, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(split.tokens, att.tokens, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- words


def test_merge_subwords_and_word_rank():
    tokens = ["[CLS]", "on", "a", "sa", "##nd", "back", "##ground", "[SEP]", "[PAD]"]
    words = merge_subwords(tokens, [9.0, 0.125, -0.25, 0.5, 0.25, 0.5, -0.25, 9.0, 0.0])
    assert words == [("on", 0.125), ("a", -0.25), ("sand", 0.75), ("background", 0.25)]
    assert word_rank(words, "sand") == 1 and word_rank(words, "a") == 3 and word_rank(words, "sky") is None
    assert merge_subwords(["▁on", "▁sa", "nd"], [1.0, 2.0, 3.0]) == [("on", 1.0), ("sand", 5.0)]


def test_attribution_measurements_on_hand_cases():
    from xclip.distill.attribution_eval import deciding_word_ranks, mass_on_region

    maps = torch.tensor([[[1.0, 3.0], [0.0, 4.0]], [[0.0, 0.0], [0.0, 0.0]]])
    masks = torch.tensor([[[True, False], [False, True]], [[True, True], [False, False]]])
    share = mass_on_region(maps, masks)
    assert share[0].item() == pytest.approx(5 / 8) and torch.isnan(share[1])
    with pytest.raises(ValueError, match="non-negative"):
        mass_on_region(-maps, masks)
    tokens = [
        ["[CLS]", "on", "sa", "##nd", "[SEP]", "[PAD]"],
        ["[CLS]", "sky", "background", "[SEP]", "[PAD]", "[PAD]"],
    ]
    scores = torch.tensor([[5.0, 0.5, 0.25, 0.5, 5.0, 0.0], [0.0, -0.1, 0.3, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]])
    ranks, counts = deciding_word_ranks(tokens, scores, mask, ["sand", "sky"])
    assert ranks == [1, 2] and counts == [2, 2]


# ----------------------------------------------------------------------------- callbacks on files


def test_word_chart_title_fits_the_figure_and_a_legend_names_the_signs():
    from xclip.explain.render import explanation_title, token_bar_chart

    title = explanation_title(
        "on a sand background: one small red object in the top left corner, next to a tree",
        "integrated_gradients",
        "W" * 90,
        "val | task background | class sand",
    )
    fig = token_bar_chart(
        ["on", "a_very_long_word_piece_label_pushing_the_axes", "sand"],
        [0.1, -0.2, 0.9],
        title,
        legend=("towards 'sand'", "away from 'sand'"),
    )
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    box = fig.axes[0].title.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width and box.y1 <= fig.bbox.height  # nothing cut off
    assert "W" * 40 in fig.axes[0].get_title()  # the id is wrapped, not dropped
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["> 0: towards 'sand'", "< 0: away from 'sand'"]
    colours = [tuple(h.get_facecolor()) for h in legend.legend_handles]
    bars = {p.get_width() > 0: tuple(p.get_facecolor()) for p in fig.axes[0].patches}
    assert colours == [bars[True], bars[False]]  # the legend's colours are the bars'
    legend_box = legend.get_window_extent(renderer)
    assert legend_box.y1 <= fig.axes[0].xaxis.label.get_window_extent(renderer).y0  # clear of the axis label


def test_explanation_files_are_named_by_the_image_file_and_record_its_path(tmp_path):
    import json

    import lightning.pytorch as pl
    from distill_fixtures import shapes_csv_layout
    from lightning.pytorch.loggers import CSVLogger

    from xclip.callbacks import CaptumCallback, SHAPCallback
    from xclip.distill import DistillDataModule, MultimodalClassifierModule

    root = shapes_csv_layout(tmp_path / "data", {"train": 8, "dev": 4, "test": 2})
    lines = (root / "metadata_dev.csv").read_text().splitlines()
    lines[3] = "images/dev_0.png" + lines[3][lines[3].index(",") :]  # data row 3 reuses row 1's image
    (root / "metadata_dev.csv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    module = MultimodalClassifierModule(
        model=TEACHER_ARGS, labels={"type": TASKS["shape"], "severity": TASKS["background"]}
    )
    data = DistillDataModule(source="csv", data_root=str(root), image_size=64, batch_size=2)
    callbacks = [
        SHAPCallback(max_items=3, background_size=2, nsamples=4, tasks=["type"]),
        CaptumCallback(max_items=3, n_steps=4, tasks=["type"]),
    ]
    trainer = pl.Trainer(
        logger=CSVLogger(tmp_path, name="run"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.validate(module, datamodule=data)
    for explainer in ("shap", "integrated_gradients"):
        folder = Path(trainer.log_dir) / "explanations" / explainer / "val"
        items = json.loads((folder / "index.json").read_text())["items"]
        assert [(r["item_id"], r["index"], r["path"]) for r in items] == [
            ("dev_0", 0, "images/dev_0.png"),
            ("dev_1", 1, "images/dev_1.png"),
            ("dev_0-2", 2, "images/dev_0.png"),
        ]
        for r in items:
            assert (folder / f"type_{r['item_id']}.png").is_file() and r["png"] == f"type_{r['item_id']}.png"
            assert (folder / r["token_png"]).is_file() and (folder / r["npy"]).is_file()
