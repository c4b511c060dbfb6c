"""Attention through a shorter set: inducing points (Set Transformer) and compressed keys (memory-
compressed attention).

Both replace the Nk keys by a set that grows slower (m learned points, or Nk/k compressed blocks),
so their cost is O(N·m) or O(N²/k), and both are trainable and calibratable (``ar.calibrate``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.site import KERNEL_MASK_CLASSES, AttentionSite, MaskClass
from attnrewrite.variants.base import (
    AttentionVariant,
    additive_mask,
    compute_dtype,
    key_weights,
    repeat_kv,
)
from attnrewrite.variants.blockwise import (
    band_segment,
    block_gather,
    block_queries,
    finite_or_zero,
    fused_attention,
    padded_count,
)

# -- Set Transformer -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SetTransformerOptions:
    num_inducing: int = 32

    def check(self) -> str | None:
        if self.num_inducing < 1:
            return f"num_inducing must be a positive integer, got {self.num_inducing}"
        return None


class SetTransformerAttention(AttentionVariant):
    """Induced attention: Lee, Lee, Kim, Kosiorek, Choi, Teh, "Set Transformer: A Framework for
    Attention-based Permutation-Invariant Neural Networks", 2019 (ICML), arXiv:1810.00825 (the
    induced set attention block, ISAB, on the canonical q, k, v).

    With m learned inducing points I (m x d per query head): the inducing points attend over the
    keys and values, H = softmax(I kᵀ·s + m_j) v (m x dv), and the queries attend over the m
    results, addressed by their inducing points: out = softmax(q Iᵀ·s) H. That is attention through
    the rank-m factorisation softmax(q Iᵀ s)·softmax(I kᵀ s + m).

    Initialisation: I ~ N(0, 1) from the seed. Key mask (class ``key``): exact in the first stage
    (a masked key gets weight 0 in every summary); rows of a query whose keys are all masked are 0.
    Capabilities: masks ``none`` and ``key``; not causal (every summary mixes all positions);
    cross-attention; grouped heads. Parameters: I (calibratable). Options: ``num_inducing`` m
    (default 32). Cost: time O(N·m·(d + dv)), memory O(N·m).
    """

    name: ClassVar[str] = "set_transformer"
    mask_classes: ClassVar[frozenset[MaskClass]] = frozenset({MaskClass.NONE, MaskClass.KEY})
    supports_causal: ClassVar[bool] = False
    why_not_causal: ClassVar[str] = (
        "'set_transformer' is not causal: each inducing point summarises all keys, future ones "
        "included; use a causal variant (local, memory_compressed, reformer)"
    )
    Options: ClassVar[type] = SetTransformerOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        points = torch.randn(
            site.num_heads, self.options.num_inducing, site.head_dim, generator=self.generator()
        )
        self.inducing = nn.Parameter(points)

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
        if causal:
            raise ValueError("'set_transformer' is not causal; its refuse() rejects causal sites")
        acc = compute_dtype(query.dtype)
        heads = query.shape[1]
        points = self.inducing.to(acc)
        key, value = repeat_kv(key.to(acc), heads), repeat_kv(value.to(acc), heads)
        points = points.expand(key.shape[0], heads, -1, -1)  # (B, H, m, d)
        bias = additive_mask(mask, acc)  # (B|1, H|1, 1, Nk) or None
        summaries = fused_attention(points, key, value, bias, scale)  # (B, H, m, dv)
        empty = None
        if bias is not None:
            # Keys all masked: every point summarises nothing, and queries give it no weight.
            something = ~torch.isneginf(bias).all(dim=-1, keepdim=True)  # (B|1, H|1, 1, 1)
            empty = additive_mask(something, acc)
        return fused_attention(query.to(acc), points, summaries, empty, scale).to(query.dtype)


# -- Memory-compressed attention -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MemoryCompressedOptions:
    stride: int = 4

    def check(self) -> str | None:
        if self.stride < 1:
            return f"stride must be a positive integer, got {self.stride}"
        return None


class MemoryCompressedAttention(AttentionVariant):
    """Memory-compressed attention: Liu, Saleh, Pot, Goodrich, Sepassi, Kaiser, Shazeer,
    "Generating Wikipedia by Summarizing Long Sequences", 2018 (ICLR), arXiv:1801.10198.

    Keys and values are compressed by a strided convolution along the sequence, kernel = stride =
    k: block p of k positions becomes k̃_p = Σ_t W^K_t k_{pk+t} (W^K_t d x d; likewise ṽ_p with
    W^V), then exact softmax over the Nk/k compressed blocks: out_i = Σ_p softmax_p(q_i·k̃_p·s +
    b_p) ṽ_p. Initialisation: W_t = I/k, average pooling. A partial last block is zero-padded.

    Key mask: masked keys and values are zeroed before the convolution, and block p gets the bias
    b_p = log(mean of w_j over its positions), w_j = exp(m_j) (0 where masked): 0 for an unmasked
    block, -inf for a block with no kept key. Exact only for masks constant over each block.

    Causal (block-causal compression): query i in block t = ⌊i/k⌋ sees the compressed blocks p < t
    (those that end before its block begins) and the keys of its own block exactly, j ∈ [tk, i],
    one softmax over both; the key mask applies exactly inside the own block.

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; cross-attention (blocks by
    position on both sides); grouped heads. Parameters: W^K, W^V (k·d² each, calibratable).
    Options: ``stride`` k (default 4). Cost: time O(N²·d/k), memory O(N²/k + N·k).
    """

    name: ClassVar[str] = "memory_compressed"
    mask_classes: ClassVar[frozenset[MaskClass]] = KERNEL_MASK_CLASSES
    Options: ClassVar[type] = MemoryCompressedOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        stride = self.options.stride

        def average(dim: int) -> Tensor:
            return (torch.eye(dim) / stride).unsqueeze(0).repeat(stride, 1, 1)  # (k, out, in)

        self.key_compression = nn.Parameter(average(site.head_dim))
        self.value_compression = nn.Parameter(average(site.value_dim))

    def compress(self, x: Tensor, weight: Tensor, kept: Tensor | None) -> Tensor:
        """(B, H, N, d) -> (B, H, ⌈N/k⌉, d'): Σ_t W_t x_{pk+t}, padding and masked rows zero."""
        stride = self.options.stride
        index, inside = _blocks(x.shape[2], stride, x.device)
        factor = inside.to(x.dtype)
        if kept is not None:
            factor = factor * kept[:, :, index]
        weight = weight.to(x.dtype)
        # One product per tap t (k is small): an einsum over (t, d) reshapes the symbolic block
        # count in a way torch.export cannot prove general.
        out = None
        for tap in range(stride):
            term = torch.matmul(x[:, :, index[:, tap]] * factor[..., tap, None], weight[tap].T)
            out = term if out is None else out + term
        return out

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
        out_dtype, acc = query.dtype, compute_dtype(query.dtype)
        heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
        stride = self.options.stride
        query, key, value = query.to(acc), key.to(acc), value.to(acc)
        weights = key_weights(mask, acc)  # (B|1, H|1, Nk)
        if weights is not None and weights.shape[1] not in (1, key.shape[1]):
            # A mask per query head over shared key heads: give every query head its keys.
            key, value = repeat_kv(key, heads), repeat_kv(value, heads)
        kept = None if weights is None else (weights > 0).to(acc)
        # Query head h reads head h // (H / Hkv), as an index (repeat_interleave of a symbolic
        # block count makes torch.export add guards its solver cannot prove).
        kv_head = torch.arange(heads, device=query.device) // (heads // key.shape[1])
        compressed_key = self.compress(key, self.key_compression, kept).index_select(1, kv_head)
        compressed_value = self.compress(value, self.value_compression, kept).index_select(
            1, kv_head
        )
        index, inside = _blocks(k_len, stride, query.device)
        real = inside.to(acc)
        kept_sum = real.sum(-1) if weights is None else (weights[:, :, index] * real).sum(-1)
        block_weight = kept_sum / real.sum(-1).clamp_min(1.0)
        block_bias = torch.log(block_weight.clamp_min(torch.finfo(acc).tiny))
        block_bias = block_bias.masked_fill(block_weight <= 0, float("-inf")).unsqueeze(-2)
        if not causal:
            out = fused_attention(query, compressed_key, compressed_value, block_bias, scale)
            return out.to(out_dtype)
        scores = torch.matmul(query, compressed_key.transpose(-1, -2)) * scale  # (B, H, Nq, C)
        scores = scores + block_bias

        count = index.shape[0]
        query_block = torch.div(
            torch.arange(q_len, device=query.device), stride, rounding_mode="floor"
        )
        earlier = torch.arange(count, device=query.device)[None, :] < query_block[:, None]
        scores = scores.masked_fill(~earlier, float("-inf"))
        far_max = scores.amax(dim=-1).detach()
        far = torch.exp(scores - finite_or_zero(far_max).unsqueeze(-1))
        far_total, far_values = far.sum(dim=-1), torch.matmul(far, compressed_value)
        near_max, near_total, near_values = _own_block(query, key, value, mask, stride, scale)
        top = finite_or_zero(torch.maximum(far_max, near_max))
        far_factor, near_factor = torch.exp(far_max - top), torch.exp(near_max - top)
        total = far_total * far_factor + near_total * near_factor
        out = far_values * far_factor.unsqueeze(-1) + near_values * near_factor.unsqueeze(-1)
        out = out / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
        return out.to(out_dtype)


def _blocks(length: int, stride: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(⌈N/k⌉ + 1, k) positions of each block (padding clamped to 0) and which are inside.

    The extra all-padding block (masked by its bias) keeps ``torch.export`` general, as in
    :func:`~attnrewrite.variants.blockwise.padded_count`.
    """
    count = padded_count(length, stride)
    positions = torch.arange(count, device=device)[:, None] * stride + torch.arange(
        stride, device=device
    )
    inside = positions < length
    return torch.where(inside, positions, torch.zeros_like(positions)), inside


def _own_block(
    query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, stride: int, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics of query i over keys ⌊i/k⌋k .. i (causal, exact key mask)."""
    heads, q_len, k_len = query.shape[1], query.shape[2], key.shape[2]
    device = query.device
    q_pos = block_queries(q_len, stride, device)  # (G, k)
    k_pos = band_segment(q_pos.shape[0], stride, 0, 0, device).positions  # (G, k)
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    keep = (i < q_len) & (j < k_len) & (j <= i)
    gather = block_gather(q_pos, k_pos, q_len, k_len, heads, key.shape[1])
    q = gather.queries(query)
    k, v = gather.keys(key), gather.keys(value)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, G, k, k)
    if mask is not None:
        bias = mask.squeeze(-2)[:, :, gather.key_index].unsqueeze(-2)  # (B|1, H|1, G, 1, k)
        if bias.dtype == torch.bool:
            keep = keep & bias
        else:
            scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~keep, float("-inf"))
    top = scores.amax(dim=-1).detach()
    weights = torch.exp(scores - finite_or_zero(top).unsqueeze(-1))
    rows = torch.arange(q_len, device=device)

    def to_rows(x: Tensor) -> Tensor:
        return x.flatten(2, 3).index_select(2, rows)

    return to_rows(top), to_rows(weights.sum(dim=-1)), to_rows(torch.matmul(weights, v))
