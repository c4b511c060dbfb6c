"""Nyströmformer: softmax attention approximated through segment-mean landmarks."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
from torch import Tensor

from attnrewrite.site import MaskClass
from attnrewrite.variants.base import (
    AttentionVariant,
    additive_mask,
    compute_dtype,
    key_weights,
    repeat_kv,
)
from attnrewrite.variants.blockwise import fused_attention, safe_softmax
from attnrewrite.variants.linformer import pooled_key_bias


@dataclasses.dataclass(frozen=True)
class NystromOptions:
    num_landmarks: int = 64
    pinv_iterations: int = 6

    def check(self) -> str | None:
        if self.num_landmarks < 1:
            return f"num_landmarks must be a positive integer, got {self.num_landmarks}"
        if self.pinv_iterations < 1:
            return f"pinv_iterations must be a positive integer, got {self.pinv_iterations}"
        return None


def segment_membership(rows: int, length: int, device: torch.device) -> Tensor:
    """(rows, length) 0/1 matrix: position p belongs to segment ⌊p·rows/length⌋.

    Computed from indices, so ``length`` may be symbolic; segments are empty only when
    length < rows.
    """
    segment = torch.div(torch.arange(length, device=device) * rows, length, rounding_mode="floor")
    return (segment[None, :] == torch.arange(rows, device=device)[:, None]).to(torch.float32)


def iterative_pinv(matrix: Tensor, iterations: int) -> Tensor:
    """Moore-Penrose pseudo-inverse of each (m, m) matrix by the iteration of Razavi et al. 2014.

    Z₀ = Aᵀ / (‖A‖₁‖A‖∞) and Z ← ¼ Z (13 I - AZ (15 I - AZ (7 I - AZ))), as in Nyströmformer.
    The scaling is per matrix (Nyströmformer's reference code scales by the batch maximum), so
    examples in a batch do not affect each other.
    """
    magnitude = matrix.abs()
    norm_1 = magnitude.sum(dim=-2).amax(dim=-1, keepdim=True)  # max column sum
    norm_inf = magnitude.sum(dim=-1).amax(dim=-1, keepdim=True)  # max row sum
    z = matrix.transpose(-1, -2) / (norm_1 * norm_inf).clamp_min(1e-12).unsqueeze(-1)
    identity = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    for _ in range(iterations):
        az = torch.matmul(matrix, z)
        inner = torch.matmul(az, 7 * identity - az)
        inner = torch.matmul(az, 15 * identity - inner)
        z = 0.25 * torch.matmul(z, 13 * identity - inner)
    return z


class NystromAttention(AttentionVariant):
    """Nyströmformer: Xiong, Zeng, Chakraborty, Tan, Fung, Li, Singh, "Nyströmformer: A
    Nyström-Based Algorithm for Approximating Self-Attention", AAAI 2021, arXiv:2102.03902.

    With m landmarks q̃, k̃ (means of m contiguous segments of the queries and keys):

        out = softmax(q k̃ᵀ·s) · pinv(softmax(q̃ k̃ᵀ·s)) · softmax(q̃ kᵀ·s + m) · v

    where pinv is the iterative Moore-Penrose pseudo-inverse (``pinv_iterations`` steps).

    Key mask (class ``key``): masked keys are left out of the key landmarks (each landmark averages
    its segment's unmasked keys and carries the bias log(fraction unmasked), -inf when its whole
    segment is masked) and the mask is added to the third kernel, so masked keys get weight 0. With
    m = N every landmark is one token and the formula reduces to softmax(q kᵀ·s + m) v up to the
    pseudo-inverse's accuracy. Sequences shorter than m leave some landmarks empty; they are
    dropped rather than averaged over nothing.

    Capabilities: masks ``none`` and ``key``; not causal (landmarks average over the whole
    sequence, future positions included), so ``refuse`` rejects causal sites; cross-attention;
    grouped heads; no parameters. Options: ``num_landmarks`` m (default 64), ``pinv_iterations``
    (default 6). Cost: time O(N·m·d + m³·iterations), memory O(N·m + m²).
    """

    name: ClassVar[str] = "nystrom"
    mask_classes: ClassVar[frozenset[MaskClass]] = frozenset({MaskClass.NONE, MaskClass.KEY})
    supports_causal: ClassVar[bool] = False
    why_not_causal: ClassVar[str] = (
        "'nystrom' is not causal: its landmarks average over the whole sequence, future "
        "positions included; use a causal variant (local, linear, performer)"
    )
    Options: ClassVar[type] = NystromOptions

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
            raise ValueError("'nystrom' is not causal; its refuse() rejects causal sites")
        out_dtype, acc = query.dtype, compute_dtype(query.dtype)
        heads, landmarks = query.shape[1], self.options.num_landmarks
        q_len, k_len = query.shape[-2], key.shape[-2]
        query = query.to(acc)
        key, value = repeat_kv(key.to(acc), heads), repeat_kv(value.to(acc), heads)

        query_members = segment_membership(landmarks, q_len, query.device).to(acc)
        query_count = query_members.sum(dim=-1)
        query_landmarks = torch.matmul(query_members, query) / query_count.clamp_min(1)[:, None]
        # Empty query landmarks (q_len < m) get zero rows in kernels 2 and 3, hence zero columns in
        # the pseudo-inverse: they drop out instead of acting as a spurious zero query.
        query_present = (query_count > 0).to(acc)[:, None]

        key_members = segment_membership(landmarks, k_len, key.device).to(acc)
        weights = key_weights(mask, acc)  # (B|1, H|1, Nk) or None
        kept_members = (
            key_members if weights is None else key_members * (weights > 0).to(acc)[..., None, :]
        )
        kept_count = kept_members.sum(dim=-1, keepdim=True).clamp_min(1)
        key_landmarks = torch.matmul(kept_members, key) / kept_count
        landmark_bias = pooled_key_bias(key_members, weights).unsqueeze(-2)

        landmarks_t = key_landmarks.transpose(-1, -2)
        kernel_2 = safe_softmax(torch.matmul(query_landmarks, landmarks_t) * scale + landmark_bias)
        kernel_2 = kernel_2 * query_present
        # kernel_3 · V and kernel_1 · (pinv(kernel_2) · kernel_3 · V) are softmax attentions of
        # the query landmarks over the keys and of the queries over the key landmarks: fused,
        # neither (m, Nk) nor (Nq, m) weights are held.
        bias_3 = additive_mask(mask, acc)
        mixed = fused_attention(query_landmarks, key, value, bias_3, scale) * query_present
        inverse = iterative_pinv(kernel_2, self.options.pinv_iterations)
        mixed = torch.matmul(inverse, mixed)  # (B, H, m, dv)
        out = fused_attention(query, key_landmarks, mixed, landmark_bias, scale)
        return out.to(out_dtype)
