"""The shared core of pattern (sparse) attention: exact softmax over a set of keys per query.

A pattern variant computes, for every query i, exact softmax attention restricted to the keys j for
which a predicate P(i, j) holds (positions counted from 0; causal adds j <= i). It never builds an
Nq x Nk matrix. Instead the pattern is described by *query groups*:

- a group lays the queries out as (G, bq) positions (query blocks, strided columns, all queries, a
  prefix of global rows) and gathers, per group row, key positions from one or more *segments*
  (neighbour blocks, a fixed set of global/summary keys, random blocks);
- scores are computed on the gathered (B, H, G, bq, K) tensor only, and the exact predicate is
  evaluated from the position indices of those pairs, so memory is O(G·bq·K), e.g. O(N·w) for a
  window and O(N·√N) for strided patterns;
- segments may gather the same pair twice (a global key inside a window); every segment
  therefore states which pairs it ``covers`` and drops pairs an earlier segment covers, so each
  allowed pair is counted exactly once;
- each group yields the softmax statistics of its pairs (row maximum, normaliser, weighted values),
  scattered back to query rows and merged across groups as in blockwise/flash attention: the result
  equals softmax over the union of all allowed pairs.

The key-only mask, the causal condition and a ``general`` additive/boolean bias are gathered at the
same positions, so a general bias only matters where the pattern computes scores. Rows with no
allowed key give 0 (not NaN). All lengths are used as (possibly symbolic) sizes and padding is
arithmetic, so the code exports with ``torch.export`` at a dynamic sequence length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnrewrite.variants.base import additive_mask, compute_dtype
from attnrewrite.variants.kernel_core import chunk_first, unchunk_queries

#: (query positions, key positions) -> bool, broadcasting; both int64 tensors.
PairPredicate = Callable[[Tensor, Tensor], Tensor]


@dataclasses.dataclass(frozen=True)
class KeySegment:
    """Key positions gathered for every row of a query group.

    Attributes:
        positions: (G, K) int64 key positions per group row; positions outside [0, Nk) are padding.
        covers: which (i, j) pairs this segment gathers; later segments drop these pairs.
        slot_keep: optional (G, K) bool; False drops a slot (e.g. a duplicate random block).
    """

    positions: Tensor
    covers: PairPredicate
    slot_keep: Tensor | None = None


@dataclasses.dataclass(frozen=True)
class QueryGroup:
    """Queries laid out as (G, bq) positions, with the key segments each row gathers.

    Attributes:
        positions: (G, bq) int64 query positions; positions >= Nq are padding and are discarded.
        segments: the key segments, concatenated along the key axis.
        in_order: the positions are 0, 1, 2, ... in row-major order (consecutive blocks), so the
            results are query rows after a reshape, without a scatter.
    """

    positions: Tensor
    segments: tuple[KeySegment, ...]
    in_order: bool = False


# -- building blocks of patterns -----------------------------------------------------------------


def ceil_div(size: int, divisor: int) -> int:
    """⌈size / divisor⌉ for ints and symbolic sizes alike (no ``int()``, no branching)."""
    return (size + divisor - 1) // divisor


def padded_count(size: int, divisor: int) -> int:
    """⌈size / divisor⌉ + 1: the number of blocks of a padded layout, always at least 2.

    The extra (all-padding) block costs one block of work and keeps ``torch.export`` general: with a
    count that may be 1, reshapes and contiguity checks add guards "count != 1" that would exclude
    sequences of one block from the exported program.
    """
    return ceil_div(size, divisor) + 1


def block_queries(q_len: int, block: int, device: torch.device) -> Tensor:
    """(⌈Nq/b⌉ + 1, b) query positions in consecutive blocks of ``block``; the tail is padding."""
    starts = torch.arange(padded_count(q_len, block), device=device)[:, None] * block
    return starts + torch.arange(block, device=device)[None, :]


def band_segment(num_blocks: int, block: int, before: int, after: int, device) -> KeySegment:
    """Key blocks c - before .. c + after for query block c (a sliding window in blocks)."""
    offsets = torch.arange(-before * block, (after + 1) * block, device=device)
    starts = torch.arange(num_blocks, device=device) * block
    positions = starts[:, None] + offsets[None, :]

    def covers(i: Tensor, j: Tensor) -> Tensor:
        distance = torch.div(j, block, rounding_mode="floor") - torch.div(
            i, block, rounding_mode="floor"
        )
        return (distance >= -before) & (distance <= after)

    return KeySegment(positions, covers)


def prefix_segment(num_rows: int, count: int, device) -> KeySegment:
    """Keys 0 .. count-1 for every group row (global tokens)."""
    positions = torch.arange(count, device=device).expand(num_rows, count)
    return KeySegment(positions, lambda i, j: j < count)


@dataclasses.dataclass(frozen=True)
class BlockGather:
    """Indices that gather query blocks and the key positions each block reads.

    Built by :func:`block_gather`. Gathers by these 2-d indices give (B, H, G, bq|K, ·) directly,
    query head h reading key/value head h // (H / Hkv): neither a reshape of a symbolic size nor a
    repeat of grouped heads is involved, since both make ``torch.export`` add guards its solver
    cannot prove (e.g. "G != 1").

    Attributes:
        query_index: (G, bq) query rows; padding positions read row 0 (any valid row).
        key_index: (G, K) key rows; padding positions read row 0.
        kv_head: (H, 1, 1) the key/value head each query head reads.
    """

    query_index: Tensor
    key_index: Tensor
    kv_head: Tensor

    def queries(self, x: Tensor) -> Tensor:
        """(B, H, Nq, ·) -> (B, H, G, bq, ·)."""
        return x[:, :, self.query_index]

    def keys(self, x: Tensor) -> Tensor:
        """(B, Hkv, Nk, ·) -> (B, H, G, K, ·), query head h reading head h // (H / Hkv)."""
        return x[:, self.kv_head, self.key_index]


def block_gather(
    query_positions: Tensor,
    key_positions: Tensor,
    q_len: int,
    k_len: int,
    heads: int,
    kv_heads: int,
) -> BlockGather:
    """The gather of (G, bq) query positions and (G, K) key positions from canonical tensors.

    Args:
        query_positions: (G, bq) int64; positions >= ``q_len`` are padding.
        key_positions: (G, K) int64; positions outside [0, ``k_len``) are padding.
        q_len: Nq (may be symbolic).
        k_len: Nk (may be symbolic).
        heads: H, the query heads.
        kv_heads: Hkv, the key/value heads (H % Hkv == 0).

    Returns:
        The indices, with padding clamped to row 0: the caller masks padded pairs itself (their
        scores are computed, then dropped).
    """
    query_index = torch.where(
        query_positions < q_len, query_positions, torch.zeros_like(query_positions)
    )
    inside = (key_positions >= 0) & (key_positions < k_len)
    key_index = torch.where(inside, key_positions, torch.zeros_like(key_positions))
    device = query_positions.device
    kv_head = (torch.arange(heads, device=device) // (heads // kv_heads))[:, None, None]
    return BlockGather(query_index, key_index, kv_head)


def is_key_only(mask: Tensor) -> bool:
    """A mask that depends on the key only: (…, 1, Nk), its query axis of static size 1."""
    return mask.dim() < 2 or (isinstance(mask.shape[-2], int) and mask.shape[-2] == 1)


def finite_or_zero(x: Tensor) -> Tensor:
    """``x`` with ±inf and NaN replaced by 0: a row maximum used as a stabiliser, where a row with
    no allowed key (maximum -inf) must subtract 0 rather than produce NaN."""
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def safe_softmax(scores: Tensor, dim: int = -1) -> Tensor:
    """Softmax that gives 0, not NaN, on slices whose every entry is -inf (no allowed key)."""
    top = scores.amax(dim=dim, keepdim=True).detach()
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    weights = torch.exp(scores - top)
    total = weights.sum(dim=dim, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))


def fused_attention(
    query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """softmax(q·kᵀ·scale + bias) v, as :func:`safe_softmax` gives it (a row whose bias is -inf
    at every key is 0), through one ``scaled_dot_product_attention``: its fused kernel never holds
    the (Nq, Nk) scores, and is what the exact softmax it replaces runs at.

    Args:
        query: (B, H, Nq, e); key: (B|1, H, Nk, e); value: (B|1, H, Nk, dv), all one dtype.
        bias: additive, broadcastable to (B, H, Nq, Nk), -inf for a pair left out; or None.
        scale: factor on q·k.
    """
    if bias is not None:
        bias = bias.to(query.dtype)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scale)
    if bias is None:
        return out
    # torch's kernels give 0 on a row with no allowed key; ONNX's Softmax (and older torch)
    # NaN. The row is zeroed here, so every backend computes the same.
    allowed = (bias > float("-inf")).any(dim=-1, keepdim=True)
    return torch.where(allowed, out, torch.zeros((), dtype=out.dtype, device=out.device))


# -- the core ------------------------------------------------------------------------------------


def pattern_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    groups: Sequence[QueryGroup],
    allowed: PairPredicate,
    *,
    mask: Tensor | None = None,
    scale: float = 1.0,
) -> Tensor:
    """Exact softmax attention over the pairs ``allowed`` selects among those the groups gather.

    Args:
        query: (B, H, Nq, d).
        key: (B, Hkv, Nk, d), H % Hkv == 0.
        value: (B, Hkv, Nk, dv).
        groups: the query groups and their key segments; together they must gather every pair
            ``allowed`` accepts. A segment drops the pairs covered by any segment before it (in
            group order, then segment order).
        allowed: the pattern predicate P(i, j), including the causal condition if any.
        mask: None, or a boolean (True = attend) / additive mask broadcastable to (B, H, Nq, Nk);
            it is read at the computed pairs only.
        scale: factor on q·k.

    Returns:
        (B, H, Nq, dv) in the dtype of ``query``; rows with no allowed key are 0.
    """
    out_dtype, acc = query.dtype, compute_dtype(query.dtype)
    q_len, k_len = query.shape[-2], key.shape[-2]
    if mask is not None:
        while mask.dim() < 4:
            mask = mask.unsqueeze(0)
        # A key-only mask (query axis of static size 1) stays as it is: the gathers read its one
        # row. Anything else is expanded as a view (exported to ONNX, an Expand materialises it).
        key_only = is_key_only(mask)
        mask = mask.expand(*mask.shape[:-2], 1 if key_only else q_len, k_len)
    query, key, value = query.to(acc), key.to(acc), value.to(acc)
    partials = []
    earlier: list[PairPredicate] = []
    for group in groups:
        partials.append(_group_partials(query, key, value, group, allowed, earlier, mask, scale))
        earlier.extend(segment.covers for segment in group.segments)

    if len(partials) == 1:
        _, total, weighted = partials[0]
    else:
        top = torch.stack([row_max for row_max, _, _ in partials]).amax(dim=0)
        top = finite_or_zero(top)
        total = torch.zeros_like(top)
        weighted = torch.zeros_like(partials[0][2])
        for row_max, row_total, row_weighted in partials:
            # Rescale each group's statistics to the common row maximum (the flash-attention merge).
            factor = torch.exp(row_max - top)
            total = total + row_total * factor
            weighted = weighted + row_weighted * factor.unsqueeze(-1)
    out = weighted / torch.where(total > 0, total, torch.ones_like(total)).unsqueeze(-1)
    return out.to(out_dtype)


def _segment_keep(
    i: Tensor,
    segment: KeySegment,
    allowed: PairPredicate,
    earlier: Sequence[PairPredicate],
    q_len: int,
    k_len: int,
) -> Tensor:
    """(G, bq, K) pairs of ``segment`` that are allowed, in range, and not counted before."""
    j = segment.positions[:, None, :]
    keep = allowed(i, j) & (i < q_len) & (j >= 0) & (j < k_len)
    if segment.slot_keep is not None:
        keep = keep & segment.slot_keep[:, None, :]
    for covers in earlier:
        keep = keep & ~covers(i, j)
    return keep


def _group_partials(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    group: QueryGroup,
    allowed: PairPredicate,
    earlier: Sequence[PairPredicate],
    mask: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Softmax statistics of one group as query rows: max and sum (B, H, Nq), values (B, H, Nq, dv).

    Rows the group does not reach, or where it allows no key, have max -inf and sum 0.
    """
    batch, heads, q_len = query.shape[:3]
    kv_heads, k_len = key.shape[1], key.shape[2]
    q_pos = group.positions
    i = q_pos[:, :, None]
    keeps, seen = [], list(earlier)
    for segment in group.segments:
        keeps.append(_segment_keep(i, segment, allowed, seen, q_len, k_len))
        seen.append(segment.covers)
    keep = torch.cat(keeps, dim=-1)
    k_pos = torch.cat([segment.positions for segment in group.segments], dim=-1)

    # Padding positions read row 0 (any valid row); ``keep`` already excludes them.
    gather = block_gather(q_pos, k_pos, q_len, k_len, heads, kv_heads)
    q = gather.queries(query)
    k, v = gather.keys(key), gather.keys(value)
    scores = torch.matmul(q * scale, k.transpose(-1, -2))  # (B, H, G, bq, K)
    if mask is not None:
        key_only = is_key_only(mask)
        q_index, k_index = gather.query_index, gather.key_index
        rows = torch.zeros_like(q_index) if key_only else q_index
        bias = mask[..., rows[:, :, None], k_index[:, None, :]]  # (B|1, H|1, G, bq, K)
        if bias.dtype == torch.bool:
            keep = keep & bias
        else:
            scores = scores + bias.to(scores.dtype)
    scores = scores.masked_fill(~keep, float("-inf"))

    # The maximum is a stabiliser only (the result does not depend on it): no gradient through it.
    row_max = scores.amax(dim=-1).detach()
    weights = torch.exp(scores - finite_or_zero(row_max).unsqueeze(-1))
    row_total = weights.sum(dim=-1)
    row_weighted = torch.matmul(weights, v)

    if group.in_order:
        # The first Nq rows, as a gather: ``narrow`` would make export guard on Nq <= G·bq, a
        # bound its solver cannot prove for symbolic lengths.
        rows_kept = torch.arange(q_len, device=q_pos.device)
        stats = (row_max, row_total, row_weighted)
        return tuple(stat.flatten(2, 3).index_select(2, rows_kept) for stat in stats)

    # Back to query rows: padding positions go to a dump row Nq, cut off afterwards.
    target = torch.where(q_pos < q_len, q_pos, torch.full_like(q_pos, q_len)).flatten()

    def to_rows(stat: Tensor, fill: float) -> Tensor:
        stat = stat.flatten(2, 3)  # (B, H, G * bq, ·)
        base = stat.new_full((batch, heads, q_len + 1, *stat.shape[3:]), fill)
        return base.index_copy(2, target, stat).narrow(2, 0, q_len)

    return to_rows(row_max, float("-inf")), to_rows(row_total, 0.0), to_rows(row_weighted, 0.0)


# -- the band fast path ----------------------------------------------------------------------------


def band_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    window: int,
    block: int,
    causal: bool,
    bias: Tensor | None = None,
    scale: float = 1.0,
    inside: Tensor | None = None,
    columns: ColumnRule | None = None,
    global_rows: int = 0,
    groups: tuple[Sequence[QueryGroup], PairPredicate] | None = None,
) -> Tensor:
    """Exact softmax self-attention over a sliding window |i − j| <= w (causal: 0 <= i − j <= w),
    optionally with key columns each query block reads besides its window, query groups of the
    general core (:func:`pattern_attention`) and global query rows.

    The same result as :func:`pattern_attention` with a band segment, computed as dense batched
    products without gathers: the keys are padded by R = ⌈w / b⌉ blocks on each side and, for
    every block of b queries, its 2R + 1 neighbouring key blocks (R + 1 causal) are laid side by
    side by concatenating shifted slices (one copy of K and V per block of the window); scores,
    the window predicate and the softmax then live in (B, Hkv, blocks, G·b, (2R + 1)·b). The
    predicate depends only on the offsets inside a block (a constant (b, (2R + 1)·b) table), and
    key positions outside [0, Nk) get the padded bias -inf, so no index arithmetic runs per pair.

    Args:
        query: (B, H, N, d).
        key: (B, Hkv, N, d), H % Hkv == 0: as many keys as queries (self-attention; a cross
            site takes the general core).
        value: (B, Hkv, N, dv).
        window: w >= 0.
        block: b >= 1, the query block (and key block) size.
        causal: keep only j <= i as well.
        bias: additive key bias (B|1, 1|H, Nk) (a key-only mask, 0 / -inf for booleans), or None.
        scale: factor on q·k.
        inside: :func:`band_bias` of the same arguments, if the caller keeps one (a table
            built in the graph is recomputed inside the fused softmax kernel, at a cost).
        columns: the extra keys of each query block (global tokens, random blocks), gathered
            once per block and scored apart from the window, one softmax over both: see
            :class:`BlockColumns`. Their ``keep`` must leave out the pairs the window keeps.
        global_rows: queries 0 .. g − 1 attend every key (j <= i when causal), computed on their
            own in O(g·N) and written over the band's result for those rows.
        groups: (query groups, pattern predicate) of further pairs outside the window (the
            Sparse Transformer's strided columns), computed as the general core computes them and
            merged through their softmax statistics; the window's pairs are left out of them.

    Returns:
        (B, H, Nq, dv) in the dtype of ``query``; rows with no allowed key are 0.
    """
    out_dtype, acc = query.dtype, compute_dtype(query.dtype)
    batch, heads, q_len = query.shape[:3]
    kv_heads, k_len = key.shape[1], key.shape[2]
    group = heads // kv_heads
    reach = ceil_div(window, block) if window else 0
    before, after = reach, 0 if causal else reach
    # Query blocks, at least 2; sym_max keeps "padded = blocks · b" a product torch.export's
    # solver can divide (⌈N/b⌉ + 1 would expand to b·⌈N/b⌉ + b, which it cannot).
    count = torch.sym_max(ceil_div(q_len, block), 2)
    padded = count * block
    extra = columns(count) if columns is not None else None
    plain = bias is None and extra is None and groups is None and not global_rows
    if plain and isinstance(count, int):
        # the plain window at a static length (eager, torch.compile), the common case
        inside, outside = _band_masks(
            inside, window, block, causal, count, before, k_len, acc, query
        )
        return _plain_band(
            query, key, value, block, (before, after), count, scale, inside + outside
        )
    # Block axis first, everything a batch of (blocks·B·Hkv) block problems multiplied with bmm:
    # as in kernel_core's chunked form, shapes only split an axis leaving the symbolic part to
    # -1 or merge axes that start with the symbolic one, so torch.export keeps lengths dynamic.
    # The scale goes on the queries (N·d values), not on the scores (N·W).
    q = F.pad(query.to(acc) * scale, (0, 0, 0, padded - q_len)).unflatten(1, (kv_heads, group))
    q = chunk_first(q, block).flatten(3, 4).flatten(0, 2)  # (blocks·B·Hkv, G·b, d)

    def windows(x: Tensor, fill: float) -> Tensor:
        return band_windows(x, block, count, before, after, fill)

    k = windows(key.to(acc), 0.0).flatten(0, 2)  # (blocks·B·Hkv, W, d)
    v = windows(value.to(acc), 0.0).flatten(0, 2)
    scores = torch.bmm(q, k.transpose(1, 2))
    scores = scores.unflatten(0, (-1, batch, kv_heads)).unflatten(3, (group, block))
    # (blocks, B, Hkv, G, b, W): the window predicate on offsets inside a block, and the padding
    inside, outside = _band_masks(inside, window, block, causal, count, before, k_len, acc, query)
    scores = scores + (inside + outside)[:, None, None, None]

    if bias is not None:
        bias = bias.to(acc)
        band_bias = windows(bias.unsqueeze(-1), float("-inf")).squeeze(-1)
        scores = scores + _per_query_head(band_bias, kv_heads)
    if extra is None and bias is None and groups is None:
        # every query sees at least itself: the plain softmax
        weights = torch.softmax(scores, dim=-1)
        out, total = torch.bmm(weights.flatten(3, 4).flatten(0, 2), v), None
    else:
        parts: list[tuple[Tensor, Callable[[Tensor], Tensor]]] = [
            (scores, lambda weights: _block_product(weights, v))
        ]
        if extra is not None:
            column_scores, column_values = _column_scores(
                extra, q, key, value, bias, batch, block, acc
            )
            parts.append((column_scores, lambda weights: _block_product(weights, column_values)))
        # One softmax over every part's scores (kept apart, no concatenation).
        raw_top = torch.stack([s.amax(dim=-1, keepdim=True) for s, _ in parts]).amax(dim=0)
        top = finite_or_zero(raw_top.detach())
        out, total = 0.0, 0.0
        for part_scores, product in parts:
            weights = torch.exp(part_scores - top)
            total = total + weights.sum(dim=-1, keepdim=True).flatten(3, 4).flatten(0, 2)
            out = out + product(weights)
    unchunk = unchunk_queries(q_len, padded, batch, kv_heads, group, block)

    def rows(x: Tensor) -> Tensor:  # (blocks·B·Hkv, G·b, e) -> (B, H, Nq, e)
        return unchunk(x).flatten(1, 2)

    out, total = rows(out), None if total is None else rows(total)
    if groups is not None:
        # Merged in sequence order as flash attention merges blocks, at the common row maximum.
        flat = [rows(x.flatten(3, 4).flatten(0, 2)) for x in (raw_top.detach(), top)]
        stats: RowStats = (*flat, total, out)
        mask = None if bias is None else bias.unsqueeze(-2)  # a key-only additive mask
        pattern_groups, allowed = groups
        earlier = [lambda i, j: (i - j).abs() <= window]  # the band's pairs
        query, key, value = query.to(acc), key.to(acc), value.to(acc)
        for query_group in pattern_groups:
            row_max, row_total, row_weighted = _group_partials(
                query, key, value, query_group, allowed, earlier, mask, scale
            )
            earlier = [*earlier, *(segment.covers for segment in query_group.segments)]
            part = (row_max[..., None], finite_or_zero(row_max)[..., None], row_total[..., None])
            stats = _merge_stats(stats, (*part, row_weighted))
        out, total = stats[3], stats[2]
    if total is not None:
        # A row with no allowed key (every key masked) gives 0, as sdpa's safe softmax does.
        out = out / torch.where(total > 0, total, torch.ones_like(total))
    if global_rows:
        out = _with_global_rows(out, query, key, value, global_rows, causal, bias, scale)
    return out.to(out_dtype)  # (B, H, Nq, dv)


def _band_masks(
    inside: Tensor | None,
    window: int,
    block: int,
    causal: bool,
    count: int,
    before: int,
    k_len: int,
    dtype: torch.dtype,
    like: Tensor,
) -> tuple[Tensor, Tensor]:
    """The band's two additive masks (0 / -inf): the window predicate on offsets inside a block,
    (b, W), and the key slots outside [0, Nk) per query block, (blocks, 1, W), to be added.

    Additive, not boolean: Inductor's CPU code loads a boolean mask in the fused softmax kernel
    more slowly than it adds a float one (the whole window attention at 4K, one thread, compiled:
    99 ms with a boolean table, 70 ms with a float one).
    """
    if inside is None:
        inside = band_bias(window, block, causal, like.device)
    slots = torch.arange(inside.shape[-1], device=like.device) - before * block
    j = (torch.arange(count, device=like.device) * block)[:, None] + slots[None, :]
    outside = torch.zeros(j.shape, dtype=dtype, device=like.device)
    outside = outside.masked_fill(~((j >= 0) & (j < k_len)), float("-inf"))
    return inside.to(dtype), outside[:, None, :]


def _plain_band(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    block: int,
    reach: tuple[int, int],
    count: int,
    scale: float,
    band_mask: Tensor,
) -> Tensor:
    """:func:`band_attention` without a mask, extra columns or global rows, at a static length:
    ``count`` query blocks of ``block``, each reading key blocks ``reach`` = (before, after) of its
    own, and ``band_mask`` (blocks, b, W) the additive mask of the pairs (:func:`_band_masks`).

    The blocks stay where they are in memory: (B, Hkv, P, ·) is viewed as a batch of
    (B·Hkv·blocks) block problems, so queries (without grouped heads) and outputs are not copied
    into the block-first layout that a symbolic length needs, and the window's keys are shifted
    slices of the padded keys. Every query reads itself, so the plain softmax is safe. ``local``
    at 4K (8 heads of 64, w = 64, one CPU thread), eager and compiled: 15–20% faster than through
    the block-first layout (``benchmarks/kernel_variants.py``, side by side).
    """
    out_dtype, acc = query.dtype, band_mask.dtype
    (batch, heads, q_len), (kv_heads, k_len) = query.shape[:3], key.shape[1:3]
    group, (before, after), padded = heads // kv_heads, reach, count * block
    # (B, Hkv, blocks, G·b, d): a view when G = 1
    q = F.pad(query.to(acc) * scale, (0, 0, 0, padded - q_len)).unflatten(1, (kv_heads, group))
    q = q.unflatten(3, (count, block)).transpose(2, 3).flatten(3, 4).flatten(0, 2)

    def windows(x: Tensor) -> Tensor:  # (B, Hkv, N, e) -> (B·Hkv·blocks, W, e)
        x = F.pad(x.to(acc), (0, 0, before * block, (count + after) * block - k_len))
        x = x.unflatten(2, (count + before + after, block))
        span = before + after + 1
        return torch.cat([x.narrow(2, r, count) for r in range(span)], dim=3).flatten(0, 2)

    scores = torch.bmm(q, windows(key).transpose(1, 2))
    scores = scores.unflatten(0, (batch * kv_heads, count)).unflatten(2, (group, block))
    # scores: (B·Hkv, blocks, G, b, W)
    weights = torch.softmax(scores + band_mask[:, None], dim=-1)
    out = torch.bmm(weights.flatten(2, 3).flatten(0, 1), windows(value))  # (B·Hkv·blocks, G·b, dv)
    out = out.unflatten(0, (batch, kv_heads, count)).unflatten(3, (group, block))
    out = out.transpose(2, 3).flatten(3, 4).flatten(1, 2)  # (B, H, P, dv)
    return out[:, :, :q_len].to(out_dtype)


@dataclasses.dataclass(frozen=True)
class BlockColumns:
    """Key positions every query of a block reads besides its window (for :func:`band_attention`).

    Attributes:
        positions: (blocks, E) int64 key positions per query block; positions outside [0, Nk)
            are padding (masked).
        keep: (blocks, b, E) bool, the pairs (query of the block, column) the pattern adds: it
            must leave out pairs the window already keeps, and repeated positions, so that every
            pair is counted once; the causal condition is the caller's to include.
    """

    positions: Tensor
    keep: Tensor

    def gather(self, x: Tensor) -> Tensor:
        """(B', H', N, e) -> (blocks, B', H', E, e): the columns' rows (padding reads row 0)."""
        index = self.positions.clamp(0, x.shape[2] - 1)
        taken = x.index_select(2, index.flatten()).unflatten(2, (-1, index.shape[1]))
        return taken.movedim(2, 0)


def _per_query_head(bias: Tensor, kv_heads: int) -> Tensor:
    """A key bias laid out per block, (blocks|1, B|1, 1|H, K) -> (…, 1|Hkv, 1|G, 1, K)."""
    if bias.shape[2] == 1:
        return bias[:, :, :, None, None, :]
    return bias.unflatten(2, (kv_heads, -1)).unsqueeze(-2)


def _block_product(weights: Tensor, values: Tensor) -> Tensor:
    """(blocks, B, Hkv, G, b, K) weights times (blocks, B, Hkv, K, dv) values (or their
    (blocks·B·Hkv, K, dv) view) as (blocks·B·Hkv, G·b, dv), by ``bmm``: ``matmul`` would compare
    the two sides' batch sizes, a guard torch.export cannot prove for symbolic lengths."""
    weights = weights.flatten(3, 4)
    return torch.bmm(weights.flatten(0, 2), values if values.dim() == 3 else values.flatten(0, 2))


def _column_scores(
    extra: BlockColumns,
    q: Tensor,
    key: Tensor,
    value: Tensor,
    bias: Tensor | None,
    batch: int,
    block: int,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """The scores of a block's extra columns, (blocks, B, Hkv, G, b, E), masked where the
    columns keep no pair, and their values (blocks, B, Hkv, E, dv); ``q`` are the chunked
    queries, already scaled."""
    kv_heads, k_len = key.shape[1], key.shape[2]
    keys, values = extra.gather(key.to(acc)), extra.gather(value.to(acc))
    scores = torch.bmm(q, keys.flatten(0, 2).transpose(1, 2))  # (blocks·B·Hkv, G·b, E)
    scores = scores.unflatten(0, (-1, batch, kv_heads))
    scores = scores.unflatten(3, (-1, block))
    in_range = (extra.positions >= 0) & (extra.positions < k_len)
    keep = (extra.keep & in_range[:, None, :])[:, None, None, None]
    scores = scores.masked_fill(~keep, float("-inf"))
    if bias is not None:
        column_bias = extra.gather(bias.unsqueeze(-1)).squeeze(-1)
        scores = scores + _per_query_head(column_bias, kv_heads)
    return scores, values


#: Query block count -> the block's extra key columns.
ColumnRule = Callable[[int], BlockColumns]


#: Softmax statistics of a part of each row's keys: raw row maximum (-inf where the part has
#: no key), the maximum the weights were taken against (finite), normaliser, weighted values.
RowStats = tuple[Tensor, Tensor, Tensor, Tensor]


def _merge_stats(first: RowStats, second: RowStats) -> RowStats:
    """Two parts' statistics merged at their common row maximum. A part with no key in a row
    has normaliser 0; its factor is kept <= 1 so that it stays 0."""
    raw = torch.maximum(first[0], second[0])
    common = finite_or_zero(raw)
    out, total = 0.0, 0.0
    for _, used, part_total, part_out in (first, second):
        factor = torch.exp((used - common).clamp_max(0.0))
        total, out = total + part_total * factor, out + part_out * factor
    return raw, common, total, out


def _with_global_rows(
    out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    count: int,
    causal: bool,
    bias: Tensor | None,
    scale: float,
) -> Tensor:
    """``out`` with rows 0 .. count − 1 replaced by attention over every key (causal: j <= i);
    O(count·N). With fewer than ``count`` queries, the indices are clamped to the last row (the
    duplicate rows are computed alike), so no branch depends on the length."""
    acc = out.dtype
    heads, q_len = query.shape[1], query.shape[2]
    kv_heads, k_len = key.shape[1], key.shape[2]
    rows = torch.arange(count, device=query.device).clamp_max(q_len - 1)
    q = query.to(acc).index_select(2, rows).unflatten(1, (kv_heads, heads // kv_heads))
    k, v = key.to(acc).unsqueeze(2), value.to(acc).unsqueeze(2)  # (B, Hkv, 1, N, ·)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hkv, G, count, N)
    if bias is not None:  # (B|1, 1|H, N)
        bias = bias.to(acc)
        if bias.shape[1] == 1:
            scores = scores + bias[:, :, None, None, :]
        else:
            scores = scores + bias.unflatten(1, (kv_heads, -1)).unsqueeze(-2)
    if causal:
        later = torch.arange(k_len, device=query.device)[None, :] > rows[:, None]
        scores = scores.masked_fill(later, float("-inf"))
    first = torch.matmul(safe_softmax(scores), v).flatten(1, 2)  # (B, H, count, dv)
    return out.index_copy(2, rows, first)


def band_windows(
    x: Tensor, block: int, count: int, before: int, after: int, fill: float = 0.0
) -> Tensor:
    """(B', H', N, e) -> (count, B', H', W, e) with W = (before + 1 + after)·b: for query block c,
    key blocks c − before .. c + after side by side (shifted slices of the chunked keys, one copy
    per block of the window); positions outside [0, N) read ``fill``. ``count``·b >= N is the
    padded length. The blocks outside are added on the block axis, not by padding the sequence:
    a length of (count + R)·b would be a sum torch.export's solver cannot divide by b."""
    x = chunk_first(F.pad(x, (0, 0, 0, count * block - x.shape[-2]), value=fill), block)
    edge = x.new_full((1, *x.shape[1:]), fill)
    x = torch.cat([edge.expand(before, *x.shape[1:]), x, edge.expand(after, *x.shape[1:])])
    return torch.cat([x.narrow(0, r, count) for r in range(before + after + 1)], dim=-2)


def band_bias(window: int, block: int, causal: bool, device=None) -> Tensor:
    """:func:`band_table` as an additive float32 mask: 0 where a pair is kept, -inf elsewhere."""
    return additive_mask(band_table(window, block, causal, device), torch.float32)


def band_table(window: int, block: int, causal: bool, device=None) -> Tensor:
    """The window predicate of :func:`band_attention` on offsets inside a block: (b, W) bool, True
    where query a of a block may read key slot s of its window (j − i = s − R·b − a)."""
    reach = ceil_div(window, block) if window else 0
    width = (2 * reach + 1 - (reach if causal else 0)) * block
    offset = torch.arange(width, device=device)[None, :] - reach * block
    offset = offset - torch.arange(block, device=device)[:, None]
    return (offset <= 0 if causal else offset <= window) & (offset >= -window)
