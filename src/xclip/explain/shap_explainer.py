"""SHAP expected gradients over a multimodal model's (pixel values, token embeddings).

Token ids are not differentiable, so the text input is the token *embeddings*
(``word_embeddings(ids)``); the model's own position / type embeddings are added inside, as for
ids. The explained sample's attention mask is kept for every interpolated row, so padding gets
exactly zero attribution.

Two engines compute the same numbers (the tests check them against each other):

- ``"shap"``: ``shap.GradientExplainer`` itself, one sample at a time (the reference; the model
  wrapped with the sample's attention mask and the explained output columns).
- ``"batched"`` (default): shap's algorithm without its per-sample loop. For every sample it
  draws the same ``nsamples`` pairs (background row, t ~ U(0, 1)) that ``shap_values(...,
  rseed=seed)`` draws (a ``RandomState(seed)``: ``choice`` then ``uniform``, shared by both
  inputs and by every output), then pushes the interpolations ``t x + (1 - t) bg`` of all samples
  through the model in chunks of `batch_size` rows, one backward per explained output and chunk,
  and averages ``grad * (x - bg)``.

Each sample has its own seed (by default ``seed + its position``; callbacks pass one per item
id), so a sample's explanation does not depend on the batch it is explained in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from xclip.explain.base import autocast, autocast_dtype, explaining
from xclip.explain.multimodal import MultimodalAttribution, MultimodalInputs, MultimodalTarget, explained_classes

ENGINES = ("batched", "shap")


def expected_gradient_draws(seed: int, n_background: int, nsamples: int) -> tuple[np.ndarray, np.ndarray]:
    """The (background row [nsamples], t [nsamples]) pairs ``shap.GradientExplainer.shap_values``
    draws for one sample under ``rseed=seed`` (interleaved ``choice`` / ``uniform`` calls)."""
    rs = np.random.RandomState(seed)
    rows, ts = np.empty(nsamples, np.int64), np.empty(nsamples, np.float64)
    for k in range(nsamples):
        rows[k] = rs.choice(n_background)
        ts[k] = rs.uniform()
    return rows, ts


def pad_ids(input_ids: Tensor, length: int, pad_token_id: int) -> Tensor:
    """[B, T'] ids padded with `pad_token_id` (or cut) to [B, length]."""
    if input_ids.shape[1] >= length:
        return input_ids[:, :length]
    pad = input_ids.new_full((input_ids.shape[0], length - input_ids.shape[1]), pad_token_id)
    return torch.cat([input_ids, pad], dim=1)


class _MaskedColumns(nn.Module):
    """``(pixel_values, token_embeds) -> output columns``, with one sample's attention mask fixed:
    the two-input model shap.GradientExplainer calls."""

    def __init__(self, target: MultimodalTarget, mask_row: Tensor, columns: Tensor | None, precision: str | None):
        super().__init__()
        self.model = target.module  # registered, so shap's eval()/zero_grad() reach it
        self.target, self.mask_row, self.columns, self.precision = target, mask_row, columns, precision

    def forward(self, pixel_values: Tensor, token_embeds: Tensor) -> Tensor:
        with autocast(pixel_values.device, self.precision):
            out = self.target.forward_embeds(
                pixel_values, token_embeds, self.mask_row.expand(pixel_values.shape[0], -1)
            ).float()
        return out if self.columns is None else out[:, self.columns]


class SHAPExplainer:
    """Expected-gradients SHAP values of one output head (`target`) over pixels and token embeddings.

    Args:
        target: the model head (`MultimodalTarget`).
        background: the background rows (e.g. sampled from the validation data; every row has a
            pixel input and a text); its texts are padded with [PAD] to each explained batch's length.
        nsamples: (background row, t) draws per explained sample (shap's default 200).
        batch_size: rows per forward/backward (memory).
        seed: the seed of sample i is ``seed + i`` unless `explain` gets per-sample seeds.
        engine: ``"batched"`` or ``"shap"`` (see the module docstring).
        precision: autocast precision of the forward passes (Lightning's names; None: fp32).
    """

    name = "shap"

    def __init__(
        self,
        target: MultimodalTarget,
        background: MultimodalInputs,
        nsamples: int = 200,
        batch_size: int = 50,
        seed: int = 0,
        engine: str = "batched",
        precision: str | None = None,
    ):
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if nsamples < 1 or batch_size < 1:
            raise ValueError(f"nsamples and batch_size must be >= 1, got {nsamples} and {batch_size}")
        if len(background) < 1:
            raise ValueError("the SHAP background needs at least one row")
        autocast_dtype(precision)
        self.target, self.background = target, background
        self.nsamples, self.batch_size, self.seed, self.engine = int(nsamples), int(batch_size), int(seed), engine
        self.precision = None if precision is None else str(precision)

    # ---- public ----------------------------------------------------------------------------------
    def explain(
        self, inputs: MultimodalInputs, classes: str | Tensor | None = "predicted", seeds: Sequence[int] | None = None
    ) -> MultimodalAttribution:
        """SHAP values of `inputs` (N samples).

        Args:
            classes: ``"predicted"`` (each sample's arg-max output, like shap's ``ranked_outputs=1``),
                a [N] tensor of classes, or None for every output (K' = K).
            seeds: one seed per sample (default ``seed + i``).

        Returns:
            `MultimodalAttribution` with image [N, 3, H, W, K'] and tokens [N, T, D, K'] (float64);
            its ``joint`` reference is the mean output over the background rows (read with each
            sample's mask): the values add up to output - reference in expectation (exactly with a
            one-row background and a linear model).
        """
        n = len(inputs)
        seeds = [self.seed + i for i in range(n)] if seeds is None else [int(s) for s in seeds]
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} samples")
        module = self.target.module
        device = inputs.pixel_values.device
        # validate/test run under inference mode: explanations need autograd on fresh tensors
        with explaining(module), torch.inference_mode(False), torch.enable_grad():
            x_img = inputs.pixel_values.detach().float().clone()
            mask = inputs.attention_mask.detach().clone()
            with torch.no_grad():
                x_emb = self.target.embed(inputs.input_ids).detach().float().clone()
                bg_ids = pad_ids(self.background.input_ids.to(device).clone(), x_emb.shape[1], inputs.pad_token_id)
                bg_img = self.background.pixel_values.to(device).float().clone()
                bg_emb = self.target.embed(bg_ids).detach().float()
                output = self._forward(x_img, x_emb, mask)
            cls = explained_classes(classes, output)
            if self.engine == "batched":
                phi_img, phi_emb = self._batched(x_img, x_emb, mask, bg_img, bg_emb, cls, seeds)
            else:
                phi_img, phi_emb = self._with_shap(x_img, x_emb, mask, bg_img, bg_emb, cls, seeds)
            with torch.no_grad():
                reference = self._background_mean(bg_img, bg_emb, mask).gather(1, cls).cpu()
        output = output.gather(1, cls).double().cpu()
        phi_img, phi_emb = phi_img.cpu(), phi_emb.cpu()
        total = phi_img.sum(dim=(1, 2, 3)) + phi_emb.sum(dim=(1, 2))
        return MultimodalAttribution(
            self.name,
            self.target.name,
            phi_img,
            phi_emb,
            mask.cpu(),
            cls.cpu(),
            output,
            {"joint": reference},
            {"joint": total - (output - reference)},
        )

    # ---- engines ---------------------------------------------------------------------------------
    def _batched(self, x_img, x_emb, mask, bg_img, bg_emb, cls, seeds) -> tuple[Tensor, Tensor]:
        n, slots, ns = x_img.shape[0], cls.shape[1], self.nsamples
        draws = [expected_gradient_draws(s, bg_img.shape[0], ns) for s in seeds]
        rows = torch.from_numpy(np.concatenate([d[0] for d in draws])).to(x_img.device)
        ts = torch.from_numpy(np.concatenate([d[1] for d in draws])).to(x_img.device, torch.float32)
        sample = torch.arange(n, device=x_img.device).repeat_interleave(ns)
        phi_img = torch.zeros((*x_img.shape, slots), dtype=torch.float64, device=x_img.device)
        phi_emb = torch.zeros((*x_emb.shape, slots), dtype=torch.float64, device=x_img.device)
        for start in range(0, n * ns, self.batch_size):
            j, r, t = (v[start : start + self.batch_size] for v in (sample, rows, ts))
            d_img, d_emb = x_img[j] - bg_img[r], x_emb[j] - bg_emb[r]
            s_img = t.view(-1, 1, 1, 1) * x_img[j] + (1 - t.view(-1, 1, 1, 1)) * bg_img[r]
            s_emb = t.view(-1, 1, 1) * x_emb[j] + (1 - t.view(-1, 1, 1)) * bg_emb[r]
            s_img.requires_grad_(True)
            s_emb.requires_grad_(True)
            out = self._forward(s_img, s_emb, mask[j])
            for slot in range(slots):
                # rows are independent (eval mode): the gradient of the summed selected outputs is
                # every row's own gradient
                picked = out.gather(1, cls[j, slot : slot + 1]).sum()
                g_img, g_emb = torch.autograd.grad(picked, (s_img, s_emb), retain_graph=slot + 1 < slots)
                phi_img[..., slot].index_add_(0, j, g_img.double() * d_img.double())
                phi_emb[..., slot].index_add_(0, j, g_emb.double() * d_emb.double())
        return phi_img / ns, phi_emb / ns

    def _with_shap(self, x_img, x_emb, mask, bg_img, bg_emb, cls, seeds) -> tuple[Tensor, Tensor]:
        import shap

        state = np.random.get_state()  # shap re-seeds numpy's global generator: give it back
        try:
            images, embeds = [], []
            for j in range(x_img.shape[0]):
                model = _MaskedColumns(self.target, mask[j : j + 1], cls[j], self.precision)
                explainer = shap.GradientExplainer(model, [bg_img, bg_emb], batch_size=self.batch_size)
                img, emb = explainer.shap_values(
                    [x_img[j : j + 1], x_emb[j : j + 1]], nsamples=self.nsamples, rseed=seeds[j]
                )
                images.append(torch.from_numpy(np.asarray(img, dtype=np.float64)))
                embeds.append(torch.from_numpy(np.asarray(emb, dtype=np.float64)))
        finally:
            np.random.set_state(state)
        return torch.cat(images), torch.cat(embeds)

    # ---- helpers ---------------------------------------------------------------------------------
    def _forward(self, pixel_values: Tensor, token_embeds: Tensor, mask: Tensor) -> Tensor:
        with autocast(pixel_values.device, self.precision):
            return self.target.forward_embeds(pixel_values, token_embeds, mask).float()

    def _background_mean(self, bg_img: Tensor, bg_emb: Tensor, mask: Tensor) -> Tensor:
        """[N, K]: the mean output over the background rows, each read with sample n's mask."""
        n, b = mask.shape[0], bg_img.shape[0]
        pairs = torch.cartesian_prod(torch.arange(n), torch.arange(b)).to(mask.device)
        outs = [
            self._forward(bg_img[p[:, 1]], bg_emb[p[:, 1]], mask[p[:, 0]]) for p in pairs.split(max(self.batch_size, 1))
        ]
        return torch.cat(outs).view(n, b, -1).double().mean(1)
