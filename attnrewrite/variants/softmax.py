"""Exact softmax attention, lowered to ``F.scaled_dot_product_attention``."""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnrewrite.site import ALL_MASK_CLASSES, MaskClass
from attnrewrite.variants.base import AttentionVariant, combine_mask, key_bias, repeat_kv


class SoftmaxAttention(AttentionVariant):
    """Exact scaled dot-product attention (Vaswani et al. 2017, arXiv:1706.03762).

    softmax(q·kᵀ·scale + m) v, computed by ``torch.nn.functional.scaled_dot_product_attention``
    (fused kernels where the backend has them). Keeps every mask class, causal and cross attention,
    grouped heads and attention dropout (in training mode). This is the identity rewrite: a model
    rewritten with it computes what the original computed. Cost: O(N²) time; memory O(N²) for the
    math kernel, O(N) for the fused ones.
    """

    name: ClassVar[str] = "softmax"
    mask_classes: ClassVar[frozenset[MaskClass]] = ALL_MASK_CLASSES
    exact: ClassVar[bool] = True
    #: Decoding keeps a key/value cache: every key and value so far and each key's mask term.
    state_names: ClassVar[tuple[str, ...]] = ("keys", "values", "key_bias")
    #: A sliding-window site keeps the last ``site.window`` keys (a query sees no older one).
    decodes_windows: ClassVar[bool] = True

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float = 1.0,
    ) -> Tensor:
        dropout_p = self.site.dropout_p if self.training else 0.0
        return exact_attention(query, key, value, mask, causal, scale, dropout_p)

    def prefill(self, query, key, value, *, mask=None, causal=False, scale=1.0):
        out = self.forward(query, key, value, mask=mask, causal=causal, scale=scale)
        return out, self._window((key, value, key_bias(mask, key)))

    def step(self, query, key, value, state, *, mask=None, scale=1.0):
        keys, values, bias = state
        keys, values = torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2)
        bias = append_bias(bias, key_bias(mask, key))
        keys, values, bias = self._window((keys, values, bias))
        return one_row_attention(query, keys, values, bias, scale), (keys, values, bias)

    def _window(self, cache: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """The last ``site.window`` keys of a sliding-window site's cache (all of it otherwise):
        the next query sees no older key, so keeping them would only cost memory."""
        w = self.site.window
        if w is None:
            return cache
        keys, values, bias = cache
        return keys[:, :, -w:], values[:, :, -w:], bias[..., -w:]


def one_row_attention(query: Tensor, keys: Tensor, values: Tensor, bias: Tensor, scale: float):
    """Exact attention of one new query per sequence over a cache, grouped heads read in place.

    query (B, H, 1, d); keys, values (B, Hkv, N, d|dv); bias (B, 1|H, N) additive. The query heads
    sharing a key/value head are one (G, d) × (d, N) product: no copy of the cache per step (a
    step reads it once, which is what decoding with a cache costs).
    """
    b, heads, _, d = query.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    group = heads // kv_heads
    acc = torch.float32 if query.dtype in (torch.float16, torch.bfloat16) else query.dtype
    q = query.reshape(b, kv_heads, group, d).to(acc)
    scores = torch.matmul(q, keys.to(acc).transpose(-1, -2)) * scale  # (B, Hkv, G, N)
    grouped_bias = bias.to(acc).reshape(b, -1, 1 if bias.shape[1] == 1 else group, length)
    # A row with every key masked gets zeros, as sdpa's safe softmax gives (not NaN).
    weights = torch.softmax(scores + grouped_bias, dim=-1).nan_to_num(nan=0.0)
    out = torch.matmul(weights, values.to(acc))  # (B, Hkv, G, dv)
    return out.reshape(b, heads, 1, values.shape[-1]).to(query.dtype)


def append_bias(past: Tensor, new: Tensor) -> Tensor:
    """Concatenate key biases (B, 1|H, N) along keys, broadcasting their head axes."""
    heads = max(past.shape[1], new.shape[1])
    past = past.expand(-1, heads, -1) if past.shape[1] != heads else past
    new = new.expand(-1, heads, -1) if new.shape[1] != heads else new
    return torch.cat([past, new.to(past.dtype)], dim=-1)


def exact_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float = 1.0,
    dropout_p: float = 0.0,
) -> Tensor:
    """Exact softmax attention on canonical tensors (grouped heads repeated, causal folded in)."""
    heads = query.shape[1]
    key, value = repeat_kv(key, heads), repeat_kv(value, heads)
    if causal and mask is None:
        return F.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout_p, is_causal=True, scale=scale
        )
    attn_mask = combine_mask(mask, causal, query.shape[-2], key.shape[-2], query.device)
    if attn_mask is not None and attn_mask.dtype.is_floating_point:
        attn_mask = attn_mask.to(query.dtype)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale
    )
