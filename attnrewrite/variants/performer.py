"""Performer attention (FAVOR+): positive orthogonal random features for the softmax kernel."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from attnrewrite.site import AttentionSite
from attnrewrite.variants.base import compute_dtype, default_num_features, key_bias, key_weights
from attnrewrite.variants.kernel import FeatureMapAttention, KernelOptions
from attnrewrite.variants.kernel_core import kernel_attention, match_heads, random_projection, step

# Seeds of successive redraws: a large odd step (2^32/φ) keeps the streams of neighbouring seeds
# and neighbouring draws apart.
_REDRAW_STRIDE = 0x9E3779B1


@dataclasses.dataclass(frozen=True)
class PerformerOptions(KernelOptions):
    """Options of ``performer``."""

    num_features: int | None = None
    redraw: bool = False

    def check(self) -> str | None:
        if self.num_features is not None and self.num_features <= 0:
            return f"num_features must be positive, got {self.num_features}"
        return super().check()


class PerformerAttention(FeatureMapAttention):
    """Performer (FAVOR+): Choromanski, Likhosherstov, Dohan, Song, Gane, Sarlos, Hawkins, Davis,
    Mohiuddin, Kaiser, Belanger, Colwell, Weller, "Rethinking Attention with Performers",
    ICLR 2021, arXiv:2009.14794.

    exp(q·k) = E_ω[φ(q)·φ(k)] with positive random features φ(x) = exp(ω_r·x − |x|²/2)/√m,
    r = 1..m, the ω_r orthogonal Gaussian (``kernel_core.random_projection``), applied to q·√s and
    k·√s, so the kernel estimates exp(s·q·k) and the output estimates softmax attention (unbiased
    numerator and denominator). Every feature is positive, so the normaliser is too.

    Stable form: the exponents a_r(q) = ω_r·q − |q|²/2 and b_r(k) likewise are shifted before
    ``exp``. Keys: feature r is shifted by c_r = max_j b_r(k_j) over the (unmasked) keys of a
    (batch, head), and c_r is added to the queries' exponents instead — exact, since
    φ(q)·φ(k) = Σ_r e^{a_r(q) + c_r} e^{b_r(k) − c_r}. Queries: each row is then shifted by its own
    maximum over features, a factor common to the numerator and the denominator of that row. So
    every key feature is at most 1 with a 1 somewhere, the dominant term of each row is exactly 1,
    and only terms below e^-87 of it underflow: float16/bfloat16 inputs (computed in float32) with
    |q|, |k| ~ 30 stay finite and, non-causal, accurate. (One shift per head — a max over keys and
    features — also cancels, but loses a row whenever its features and the keys' peak in different
    features.) Causal caveat: the shifts are taken over the whole sequence, so for very large norms
    an early query whose keys are all far below the later maxima can underflow to the clamped
    normaliser (finite, inaccurate); at |x·√s| of a few units this does not arise. Keys the mask
    removes do not take part in the maxima, so padding vectors of any size cannot underflow the
    real keys. The shifts carry no gradient: the function does not depend on them.

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; causal; cross-attention;
    grouped key/value heads (one projection shared by all heads). Options: ``num_features`` m
    (default d·ln d, see ``default_num_features``: 266 for d = 64, where the error against
    exact softmax is ‖error‖/‖exact‖ ≈ 0.16 at |q·√s| ≈ 1, against 0.24 at 64 features and 0.07 at
    1024 (BENCHMARKS.md); at that count, on one CPU thread, it is faster than SDPA from 1K
    tokens on under torch.compile and from 4K (not yet at 1K) eager: the peer table of
    BENCHMARKS.md), ``redraw`` (draw a new projection at every
    forward in training mode; eval mode always uses the stored one), ``chunk_size``. The projection
    is a buffer: saved in ``state_dict``, exported as an initializer, reproducible from ``seed``.
    Cost: time O(N·m·(d + dv)); memory O(N·m + m·dv) non-causal, O(N·(m + C) + m·dv·N/C) causal.
    """

    name: ClassVar[str] = "performer"
    Options: ClassVar[type] = PerformerOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        self.num_features = self.options.num_features or default_num_features(site.head_dim)
        self._draws = 0
        self.register_buffer("projection", self._draw(self.generator()))

    def _draw(self, generator: torch.Generator) -> Tensor:
        return random_projection(self.num_features, self.site.head_dim, generator=generator)

    @torch.no_grad()
    def redraw_projection(self) -> None:
        """Replace the projection by a new draw, seeded from ``seed`` and the number of draws."""
        self._draws += 1
        generator = torch.Generator()
        base = 0 if self.seed is None else int(self.seed)
        generator.manual_seed((base + self._draws * _REDRAW_STRIDE) % (2**63))
        self.projection.copy_(self._draw(generator))

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        phi_q, phi_k, _ = self._stabilised(query, key, weights)
        return phi_q, phi_k

    def _stabilised(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """φ(q), φ(k) and the per-feature key shift c (B, Hkv, 1, m) they were stabilised with."""
        if self.training and self.options.redraw:
            self.redraw_projection()
        q_log, k_log = self._logs(query), self._logs(key)
        # Per-feature key maxima move to the query side (see the class docstring).
        k_shift = _key_maximum(k_log.detach(), weights)  # (B, Hkv, 1, m)
        q_log = q_log + k_shift.repeat_interleave(query.shape[1] // key.shape[1], dim=1)
        q_shift = q_log.detach().amax(dim=-1, keepdim=True)
        root_m = math.sqrt(self.num_features)
        return (q_log - q_shift).exp() / root_m, (k_log - k_shift).exp() / root_m, k_shift

    # -- decoding --------------------------------------------------------------------------------
    # The stabiliser c_r (per-feature key maximum) is part of the state: a new key raises it to
    # c' = max(c, b(k_t)) and the sums are rescaled by exp(c - c'), which is the same function
    # (every key feature carries the same shift), so no feature ever exceeds 1.
    state_names: ClassVar[tuple[str, ...]] = ("S", "z", "key_shift")

    def _logs(self, x: Tensor) -> Tensor:
        projection = self.projection.to(x.dtype)
        return x @ projection.T - x.square().sum(-1, keepdim=True) / 2

    def prefill(self, query, key, value, *, mask=None, causal=False, scale=1.0):
        acc = compute_dtype(query.dtype)
        root = math.sqrt(scale)
        weights = key_weights(mask, acc)
        phi_q, phi_k, shift = self._stabilised(query.to(acc) * root, key.to(acc) * root, weights)
        out = kernel_attention(
            phi_q,
            phi_k,
            value,
            key_weights=weights,
            causal=causal,
            chunk_size=self.options.chunk_size,
        )
        sums = self._sums(phi_k, value, key_bias(mask, key, acc), query.shape[1])
        return out.to(query.dtype), (*sums, shift.squeeze(2))

    def step(self, query, key, value, state, *, mask=None, scale=1.0):
        acc_state, acc_norm, shift = state
        acc = compute_dtype(query.dtype)
        root = math.sqrt(scale)
        k_log = self._logs(key.to(acc)[:, :, 0] * root)  # (B, Hkv, m)
        new_shift = torch.maximum(shift, k_log)
        rescale = (shift - new_shift).exp()
        acc_state = acc_state * match_heads(rescale, acc_state.shape[1]).unsqueeze(-1)
        acc_norm = acc_norm * match_heads(rescale, acc_norm.shape[1])
        root_m = math.sqrt(self.num_features)
        phi_k = (k_log - new_shift).exp() / root_m
        q_log = self._logs(query.to(acc)[:, :, 0] * root) + match_heads(new_shift, query.shape[1])
        phi_q = (q_log - q_log.amax(dim=-1, keepdim=True)).exp() / root_m
        weight = key_bias(mask, key, acc).exp()[..., 0]
        out, (acc_state, acc_norm) = step(
            (acc_state, acc_norm), phi_q, phi_k, value[:, :, 0].to(acc), weight
        )
        return out.unsqueeze(2).to(query.dtype), (acc_state, acc_norm, new_shift)


def _key_maximum(k_log: Tensor, weights: Tensor | None) -> Tensor:
    """Per-feature maximum of the key log-features over the keys: (B, Hkv, 1, m).

    Masked keys (weight 0) are left out. A fully masked (batch, head) falls back to 0 (its
    features are multiplied by zero weights anyway).
    """
    if weights is not None:
        batch, kv_heads = k_log.shape[0], k_log.shape[1]
        masked = weights <= 0
        if masked.shape[1] not in (1, kv_heads):
            # Per-query-head weights with grouped keys: a key is out only if every head drops it.
            masked = masked.reshape(masked.shape[0], kv_heads, -1, masked.shape[-1]).all(dim=2)
        masked = masked.expand(batch, kv_heads, -1).unsqueeze(-1)
        k_log = k_log.masked_fill(masked, float("-inf"))
    top = k_log.amax(dim=-2, keepdim=True)
    return torch.where(torch.isfinite(top), top, torch.zeros_like(top))
