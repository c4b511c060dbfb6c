"""Hedgehog: learned softmax feature maps trained to mimic softmax attention."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.site import AttentionSite
from attnrewrite.variants.learned import LearnedMapAttention, LearnedMapOptions


class HedgehogAttention(LearnedMapAttention):
    """Hedgehog: Zhang, Bhatia, Kumbong, Ré, "The Hedgehog & the Porcupine: Expressive Linear
    Attentions with Softmax Mimicry", ICLR 2024, arXiv:2402.04347.

    A_ij = w_j φ(q_i)·ψ(k_j) with learned maps φ(x) = softmax([W_h x, −W_h x]) over the 2m
    features, on q·√s and k·√s. The paper's map is exp([Wx, −Wx]) (a spiky, monotone kernel like
    exp(q·k)); the softmax over features is the numerically stable spelling it recommends: for
    queries its normaliser cancels, for keys it is a learned per-key re-weighting. Queries and keys
    have their own maps, as in the paper: ``query_weight`` per query head, ``key_weight`` per
    key/value head; both start at the identity (rectangular when m ≠ d), which makes the initial
    kernel Σ_r e^{q_r + k_r} + e^{−q_r − k_r} up to normalisers, and are meant to be trained
    (attention distillation, then fine-tuning).

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; causal; cross-attention;
    grouped key/value heads. Parameters: ``query_weight`` (H, m, d), ``key_weight`` (Hkv, m, d).
    Options: ``feature_dim`` m (default d; 2m features), ``chunk_size``. Cost: time
    O(N·m·(d + dv)); memory O(N·m + m·dv) non-causal, O(N·(m + C) + m·dv·N/C) causal.

    With ``window`` w > 0 (and optionally ``global_tokens``), the LoLCATs hybrid (Zhang et al.,
    ICLR 2025, arXiv:2410.10254) of :mod:`attnrewrite.variants.hybrid`: exact softmax weights
    within w positions (block-aligned), the Hedgehog kernel elsewhere, and three more parameters,
    the far part's gains ``log_gain`` (H,), ``query_gate`` (H, d) and ``key_gate`` (Hkv, d);
    time O(N·w·(d + m)), still linear in N.
    """

    name: ClassVar[str] = "hedgehog"
    Options: ClassVar[type] = LearnedMapOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        features = self.options.feature_dim or site.head_dim
        identity = torch.eye(features, site.head_dim)
        self.query_weight = nn.Parameter(identity.repeat(site.num_heads, 1, 1))
        self.key_weight = nn.Parameter(identity.repeat(site.num_kv_heads, 1, 1))

    @staticmethod
    def _map(x: Tensor, weight: Tensor) -> Tensor:
        projected = torch.einsum("bhnd,hmd->bhnm", x, weight.to(x.dtype))
        return torch.softmax(torch.cat([projected, -projected], dim=-1), dim=-1)

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        return self._map(query, self.query_weight), self._map(key, self.key_weight)
