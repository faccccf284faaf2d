"""Grad-ECLIP (Zhao et al., ICML 2024): gradient-based visual and textual explanations for CLIP.

For a scalar target c (default: the cosine of the normalised embeddings) and the pooling attention's
read-out o (before its output projection) at the pooled row (the class token for a ViT's images, EOT
for CLIP's text):

    g = dc/do_pooled,   lambda_j = minmax_j cos(q_pooled, k_j),   H_j = ReLU(sum_c g_c lambda_j v_jc)

How the formula carries over to other pooling steps. Grad-ECLIP needs only that the embedding is a
function of ONE attention read-out ``o = sum_j a_j v_j`` of a query over the patch tokens j; the
backbone exposes that read-out as `xclip.backbones.PoolAttention` (q, k, v per head, o, and the
``tail`` that maps o to the embedding), and the formula above is applied to it unchanged:

- class-token ViT (OpenAI CLIP, EVA, MobileCLIP-B, HF CLIP): q is the class token's row of the last
  block, k and v its keys and values (EVA's rotary embeddings applied, as the block uses them); the
  tail is the out-projection, the residual with the class token, the MLP, the final norm and the
  projection. Prefix tokens (class, registers) are dropped from the map.
- attention-pool head with a learned query (SigLIP / SigLIP 2 ``map`` heads and HF's probe pooling
  head, PE-Core, CoCa's attentional pooler): q is the learned latent (probe) after its query
  projection, k and v are the pool's projections of the trunk's normalised output tokens. There is
  no residual into a token: the tail is the pool's out-projection, ``x + mlp(norm(x))`` and any
  projection after it. g is taken at the latent's read-out, lambda_j = cos(latent query, k_j)
  min-max normalised over the grid tokens (PE's class token, attended as a prefix key, is dropped),
  and H_j weighs token j's value by both. Since nothing else reaches the embedding, the map accounts
  for everything the pool reads.
- ResNet's attention pool (RN50 ... RN50x64): the query is the *mean* of the last feature map's
  tokens (plus its positional embedding), attending over itself and the HW tokens; k and v are the
  pool's projections, the tail is ``c_proj``. lambda_j = cos(q_mean, k_j) over the HW tokens (the mean
  token's own key dropped). The query depends on every token (it is their mean), but Grad-ECLIP's
  g = dc/do is the gradient at the read-out, as for the class-token row, whose query also depends
  on the tokens through the earlier blocks.
- average pooling (ConvNeXt, FastViT / MobileCLIP-S, Swin, ViTamin, CLIPA): no query, so the spatial
  term lambda does not exist; `GradECLIP` refuses these and names Grad-CAM on the last feature map.

Text maps use the same formula over the last n text blocks at the pooled row with the tower's own
mask: CLIP's EOT row under the causal mask, SigLIP's last position (no causal mask: every token is
a key), CoCa's appended class token (with its padding mask).

Two modes:
- ``mode="model"`` (default) explains the stock multi-head model: lambda is computed per head on
  that head's channels, and the target is the model's own output (unchanged by the explainer).
- ``mode="reference"`` reproduces the official implementation (OpenAI CLIP's class-token ViT only):
  the block(s) are recomputed as one head over the full width (so the target is computed on that
  modified forward), and q and k are passed through ``out_proj`` (with bias) before the cosine.
  Use it for cross-checking.

Speed: an image's embedding depends on the pooling attention only through its read-out row, and
everything after it is per-vector. So image maps need one forward up to the pooling step (no graph)
and a batched vector-Jacobian product through the tail for all K texts: no backward pass through
the network.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from xclip.backbones import Backbone
from xclip.backbones.base import (
    BlockTrace,
    BlockView,
    ImageTrace,
    PoolAttention,
    TextTrace,
    UnsupportedFamily,
    trace_block,
)
from xclip.backbones.sequence import SequenceTextTower
from xclip.explain.base import Explainer, Texts, as_text_list, check_pairs, explaining, minmax, per_text_gradients
from xclip.explain.targets import Target, cosine

MODES = ("model", "reference")


def qk_weights(q_pooled: Tensor, k: Tensor, key_mask: Tensor | None = None) -> Tensor:
    """lambda: cosine of the pooled query with every key, min-max normalised over the keys.

    q_pooled [..., H, dh], k [..., H, J, dh], key_mask [..., J] bool (the keys the min-max runs
    over; others get 0) -> [..., H, J].
    """
    lam = F.cosine_similarity(q_pooled[..., None, :], k, dim=-1)
    mask = None if key_mask is None else key_mask[..., None, :].expand_as(lam)
    return minmax(lam, dim=-1, mask=mask)


def grad_eclip_terms(grad: Tensor, q_pooled: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """The two factors of Grad-ECLIP, per head, before they are multiplied and summed.

    Args:
        grad: [N, K, W] gradient of each target w.r.t. the pooled (CLS) attention output.
        q_pooled: [N, H, dh] the pooled token's query per head (W = H * dh).
        k: [N, H, J, dh] keys of the J explained tokens per head.
        v: [N, H, J, dh] their values.
    Returns:
        spatial [N, H, J]: lambda, min-max cos(q_pooled, k_j) (text-independent);
        channel [N, K, H, J]: sum_c g_hc v_hjc (the target's direction read on each token's value).
    """
    n, kk, _ = grad.shape
    heads, dh = q_pooled.shape[-2:]
    channel = torch.einsum("nkhd,nhjd->nkhj", grad.reshape(n, kk, heads, dh), v)
    return qk_weights(q_pooled, k), channel


def combine_terms(spatial: Tensor, channel: Tensor) -> Tensor:
    """ReLU(sum_h spatial_h * channel_h): spatial [N, H, *grid], channel [N, K, H, *grid] -> [N, K, *grid]."""
    return (spatial[:, None] * channel).sum(2).clamp_min(0)


def text_layer_scores(grad: Tensor, q_pooled: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None) -> Tensor:
    """One text block's Grad-ECLIP scores before the ReLU (text maps sum layers, then ReLU).

    grad [N, K, W] (at each text's EOT row); q_pooled [K, H, dh]; k, v [K, H, L, dh];
    key_mask [K, L] -> [N, K, L].
    """
    n, kk, _ = grad.shape
    heads, dh = q_pooled.shape[-2:]
    weighted_v = qk_weights(q_pooled, k, key_mask)[..., None] * v  # [K, H, L, dh]
    return torch.einsum("nkhd,khld->nkl", grad.reshape(n, kk, heads, dh), weighted_v)


def _single_head(view: BlockView) -> BlockView:
    return replace(view, num_heads=1)


@dataclass
class GradECLIPTerms:
    """Grad-ECLIP's two factors per head (one head in reference mode), on the patch grid.

    ``spatial`` [N, H, gh, gw]: lambda, min-max cos(q_cls, k_j), the same for every text;
    ``channel`` [N, K, H, gh, gw]: g . v_j, the target's gradient direction read on each patch's
    value. Useful to see which factor puts a map's maximum where it is.
    """

    spatial: Tensor
    channel: Tensor


@dataclass
class TextMaps:
    """Per-token Grad-ECLIP scores for N images x K texts.

    ``tokens[k]``: text k's own tokens decoded (no start, end or padding tokens);
    ``token_scores`` [N, K, T] (zero-padded to the longest text; each row sums to 1, or is all zero
    when ReLU removed everything); ``words[k]`` and ``word_scores`` [N, K, Wd]: the same merged into
    words (sub-word scores add up).
    """

    texts: list[str]
    tokens: list[list[str]]
    token_scores: Tensor
    words: list[list[str]]
    word_scores: Tensor

    def word_pairs(self, n: int, k: int) -> list[tuple[str, float]]:
        """(word, score) pairs of image n and text k."""
        return [(w, float(s)) for w, s in zip(self.words[k], self.word_scores[n, k])]


_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+", re.IGNORECASE)


class GradECLIP(Explainer):
    """Grad-ECLIP image and text explanations for any xclip backbone.

    ``image_maps(images [N,3,S,S], texts) -> [N, K, gh, gw]`` raw non-negative maps;
    ``text_maps(images, texts) -> TextMaps``. `texts` are K strings or (image maps only) K text
    embeddings [K, D]; `target` is ``"cosine"``, ``"softmax"``, ``"probability"`` (the model's own, see
    `Explainer.target_fn`) or a callable (see `targets`).

    Args:
        backbone: an xclip backbone (open_clip or HF).
        mode: ``"model"`` (default) or ``"reference"`` (see the module docstring).
        text_blocks: how many of the last text blocks the text maps sum over (8 as in the paper).
        precision: autocast precision (``"bf16-mixed"``, ``"16-mixed"``, ``"32"`` or None; see
            `Explainer`); maps and scores come back in float32.
    """

    name = "grad_eclip"

    def __init__(
        self, backbone: Backbone, mode: str = "model", text_blocks: int = 8, precision: str | int | None = None
    ):
        super().__init__(backbone, precision)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode, self.text_blocks = mode, text_blocks
        self._token_counts: dict[str, int] = {}

    # ---- images ------------------------------------------------------------------------------
    def _maps(self, images: Tensor, texts: Texts, target: str | Target, pairs: bool) -> Tensor:
        terms = self.terms(images, texts, target, pairs)
        return combine_terms(terms.spatial, terms.channel)

    def terms(
        self,
        images: Tensor,
        texts: Texts,
        target: str | Target = "cosine",
        pairs: bool = False,
        trace: ImageTrace | None = None,
    ) -> GradECLIPTerms:
        """The two factors of every image map before they are combined (see `GradECLIPTerms`):
        ``image_maps == combine_terms(spatial, channel)``; with `pairs`, image n with text n only
        (channel [N, 1, H, gh, gw], as `pair_maps`). `trace`: the caller's own
        ``backbone.trace_image(images, n_blocks=1)`` of these images (no graph needed), reused
        instead of a second forward (e.g. to read the patch tokens of the same pass)."""
        self.check_inputs(images, texts)
        if pairs:
            check_pairs(images, texts)
        self.require_attention_pool()
        target_fn = self.target_fn(target)
        images = images.to(self.backbone.device)
        with explaining(self.backbone.model), self.autocast():
            text_emb = self.text_embeddings(texts)
            with torch.no_grad():
                if trace is None:
                    trace = self.backbone.trace_image(images, n_blocks=1)
                attention = trace.pool_attention() if self.mode == "model" else self._reference_attention(trace)
            read_out = attention.attn_out.detach().requires_grad_(True)
            with torch.enable_grad():
                emb = attention.tail(read_out)
                (grad,) = per_text_gradients(target_fn(emb, text_emb), [read_out], pairs)  # [K, N, W]
            k_grid, v_grid = attention.grid_keys()
            spatial, channel = grad_eclip_terms(grad.transpose(0, 1), attention.q, k_grid, v_grid)
        grid = trace.grid
        return GradECLIPTerms(spatial.float().unflatten(-1, grid), channel.float().unflatten(-1, grid))

    def require_attention_pool(self) -> None:
        vision = self.backbone.vision
        if not vision.has_attention_pool:
            raise vision.refusal(
                "Grad-ECLIP image maps", "GradCAM(backbone) (Grad-CAM on the last feature map) or SHAP/Captum"
            )
        if self.mode == "reference" and vision.pooling != "class token":
            raise UnsupportedFamily(
                f"Grad-ECLIP mode='reference' reproduces the official code for OpenAI CLIP's "
                f"class-token ViT, not {vision.family}: use mode='model'"
            )

    def _reference_attention(self, trace: ImageTrace) -> PoolAttention:
        """The official code's last block: one head over the full width, q and k through out_proj."""
        view = self.backbone.vision_blocks()[-1]
        last = trace_block(_single_head(view), trace.blocks[-1].x_in, None)
        x_cls = last.x_in[:, 0]

        def tail(attn_out: Tensor) -> Tensor:
            x = x_cls + view.ls_1(view.out_proj(attn_out))
            return self.backbone.image_head(x + view.ls_2(view.mlp(view.ln_2(x))))

        q, k = view.out_proj(last.q)[:, None], view.out_proj(last.k)[:, None]
        return PoolAttention(
            q[:, :, 0],
            k,
            last.v[:, None],
            last.attn_weights[:, :, 0],
            last.attn_out[:, 0],
            trace.traced_pool().prefix,
            tail,
        )

    # ---- texts -------------------------------------------------------------------------------
    def text_maps(
        self, images: Tensor, texts: Sequence[str], target: str | Target = "cosine", pseudo_tokens: Tensor | None = None
    ) -> TextMaps:
        """Per-token and per-word scores for every (image, text) pair (see `TextMaps`).

        `images` are model inputs [N, 3, H, W] or, already encoded, image embeddings [N, D] (no
        image forward then). With `pseudo_tokens` [K, W] (SEARLE), the first ``$`` of text k reads
        pseudo token k instead of its token embedding; ``$`` keeps its score as a word of its own.
        """
        target_fn = self.target_fn(target)
        if images.ndim == 2:  # embeddings: the model-input checks do not apply
            if images.shape[1] != self.backbone.embed_dim:
                raise ValueError(f"image embeddings must be [N, {self.backbone.embed_dim}], got {tuple(images.shape)}")
            if not bool(torch.isfinite(images).all()):
                raise ValueError("image embeddings hold NaN or infinite values")
        else:
            self.backbone.check_model_input(images)
        texts = as_text_list(texts)
        tokens = self.backbone.tokenize(texts)
        images = images.to(self.backbone.device)
        with explaining(self.backbone.model), self.autocast():
            with torch.no_grad():
                img_emb = (images if images.ndim == 2 else self.backbone.encode_image(images)).float()
            with torch.enable_grad():
                trace = self._trace_text(tokens, pseudo_tokens)
                raw = self._text_scores(trace, target_fn, img_emb)  # [N, K, L']
        assert trace.content is not None  # Backbone.trace_text marks every text's content
        return self._package(texts, tokens, raw, trace.content)

    def _trace_text(self, tokens: Tensor, pseudo_tokens: Tensor | None = None) -> TextTrace:
        if pseudo_tokens is not None:
            pseudo_tokens = pseudo_tokens.detach()
        trace = self.backbone.trace_text(tokens, n_blocks=self.text_blocks, pseudo_tokens=pseudo_tokens)
        if self.mode == "model":
            return trace
        text = self.backbone.text
        causal_mask = text.causal is not False and (trace.attn_mask is None or trace.attn_mask.ndim == 2)
        if not (causal_mask and isinstance(text, SequenceTextTower)):
            raise UnsupportedFamily(
                f"Grad-ECLIP mode='reference' reproduces the official code for OpenAI CLIP's "
                f"causal text tower, not {self.backbone.text.family}: use mode='model'"
            )
        x = trace.blocks[0].x_in
        views = self.backbone.text_blocks()[-len(trace.blocks) :]
        blocks = []
        for view in views:
            blocks.append(trace_block(_single_head(view), x, trace.attn_mask))
            x = blocks[-1].x_out
        return replace(trace, blocks=blocks, embedding=text.head(x, trace.eot_index))

    def _text_scores(self, trace: TextTrace, target_fn: Target, img_emb: Tensor) -> Tensor:
        """Summed per-layer Grad-ECLIP scores of every position, ReLU after the sum: [N, K, L']."""
        blocks, txt_emb, eot = trace.blocks, trace.embedding, trace.eot_index
        n, kk = img_emb.shape[0], txt_emb.shape[0]
        outs = [b.attn_out for b in blocks]
        scores = target_fn(img_emb, txt_emb)  # [N, K]
        grads: Sequence[Tensor]
        if target_fn is cosine:
            # column k depends on text k only: one batched backward per image is exact
            eye = torch.eye(n, dtype=scores.dtype, device=scores.device)
            go = eye[:, :, None].expand(n, n, kk)
            grads = torch.autograd.grad(scores, outs, grad_outputs=go, is_grads_batched=True)  # [N, K, L, W]
        else:  # a target may mix texts (softmax over prompts): one batched backward per pair
            eye = torch.eye(n * kk, dtype=scores.dtype, device=scores.device).view(n * kk, n, kk)
            grads = [
                g.view(n, kk, kk, *g.shape[2:]).diagonal(dim1=1, dim2=2).movedim(-1, 1)
                for g in torch.autograd.grad(scores, outs, grad_outputs=eye, is_grads_batched=True)
            ]
        rows = torch.arange(kk, device=eot.device)
        # the keys the pooled row attends to (causal: up to EOT; padding masks; SigLIP: all);
        # the reference min-maxes over all positions
        key_mask = _pooled_row_keys(trace.attn_mask, eot, blocks[0].x_in.shape[1]) if self.mode == "model" else None
        total: Tensor | None = None
        for view, block, grad in zip(self.backbone.text_blocks()[-len(blocks) :], blocks, grads):
            q, k, v = self._qkv_heads(view, block)  # [K, H, L, dh]
            layer = text_layer_scores(grad[:, rows, eot], q[rows, :, eot], k, v, key_mask)
            total = layer if total is None else total + layer
        if total is None:
            raise ValueError("Grad-ECLIP text scores need at least one traced text block (text_blocks >= 1)")
        return F.relu(total.detach().float())

    def _qkv_heads(self, view: BlockView, trace: BlockTrace) -> tuple[Tensor, Tensor, Tensor]:
        """Per-head q, k, v [N, H, L, dh]; in reference mode q and k through out_proj, one head."""
        if self.mode == "model":
            return trace.q_heads, trace.k_heads, trace.v_heads
        with torch.no_grad():
            q, k = view.out_proj(trace.q), view.out_proj(trace.k)
        return q[:, None], k[:, None], trace.v[:, None]

    def _package(self, texts: list[str], tokens: Tensor, raw: Tensor, content: Tensor) -> TextMaps:
        """Scores of each text's own tokens (`content` [K, L] marks them: no start, end or padding
        tokens), rows normalised to sum 1, and merged into words."""
        n, kk, _ = raw.shape
        content = content.to(raw.device)
        starts = content.int().argmax(1).tolist()
        lengths = content.sum(1).tolist()
        t_max = max(lengths, default=0)
        index = torch.tensor(starts, device=raw.device)[:, None] + torch.arange(t_max, device=raw.device)[None]
        keep = torch.arange(t_max, device=raw.device)[None] < torch.tensor(lengths, device=raw.device)[:, None]
        index = index.clamp_max(raw.shape[-1] - 1)
        token_scores = raw.gather(2, index[None].expand(n, -1, -1)) * keep
        total = token_scores.sum(-1, keepdim=True)
        # rows sum to 1, or stay all zero when the ReLU removed everything (never a partial sum)
        token_scores = torch.where(total > 0, token_scores / torch.where(total > 0, total, 1.0), 0.0)
        token_strs = [self.backbone.decode_tokens(tokens[j, starts[j] : starts[j] + lengths[j]]) for j in range(kk)]
        words, groups = zip(*[self._word_groups(t, token_strs[j]) for j, t in enumerate(texts)])
        w_max = max((len(g) for g in groups), default=0)
        word_scores = raw.new_zeros(n, kk, w_max)
        for j, group in enumerate(groups):  # bookkeeping over spans, no model calls
            for w, (a, b) in enumerate(group):
                word_scores[:, j, w] = token_scores[:, j, a:b].sum(-1)
        return TextMaps(texts, token_strs, token_scores, list(words), word_scores)

    def _word_groups(self, text: str, token_strs: list[str]) -> tuple[list[str], list[tuple[int, int]]]:
        """Words of `text` and each word's token span, found by tokenising every word alone."""
        words = _WORD.findall(text)
        counts = [self._token_count(w) for w in words]
        if sum(counts) != len(token_strs):  # truncated text or an unusual tokenizer: a word per token
            return list(token_strs), [(i, i + 1) for i in range(len(token_strs))]
        spans, start = [], 0
        for c in counts:
            spans.append((start, start + c))
            start += c
        return words, spans

    def _token_count(self, word: str) -> int:
        # a per-explainer cache (an lru_cache on the method would keep every explainer alive)
        if word not in self._token_counts:
            ids = self.backbone.tokenizer([word]).to(self.backbone.device)
            self._token_counts[word] = int(self.backbone.content_mask(ids)[0].sum())
        return self._token_counts[word]


def _pooled_row_keys(attn_mask: Tensor | None, pooled: Tensor, length: int) -> Tensor:
    """bool [K, L]: the keys the pooled row of each text may attend to under `attn_mask` (additive,
    [L, L] or [K, 1|H, L, L]; None: all keys)."""
    if attn_mask is None:
        return torch.ones(pooled.shape[0], length, dtype=torch.bool, device=pooled.device)
    rows = torch.arange(pooled.shape[0], device=pooled.device)
    row = attn_mask[pooled] if attn_mask.ndim == 2 else attn_mask[rows, 0, pooled]
    return torch.isfinite(row) & (row > -1e4)
