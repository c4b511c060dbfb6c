"""The shared core of content-based sparse attention: exact softmax inside sorted chunks.

Reformer (LSH buckets), the Routing Transformer (nearest centroid) and Sinkhorn attention (a learned
block sort) differ only in how they choose which keys a query sees. All three reduce to:

1. per *round* r, a permutation of the query positions and one of the key positions (sorted by
   bucket; the identity for Sinkhorn's blocks), split into C equal chunks of ``query_chunk`` queries
   and chunks of ``key_chunk`` keys;
2. per round and query chunk t, a few *partner* key chunks (t and its predecessor t - 1 mod C for
   Reformer and routing; t and its sorted partner for Sinkhorn), each optionally with an additive
   bias on its scores;
3. exact softmax of every query over the keys of its partner chunks, causal and key masks applied
   to those pairs from the gathered original positions; a pair gathered in several rounds counts
   once (its score gets -log(number of rounds that gather it), Kitaev et al.'s correction), so the
   rounds merged by log-sum-exp give softmax over the *union* of the rounds' pairs;
4. optionally (``separate_diagonal``, causal content-based chunks) the pair (i, i) on its own, so
   that a query whose chunks hold only future keys still attends to itself.

Every tensor is O(R·N·P·chunk) (the gathered scores); nothing is N x N. Lengths need not be chunk
multiples: the tail of the last chunk is padding that no pair reads. Gathers use explicit index
tensors (no reshape of symbolic sizes), so the code exports at a dynamic sequence length.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.variants.base import compute_dtype, repeat_kv
from attnrewrite.variants.blockwise import ceil_div, finite_or_zero


def sort_by_bucket(buckets: Tensor) -> Tensor:
    """Positions sorted by (bucket, position): (..., N) int buckets -> (..., N) permutation.

    The position breaks ties, so the order is deterministic whatever sort the backend uses.
    """
    length = buckets.shape[-1]
    positions = torch.arange(length, device=buckets.device)
    return torch.argsort(buckets.to(torch.int64) * length + positions, dim=-1)


def chunk_sizes(q_len: int, k_len: int, chunk: int) -> tuple[int, int]:
    """(C, key chunk) for C = ⌈Nq / chunk⌉ query chunks and as many key chunks of ⌈Nk / C⌉.

    For self-attention the key chunks have the queries' size (up to the ragged tail); for
    cross-attention the sorted keys are cut into as many chunks as the sorted queries, so chunk t
    of either side covers the same share of the bucket order.
    """
    count = ceil_div(q_len, chunk)
    return count, ceil_div(k_len, count)


def neighbour_partners(count: int, rounds: int, device: torch.device) -> Tensor:
    """(1, 1, R, C, 2) partners of chunk t: t itself and its predecessor t - 1 (mod C)."""
    own = torch.arange(count, device=device)
    # [C-1, 0, 1, ...]: a roll, since ``remainder`` by a symbolic size does not export to ONNX.
    previous = torch.roll(own, 1)
    return torch.stack([own, previous], dim=-1).expand(1, 1, rounds, count, 2)


def bucketed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    query_order: Tensor,
    key_order: Tensor,
    partners: Tensor,
    *,
    query_chunk: int,
    key_chunk: int,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float = 1.0,
    partner_bias: Tensor | None = None,
    separate_diagonal: bool = False,
) -> Tensor:
    """Exact softmax over the union of the rounds' chunk pairs (see the module docstring).

    Args:
        query: (B, H, Nq, d); key: (B, Hkv, Nk, d); value: (B, Hkv, Nk, dv), H % Hkv == 0.
        query_order: (B, H, R, Nq) permutation of the query positions per round.
        key_order: (B, H, R, Nk) permutation of the key positions per round (per query head).
        partners: (B|1, H|1, R, C, P) key-chunk index of each query chunk's partner slots, with
            C = ⌈Nq / query_chunk⌉; an index outside [0, ⌈Nk / key_chunk⌉) leaves the slot empty,
            and a slot repeating an earlier slot of its chunk is dropped.
        query_chunk, key_chunk: chunk lengths of the sorted queries and keys.
        mask: None, or a key-only mask (B|1, H|1, 1, Nk): boolean (True = attend) or additive.
        causal: keep only pairs with j <= i (original positions).
        scale: factor on q·k.
        partner_bias: (B|1, H|1, R, C, P) additive bias on the scores of each partner slot, or
            None. With several rounds it applies to the pair as gathered in that round.
        separate_diagonal: with ``causal``, the pair (i, i) is taken out of the chunks and always
            attended (if key i exists and is not masked).

    Returns:
        (B, H, Nq, dv) in the dtype of ``query``; rows with no allowed pair are 0.
    """
    out_dtype, acc = query.dtype, compute_dtype(query.dtype)
    batch, heads, q_len = query.shape[:3]
    k_len = key.shape[2]
    device = query.device
    query = query.to(acc)
    key, value = repeat_kv(key.to(acc), heads), repeat_kv(value.to(acc), heads)
    rounds = query_order.shape[2]
    count, slots = partners.shape[-2], partners.shape[-1]
    partners = partners.expand(batch, heads, rounds, count, slots)
    key_count = ceil_div(k_len, key_chunk)

    b_index = torch.arange(batch, device=device).view(batch, 1, 1, 1, 1)
    h_index = torch.arange(heads, device=device).view(1, heads, 1, 1, 1)
    r_index = torch.arange(rounds, device=device).view(1, 1, rounds, 1, 1)

    # Queries: sorted rank t·cq + u for chunk t, slot u; the tail past Nq is padding.
    q_rank = torch.arange(count, device=device)[:, None] * query_chunk + torch.arange(
        query_chunk, device=device
    )
    q_valid = q_rank < q_len
    q_pos = query_order[..., torch.where(q_valid, q_rank, torch.zeros_like(q_rank))]

    # Keys: the partner chunks' sorted ranks, (B, H, R, C, P·ck).
    in_range = (partners >= 0) & (partners < key_count)
    slot_valid = torch.stack(
        [in_range[..., 0]]
        + [
            in_range[..., slot]
            & ~(partners[..., :slot] == partners[..., slot : slot + 1]).any(dim=-1)
            for slot in range(1, slots)
        ],
        dim=-1,
    )
    k_rank = partners.unsqueeze(-1) * key_chunk + torch.arange(key_chunk, device=device)
    k_valid = (slot_valid.unsqueeze(-1) & (k_rank >= 0) & (k_rank < k_len)).flatten(-2)
    k_rank = torch.where(k_valid, k_rank.flatten(-2), torch.zeros_like(k_valid, dtype=torch.long))
    k_pos = key_order[b_index, h_index, r_index, k_rank]

    q = query[b_index, h_index, q_pos]  # (B, H, R, C, cq, d)
    k, v = key[b_index, h_index, k_pos], value[b_index, h_index, k_pos]  # (B, H, R, C, P·ck, ·)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, R, C, cq, P·ck)
    i, j = q_pos.unsqueeze(-1), k_pos.unsqueeze(-2)
    keep = q_valid[:, :, None] & k_valid.unsqueeze(-2)
    if causal:
        keep = keep & (j <= i)
        if separate_diagonal:
            keep = keep & (j != i)
    key_bias = None
    if mask is not None:
        key_bias = mask.squeeze(-2).expand(batch, heads, k_len)
        gathered = key_bias[b_index, h_index, k_pos].unsqueeze(-2)
        if gathered.dtype == torch.bool:
            keep = keep & gathered
        else:
            scores = scores + gathered.to(acc)
    if partner_bias is not None:
        slot_bias = partner_bias.expand(batch, heads, rounds, count, slots).to(acc)
        scores = (
            scores
            + slot_bias.unsqueeze(-1).expand(*slot_bias.shape, key_chunk).flatten(-2)[..., None, :]
        )
    if rounds > 1:
        scores = scores - torch.log(
            _rounds_gathering(
                query_order, key_order, partners, q_pos, k_pos, query_chunk, key_chunk
            ).to(acc)
        )
    scores = scores.masked_fill(~keep, float("-inf"))

    # Per round: softmax statistics per sorted query slot, back in query order via the ranks.
    row_max = scores.amax(dim=-1).detach()
    weights = torch.exp(scores - finite_or_zero(row_max).unsqueeze(-1))
    q_ranks = torch.argsort(query_order, dim=-1)  # (B, H, R, Nq): slot of query i in round r
    stats = [row_max.flatten(-2), weights.sum(dim=-1).flatten(-2)]
    stats = [torch.gather(stat, -1, q_ranks) for stat in stats]
    weighted = torch.matmul(weights, v).flatten(-3, -2)  # (B, H, R, C·cq, dv)
    weighted = torch.gather(
        weighted, -2, q_ranks.unsqueeze(-1).expand(*q_ranks.shape, weighted.shape[-1])
    )
    maxima, totals, values = (
        list(stats[0].unbind(2)),
        list(stats[1].unbind(2)),
        list(weighted.unbind(2)),
    )

    if causal and separate_diagonal:
        diagonal = _diagonal_stats(query, key, value, key_bias, scale)
        for stat, parts in zip(diagonal, (maxima, totals, values), strict=True):
            parts.append(stat)

    top = finite_or_zero(torch.stack(maxima).amax(dim=0))
    total = torch.zeros_like(top)
    out = torch.zeros_like(values[0])
    for row_max_r, total_r, values_r in zip(maxima, totals, values, strict=True):
        factor = torch.exp(row_max_r - top)
        total = total + total_r * factor
        out = out + values_r * factor.unsqueeze(-1)
    out = out / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out.to(out_dtype)


def _rounds_gathering(
    query_order: Tensor,
    key_order: Tensor,
    partners: Tensor,
    q_pos: Tensor,
    k_pos: Tensor,
    query_chunk: int,
    key_chunk: int,
) -> Tensor:
    """For every gathered pair, in how many rounds its key's chunk is a partner of its query's."""
    rounds = query_order.shape[2]
    q_chunk_of = torch.div(torch.argsort(query_order, dim=-1), query_chunk, rounding_mode="floor")
    k_chunk_of = torch.div(torch.argsort(key_order, dim=-1), key_chunk, rounding_mode="floor")
    batch, heads = q_pos.shape[:2]
    b_index = torch.arange(batch, device=q_pos.device).view(batch, 1, 1, 1, 1)
    h_index = torch.arange(heads, device=q_pos.device).view(1, heads, 1, 1, 1)
    total = torch.zeros(
        k_pos.shape[:-1] + (q_pos.shape[-1], k_pos.shape[-1]),
        dtype=torch.int64,
        device=q_pos.device,
    )
    for other in range(rounds):
        q_chunk = q_chunk_of[:, :, other][b_index, h_index, q_pos]  # (B, H, R, C, cq)
        k_chunk = k_chunk_of[:, :, other][b_index, h_index, k_pos]  # (B, H, R, C, P·ck)
        slot_chunks = partners[:, :, other][b_index, h_index, q_chunk]  # (B, H, R, C, cq, P)
        member = (slot_chunks.unsqueeze(-2) == k_chunk[..., None, :, None]).any(dim=-1)
        total = total + member.to(torch.int64)
    return total.clamp_min(1)


def _diagonal_stats(
    query: Tensor, key: Tensor, value: Tensor, key_bias: Tensor | None, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics of the single pair (i, i) per query: max, sum (B, H, Nq), values."""
    q_len, k_len = query.shape[2], key.shape[2]
    positions = torch.arange(q_len, device=query.device)
    exists = positions < k_len
    index = torch.where(exists, positions, torch.zeros_like(positions))
    key_i, value_i = key[:, :, index], value[:, :, index]
    score = (query * key_i).sum(dim=-1) * scale
    keep = exists.expand_as(score)
    if key_bias is not None:
        bias = key_bias[:, :, index]
        if bias.dtype == torch.bool:
            keep = keep & bias
        else:
            score = score + bias.to(score.dtype)
    score = score.masked_fill(~keep, float("-inf"))
    top = score.detach()
    weight = torch.exp(score - finite_or_zero(top))  # 1 where attended (with its gradient), else 0
    return top, weight, value_i * weight.unsqueeze(-1)
