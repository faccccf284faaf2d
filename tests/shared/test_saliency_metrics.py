"""The MIT saliency-benchmark metrics against hand-computed cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from xclip.metrics import auc_judd, cc, kld, nss, saliency_metrics, sim


def row(*values):
    """A [1, 1, W] map."""
    return torch.tensor([[list(values)]], dtype=torch.float64)


P = row(1, 2, 3, 4)
G = row(0, 0, 1, 1)


def test_kld_by_hand():
    # P' = [1/4, 3/4], G' = [0, 1]: KLD = 1 * log(1 / (3/4))
    assert kld(row(1, 3), row(0, 1)).item() == pytest.approx(math.log(4 / 3), abs=1e-12)
    # identical distributions: zero
    assert kld(row(1, 1, 2), row(2, 2, 4)).item() == pytest.approx(0.0, abs=1e-12)


def test_cc_by_hand():
    # centred P = [-1.5, -.5, .5, 1.5], centred G = [-.5, -.5, .5, .5]: 2 / sqrt(5 * 1)
    assert cc(P, G).item() == pytest.approx(2 / math.sqrt(5), abs=1e-12)
    assert math.isnan(cc(row(2, 2, 2, 2), G).item())


def test_sim_by_hand():
    # min-max P = [0, 1/3, 2/3, 1] -> /2 = [0, 1/6, 1/3, 1/2]; G' = [0, 0, 1/2, 1/2]; sum of minima 1/3 + 1/2
    assert sim(P, G).item() == pytest.approx(5 / 6, abs=1e-12)


def test_nss_by_hand():
    # mean 2.5, std (N - 1) sqrt(5/3); z at 3 and 4: 0.5/s, 1.5/s; mean 1/s
    assert nss(P, G).item() == pytest.approx(1 / math.sqrt(5 / 3), abs=1e-12)


def test_auc_judd_by_hand():
    assert auc_judd(P, G).item() == pytest.approx(1.0)
    # fixation values 4 and 2: (0, .5) then #{P >= 2} = 3 -> (1/2, 1); area 0 + .5 * 1.5 / 2 + .5 * 1
    assert auc_judd(row(4, 1, 3, 2), row(1, 0, 0, 1)).item() == pytest.approx(0.875)
    # a constant map: one threshold that every pixel passes -> the diagonal
    assert auc_judd(row(1, 1, 1, 1), row(1, 0, 0, 0)).item() == pytest.approx(0.5)


def test_batched_rows_equal_single_rows_with_different_fixation_counts():
    pred = torch.tensor([[[4.0, 1, 3, 2]], [[1.0, 2, 3, 4]], [[0.3, 0.9, 0.1, 0.5]]], dtype=torch.float64)
    truth = torch.tensor([[[1.0, 0, 0, 1]], [[0.0, 0, 0, 1]], [[1.0, 1, 1, 0]]], dtype=torch.float64)
    batched = saliency_metrics(pred, truth)
    for name, values in batched.items():
        single = torch.cat([saliency_metrics(pred[i : i + 1], truth[i : i + 1])[name] for i in range(3)])
        assert torch.allclose(values, single), name
    # third row by hand: fixation values .9, .3, .1 -> #above 1, 3, 4; fp (0, 1, 1)... n_neg = 1
    # points (0,0), (0,1/3), (1,2/3), (1,1), (1,1): area = 1 * (1/3 + 2/3) / 2
    assert batched["AUC-Judd"][2].item() == pytest.approx(0.5)


def test_prediction_is_resized_to_the_truth():
    pred = torch.tensor([[[0.0, 1.0], [2.0, 5.0]]], dtype=torch.float64)
    truth = torch.zeros(1, 6, 6, dtype=torch.float64)
    truth[0, 4:, 4:] = 1
    up = F.interpolate(pred[:, None], size=(6, 6), mode="bilinear", align_corners=False)[:, 0]
    for name, value in saliency_metrics(pred, truth).items():
        assert value.item() == pytest.approx(saliency_metrics(up, truth)[name].item()), name


def test_empty_truth_is_nan_and_bad_inputs_are_refused():
    out = saliency_metrics(P, torch.zeros_like(G))
    assert all(math.isnan(v.item()) for v in out.values())
    with pytest.raises(ValueError, match="non-negative predicted"):
        kld(row(-1, 2), row(0, 1))
    with pytest.raises(ValueError, match="NaN"):
        cc(row(float("nan"), 2), row(0, 1))
    with pytest.raises(ValueError, match=r"pred \[B, h, w\]"):
        sim(torch.ones(4), torch.ones(4))
