"""cosFormer: ReLU features with a cosine re-weighting of the distance between positions."""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import Tensor

from attnrewrite.variants.kernel import FeatureMapAttention


class CosFormerAttention(FeatureMapAttention):
    """cosFormer: Qin, Sun, Deng, Li, Wei, Lv, Yan, Kong, Zhong, "cosFormer: Rethinking Softmax in
    Attention", ICLR 2022, arXiv:2202.08791.

    A_ij = w_j relu(q_i)·relu(k_j) cos(π/2 · (i − j)/M), on q·√s and k·√s, positions i, j counted
    from 0 and M = max(Nq, Nk). Since cos(a − b) = cos a cos b + sin a sin b, the re-weighted kernel
    is the plain inner product of the 2d features φ(q_i) = [relu(q_i) cos θ_i, relu(q_i) sin θ_i]
    and φ(k_j) = [relu(k_j) cos θ_j, relu(k_j) sin θ_j], θ_t = π t / 2M — exactly, so one core
    call computes it in linear time. |i − j| < M keeps the weight in (0, 1]: nearby keys weigh
    more, and every term stays non-negative.

    Because M is the full length, a causal prefix's weights depend on how long the sequence will
    be: the recurrent ``kernel_core.step`` form reproduces a causal forward only for a known M.

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; causal; cross-attention
    (positions of each sequence from 0); grouped key/value heads. No parameters. Options:
    ``chunk_size``. Cost: time O(N·d·dv); memory O(N·d + d·dv) non-causal,
    O(N·(d + C) + d·dv·N/C) causal.
    """

    name: ClassVar[str] = "cosformer"
    state_names: ClassVar[tuple[str, ...]] = ()
    why_not_decodable: ClassVar[str] = (
        "reweights every position by cos(π·i / 2M) with M the full length, so a prefix's output "
        "depends on how long the sequence will be (no fixed horizon to decode against)"
    )

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        q_len, k_len = query.shape[-2], key.shape[-2]
        # sym_max keeps M symbolic under torch.export instead of guarding on which length wins.
        longest = torch.sym_max(q_len, k_len)
        return _reweighted(query, longest), _reweighted(key, longest)


def _reweighted(x: Tensor, longest: int) -> Tensor:
    """[relu(x) cos θ, relu(x) sin θ] with θ_t = π t / 2M for x: (B, h, N, d)."""
    positions = torch.arange(x.shape[-2], device=x.device, dtype=x.dtype)
    angle = (positions * (math.pi / 2) / longest).unsqueeze(-1)  # (N, 1)
    base = torch.relu(x)
    return torch.cat([base * angle.cos(), base * angle.sin()], dim=-1)
