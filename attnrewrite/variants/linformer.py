"""Linformer: attention over keys and values projected along the sequence to a fixed length."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import AttentionSite, MaskClass
from attnrewrite.variants.base import AttentionVariant, compute_dtype, key_weights, repeat_kv
from attnrewrite.variants.blockwise import fused_attention

#: Projection length when neither the option nor the site's key length at capture gives one.
DEFAULT_MAX_LEN = 512
#: Largest default projected length k.
DEFAULT_PROJECTED = 256


@dataclasses.dataclass(frozen=True)
class LinformerOptions:
    k: int | None = None
    max_len: int | None = None

    def check(self) -> str | None:
        for name in ("k", "max_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                return f"{name} must be a positive integer, got {value}"
        if self.k is not None and self.max_len is not None and self.k > self.max_len:
            return f"k ({self.k}) cannot exceed max_len ({self.max_len}): nothing to compress"
        return None


def segment_means(rows: int, length: int) -> Tensor:
    """(rows, length) matrix whose row r averages the positions of segment r of ``length``.

    Position p belongs to segment ⌊p·rows/length⌋, so segments differ in size by at most one and
    none is empty when rows <= length.
    """
    segment = torch.arange(length) * rows // length
    member = (segment[None, :] == torch.arange(rows)[:, None]).to(torch.float32)
    return member / member.sum(dim=-1, keepdim=True).clamp_min(1.0)


def leading(table: Tensor, dim: int, length: int) -> Tensor:
    """The first ``length`` entries of ``table`` along ``dim``, as a gather rather than a slice.

    A slice of a parameter is contiguous exactly when it is the whole parameter, so with a symbolic
    length ``torch.export`` guards on "length != max_len" and refuses the full range; a gather has
    no such case (and costs no more than the product that reads it).
    """
    return table.index_select(dim, torch.arange(length, device=table.device))


def pooled_key_bias(pooling: Tensor, weights: Tensor | None) -> Tensor:
    """Additive bias of pooled keys that carries a key-only mask through a pooling along keys.

    For pooled key r = Σ_j P_rj k_j the bias is log(Σ_j |P_rj| w_j) - log(Σ_j |P_rj|): the log of
    the |P_r|-weighted mean key weight (w_j = exp of the mask, 0 where masked). It is exact when P
    is the identity (bias = the mask itself), gives log(fraction kept) for a segment mean that is
    partly padding, and -inf for a pooled key with no kept key behind it (or an all-zero row).

    Args:
        pooling: (R, Nk) pooling matrix.
        weights: (B|1, H|1, Nk) key weights from :func:`~attnrewrite.variants.base.key_weights`,
            or None for no mask.

    Returns:
        (R,) or (B|1, H|1, R) additive bias.
    """
    magnitude = pooling.abs()
    total = magnitude.sum(dim=-1)
    kept = total if weights is None else torch.matmul(weights.to(magnitude.dtype), magnitude.T)
    bias = torch.log(kept.clamp_min(torch.finfo(kept.dtype).tiny)) - torch.log(
        total.clamp_min(torch.finfo(total.dtype).tiny)
    )
    return torch.where(kept > 0, bias, torch.full_like(bias, float("-inf")))


class LinformerAttention(AttentionVariant):
    """Linformer: Wang, Li, Khabsa, Fang, Ma, "Linformer: Self-Attention with Linear Complexity",
    2020, arXiv:2006.04768.

    out = softmax(q (E k)ᵀ·s + b) (F v), with E, F (k x max_len) learned projections along the
    sequence (one pair per rewritten layer, shared by its heads; a sequence of N <= max_len
    positions uses their first N columns).

    Initialisation: row r of E and F averages the positions of segment r (max_len split into k
    near-equal segments), so the untrained rewrite attends over segment means of keys and values:
    a sensible approximation at the capture length, exact when k = N.

    Key mask (class ``key``): masked keys and values are zeroed before the projection and each
    projected key gets the bias b_r = log of the |E_r|-weighted mean key weight
    (:func:`pooled_key_bias`), which is -inf for a projected key with no unmasked key behind it.
    Exact only in the identity case k = N, E = F = I; otherwise it keeps padding out of the
    projected keys and values. Projected keys whose row of E is zero at the current length (trailing
    segments when N < max_len at initialisation) get -inf the same way.

    Capabilities: masks ``none`` and ``key``; not causal (every projected key mixes all positions,
    future ones included), so ``refuse`` rejects causal sites; cross-attention; grouped heads.
    Parameters: E, F. Options: ``k`` (default min(256, max_len)), ``max_len`` (default the site's
    key length at capture if known, else 512; a site known to be longer is refused at construction
    and a longer input fails a shape check). Cost: time O(N·k·d), memory O(N·k).
    """

    name: ClassVar[str] = "linformer"
    mask_classes: ClassVar[frozenset[MaskClass]] = frozenset({MaskClass.NONE, MaskClass.KEY})
    supports_causal: ClassVar[bool] = False
    why_not_causal: ClassVar[str] = (
        "'linformer' is not causal: each projected key and value mixes all positions, "
        "future ones included; use a causal variant (local, linear, performer)"
    )
    Options: ClassVar[type] = LinformerOptions

    @classmethod
    def refuse(cls, site: AttentionSite, options: dict[str, Any] | None = None) -> str | None:
        reason = super().refuse(site, options)
        known_len = site.key_len if isinstance(site.key_len, int) else None
        max_len = (options or {}).get("max_len")
        if reason is None and known_len is not None and max_len and known_len > max_len:
            return (
                f"the site's keys have {known_len} positions but max_len={max_len}; "
                f"pass max_len >= {known_len}"
            )
        return reason

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        known_len = site.key_len if isinstance(site.key_len, int) else None
        self.max_len = self.options.max_len or known_len or DEFAULT_MAX_LEN
        if known_len is not None and known_len > self.max_len:
            raise VariantOptionError(
                f"variant 'linformer': the site's keys have {known_len} positions but "
                f"max_len={self.max_len}; pass max_len >= {known_len}"
            )
        self.projected_len = self.options.k or min(DEFAULT_PROJECTED, self.max_len)
        if self.projected_len > self.max_len:
            raise VariantOptionError(
                f"variant 'linformer': k={self.projected_len} exceeds max_len={self.max_len}; "
                "choose k <= max_len"
            )
        init = segment_means(self.projected_len, self.max_len)
        self.key_projection = nn.Parameter(init.clone())
        self.value_projection = nn.Parameter(init.clone())

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
            raise ValueError("'linformer' is not causal; its refuse() rejects causal sites")
        acc = compute_dtype(query.dtype)
        heads, key_len = query.shape[1], key.shape[-2]
        max_len = self.max_len  # a plain int in the message: Dynamo cannot trace closures over self
        torch._check(
            key_len <= max_len,
            lambda: f"linformer was built for at most max_len={max_len} keys",
        )
        key_proj = leading(self.key_projection, 1, key_len).to(acc)
        value_proj = leading(self.value_projection, 1, key_len).to(acc)
        key, value = key.to(acc), value.to(acc)
        weights = key_weights(mask, acc)
        if weights is not None:
            if weights.shape[1] not in (1, key.shape[1]):
                # A mask per query head over shared key heads: give every query head its keys.
                key, value = repeat_kv(key, heads), repeat_kv(value, heads)
            kept = (weights > 0).to(acc).unsqueeze(-1)
            key, value = key * kept, value * kept
        bias = pooled_key_bias(key_proj, weights)  # (k,) or (B|1, H|1, k)
        key = repeat_kv(torch.matmul(key_proj, key), heads)  # (B, H, k, d)
        value = repeat_kv(torch.matmul(value_proj, value), heads)
        return fused_attention(query.to(acc), key, value, bias.unsqueeze(-2), scale).to(query.dtype)
