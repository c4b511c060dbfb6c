"""Generic kernel attention with a user-given feature map, and the base class of the kernel family.

Every kernel variant (``performer``, ``rfa``, ``cosformer``, ``t2r``, ``hedgehog``) is a
:class:`FeatureMapAttention`: it only says how to map queries and keys to features; the shared
forward scales q and k by √scale, computes in float32 for half inputs, turns a key-only mask into
per-key weights and runs the one core in :mod:`attnrewrite.variants.kernel_core`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, ClassVar

from torch import Tensor, nn

from attnrewrite.site import AttentionSite
from attnrewrite.variants.base import AttentionVariant, compute_dtype, key_bias, key_weights
from attnrewrite.variants.kernel_core import (
    DEFAULT_CHUNK,
    KernelState,
    kernel_attention,
    match_heads,
    step,
)


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Options every kernel variant has."""

    chunk_size: int | None = DEFAULT_CHUNK  # None: from the feature size (default_chunk)

    def check(self) -> str | None:
        if self.chunk_size is not None and self.chunk_size <= 0:
            return f"chunk_size must be positive, got {self.chunk_size}"
        return None


class FeatureMapAttention(AttentionVariant):
    """Base class of kernel variants: out_i = Σ_j w_j φ(q_i)·φ(k_j) v_j / Σ_j w_j φ(q_i)·φ(k_j).

    Subclasses implement :meth:`feature_maps`; ``Options`` must derive from :class:`KernelOptions`.
    """

    Options: ClassVar[type] = KernelOptions
    #: Decoding keeps the constant-size sums S = Σ_j w_j φ(k_j) v_jᵀ and z = Σ_j w_j φ(k_j).
    state_names: ClassVar[tuple[str, ...]] = ("S", "z")

    def decode_refusal(self) -> str | None:
        if type(self).forward is not FeatureMapAttention.forward and not self._plain_forward():
            return f"'{self.name}' with these options has no one-token step"
        return super().decode_refusal()

    def _plain_forward(self) -> bool:
        """Whether ``forward`` is the shared kernel forward for these options (subclasses that
        add terms under some options say when they do not)."""
        return False

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """φ(q·√s) and φ(k·√s).

        Args:
            query: (B, H, Nq, d) already multiplied by √scale, in the compute dtype.
            key: (B, Hkv, Nk, d) likewise.
            weights: the per-key weights (B|1, H|1, Nk) the core will apply, or None; a feature
                map may use them to ignore masked keys when stabilising.

        Returns:
            (B, H, Nq, m) and (B, Hkv, Nk, m) features in the compute dtype.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement feature_maps")

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
        return self._attend(query, key, value, mask, causal, scale)[0]

    def _attend(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        mask: Tensor | None,
        causal: bool,
        scale: float,
    ) -> tuple[Tensor, Tensor]:
        """The output (in ``query``'s dtype) and φ(k) (compute dtype), the features computed
        once."""
        acc = compute_dtype(query.dtype)
        root = math.sqrt(scale)
        weights = key_weights(mask, acc)
        phi_q, phi_k = self.feature_maps(query.to(acc) * root, key.to(acc) * root, weights)
        out = kernel_attention(
            phi_q,
            phi_k,
            value,
            key_weights=weights,
            causal=causal,
            chunk_size=self.options.chunk_size,
        )
        return out.to(query.dtype), phi_k

    # -- decoding: the recurrent form (Katharopoulos et al. 2020, "Transformers are RNNs") ----
    def prefill(self, query, key, value, *, mask=None, causal=False, scale=1.0):
        out, phi_k = FeatureMapAttention._attend(self, query, key, value, mask, causal, scale)
        bias = key_bias(mask, key, phi_k.dtype)
        return out, self._sums(phi_k, value, bias, query.shape[1])

    def step(self, query, key, value, state, *, mask=None, scale=1.0):
        acc = compute_dtype(query.dtype)
        root = math.sqrt(scale)
        # Feature maps that act on each position alone give the same φ(q_t), φ(k_t) here as in
        # the parallel form; the weight exp(bias) of the new key is absolute, as in the sums.
        phi_q, phi_k = self.feature_maps(query.to(acc) * root, key.to(acc) * root, None)
        weight = key_bias(mask, key, acc).exp()[..., 0]
        out, state = step(state, phi_q[:, :, 0], phi_k[:, :, 0], value[:, :, 0].to(acc), weight)
        return out.unsqueeze(2).to(query.dtype), state

    @staticmethod
    def _sums(phi_k: Tensor, value: Tensor, bias: Tensor, heads: int) -> KernelState:
        """S (B, Hs, m, dv) and z (B, Hs, m) over the keys, each weighted by exp(bias)."""
        weights = bias.exp()
        if weights.shape[1] not in (1, phi_k.shape[1]):
            phi_k = match_heads(phi_k, heads)  # weights per query head: one state per head
        phi_k = phi_k * weights.unsqueeze(-1)
        value = match_heads(value.to(phi_k.dtype), phi_k.shape[1])
        return phi_k.transpose(-1, -2) @ value, phi_k.sum(dim=-2)


@dataclasses.dataclass(frozen=True)
class GenericKernelOptions(KernelOptions):
    """Options of ``kernel``: the feature map is required."""

    feature_map: Callable[[Tensor], Tensor] | None = None

    def check(self) -> str | None:
        if self.feature_map is None:
            return (
                "option feature_map is required: pass a callable or nn.Module mapping "
                "(B, H, N, d) to non-negative features (B, H, N, m), e.g. "
                "feature_map=lambda x: torch.nn.functional.elu(x) + 1"
            )
        return super().check()


class KernelAttention(FeatureMapAttention):
    """Kernel attention with any feature map: Tsai, Bai, Yamada, Morency, Salakhutdinov,
    "Transformer Dissection: A Unified Understanding of Transformer's Attention via the Lens of
    Kernel", EMNLP 2019, arXiv:1908.11775; linear-time form from Katharopoulos et al. 2020,
    arXiv:2006.16236.

    out_i = Σ_j w_j φ(q_i)·φ(k_j) v_j / Σ_j w_j φ(q_i)·φ(k_j), with φ the ``feature_map`` option
    applied to q·√s and k·√s (s the site's scale) and w_j the key-only mask as per-key weights.
    φ should be non-negative (the normaliser is clamped at 1e-6, not made positive).

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; causal (chunked prefix form);
    cross-attention; grouped key/value heads. Options: ``feature_map`` (required; a callable, or an
    ``nn.Module`` whose parameters become trainable parameters of the variant and appear in its
    ``state_dict``), ``chunk_size``. Cost with m features: time O(N·m·dv) non-causal,
    O(N·(C·m + m·dv)) causal; memory O(N·m + m·dv) non-causal, O(N·C + m·dv·N/C) causal.
    """

    name: ClassVar[str] = "kernel"
    Options: ClassVar[type] = GenericKernelOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        # Assigning an nn.Module attribute registers it, so its parameters train and are saved.
        self.feature_map = self.options.feature_map

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        return self.feature_map(query), self.feature_map(key)

    def extra_repr(self) -> str:
        # The base repr deep-copies options (dataclasses.asdict); a module prints itself anyway.
        shown = self.feature_map
        if isinstance(shown, nn.Module):
            label = type(shown).__name__
        else:
            label = getattr(shown, "__name__", repr(shown))
        return f"site={self.site.name!r}, feature_map={label}, chunk_size={self.options.chunk_size}"
