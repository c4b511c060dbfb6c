"""Axial and Transformer-XL patterns on the blockwise core (:mod:`attnrewrite.variants.blockwise`).

Both only state a pattern predicate P(i, j) and the query groups that gather its pairs, like the
variants of :mod:`attnrewrite.variants.patterns`, and share their properties: exact softmax over the
allowed keys, every mask class (a ``general`` bias is read at the pattern's pairs only), causal,
cross-attention with positions counted from 0 on both sides, grouped heads, no N x N tensor, and a
dynamic sequence length under ``torch.export``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnrewrite.site import AttentionSite
from attnrewrite.variants.blockwise import (
    KeySegment,
    PairPredicate,
    QueryGroup,
    band_segment,
    block_queries,
    padded_count,
    prefix_segment,
)
from attnrewrite.variants.patterns import PatternAttention, _global_rows_group

#: Grid width when neither the option nor the site's length at capture gives one.
DEFAULT_WIDTH = 32


@dataclasses.dataclass(frozen=True)
class AxialOptions:
    grid: tuple | None = None
    global_tokens: int | None = None

    def check(self) -> str | None:
        if self.grid is not None:
            if len(self.grid) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in self.grid
            ):
                return f"grid must be a pair of positive ints (height, width), got {self.grid!r}"
        if self.global_tokens is not None and self.global_tokens < 0:
            return f"global_tokens must be >= 0, got {self.global_tokens}"
        return None


def default_grid(length: Any) -> tuple[tuple[int, int], int]:
    """(height, width) and leading tokens of a sequence of ``length`` at capture.

    A square grid after 0 or 1 leading tokens (ViT: [CLS] + 14 x 14 patches) if there is one, else
    a grid ⌈√N⌉ wide with no leading token; ``DEFAULT_WIDTH`` if the length is not known.
    """
    if not isinstance(length, int) or length < 1:
        return (DEFAULT_WIDTH, DEFAULT_WIDTH), 0
    for leading in (0, 1):
        side = math.isqrt(max(length - leading, 0))
        if side >= 2 and side * side == length - leading:
            return (side, side), leading
    width = math.isqrt(length - 1) + 1
    return (-(-length // width), width), 0


class AxialAttention(PatternAttention):
    """Axial attention: Ho, Kalchbrenner, Weissenborn, Salimans, "Axial Attention in
    Multidimensional Transformers", 2019, arXiv:1912.12180 (row and column attention merged into
    one softmax, as in their full-context unmasked block).

    The sequence is g leading tokens (a [CLS] token, registers) followed by a row-major grid w
    wide. Grid token i sits at row r_i = ⌊(i - g)/w⌋ and column c_i = (i - g) mod w. Query i
    attends key j iff both are grid tokens with r_i = r_j or c_i = c_j, or i < g, or j < g (the
    leading tokens are global); causal adds j <= i. One softmax over the union.

    Capabilities: all mask classes (``general`` read at the pattern's pairs only), causal,
    cross-attention (keys laid out on the same grid), grouped heads, no parameters. Options:
    ``grid`` = (h, w) (default: a square grid after 0 or 1 leading tokens of the site's length at
    capture, else ⌈√N⌉ wide); ``global_tokens`` g (default: N - h·w at capture, else 0). At run time
    the width and g stay fixed and the number of rows follows the length (a partial last row is
    fine). Cost: time and memory O(N·(h + w + g)), O(N·√N) for a square grid.
    """

    name: ClassVar[str] = "axial"
    Options: ClassVar[type] = AxialOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        if self.options.grid is not None:
            grid = tuple(self.options.grid)
            leading = 0
            if isinstance(site.query_len, int) and site.query_len >= grid[0] * grid[1]:
                leading = site.query_len - grid[0] * grid[1]
        else:
            grid, leading = default_grid(site.query_len)
        if self.options.global_tokens is not None:
            leading = self.options.global_tokens
        self.grid, self.global_tokens = grid, leading

    def allows(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        count, width = self.global_tokens, self.grid[1]
        qi, kj = query_pos - count, key_pos - count
        same_row = torch.div(qi, width, rounding_mode="floor") == torch.div(
            kj, width, rounding_mode="floor"
        )
        same_column = torch.remainder(qi, width) == torch.remainder(kj, width)
        on_grid = (qi >= 0) & (kj >= 0)
        return (on_grid & (same_row | same_column)) | (query_pos < count) | (key_pos < count)

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        count, width = self.global_tokens, self.grid[1]
        # Rows: consecutive blocks of w grid positions, each against its own row of keys.
        rows = block_queries(q_len, width, device) + count
        row_keys = band_segment(rows.shape[0], width, 0, 0, device)
        row_keys = dataclasses.replace(
            row_keys,
            positions=row_keys.positions + count,
            covers=lambda i, j: (
                (i >= count)
                & (j >= count)
                & (
                    torch.div(i - count, width, rounding_mode="floor")
                    == torch.div(j - count, width, rounding_mode="floor")
                )
            ),
        )
        row_segments: list[KeySegment] = [row_keys]
        if count:
            row_segments.append(prefix_segment(rows.shape[0], count, device))
        # Columns: column c holds grid positions c, c + w, c + 2w, ... (after the leading tokens).
        lane = torch.arange(width, device=device)[:, None]
        column_queries = (
            count + lane + torch.arange(padded_count(q_len, width), device=device) * width
        )
        column_keys = count + lane + torch.arange(padded_count(k_len, width), device=device) * width
        columns = KeySegment(
            column_keys,
            lambda i, j: (
                (i >= count)
                & (j >= count)
                & (torch.remainder(i - count, width) == torch.remainder(j - count, width))
            ),
        )
        groups = [QueryGroup(rows, tuple(row_segments)), QueryGroup(column_queries, (columns,))]
        if count:
            groups.insert(0, _global_rows_group(count, k_len, device))
        return groups, self.allows


@dataclasses.dataclass(frozen=True)
class TransformerXLOptions:
    segment: int = 64

    def check(self) -> str | None:
        if self.segment < 1:
            return f"segment must be a positive integer, got {self.segment}"
        return None


class TransformerXLAttention(PatternAttention):
    """Transformer-XL's segment-level recurrence as a pattern: Dai, Yang, Yang, Carbonell, Le,
    Salakhutdinov, "Transformer-XL: Attentive Language Models Beyond a Fixed-Length Context",
    2019, arXiv:1901.02860.

    With segments of L positions, query i attends key j iff ⌊j/L⌋ ∈ {⌊i/L⌋ - 1, ⌊i/L⌋} (its own
    segment and the previous one, the cached memory); causal adds j <= i. Unlike the paper, the
    memory is not detached from the gradient and positions keep the model's own encoding (the
    relative encoding of Transformer-XL is a property of the model, not of the attention).

    Capabilities: all mask classes (``general`` read at the pattern's pairs only), causal (the
    intended use) and bidirectional (own segment entirely, plus the previous one), cross-attention
    with positions from 0, grouped heads, no parameters. Options: ``segment`` L (default 64).
    Cost: time and memory O(N·2L).
    """

    name: ClassVar[str] = "transformer_xl"
    Options: ClassVar[type] = TransformerXLOptions

    def allows(self, query_pos: Tensor, key_pos: Tensor) -> Tensor:
        length = self.options.segment
        distance = torch.div(query_pos, length, rounding_mode="floor") - torch.div(
            key_pos, length, rounding_mode="floor"
        )
        return (distance == 0) | (distance == 1)

    def pattern(
        self, q_len: int, k_len: int, causal: bool, device: torch.device
    ) -> tuple[list[QueryGroup], PairPredicate]:
        length = self.options.segment
        queries = block_queries(q_len, length, device)
        band = band_segment(queries.shape[0], length, 1, 0, device)
        return [QueryGroup(queries, (band,), in_order=True)], self.allows
