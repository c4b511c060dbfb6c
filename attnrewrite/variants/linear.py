"""Linear Transformer attention (Katharopoulos et al. 2020): the kernel core with φ = elu + 1."""

from __future__ import annotations

from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from attnrewrite.variants.kernel import FeatureMapAttention


def elu_feature_map(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 (positive, so the normaliser never vanishes)."""
    return F.elu(x) + 1.0


class LinearAttention(FeatureMapAttention):
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

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        return elu_feature_map(query), elu_feature_map(key)
