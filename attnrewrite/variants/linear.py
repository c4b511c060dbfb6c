"""Linear Transformer attention (Katharopoulos et al. 2020)."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from attnrewrite.variants.base import AttentionVariant, key_weights
from attnrewrite.variants.kernel_core import DEFAULT_CHUNK, kernel_attention


def elu_feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 (positive, so the normaliser never vanishes)."""
    return F.elu(x) + 1.0


@dataclasses.dataclass(frozen=True)
class LinearOptions:
    chunk_size: int = DEFAULT_CHUNK

    def check(self) -> str | None:
        if self.chunk_size <= 0:
            return f"chunk_size must be positive, got {self.chunk_size}"
        return None


class LinearAttention(AttentionVariant):
    """Linear Transformer attention: Katharopoulos, Vyas, Pappas, Fleuret, "Transformers are RNNs:
    Fast Autoregressive Transformers with Linear Attention", ICML 2020, arXiv:2006.16236.

    out_i = φ(q_i)ᵀ Σ_j w_j φ(k_j) v_jᵀ / φ(q_i)ᵀ Σ_j w_j φ(k_j), with φ(x) = elu(x) + 1 applied to
    q·√s and k·√s (s = the site's scale, so how the model spelled the scale does not matter), and
    w_j the key-only mask as per-key weights (exp of an additive value, 0 for -inf or False).

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; causal (chunked prefix form);
    cross-attention; grouped key/value heads. No parameters. Options: ``chunk_size`` (causal chunk).
    Cost: time O(N·d²) non-causal, O(N·(C·d + d²)) causal; memory O(N·d + d²) non-causal,
    O(N·C + d²·N/C) causal.
    """

    name: ClassVar[str] = "linear"
    Options: ClassVar[type] = LinearOptions

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
        root = math.sqrt(scale)
        out = kernel_attention(
            elu_feature_map(query * root),
            elu_feature_map(key * root),
            value,
            key_weights=key_weights(mask),
            causal=causal,
            chunk_size=self.options.chunk_size,
        )
        return out.to(query.dtype)
