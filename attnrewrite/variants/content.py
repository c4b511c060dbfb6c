"""Content-based sparse attention: Reformer (LSH), Routing Transformer, Sinkhorn attention.

All three choose, from the content of q and k, which chunk of keys each query sees, and compute
exact softmax inside the chosen pairs with the shared core :func:`bucketed_attention`
(:mod:`attnrewrite.variants.bucketed`). Common to all of them:

- the result is exact softmax over the variant's pair set, which is its definition (the tests
  compare it with dense softmax under that pair set written out as a boolean matrix); key-only masks
  and the causal condition are applied exactly to those pairs;
- ``general`` masks are refused: the pair set is chosen per call, so a bias depending on (i, j)
  would have to be gathered at data-dependent pairs, which is possible but not implemented;
- cross-attention (Nq != Nk) and grouped key/value heads; time and memory O(N·chunk), never N x N.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnrewrite.site import KERNEL_MASK_CLASSES, AttentionSite, MaskClass
from attnrewrite.variants.base import AttentionVariant, key_weights, repeat_kv
from attnrewrite.variants.blockwise import ceil_div
from attnrewrite.variants.bucketed import (
    bucketed_attention,
    chunk_sizes,
    neighbour_partners,
    sort_by_bucket,
)

#: Chunk (bucket) length when the option gives none.
DEFAULT_CHUNK = 64
#: Sinkhorn's sorting matrices are I + SORT_STEP·Δ (see SinkhornAttention.__init__).
SORT_STEP = 0.1


def _positive(name: str, value: int | float | None) -> str | None:
    if value is not None and value <= 0:
        return f"{name} must be positive, got {value}"
    return None


def _first_problem(*problems: str | None) -> str | None:
    return next((p for p in problems if p), None)


def _default_buckets(site: AttentionSite, chunk: int, least: int = 2) -> int:
    """About one bucket per chunk of the site's key length at capture (at least ``least``)."""
    length = site.key_len if isinstance(site.key_len, int) else 8 * chunk
    return max(least, ceil_div(length, chunk))


def _default_clusters(site: AttentionSite) -> int:
    """≈ √N of the site's key length at capture (Roy et al.'s choice), else 16."""
    if isinstance(site.key_len, int) and site.key_len > 0:
        return max(2, round(math.sqrt(site.key_len)))
    return 16


def _by_query_head(x: Tensor, heads: int) -> Tensor:
    """(B, Hkv, ...) -> (B, H, ...): query head h reads key head h // (H / Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1) if x.shape[1] != heads else x


class ContentSparseAttention(AttentionVariant):
    """Base of the content-based variants: a subclass returns the round orders and partners."""

    mask_classes: ClassVar[frozenset[MaskClass]] = KERNEL_MASK_CLASSES
    supports_causal: ClassVar[bool] = True
    supports_cross: ClassVar[bool] = True


# -- Reformer --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ReformerOptions:
    num_hashes: int = 2
    bucket_size: int = DEFAULT_CHUNK
    num_buckets: int | None = None

    def check(self) -> str | None:
        problem = _first_problem(
            _positive("num_hashes", self.num_hashes),
            _positive("bucket_size", self.bucket_size),
            _positive("num_buckets", self.num_buckets),
        )
        if problem is None and self.num_buckets is not None and self.num_buckets % 2:
            problem = f"num_buckets must be even (±projections), got {self.num_buckets}"
        return problem


class ReformerAttention(ContentSparseAttention):
    """Reformer's LSH attention: Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer",
    2020, arXiv:2001.04451 (angular LSH, sorted buckets, chunks attending to their predecessor).

    Per hash round r (``num_hashes`` rounds) with a random rotation R_r (d x n_b/2, drawn once from
    the seed, shared by queries and keys, a buffer): bucket(x) = argmax([x̂R_r; -x̂R_r]) for the
    normalised x̂ = x/|x| of each query and each key (q and k are separate; both are hashed with the
    same rotations). Queries and keys are sorted by (bucket, position) and cut into chunks of
    ``bucket_size`` (for cross-attention the keys into as many chunks as the queries); query chunk
    t attends key chunks t and t - 1 (cyclic). The pair set of the layer is the union over the
    rounds; out_i = Σ_{j ∈ S(i)} softmax_j(q_i·k_j·s + m_j) v_j, each pair counted once. Causal adds
    j <= i and always keeps (i, i), so no query is left without a key.

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key`` (exact inside the pairs);
    cross-attention; grouped heads; no parameters (the rotations are a seeded buffer). Options:
    ``num_hashes`` (default 2), ``bucket_size`` (chunk length, default 64), ``num_buckets``
    (default about one per chunk of the site's key length at capture, even). Cost: time and memory
    O(num_hashes·N·2·bucket_size), hashing O(N·d·n_b).
    """

    name: ClassVar[str] = "reformer"
    Options: ClassVar[type] = ReformerOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        buckets = self.options.num_buckets or _default_buckets(site, self.options.bucket_size)
        buckets += buckets % 2
        self.num_buckets = buckets
        rotations = torch.randn(
            site.head_dim, self.options.num_hashes, buckets // 2, generator=self.generator()
        )
        self.register_buffer("rotations", rotations)

    def buckets(self, x: Tensor) -> Tensor:
        """(B, H, N, d) -> (B, H, R, N) LSH bucket of every vector in every round."""
        projected = torch.einsum(
            "bhnd,drk->bhrnk", F.normalize(x.float(), dim=-1), self.rotations.float()
        )
        return torch.cat([projected, -projected], dim=-1).argmax(dim=-1)

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
        heads = query.shape[1]
        count, key_chunk = chunk_sizes(query.shape[2], key.shape[2], self.options.bucket_size)
        query_order = sort_by_bucket(self.buckets(query))
        key_order = _by_query_head(sort_by_bucket(self.buckets(key)), heads)
        partners = neighbour_partners(count, self.options.num_hashes, query.device)
        return bucketed_attention(
            query, key, value, query_order, key_order, partners,
            query_chunk=self.options.bucket_size, key_chunk=key_chunk, mask=mask, causal=causal,
            scale=scale, separate_diagonal=True,
        )  # fmt: skip


# -- Routing Transformer ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RoutingOptions:
    num_clusters: int | None = None
    chunk_size: int = DEFAULT_CHUNK
    kmeans_iterations: int = 10

    def check(self) -> str | None:
        return _first_problem(
            _positive("num_clusters", self.num_clusters),
            _positive("chunk_size", self.chunk_size),
            _positive("kmeans_iterations", self.kmeans_iterations),
        )


class RoutingAttention(ContentSparseAttention):
    """Routing attention: Roy, Saffar, Vaswani, Grangier, "Efficient Content-Based Sparse Attention
    with Routing Transformers", 2021 (TACL), arXiv:2003.05997.

    With unit centroids μ_1..μ_c per key/value head (a buffer), each query and each key goes to its
    nearest centroid by cosine, cluster(x) = argmax_r x̂·μ_r. Queries and keys are sorted by
    (cluster, position) and cut into chunks of ``chunk_size`` (the balanced top-k form of the
    paper: every chunk holds the same number of queries); query chunk t attends key chunks t and
    t - 1 (cyclic), exact softmax over those pairs: out_i = Σ_{j ∈ S(i)} softmax_j(q_i·k_j·s + m_j)
    v_j. Causal adds j <= i and always keeps (i, i).

    Centroids: initialised randomly from the seed (the rewriter gives no example data at
    construction), or from data with :meth:`initialise` (normalised example keys); refined by
    spherical k-means on the recorded queries and keys of each site in ``ar.calibrate`` (the
    :meth:`refine` hook; no gradient involved), as the paper's online k-means does during training.

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key`` (exact inside the pairs);
    cross-attention; grouped heads; no trainable parameters (centroids are a buffer). Options:
    ``num_clusters`` c (default ≈ √N of the site's key length at capture, else 16),
    ``chunk_size`` (default 64), ``kmeans_iterations`` of :meth:`refine` (default 10). Cost: time
    and memory O(N·2·chunk_size), routing O(N·d·c), O(N^1.5·d) for c ≈ √N.
    """

    name: ClassVar[str] = "routing"
    Options: ClassVar[type] = RoutingOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        clusters = self.options.num_clusters or _default_clusters(site)
        centroids = torch.randn(
            site.num_kv_heads, clusters, site.head_dim, generator=self.generator()
        )
        self.register_buffer("centroids", F.normalize(centroids, dim=-1))

    def clusters(self, x: Tensor) -> Tensor:
        """(B, H|Hkv, N, d) -> (B, H|Hkv, 1, N) nearest centroid of every vector."""
        centroids = _by_query_head(self.centroids.float().unsqueeze(0), x.shape[1])
        similarity = torch.matmul(F.normalize(x.float(), dim=-1), centroids.transpose(-1, -2))
        return similarity.argmax(dim=-1).unsqueeze(2)

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
        heads = query.shape[1]
        count, key_chunk = chunk_sizes(query.shape[2], key.shape[2], self.options.chunk_size)
        query_order = sort_by_bucket(self.clusters(query))
        key_order = _by_query_head(sort_by_bucket(self.clusters(key)), heads)
        partners = neighbour_partners(count, 1, query.device)
        return bucketed_attention(
            query, key, value, query_order, key_order, partners,
            query_chunk=self.options.chunk_size, key_chunk=key_chunk, mask=mask, causal=causal,
            scale=scale, separate_diagonal=True,
        )  # fmt: skip

    @torch.no_grad()
    def initialise(self, key: Tensor) -> None:
        """Centroids from example keys (B, Hkv, N, d): c distinct normalised keys per head."""
        points = F.normalize(key.detach().float().transpose(0, 1).flatten(1, 2), dim=-1)
        generator = self.generator(points.device)
        for head in range(points.shape[0]):
            picks = torch.randperm(points.shape[1], generator=generator, device=points.device)
            chosen = points[head, picks[: self.centroids.shape[1]]]
            self.centroids[head, : chosen.shape[0]] = chosen.to(self.centroids.dtype)

    @torch.no_grad()
    def refine(self, calls: Sequence[Any]) -> None:
        """Spherical k-means (``kmeans_iterations`` Lloyd steps) on recorded queries and keys.

        ``calls`` are :class:`~attnrewrite.calibrate.mode.SiteCall` records (query, key, mask);
        keys a key-only mask drops are left out. A cluster that receives no point keeps its
        centroid.
        """
        kv_heads = self.centroids.shape[0]
        per_head: list[list[Tensor]] = [[] for _ in range(kv_heads)]
        for call in calls:
            heads = call.query.shape[1]
            queries = call.query.float().unflatten(1, (kv_heads, heads // kv_heads))
            weights = key_weights(call.mask)
            for head in range(kv_heads):
                keys = call.key[:, head].float()
                if weights is not None:
                    # The mask is per query head (or shared): read the group's first head.
                    column = 0 if weights.shape[1] == 1 else head * (heads // kv_heads)
                    kept = weights[:, column] > 0  # (B|1, Nk)
                    keys = keys[kept.expand(keys.shape[:2])]
                per_head[head] += [
                    keys.reshape(-1, keys.shape[-1]),
                    queries[:, head].reshape(-1, queries.shape[-1]),
                ]
        centroids = self.centroids.float().clone()
        for head, parts in enumerate(per_head):
            points = F.normalize(torch.cat(parts).to(centroids.device), dim=-1)
            for _ in range(self.options.kmeans_iterations):
                nearest = (points @ centroids[head].T).argmax(dim=-1)
                sums = torch.zeros_like(centroids[head]).index_add_(0, nearest, points)
                counts = torch.bincount(nearest, minlength=centroids.shape[1])
                moved = F.normalize(sums, dim=-1)
                centroids[head] = torch.where((counts > 0)[:, None], moved, centroids[head])
        self.centroids.copy_(centroids.to(self.centroids.dtype))


# -- Sinkhorn --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SinkhornOptions:
    block_size: int = DEFAULT_CHUNK
    sinkhorn_iterations: int = 8
    temperature: float = 0.75

    def check(self) -> str | None:
        return _first_problem(
            _positive("block_size", self.block_size),
            _positive("sinkhorn_iterations", self.sinkhorn_iterations),
            _positive("temperature", self.temperature),
        )


class SinkhornAttention(ContentSparseAttention):
    """Sinkhorn attention: Tay, Bahri, Yang, Metzler, Juan, "Sparse Sinkhorn Attention", 2020
    (ICML), arXiv:2002.11296 (block sorting by a learned sorting network with Sinkhorn balancing).

    Queries and keys are cut into blocks of b positions. A small sorting network scores query block
    t against key block p from the blocks' mean query q̄_t and mean (unmasked) key k̄_p:
    L_tp = (q̄_t W_q)·(k̄_p W_k)·s / τ, with W_q, W_k (d x d per query head) learned; causal keeps
    only p < t. Sinkhorn normalisation (alternate row and column log-normalisation, n iterations)
    makes P = Sinkhorn(L) a relaxed permutation. Block t's sorted partner is π(t) = argmax_p P_tp.
    Query i in block t attends the keys of block t and of block π(t) (once if π(t) = t), exact
    softmax, the partner's scores biased by β_t = log(n_k·P_tπ(t)) + g_h (n_k key blocks: 0 for a
    uniform P; g_h a learned gain per head, starting at 0), through which the sorting network
    receives its gradient:

        out_i = Σ_{j ∈ block t ∪ block π(t)} softmax_j(q_i·k_j·s + m_j + β_t[j ∈ block π(t)]) v_j.

    Causal adds j <= i (the partner block is in the past entirely).

    Initialisation: W_q = W_k = I (stored as I + 0.1·Δ, Δ = 0), so the untrained partner is the
    key block whose mean key best matches the block's mean query. Capabilities: masks ``none``,
    ``key``, ``causal``, ``causal+key`` (exact inside the pairs); cross-attention (blocks by
    position on both sides); grouped heads. Parameters: W_q, W_k, g (calibratable). Options:
    ``block_size`` b (default 64), ``sinkhorn_iterations`` n (default 8), ``temperature`` τ
    (default 0.75). Cost: time and memory O(N·2b) for the attention, O((N/b)²) for the block sort.
    """

    name: ClassVar[str] = "sinkhorn"
    Options: ClassVar[type] = SinkhornOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        shape = (site.num_heads, site.head_dim, site.head_dim)
        # W = I + SORT_STEP·Δ with Δ learned from 0: a step of Adam's size on Δ moves the sorting
        # network gently (the partner is an argmax: large steps flip it back and forth).
        self.query_sort = nn.Parameter(torch.zeros(shape))
        self.key_sort = nn.Parameter(torch.zeros(shape))
        self.partner_gain = nn.Parameter(torch.zeros(site.num_heads, 1))

    def partners(
        self, query: Tensor, key: Tensor, mask: Tensor | None, causal: bool, scale: float
    ) -> tuple[Tensor, Tensor]:
        """Partner key block π(t) (B, H, C; -1 = none) and its bias β_t (B, H, C)."""
        block = self.options.block_size
        heads = query.shape[1]
        q_len, k_len = query.shape[2], key.shape[2]
        query_means = _block_means(query.float(), block, None)
        weights = key_weights(mask)
        kept = None if weights is None else (weights > 0).float()
        key_means = _block_means(repeat_kv(key.float(), heads), block, kept)
        eye = torch.eye(query.shape[-1], device=query.device)
        query_sort = eye + SORT_STEP * self.query_sort.float()
        key_sort = eye + SORT_STEP * self.key_sort.float()
        logits = torch.matmul(
            torch.matmul(query_means, query_sort),
            torch.matmul(key_means, key_sort).transpose(-1, -2),
        ) * (scale / self.options.temperature)
        count, key_count = ceil_div(q_len, block), ceil_div(k_len, block)
        allowed = None
        if causal:
            t = torch.arange(count, device=query.device)[:, None]
            p = torch.arange(key_count, device=query.device)[None, :]
            allowed = p < t
            # A large finite value rather than -inf: a row with no earlier block stays finite.
            logits = logits.masked_fill(~allowed, -1e4)
        log_p = logits
        for _ in range(self.options.sinkhorn_iterations):
            log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
            log_p = log_p - torch.logsumexp(log_p, dim=-2, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        if allowed is not None:
            log_p = log_p.masked_fill(~allowed, float("-inf"))
        best, partner = log_p.max(dim=-1)
        has_partner = torch.isfinite(best)
        partner = torch.where(has_partner, partner, torch.full_like(partner, -1))
        key_blocks = torch.full_like(best, 1.0) * key_count
        bias = best + torch.log(key_blocks) + self.partner_gain.float()
        bias = torch.where(has_partner, bias, torch.zeros_like(best))
        return partner, bias

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
        batch, heads, q_len = query.shape[:3]
        k_len = key.shape[2]
        block = self.options.block_size
        partner, bias = self.partners(query, key, mask, causal, scale)
        count = partner.shape[-1]
        own = torch.arange(count, device=query.device).expand_as(partner)
        partners = torch.stack([own, partner], dim=-1).unsqueeze(2)  # (B, H, 1, C, 2)
        partner_bias = torch.stack([torch.zeros_like(bias), bias], dim=-1).unsqueeze(2)
        query_order = torch.arange(q_len, device=query.device).expand(batch, heads, 1, q_len)
        key_order = torch.arange(k_len, device=query.device).expand(batch, heads, 1, k_len)
        return bucketed_attention(
            query, key, value, query_order, key_order, partners, query_chunk=block,
            key_chunk=block, mask=mask, causal=causal, scale=scale, partner_bias=partner_bias,
        )  # fmt: skip


def _block_means(x: Tensor, block: int, kept: Tensor | None) -> Tensor:
    """(B, H, N, d) -> (B, H, ⌈N/b⌉, d) mean of each block's (kept) positions; 0 if none."""
    length = x.shape[2]
    count = ceil_div(length, block)
    positions = torch.arange(count, device=x.device)[:, None] * block + torch.arange(
        block, device=x.device
    )
    inside = positions < length
    index = torch.where(inside, positions, torch.zeros_like(positions))
    weight = inside.to(x.dtype).expand(x.shape[0], x.shape[1], count, block)
    if kept is not None:
        weight = weight * kept[:, :, index]
    gathered = x[:, :, index]  # (B, H, C, b, d)
    total = (gathered * weight.unsqueeze(-1)).sum(dim=-2)
    return total / weight.sum(dim=-1, keepdim=True).clamp_min(1.0)
