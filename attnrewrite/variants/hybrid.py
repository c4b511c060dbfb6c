"""Sliding-window + kernel attention: exact softmax scores near each query, a feature map elsewhere.

The hybrid of LoLCATs (Zhang, Arora, Chalamala, Wu, Spector, Singhal, Ramesh, Ré,
"LoLCATs: On Low-Rank Linearizing of Large Language Models", ICLR 2025, arXiv:2410.10254):
pretrained attention is spiky near the diagonal (and on a few global tokens) and diffuse far from
it, so the near keys keep their softmax weights and only the far keys are approximated. For query i
with exact region E(i):

    A_ij = w_j · exp(s_ij − c_i)           for j ∈ E(i)   (s_ij = q_i·k_j·scale)
    A_ij = γ_i · δ_j · w_j · φ(q_i)·ψ(k_j)  otherwise      (causal: j <= i)
    out_i = Σ_j A_ij v_j / Σ_j A_ij

where c_i = max s_ij over the allowed keys of E(i) (w_j > 0), w_j the per-key weights of a
key-only mask (so both parts scale alike with them), and γ_i, δ_j > 0 gains of the far part per
query and per key. The window's scale is fixed by c_i, the features' by their own normalisation;
the gains relate the two. The learned-map variants (:mod:`attnrewrite.variants.learned`) learn
log γ_i = g_h + u_h·q_i and log δ_j = v_h·k_j, all starting at 0: the key gain lets a far key
that every query attends to (BERT's [SEP], an "attention sink") weigh more than normalised
features allow, as softmax's exp(q̄·k_j) factor does. (Tried on MiniLM and left out: putting the
far part on the window's scale instead, with unnormalised exponential features times exp(−c_i);
from the same start it trained far worse, per-site errors 0.08–0.27 against 0.02–0.05.)

E(i) is block-aligned so that it is computed in blocks without an N×N tensor: with blocks of
``window`` positions, query i in block p = ⌊i / window⌋ keeps the keys of blocks p − 1, p, p + 1
(causal: p − 1 and p, j <= i), so every key within ``window`` positions of i is exact (and some
up to 2·window − 1 away), plus keys 0 .. ``global_tokens`` − 1 for every query. The far part is
the whole kernel sum minus its terms inside E(i) (computed on the region's block pairs), so it
costs one kernel pass: time O(N·window·(d + m) + N·m·dv), memory O(N·window + m·dv).

For self-attention the region is laid out densely (:func:`_band_region`): the chunked keys'
shifted slices side by side, as :func:`~attnrewrite.variants.blockwise.band_attention` does, so
the forward and backward passes are batched products and copies; on MiniLM at 256 tokens this
made a training step of the whole rewritten model about 1.4× faster than gathering positions.
Cross-attention (other key positions than query positions) gathers them
(:func:`_gathered_region`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnrewrite.variants.base import compute_dtype
from attnrewrite.variants.blockwise import (
    band_segment,
    band_windows,
    block_gather,
    block_queries,
    ceil_div,
    finite_or_zero,
    padded_count,
)
from attnrewrite.variants.kernel_core import chunk_first, kernel_sums, match_heads, unchunk_queries


def window_kernel_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    *,
    window: int,
    global_tokens: int = 0,
    query_log_gain: Tensor,
    key_log_gain: Tensor | None = None,
    key_weights: Tensor | None = None,
    causal: bool = False,
    scale: float = 1.0,
    chunk_size: int | None = None,
    eps: float = 1e-6,
    self_attention: bool = False,
) -> Tensor:
    """Hybrid attention (see the module docstring).

    Args:
        query: (B, H, Nq, d); key: (B, Hkv, Nk, d); value: (B, Hkv, Nk, dv), H % Hkv == 0.
        phi_q: (B, H, Nq, m) and phi_k: (B, Hkv, Nk, m): non-negative features of q and k.
        window: block length (>= 1) of the exact region.
        global_tokens: keys 0 .. global_tokens − 1 are exact for every query.
        query_log_gain: log of the far part's gain per query, broadcastable to (B, H, Nq).
        key_log_gain: (B, Hkv, Nk) log of the far part's gain per key, or None.
        key_weights: (B|1, 1|Hkv|H, Nk) non-negative per-key weights, or None.
        causal: restrict key j to j <= i.
        scale: factor on q·k in the exact region.
        chunk_size: chunk of the causal kernel pass (None: from the feature size).
        eps: the normaliser is clamped to at least ``eps`` (rows with no allowed key give 0).
        self_attention: queries and keys are the same positions (Nq == Nk), so the exact region
            is computed in the dense band layout of :func:`band_windows` (shifted slices of the
            chunked keys) rather than by gathering positions, much cheaper to differentiate.

    Returns:
        (B, H, Nq, dv) in float32 for half inputs, else the input dtype.
    """
    acc = compute_dtype(query.dtype)
    query, key, value = query.to(acc), key.to(acc), value.to(acc)
    phi_q, phi_k = phi_q.to(acc), phi_k.to(acc)
    heads = query.shape[1]
    kv_heads = key.shape[1]

    # Far-part weights per key: the mask's, times the key gain on a stabilised scale (≤ 1), the
    # stabiliser κ moving to the query side.
    far_weights, far_log = key_weights, query_log_gain.to(acc)
    if key_log_gain is not None:
        kappa = key_log_gain.amax(dim=-1, keepdim=True).detach()  # (B, Hkv, 1)
        gates = torch.exp(key_log_gain.to(acc) - kappa)
        if key_weights is not None:
            if key_weights.shape[1] not in (1, kv_heads):
                gates = match_heads(gates, heads)
            gates = gates * key_weights.to(acc)
        far_weights = gates
        far_log = far_log + kappa.repeat_interleave(heads // kv_heads, dim=1).to(acc)

    region = _band_region if self_attention else _gathered_region
    exact_num, exact_den, near_num, near_den = region(
        query * scale, key, value, phi_q, phi_k, key_weights, far_weights,
        window=window, global_tokens=global_tokens, causal=causal,
    )  # fmt: skip
    all_num, all_den = kernel_sums(
        phi_q, phi_k, value, key_weights=far_weights, causal=causal, chunk_size=chunk_size
    )
    # The two parts' relative weight, as an exponent, split so that neither factor exceeds 1 (no
    # overflow whichever part dominates).
    far_log = far_log.expand(*all_den.shape)
    shift = far_log.clamp_min(0).detach()
    near_factor, far_factor = torch.exp(-shift), torch.exp(far_log - shift)
    # The far part is the whole kernel sum minus its terms in E(i); its normaliser is a sum of
    # non-negative terms, so a negative difference is rounding and is clamped.
    num = near_factor.unsqueeze(-1) * exact_num + far_factor.unsqueeze(-1) * (all_num - near_num)
    den = near_factor * exact_den + far_factor * (all_den - near_den).clamp_min(0)
    return num / den.clamp_min(eps).unsqueeze(-1)


Region = tuple[Tensor, Tensor, Tensor, Tensor]


def _exact_terms(
    scores: Tensor,
    near_kernel: Tensor,
    keep: Tensor,
    weights: Tensor | None,
    far_weights: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The exact region's unnormalised softmax weights and the kernel's terms there, (…, K) both:
    keys outside the region, or of weight 0, get neither."""
    if weights is not None:
        keep = keep & (weights > 0)
    if far_weights is not None:
        near_kernel = near_kernel * far_weights
    scores = scores.masked_fill(~keep, float("-inf"))
    near_kernel = near_kernel * keep.to(near_kernel.dtype)
    # c_i: the largest allowed score of the exact region (not counting w_j, so that both parts
    # scale alike with the weights and a constant added to an additive mask changes nothing).
    # It is a stabiliser: no gradient flows through the choice of it.
    top = finite_or_zero(scores.amax(dim=-1, keepdim=True).detach())
    exact = torch.exp(scores - top)
    if weights is not None:
        exact = exact * weights
    return exact, near_kernel


def _band_region(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    key_weights: Tensor | None,
    far_weights: Tensor | None,
    *,
    window: int,
    global_tokens: int,
    causal: bool,
) -> Region:
    """The exact region of self-attention in the band layout: for query block c (b = ``window``
    queries), key blocks c − 1, c, c + 1 (causal: c − 1, c) as shifted slices, the global keys in
    front. Returns (numerator, denominator) of the exact part and of the kernel's terms inside
    the region, (B, H, N, dv) and (B, H, N)."""
    batch, heads, length = query.shape[:3]
    kv_heads = key.shape[1]
    group, block = heads // kv_heads, window
    before, after = 1, 0 if causal else 1
    # At least 2 blocks, as a product the export solver can divide (see band_attention).
    count = torch.sym_max(ceil_div(length, block), 2)
    padded = count * block

    def queries(x: Tensor) -> Tensor:  # (B, H, N, e) -> (blocks, B, Hkv, G·b, e)
        x = F.pad(x, (0, 0, 0, padded - length)).unflatten(1, (kv_heads, group))
        return chunk_first(x, block).flatten(3, 4)

    def keys(x: Tensor, fill: float = 0.0) -> Tensor:  # (B, H', N, e) -> (blocks, B, H', K, e)
        windows = band_windows(x, block, count, before, after, fill)
        if not global_tokens:
            return windows
        # An index_select, not a slice: slicing a symbolic length adds guards on it (a length of
        # at most global_tokens would be the whole tensor). Indices past the end are masked.
        index = torch.arange(global_tokens, device=x.device).clamp_max(x.shape[2] - 1)
        first = x.index_select(2, index)
        first = first.expand(count, *first.shape)
        return torch.cat([first, windows], dim=-2)

    def per_key(w: Tensor | None) -> Tensor | None:
        # (B|1, 1|Hkv|H, N) -> (blocks, B|1, 1|Hkv, 1|G, 1, K)
        if w is None:
            return None
        w = keys(w.to(query.dtype).unsqueeze(-1)).squeeze(-1)
        if w.shape[2] == heads and heads != kv_heads:
            return w.unflatten(2, (kv_heads, group)).unsqueeze(-2)
        return w[:, :, :, None, None, :]

    def rows(x: Tensor) -> Tensor:  # (blocks, B, Hkv, G·b, e) -> (B, H, N, e)
        flat = x.flatten(0, 2)
        return unchunk_queries(length, padded, batch, kv_heads, group, block)(flat).flatten(1, 2)

    q, fq = queries(query), queries(phi_q)
    k, v, fk = keys(key), keys(value), keys(phi_k)
    split = (group, block)
    scores = torch.matmul(q, k.transpose(-1, -2)).unflatten(3, split)  # (blocks, B, Hkv, G, b, K)
    near_kernel = torch.matmul(fq, fk.transpose(-1, -2)).unflatten(3, split)

    # Which (query, key slot) pairs are exact: the band's slots inside [0, N) (a slot's key
    # position depends on the block only), causal j <= i, and the global keys not already in
    # the band (counted there).
    device = query.device
    width = (before + 1 + after) * block
    start = (torch.arange(count, device=device) * block)[:, None, None]  # (blocks, 1, 1)
    i = start + torch.arange(block, device=device)[None, :, None]  # (blocks, b, 1)
    j = start + (torch.arange(width, device=device) - before * block)[None, None, :]
    keep = (j >= 0) & (j < length)
    if global_tokens:
        g = torch.arange(global_tokens, device=device)[None, None, :]
        in_band = (g >= start - before * block) & (g < start + (after + 1) * block)
        j = torch.cat([g.expand(count, 1, global_tokens), j], dim=-1)
        keep = torch.cat([(g < length) & ~in_band, keep], dim=-1)
    if causal:
        keep = keep & (j <= i)
    keep = keep[:, None, None, None]  # (blocks, 1, 1, 1, b|1, K)
    exact, near_kernel = _exact_terms(
        scores, near_kernel, keep, per_key(key_weights), per_key(far_weights)
    )
    flat = (exact.flatten(3, 4), near_kernel.flatten(3, 4))
    return (
        rows(torch.matmul(flat[0], v)),
        rows(flat[0].sum(dim=-1, keepdim=True)).squeeze(-1),
        rows(torch.matmul(flat[1], v)),
        rows(flat[1].sum(dim=-1, keepdim=True)).squeeze(-1),
    )


def _gathered_region(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    key_weights: Tensor | None,
    far_weights: Tensor | None,
    *,
    window: int,
    global_tokens: int,
    causal: bool,
) -> Region:
    """:func:`_band_region` for any query and key lengths (cross-attention too), by gathering
    the (query block, key positions) pairs of the region."""
    acc = query.dtype
    heads, q_len = query.shape[1], query.shape[2]
    kv_heads, k_len = key.shape[1], key.shape[2]
    device = query.device

    # The exact region, gathered per query block: (G, b) queries against (G, K) key positions.
    q_pos = block_queries(q_len, window, device)
    band = band_segment(padded_count(q_len, window), window, 1, 0 if causal else 1, device)
    k_pos = band.positions
    i, j = q_pos[:, :, None], k_pos[:, None, :]
    keep = (i < q_len) & (j >= 0) & (j < k_len)
    if global_tokens:
        first = torch.arange(global_tokens, device=device).expand(q_pos.shape[0], global_tokens)
        g = first[:, None, :]
        # A global key already inside the band is counted there only.
        keep = torch.cat([(i < q_len) & (g < k_len) & ~band.covers(i, g), keep], dim=-1)
        k_pos = torch.cat([first, k_pos], dim=-1)
        j = k_pos[:, None, :]
    if causal:
        keep = keep & (j <= i)
    gather = block_gather(q_pos, k_pos, q_len, k_len, heads, kv_heads)
    q, fq = gather.queries(query), gather.queries(phi_q)  # (B, H, G, b, ·)
    k, v, fk = gather.keys(key), gather.keys(value), gather.keys(phi_k)

    def gathered(weights: Tensor | None) -> Tensor | None:
        # (B|1, H|1, G, 1, K): the weights of the gathered keys.
        if weights is None:
            return None
        return match_heads(weights.to(acc), heads)[:, :, gather.key_index].unsqueeze(-2)

    scores = torch.matmul(q, k.transpose(-1, -2))  # (B, H, G, b, K)
    near_kernel = torch.matmul(fq, fk.transpose(-1, -2))
    exact, near_kernel = _exact_terms(
        scores, near_kernel, keep, gathered(key_weights), gathered(far_weights)
    )

    def to_rows(x: Tensor) -> Tensor:
        # The first Nq of the G·b block rows (a gather: ``narrow`` would make export guard
        # Nq <= G·b, which its solver cannot prove for a symbolic length).
        return x.flatten(2, 3).index_select(2, torch.arange(q_len, device=device))

    return (
        to_rows(torch.matmul(exact, v)),
        to_rows(exact.sum(dim=-1)),
        to_rows(torch.matmul(near_kernel, v)),
        to_rows(near_kernel.sum(dim=-1)),
    )
