"""T2R: a learned ReLU feature map, shared by queries and keys, per key/value head."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.site import AttentionSite
from attnrewrite.variants.learned import LearnedMapAttention, LearnedMapOptions


def per_query_head(weight: Tensor, query_heads: int) -> Tensor:
    """Repeat a per-key/value-head parameter (Hkv, ...) for the query heads (h -> h // group)."""
    return weight.repeat_interleave(query_heads // weight.shape[0], dim=0)


class T2RAttention(LearnedMapAttention):
    """Transformer-to-RNN (T2R): Kasai, Peng, Zhang, Yogatama, Ilharco, Pappas, Mao, Chen, Smith,
    "Finetuning Pretrained Transformers into RNNs", EMNLP 2021, arXiv:2103.13076.

    A_ij = w_j φ_h(q_i)·φ_h(k_j) with the learned feature map φ_h(x) = relu(W_h x + b_h), applied to
    q·√s and k·√s; one (W_h, b_h) per key/value head, shared by the keys and the queries that read
    them (query head h uses key/value head h // (H/Hkv)), as in the paper. Meant to be fine-tuned
    after the rewrite; causal decoding is an RNN with an (m × dv) state.

    Initialisation: W_h with orthonormal rows (columns when m > d) drawn from ``seed`` and b_h = 0:
    the map then preserves norms and angles of q, k in the subspace it spans, so the initial
    kernel is the positive part of a rotated q·k — a sensible start for fine-tuning from softmax
    (the paper initialises randomly; an orthogonal draw has no degenerate or duplicated features).

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; causal; cross-attention;
    grouped key/value heads. Parameters: ``weight`` (Hkv, m, d), ``bias`` (Hkv, m). Options:
    ``feature_dim`` m (default d), ``chunk_size``. Cost: time O(N·m·(d + dv)); memory
    O(N·m + m·dv) non-causal, O(N·(m + C) + m·dv·N/C) causal.

    With ``window`` w > 0 (and optionally ``global_tokens``), the LoLCATs hybrid of
    :mod:`attnrewrite.variants.hybrid`: exact softmax weights within w positions (block-aligned),
    the learned kernel elsewhere, and three more parameters, the far part's gains ``log_gain``
    (H,), ``query_gate`` (H, d) and ``key_gate`` (Hkv, d); time O(N·w·(d + m)).
    """

    name: ClassVar[str] = "t2r"
    Options: ClassVar[type] = LearnedMapOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        features = self.options.feature_dim or site.head_dim
        weight = torch.empty(site.num_kv_heads, features, site.head_dim)
        generator = self.generator()
        for head in weight:
            nn.init.orthogonal_(head, generator=generator)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(site.num_kv_heads, features))

    def _map(self, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        projected = torch.einsum("bhnd,hmd->bhnm", x, weight.to(x.dtype))
        return torch.relu(projected + bias.to(x.dtype)[:, None, :])

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        heads = query.shape[1]
        return (
            self._map(query, per_query_head(self.weight, heads), per_query_head(self.bias, heads)),
            self._map(key, self.weight, self.bias),
        )
