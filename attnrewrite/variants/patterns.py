"""Pattern (sparse) attention: exact softmax restricted to a fixed set of keys per query.

All five variants share the blockwise core in :mod:`attnrewrite.variants.blockwise`; each one only
states its pattern predicate P(i, j) and how to gather the keys it needs. Common to all of them:

- exact softmax over the allowed keys of each query (positions counted from 0; causal adds j <= i);
  a query with no allowed key (everything masked) gets 0 instead of NaN;
- every mask class is accepted: key-only masks, causal, and a ``general`` additive or boolean bias,
  which is read only at the pairs the pattern computes (elsewhere the pattern already gives weight
  0), so a rewritten relative-position bias or ALiBi keeps its meaning inside the pattern;
- cross-attention (Nq != Nk) with both positions counted from 0, grouped key/value heads;
- no N x N tensor is ever built, lengths need not be multiples of the block size, and the code
  exports with ``torch.export`` at a dynamic sequence length.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from attnrewrite.site import ALL_MASK_CLASSES, AttentionSite, MaskClass
from attnrewrite.variants.base import AttentionVariant, key_bias
from attnrewrite.variants.blockwise import (
    BlockColumns,
    KeySegment,
    PairPredicate,
    QueryGroup,
    band_attention,
    band_bias,
    band_segment,
    block_queries,
    ceil_div,
    is_key_only,
    padded_count,
    pattern_attention,
    prefix_segment,
)
from attnrewrite.variants.softmax import append_bias, one_row_attention

#: Smallest block used for windows narrower than this: tiny blocks waste time on per-block overhead.
MIN_BLOCK = 16
#: Stride/block of the Sparse Transformer patterns when neither the option nor the site's length
#: at capture gives one.
DEFAULT_STRIDE = 64


def _positive(name: str, value: int | None) -> str | None:
    if value is not None and value < 1:
        return f"{name} must be a positive integer, got {value}"
    return None


def _non_negative(name: str, value: int) -> str | None:
    return f"{name} must be >= 0, got {value}" if value < 0 else None


def _first_problem(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def _default_stride(site: AttentionSite) -> int:
    """≈ √N of the site's key length at capture (Child et al.'s choice), else ``DEFAULT_STRIDE``."""
    if isinstance(site.key_len, int) and site.key_len > 0:
        return max(1, round(math.sqrt(site.key_len)))
    return DEFAULT_STRIDE


class PatternAttention(AttentionVariant):
    """Base of the pattern variants: a subclass states its pattern (see ``pattern``)."""

    mask_classes: ClassVar[frozenset[MaskClass]] = ALL_MASK_CLASSES
    supports_causal: ClassVar[bool] = True
    supports_cross: ClassVar[bool] = True

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        """The query groups the core computes and the pattern predicate P(i, j) (causal excluded).

        The groups must gather every pair P accepts (together with j <= i when causal).
        """
        raise NotImplementedError(f"{type(self).__name__} must define its pattern")

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
        groups, allows = self.pattern(query.shape[-2], key.shape[-2], causal, query.device)
        allowed = _and_causal(allows) if causal else allows
        return pattern_attention(query, key, value, groups, allowed, mask=mask, scale=scale)


def _and_causal(allows: PairPredicate) -> PairPredicate:
    return lambda i, j: allows(i, j) & (j <= i)


def _window_blocks(window: int, block_size: int | None) -> tuple[int, int]:
    """Block size b and reach R (in blocks) of a window |i - j| <= w: R = ⌈w / b⌉."""
    block = block_size or max(window, MIN_BLOCK)
    return block, ceil_div(window, block)


def _global_rows_group(count: int, k_len: int, device: torch.device) -> QueryGroup:
    """Rows 0 .. count-1 against every key (global queries), O(count · Nk)."""
    keys = torch.arange(k_len, device=device)[None, :]
    everything = KeySegment(keys, lambda i, j: i < count)
    return QueryGroup(torch.arange(count, device=device)[None, :], (everything,))


class BandPatternAttention(PatternAttention):
    """A pattern made of a sliding window |i − j| <= w, key columns shared by each block of
    queries (global tokens, random blocks) and global query rows.

    Self-attention without a mask or with a key-only mask runs
    :func:`~attnrewrite.variants.blockwise.band_attention`: dense batched products over each query
    block, its neighbouring key blocks and its columns, no per-pair gathers. Cross-attention and
    pair biases run the general pattern core (``pattern``), which computes the same pairs.
    """

    def band_shape(self) -> tuple[int, int]:
        """(window w, block b) of the band path."""
        raise NotImplementedError(f"{type(self).__name__} must define its band")

    def global_rows(self) -> int:
        """How many leading queries attend every key."""
        return 0

    def query_groups(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate] | None:
        """Query groups of the general core for pairs outside the window (and their predicate,
        causal included), or None."""
        return None

    def block_columns(
        self, count: int, block: int, k_len: int, causal: bool, device: torch.device
    ) -> BlockColumns | None:
        """The keys each of ``count`` query blocks reads besides its window, or None."""
        return None

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        # The window predicate on offsets inside a block, kept as constants: built inside the
        # graph, Inductor would recompute it in the softmax kernel at every pair.
        for name, causal in (("band", False), ("band_causal", True)):
            self.register_buffer(name, self.band_predicate(causal), persistent=False)

    def band_predicate(self, causal: bool) -> Tensor:
        """Which (query of a block, key slot of its window) pairs the band keeps, as an additive
        mask (0 kept, -inf not): by default the window |i − j| <= w
        (:func:`~attnrewrite.variants.blockwise.band_bias`)."""
        return band_bias(*self.band_shape(), causal)

    def forward(self, query, key, value, *, mask=None, causal=False, scale=1.0):
        if self.site.is_cross or (mask is not None and not is_key_only(mask)):
            # cross-attention, or a bias per (query, key) pair read at the pattern's pairs: the
            # general core
            return super().forward(query, key, value, mask=mask, causal=causal, scale=scale)
        window, block = self.band_shape()
        # Self-attention: the keys are the query positions (the query length is the one the
        # band's block count is computed from, so export sees one symbol, not two to unify).
        k_len, device = query.shape[-2], query.device

        def columns(count: int) -> BlockColumns | None:
            return self.block_columns(count, block, k_len, causal, device)

        return band_attention(
            query, key, value, window=window, block=block, causal=causal,
            bias=None if mask is None else key_bias(mask, key), scale=scale,
            inside=self.band_causal if causal else self.band,
            columns=columns, global_rows=self.global_rows(),
            groups=self.query_groups(k_len, k_len, causal, device),
        )  # fmt: skip


def _column_pairs(
    positions: Tensor, block: int, window: int, causal: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """(i, j, pairs the window does not keep) of block columns ``positions`` (blocks, E): i is
    (blocks, b, 1), j (blocks, 1, E); causal pairs j > i are left out too."""
    starts = torch.arange(positions.shape[0], device=positions.device)[:, None, None] * block
    i = starts + torch.arange(block, device=positions.device)[None, :, None]
    j = positions[:, None, :]
    outside = (i - j).abs() > window
    return i, j, (outside & (j <= i)) if causal else outside


def _global_columns(count: int, tokens: int, block: int, window: int, causal: bool, device):
    """Keys 0 .. tokens − 1 as block columns, the pairs already in the window left out."""
    positions = torch.arange(tokens, device=device).expand(count, tokens)
    _, _, keep = _column_pairs(positions, block, window, causal)
    return BlockColumns(positions, keep)


# -- local ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LocalOptions:
    window: int = 64
    block_size: int | None = None

    def check(self) -> str | None:
        return _first_problem(
            _non_negative("window", self.window), _positive("block_size", self.block_size)
        )


class LocalAttention(BandPatternAttention):
    """Sliding-window (local) attention, as in Image Transformer (Parmar et al. 2018,
    arXiv:1802.05751) and Longformer's window (Beltagy et al. 2020, arXiv:2004.05150).

    out_i = Σ_{|i-j| <= w} softmax_j(q_i·k_j·s + m_ij) v_j (causal: also j <= i).

    Capabilities: all mask classes (``general`` read inside the window only), causal,
    cross-attention (positions from 0 on both sides), grouped heads, no parameters. Options:
    ``window`` w, ``block_size`` b (default max(w, 16)). Cost: time and memory
    O(N·(2⌈w/b⌉+1)·b) = O(N·w). Self-attention without a mask or with a key-only mask runs
    :func:`~attnrewrite.variants.blockwise.band_attention` (dense batched products over each
    query block and its neighbouring key blocks, no gathers); cross-attention and pair biases
    run the general pattern core.
    """

    name: ClassVar[str] = "local"
    Options: ClassVar[type] = LocalOptions
    #: Decoding keeps a window of the last w keys and values (a shift register: constant size).
    state_names: ClassVar[tuple[str, ...]] = ("keys", "values", "key_bias")

    def prefill(self, query, key, value, *, mask=None, causal=False, scale=1.0):
        out = self.forward(query, key, value, mask=mask, causal=causal, scale=scale)
        w = self.options.window
        # The last w keys; a prompt shorter than the window is padded in front with keys that
        # weigh nothing (bias -inf).
        bias = F.pad(key_bias(mask, key), (w, 0), value=float("-inf"))[..., -w:] if w else None
        keys = F.pad(key, (0, 0, w, 0))[:, :, -w:] if w else key[:, :, :0]
        values = F.pad(value, (0, 0, w, 0))[:, :, -w:] if w else value[:, :, :0]
        return out, (keys, values, bias if bias is not None else key_bias(mask, key)[..., :0])

    def step(self, query, key, value, state, *, mask=None, scale=1.0):
        keys, values, bias = state
        keys, values = torch.cat([keys, key], dim=2), torch.cat([values, value], dim=2)
        bias = append_bias(bias, key_bias(mask, key))
        out = one_row_attention(query, keys, values, bias, scale)
        return out, (keys[:, :, 1:], values[:, :, 1:], bias[..., 1:])  # the window moves on

    def band_shape(self) -> tuple[int, int]:
        return self.options.window, _window_blocks(self.options.window, self.options.block_size)[0]

    def allows(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        return (query_pos - key_pos).abs() <= self.options.window

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        block, reach = _window_blocks(self.options.window, self.options.block_size)
        queries = block_queries(q_len, block, device)
        band = band_segment(queries.shape[0], block, reach, 0 if causal else reach, device)
        return [QueryGroup(queries, (band,), in_order=True)], self.allows


# -- Sparse Transformer --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StridedOptions:
    stride: int | None = None

    def check(self) -> str | None:
        return _positive("stride", self.stride)


class StridedSparseAttention(BandPatternAttention):
    """Strided sparse attention: Child, Gray, Radford, Sutskever, "Generating Long Sequences with
    Sparse Transformers", 2019, arXiv:1904.10509 (the two strided heads merged into one pattern).

    Query i attends key j iff |i - j| < l or (i - j) mod l = 0 (both directions when not causal;
    causal adds j <= i), exact softmax over those keys.

    Self-attention without a mask or with a key-only mask runs the window |i − j| <= l − 1 on
    the band path (:class:`BandPatternAttention`) and the lanes (same residue mod l) on the
    general core, merged through their softmax statistics. Otherwise the general core computes
    both: a band of key blocks plus attention along the columns of the sequence folded into rows
    of l. Capabilities: all mask classes
    (``general`` read at the pattern's pairs only), causal, cross-attention, grouped heads, no
    parameters. Options: ``stride`` l (default ≈ √N of the site's key length at capture, else 64).
    Cost: time and memory O(N·l + N²/l), O(N·√N) for l ≈ √N.
    """

    name: ClassVar[str] = "sparse_strided"
    Options: ClassVar[type] = StridedOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        self.stride = self.band_shape()[1]

    def band_shape(self) -> tuple[int, int]:
        # read by the base class's constructor, before ``self.stride`` is set
        stride = self.options.stride or _default_stride(self.site)
        return stride - 1, stride

    def query_groups(self, q_len, k_len, causal, device):
        allowed = _and_causal(self.allows) if causal else self.allows
        return [self._lanes(q_len, k_len, device)], allowed

    def allows(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        offset = query_pos - key_pos
        return (offset.abs() < self.stride) | (torch.remainder(offset, self.stride) == 0)

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        stride = self.stride
        queries = block_queries(q_len, stride, device)
        band = band_segment(queries.shape[0], stride, 1, 0 if causal else 1, device)
        groups = [QueryGroup(queries, (band,), in_order=True), self._lanes(q_len, k_len, device)]
        return groups, self.allows

    def _lanes(self, q_len: int, k_len: int, device: torch.device) -> QueryGroup:
        """The "(i - j) mod l = 0" part: lane r holds positions r, r + l, r + 2l, ..."""
        stride = self.stride
        lane = torch.arange(stride, device=device)[:, None]
        column_queries = lane + torch.arange(padded_count(q_len, stride), device=device) * stride
        column_keys = lane + torch.arange(padded_count(k_len, stride), device=device) * stride
        columns = KeySegment(column_keys, lambda i, j: torch.remainder(i - j, stride) == 0)
        return QueryGroup(column_queries, (columns,))


@dataclasses.dataclass(frozen=True)
class FixedOptions:
    block: int | None = None
    num_summary: int = 1

    def check(self) -> str | None:
        problem = _first_problem(
            _positive("block", self.block), _positive("num_summary", self.num_summary)
        )
        if problem is None and self.block is not None and self.num_summary > self.block:
            problem = f"num_summary ({self.num_summary}) cannot exceed block ({self.block})"
        return problem


class FixedSparseAttention(PatternAttention):
    """Fixed sparse attention: Child, Gray, Radford, Sutskever, "Generating Long Sequences with
    Sparse Transformers", 2019, arXiv:1904.10509 (the two fixed heads merged into one pattern).

    Query i attends key j iff ⌊i/l⌋ = ⌊j/l⌋ (same block) or j mod l >= l - c (the last c
    "summary" positions of every block); causal adds j <= i.

    Capabilities: all mask classes (``general`` read at the pattern's pairs only), causal,
    cross-attention, grouped heads, no parameters. Options: ``block`` l (default ≈ √N of the
    site's key length at capture, else 64), ``num_summary`` c (default 1). Cost: time and memory
    O(N·l + c·N²/l), O(N·√N) for l ≈ √N.
    """

    name: ClassVar[str] = "sparse_fixed"
    Options: ClassVar[type] = FixedOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        self.block = self.options.block or _default_stride(site)
        # A block chosen from the site's length may be shorter than the requested summary.
        self.num_summary = min(self.options.num_summary, self.block)

    def allows(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        same_block = torch.div(query_pos, self.block, rounding_mode="floor") == torch.div(
            key_pos, self.block, rounding_mode="floor"
        )
        return same_block | (torch.remainder(key_pos, self.block) >= self.block - self.num_summary)

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        block, count = self.block, self.num_summary
        queries = block_queries(q_len, block, device)
        own_block = band_segment(queries.shape[0], block, 0, 0, device)
        starts = torch.arange(padded_count(k_len, block), device=device)[:, None] * block
        summary_pos = (starts + torch.arange(block - count, block, device=device)[None]).flatten()
        summary = KeySegment(
            summary_pos[None, :], lambda i, j: torch.remainder(j, block) >= block - count
        )
        everyone = torch.arange(q_len, device=device)[None, :]
        return [
            QueryGroup(queries, (own_block,), in_order=True),
            QueryGroup(everyone, (summary,), in_order=True),
        ], self.allows


# -- Longformer and BigBird ----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LongformerOptions:
    window: int = 64
    global_tokens: int = 1
    block_size: int | None = None

    def check(self) -> str | None:
        return _first_problem(
            _non_negative("window", self.window),
            _non_negative("global_tokens", self.global_tokens),
            _positive("block_size", self.block_size),
        )


class LongformerAttention(BandPatternAttention):
    """Longformer attention: Beltagy, Peters, Cohan, "Longformer: The Long-Document Transformer",
    2020, arXiv:2004.05150 (sliding window plus global tokens; one set of projections).

    Query i attends key j iff |i - j| <= w, or i < g (global queries see everything), or j < g
    (everyone sees the global tokens); causal adds j <= i. The first g positions are the global
    tokens (a [CLS] token, or a question put first).

    Capabilities: all mask classes (``general`` read at the pattern's pairs only), causal,
    cross-attention, grouped heads, no parameters. Options: ``window`` w, ``global_tokens`` g,
    ``block_size`` (default max(w, 16)). Cost: time and memory O(N·(w + g)); the global rows are
    computed on their own in O(g·N).
    """

    name: ClassVar[str] = "longformer"
    Options: ClassVar[type] = LongformerOptions
    #: Decoding keeps the g global keys and the last w keys (constant size), and the position.
    state_names: ClassVar[tuple[str, ...]] = (
        "global_keys",
        "global_values",
        "global_bias",
        "keys",
        "values",
        "key_bias",
        "position",
    )

    def prefill(self, query, key, value, *, mask=None, causal=False, scale=1.0):
        out = self.forward(query, key, value, mask=mask, causal=causal, scale=scale)
        g, w = self.options.global_tokens, self.options.window
        length = key.shape[-2]
        bias = key_bias(mask, key)
        # The first g keys (a shorter prompt leaves slots that weigh nothing until filled).
        first = (
            F.pad(key, (0, 0, 0, g))[:, :, :g],
            F.pad(value, (0, 0, 0, g))[:, :, :g],
            F.pad(bias, (0, g), value=float("-inf"))[..., :g],
        )
        positions = torch.arange(length, device=key.device)  # the last one is the state's
        last = (
            F.pad(key, (0, 0, w, 0))[:, :, key.shape[-2] :],
            F.pad(value, (0, 0, w, 0))[:, :, key.shape[-2] :],
            F.pad(bias, (w, 0), value=float("-inf"))[..., length:],
            positions[-1:].unsqueeze(0),
        )
        return out, (*first, *last)

    def step(self, query, key, value, state, *, mask=None, scale=1.0):
        g_keys, g_values, g_bias, keys, values, bias, position = state
        g, w = self.options.global_tokens, self.options.window
        now = position + 1  # (1, 1)
        new_bias = key_bias(mask, key)
        # A key at a position < g becomes a global key for every later query.
        slot = (torch.arange(g, device=key.device) == now[0]).view(1, 1, g)
        g_keys = torch.where(slot.unsqueeze(-1), key, g_keys)
        g_values = torch.where(slot.unsqueeze(-1), value, g_values)
        g_bias = torch.where(slot, new_bias.expand_as(g_bias), g_bias)
        near_keys, near_values = torch.cat([keys, key], 2), torch.cat([values, value], 2)
        near_bias = append_bias(bias, new_bias)
        near_pos = now - w + torch.arange(w + 1, device=key.device).unsqueeze(0)
        # Keys within w of the new query; the global ones are counted once, among the globals.
        near_bias = near_bias.masked_fill((near_pos < g).unsqueeze(1), float("-inf"))
        all_bias = append_bias(g_bias, near_bias)
        out = one_row_attention(
            query,
            torch.cat([g_keys, near_keys], 2),
            torch.cat([g_values, near_values], 2),
            all_bias,
            scale,
        )
        near_bias = append_bias(bias, new_bias)  # unmasked: the mask depends on the query
        return out, (
            g_keys,
            g_values,
            g_bias,
            near_keys[:, :, 1:],
            near_values[:, :, 1:],
            near_bias[..., 1:],
            now,
        )

    def band_shape(self) -> tuple[int, int]:
        return self.options.window, _window_blocks(self.options.window, self.options.block_size)[0]

    def global_rows(self) -> int:
        return self.options.global_tokens

    def block_columns(self, count, block, k_len, causal, device):
        tokens = self.options.global_tokens
        if not tokens:
            return None
        return _global_columns(count, tokens, block, self.options.window, causal, device)

    def allows(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        count = self.options.global_tokens
        near = (query_pos - key_pos).abs() <= self.options.window
        return near | (query_pos < count) | (key_pos < count)

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        count = self.options.global_tokens
        block, reach = _window_blocks(self.options.window, self.options.block_size)
        queries = block_queries(q_len, block, device)
        segments = [band_segment(queries.shape[0], block, reach, 0 if causal else reach, device)]
        if count == 0:
            return [QueryGroup(queries, tuple(segments), in_order=True)], self.allows
        segments.append(prefix_segment(queries.shape[0], count, device))
        groups = [
            _global_rows_group(count, k_len, device),
            QueryGroup(queries, tuple(segments), in_order=True),
        ]
        return groups, self.allows


@dataclasses.dataclass(frozen=True)
class BigBirdOptions:
    window: int = 64
    global_tokens: int = 64
    num_random: int = 3
    block_size: int = 64

    def check(self) -> str | None:
        return _first_problem(
            _non_negative("window", self.window),
            _non_negative("global_tokens", self.global_tokens),
            _non_negative("num_random", self.num_random),
            _positive("block_size", self.block_size),
        )


class BigBirdAttention(BandPatternAttention):
    """BigBird attention: Zaheer et al., "Big Bird: Transformers for Longer Sequences", 2020,
    arXiv:2007.14062 (window + global + random, the ITC form with global tokens taken in place).

    With blocks of b positions, query i attends key j iff |i - j| <= w, or i < g, or j < g, or
    ⌊j/b⌋ is one of the r random key blocks drawn for query block ⌊i/b⌋; causal adds j <= i.

    The random blocks are a fixed function of (seed, query block, slot, number of key blocks): a
    counter-based integer hash of a key drawn from ``self.generator()``, so the pattern is
    deterministic per length and needs no random-number generator at run time (it exports). When
    causal, blocks are drawn from 0 .. ⌊i/b⌋ only. A random block that repeats another or falls on
    the window or the global tokens adds nothing (the pair is counted once).

    Capabilities: all mask classes (``general`` read at the pattern's pairs only), causal,
    cross-attention, grouped heads, no parameters. Options: ``window`` w, ``global_tokens`` g,
    ``num_random`` r, ``block_size`` b. Cost: time and memory O(N·(w + g + r·b)).
    """

    name: ClassVar[str] = "bigbird"
    Options: ClassVar[type] = BigBirdOptions
    why_not_decodable: ClassVar[str] = (
        "has no constant-size step: its random blocks reach any earlier block, so each new "
        "token needs every past key (use softmax's key/value cache, or local/longformer)"
    )

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        self.random_key = int(torch.randint(0, 2**31, (1,), generator=self.generator()).item())

    def band_shape(self) -> tuple[int, int]:
        return self.options.window, self.options.block_size

    def global_rows(self) -> int:
        return self.options.global_tokens

    def block_columns(self, count, block, k_len, causal, device):
        opts = self.options
        parts = []
        if opts.global_tokens:
            parts.append(
                _global_columns(count, opts.global_tokens, block, opts.window, causal, device)
            )
        if opts.num_random:
            picks = self.random_blocks(count, ceil_div(k_len, block), causal, device)
            segment = _random_segment(picks, block)
            _, j, keep = _column_pairs(segment.positions, block, opts.window, causal)
            # A random key among the global tokens is counted there; a repeated pick once.
            keep = keep & segment.slot_keep[:, None, :] & (j >= opts.global_tokens)
            parts.append(BlockColumns(segment.positions, keep))
        if not parts:
            return None
        return BlockColumns(
            torch.cat([p.positions for p in parts], dim=-1),
            torch.cat([p.keep for p in parts], dim=-1),
        )

    def random_blocks(
        self, num_query_blocks: int, num_key_blocks: int, causal: bool, device: torch.device
    ) -> Tensor:
        """(num_query_blocks, r) random key block of each query block and slot (may repeat)."""
        count = self.options.num_random
        block_index = torch.arange(num_query_blocks, device=device)[:, None]
        slot = torch.arange(count, device=device)[None, :]
        draw = _hash32((self.random_key + block_index * count + slot) % 2**32)
        if causal:
            # Blocks 0 .. c only (fewer if the keys are shorter): the others would be masked.
            choices = (block_index + 1).clamp(max=num_key_blocks)
        else:
            choices = torch.full_like(block_index, num_key_blocks)
        return torch.remainder(draw, choices.clamp(min=1))

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        opts = self.options
        count, block = opts.global_tokens, opts.block_size
        queries = block_queries(q_len, block, device)
        num_blocks = queries.shape[0]
        reach = ceil_div(opts.window, block)
        segments = [band_segment(num_blocks, block, reach, 0 if causal else reach, device)]
        if count:
            segments.append(prefix_segment(num_blocks, count, device))
        picks = None
        if opts.num_random:
            picks = self.random_blocks(num_blocks, ceil_div(k_len, block), causal, device)
            segments.append(_random_segment(picks, block))
        groups = [QueryGroup(queries, tuple(segments), in_order=True)]
        if count:
            groups.insert(0, _global_rows_group(count, k_len, device))

        def allows(query_pos: Tensor, key_pos: Tensor) -> Tensor:
            near = (query_pos - key_pos).abs() <= opts.window
            allowed = near | (query_pos < count) | (key_pos < count)
            if picks is not None:
                allowed = allowed | _in_random_blocks(picks, block, query_pos, key_pos)
            return allowed

        return groups, allows


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (xor-shift-multiply) in int64 arithmetic, values in [0, 2^32)."""
    for _ in range(2):
        x = torch.bitwise_xor(x, torch.div(x, 2**16, rounding_mode="floor"))
        x = (x * 0x45D9F3B) % 2**32
    return torch.bitwise_xor(x, torch.div(x, 2**16, rounding_mode="floor"))


def _in_random_blocks(picks: Tensor, block: int, query_pos: Tensor, key_pos: Tensor) -> Tensor:
    """Whether ⌊j/b⌋ is one of the random blocks of ⌊i/b⌋ (positions broadcast together)."""
    query_block = torch.div(query_pos, block, rounding_mode="floor").clamp(0, picks.shape[0] - 1)
    key_block = torch.div(key_pos, block, rounding_mode="floor")
    return (picks[query_block] == key_block.unsqueeze(-1)).any(dim=-1)


def _random_segment(picks: Tensor, block: int) -> KeySegment:
    """The keys of each query block's random blocks; a repeated pick keeps only its first slot."""
    rows, count = picks.shape
    positions = (picks[:, :, None] * block + torch.arange(block, device=picks.device)).flatten(1)
    earlier = torch.ones(count, count, dtype=torch.bool, device=picks.device).tril(-1)
    repeated = ((picks[:, :, None] == picks[:, None, :]) & earlier).any(dim=-1)
    slot_keep = (~repeated)[:, :, None].expand(rows, count, block).flatten(1)
    return KeySegment(
        positions,
        lambda i, j: _in_random_blocks(picks, block, i, j),
        slot_keep=slot_keep,
    )
