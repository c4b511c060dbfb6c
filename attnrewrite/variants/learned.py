"""The base of the learned feature-map variants (``t2r``, ``hedgehog``) and their options.

Both can run pure kernel attention (the default) or, with ``window`` > 0, the LoLCATs hybrid of
:mod:`attnrewrite.variants.hybrid`: exact softmax weights on a block-aligned sliding window (and
optional global tokens), the learned kernel on every other key, and learned gains of the far
part per head, per query and per key. The hybrid is still linear in the sequence length
(O(N·window)).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.site import AttentionSite
from attnrewrite.variants.base import compute_dtype, key_weights
from attnrewrite.variants.hybrid import window_kernel_attention
from attnrewrite.variants.kernel import FeatureMapAttention, KernelOptions


@dataclasses.dataclass(frozen=True)
class LearnedMapOptions(KernelOptions):
    """Options of the learned feature maps (``t2r``, ``hedgehog``)."""

    feature_dim: int | None = None
    #: Block length of the exact sliding window; 0: pure kernel attention.
    window: int = 0
    #: Keys 0 .. global_tokens − 1 exact for every query (with ``window`` only).
    global_tokens: int = 0

    def check(self) -> str | None:
        if self.feature_dim is not None and self.feature_dim <= 0:
            return f"feature_dim must be positive, got {self.feature_dim}"
        if self.window < 0 or self.global_tokens < 0:
            return (f"window and global_tokens must be >= 0, got window={self.window}, "
                    f"global_tokens={self.global_tokens}")
        if self.global_tokens and not self.window:
            return ("global_tokens needs the sliding window: pass window > 0 too "
                    "(e.g. window=32, global_tokens=1)")
        return super().check()


class LearnedMapAttention(FeatureMapAttention):
    """A kernel variant with learned maps, optionally with an exact sliding window.

    With ``window`` > 0 it has three more parameters, the far part's gains (all starting at 0,
    gain 1): ``log_gain`` (H,) per head, ``query_gate`` (H, d) and ``key_gate`` (Hkv, d), for
    log γ_i = log_gain_h + query_gate_h·q_i and log δ_j = key_gate_h·k_j (see
    :mod:`attnrewrite.variants.hybrid`).
    """

    Options: ClassVar[type] = LearnedMapOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        if self.options.window:
            self.log_gain = nn.Parameter(torch.zeros(site.num_heads))
            self.query_gate = nn.Parameter(torch.zeros(site.num_heads, site.head_dim))
            self.key_gate = nn.Parameter(torch.zeros(site.num_kv_heads, site.head_dim))

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
        if not self.options.window:
            return super().forward(query, key, value, mask=mask, causal=causal, scale=scale)
        acc = compute_dtype(query.dtype)
        root = math.sqrt(scale)
        weights = key_weights(mask, acc)
        query_in, key_in = query.to(acc) * root, key.to(acc) * root
        phi_q, phi_k = self.feature_maps(query_in, key_in, weights)
        query_log_gain = torch.einsum("bhnd,hd->bhn", query_in, self.query_gate.to(acc))
        out = window_kernel_attention(
            query, key, value, phi_q, phi_k,
            window=self.options.window,
            global_tokens=self.options.global_tokens,
            query_log_gain=query_log_gain + self.log_gain.to(acc)[:, None],
            key_log_gain=torch.einsum("bhnd,hd->bhn", key_in, self.key_gate.to(acc)),
            key_weights=weights,
            causal=causal,
            scale=scale,
            chunk_size=self.options.chunk_size,
        )
        return out.to(query.dtype)
