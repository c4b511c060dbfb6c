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
import torch.nn.functional as F
from torch import Tensor, nn

from attnrewrite.site import AttentionSite
from attnrewrite.variants.base import (
    AttentionVariant,
    compute_dtype,
    key_bias,
    key_weights,
    repeat_kv,
)
from attnrewrite.variants.blockwise import finite_or_zero
from attnrewrite.variants.hybrid import window_kernel_attention
from attnrewrite.variants.kernel import FeatureMapAttention, KernelOptions
from attnrewrite.variants.kernel_core import match_heads
from attnrewrite.variants.softmax import append_bias


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
            return (
                f"window and global_tokens must be >= 0, got window={self.window}, "
                f"global_tokens={self.global_tokens}"
            )
        if self.global_tokens and not self.window:
            return (
                "global_tokens needs the sliding window: pass window > 0 too "
                "(e.g. window=32, global_tokens=1)"
            )
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

    def _plain_forward(self) -> bool:
        return not self.options.window

    @property
    def state_names(self) -> tuple[str, ...]:  # type: ignore[override]
        if self.options.window:
            # The hybrid: far keys' kernel sums, and the last 2·window keys (the block-aligned
            # exact region of the next query lies within them) with their mask terms and
            # positions.
            return ("S", "z", "keys", "values", "key_bias", "positions")
        return ("S", "z")

    def decode_refusal(self) -> str | None:
        if self.options.global_tokens:
            return (
                f"'{self.name}' with global_tokens={self.options.global_tokens} has no one-token "
                "step yet (the sliding-window hybrid decodes with global_tokens=0)"
            )
        if self.options.window:
            return AttentionVariant.decode_refusal(self)  # the hybrid's own step, below
        return super().decode_refusal()

    def _hybrid_inputs(self, query: Tensor, key: Tensor, scale: float):
        """q·√s, k·√s in the compute dtype, their features, and the far part's log gains."""
        acc = compute_dtype(query.dtype)
        root = math.sqrt(scale)
        query_in, key_in = query.to(acc) * root, key.to(acc) * root
        phi_q, phi_k = self.feature_maps(query_in, key_in, None)
        query_log = torch.einsum("bhnd,hd->bhn", query_in, self.query_gate.to(acc))
        query_log = query_log + self.log_gain.to(acc)[:, None]
        key_log = torch.einsum("bhnd,hd->bhn", key_in, self.key_gate.to(acc))
        return phi_q, phi_k, query_log, key_log

    def prefill(self, query, key, value, *, mask=None, causal=False, scale=1.0):
        if not self.options.window:
            return super().prefill(query, key, value, mask=mask, causal=causal, scale=scale)
        out = self.forward(query, key, value, mask=mask, causal=causal, scale=scale)
        acc = compute_dtype(query.dtype)
        span = 2 * self.options.window
        length = key.shape[-2]
        bias = key_bias(mask, key, acc)
        positions = torch.arange(length, device=key.device)
        _, phi_k, _, key_log = self._hybrid_inputs(query, key, scale)
        # Keys before the last 2·window are far for every later query: their sums.
        far = torch.where(positions < length - span, 0.0, float("-inf")).to(acc)
        sums = self._sums(phi_k, value, _far_bias(bias, key_log, far), query.shape[1])
        keys = F.pad(key, (0, 0, span, 0))[:, :, -span:]
        values = F.pad(value, (0, 0, span, 0))[:, :, -span:]
        recent = F.pad(bias, (span, 0), value=float("-inf"))[..., -span:]
        where = F.pad(positions, (span, 0), value=-1)[-span:].unsqueeze(0)
        return out, (*sums, keys, values, recent, where)

    def step(self, query, key, value, state, *, mask=None, scale=1.0):
        if not self.options.window:
            return super().step(query, key, value, state, mask=mask, scale=scale)
        left_s, left_z, keys, values, bias, positions = state
        acc = compute_dtype(query.dtype)
        w = self.options.window
        heads = query.shape[1]
        now = positions[:, -1:] + 1  # (1, 1) the new key's position
        # The key leaving the buffer is far from every later query: into the sums.
        _, phi_old, _, log_old = self._hybrid_inputs(query, keys[:, :, :1], scale)
        old_bias = _far_bias(bias[..., :1], log_old, torch.zeros(1, dtype=acc, device=key.device))
        add_s, add_z = self._sums(phi_old, values[:, :, :1], old_bias, heads)
        left_s, left_z = _add_sums(left_s, left_z, add_s, add_z)
        keys, values = torch.cat([keys[:, :, 1:], key], 2), torch.cat([values[:, :, 1:], value], 2)
        bias = append_bias(bias[..., 1:], key_bias(mask, key, acc))
        positions = torch.cat([positions[:, 1:], now], dim=1)
        # The exact region of query `now`: from the start of the block before its own.
        start = (torch.div(now, w, rounding_mode="floor") - 1) * w
        exact_here = (positions >= start) & (positions >= 0)  # (1, 2w)
        phi_q, phi_k, query_log, key_log = self._hybrid_inputs(query, keys, scale)
        weights = bias.exp()  # (B, 1|H, 2w)
        scores = query.to(acc) @ repeat_kv(keys.to(acc), heads).transpose(-1, -2) * scale
        allowed = exact_here[:, None, None, :] & (weights.unsqueeze(-2) > 0)
        scores = scores.masked_fill(~allowed, float("-inf"))
        top = finite_or_zero(scores.amax(dim=-1, keepdim=True))
        exact = torch.exp(scores - top) * weights.unsqueeze(-2)  # (B, H, 1, 2w)
        v_rep = repeat_kv(values.to(acc), heads)
        exact_num, exact_den = exact @ v_rep, exact.sum(-1)
        # Far keys still in the buffer, plus the sums of those that left it.
        in_buffer = torch.where(exact_here, float("-inf"), 0.0).to(acc).unsqueeze(1)
        buf_s, buf_z = self._sums(phi_k, values, _far_bias(bias, key_log, in_buffer), heads)
        far_s, far_z = _add_sums(left_s, left_z, buf_s, buf_z)
        q_grouped = phi_q[:, :, 0]  # (B, H, m)
        far_num = _read(q_grouped, far_s)
        far_den = _read(q_grouped, far_z.unsqueeze(-1)).squeeze(-1)
        far_log = query_log[:, :, 0]  # (B, H)
        shift = far_log.clamp_min(0)
        near_factor, far_factor = torch.exp(-shift), torch.exp(far_log - shift)
        num = near_factor.unsqueeze(-1) * exact_num[:, :, 0] + far_factor.unsqueeze(-1) * far_num
        den = near_factor * exact_den[:, :, 0] + far_factor * far_den
        out = num / den.clamp_min(1e-6).unsqueeze(-1)
        return out.unsqueeze(2).to(query.dtype), (left_s, left_z, keys, values, bias, positions)

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
            query,
            key,
            value,
            phi_q,
            phi_k,
            window=self.options.window,
            global_tokens=self.options.global_tokens,
            query_log_gain=query_log_gain + self.log_gain.to(acc)[:, None],
            key_log_gain=torch.einsum("bhnd,hd->bhn", key_in, self.key_gate.to(acc)),
            key_weights=weights,
            causal=causal,
            scale=scale,
            chunk_size=self.options.chunk_size,
            self_attention=not self.site.is_cross,
        )
        return out.to(query.dtype)


def _far_bias(bias: Tensor, key_log: Tensor, extra: Tensor) -> Tensor:
    """log of a far key's weight: its mask term, its learned gain, and ``extra`` (0 or -inf),
    broadcast to (B, H|Hkv, N)."""
    heads = max(bias.shape[1], key_log.shape[1])
    return match_heads(bias, heads) + match_heads(key_log, heads) + extra


def _add_sums(s: Tensor, z: Tensor, add_s: Tensor, add_z: Tensor):
    """S + ΔS and z + Δz, broadcasting their head axes (a state per query head absorbs a state
    per key/value head)."""
    heads = max(s.shape[1], add_s.shape[1])
    return (
        match_heads(s, heads) + match_heads(add_s, heads),
        match_heads(z, heads) + match_heads(add_z, heads),
    )


def _read(phi_q: Tensor, state: Tensor) -> Tensor:
    """φ(q)ᵀ S for (B, H, m) queries and a (B, Hs, m, e) state, H a multiple of Hs."""
    b, h, m = phi_q.shape
    hs = state.shape[1]
    grouped = phi_q.reshape(b, hs, h // hs, m)
    return torch.einsum("bhgm,bhme->bhge", grouped, state).reshape(b, h, -1)
