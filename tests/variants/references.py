"""Dense O(N²) references of the variants' shared cores, for tests only.

Each is the naive definition written out as an N×N matrix of attention weights: what the linear-time
or blockwise code in :mod:`attnrewrite.variants` must reproduce. They are too costly to ship in
the package (nothing there uses them) and are kept here, next to the tests that compare against
them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnrewrite.variants.blockwise import finite_or_zero
from attnrewrite.variants.kernel_core import match_heads


def dense_kernel_reference(
    phi_q: Tensor,
    phi_k: Tensor,
    value: Tensor,
    *,
    key_weights: Tensor | None = None,
    causal: bool = False,
    eps: float = 1e-6,
    log_decay: Tensor | None = None,
) -> Tensor:
    """The naive O(N²) definition of kernel attention: A_ij = w_j φ(q_i)·φ(k_j).

    With ``log_decay`` (causal only), A_ij is further multiplied by Π_{j<l<=i} g_l = e^{G_i - G_j},
    G the cumulative sum of ``log_decay`` along positions.
    """
    heads = phi_q.shape[1]
    phi_k = phi_k.repeat_interleave(heads // phi_k.shape[1], dim=1)
    value = value.repeat_interleave(heads // value.shape[1], dim=1)
    a = phi_q @ phi_k.transpose(-1, -2)
    if key_weights is not None:
        a = a * match_heads(key_weights, heads).unsqueeze(-2)
    if causal:
        i = torch.arange(a.shape[-2], device=a.device)[:, None]
        j = torch.arange(a.shape[-1], device=a.device)[None, :]
        a = a * (j <= i)
        if log_decay is not None:
            cum = match_heads(log_decay, heads).cumsum(dim=-1)
            # Query i sits at position i; past the last key the decay is 1 (G stays constant).
            cum_q = cum[..., i[:, 0].clamp(max=a.shape[-1] - 1)]
            expo = (cum_q.unsqueeze(-1) - cum.unsqueeze(-2)).masked_fill(j > i, float("-inf"))
            a = a * expo.exp()
    elif log_decay is not None:
        raise ValueError("log_decay needs causal=True")
    return (a @ value) / a.sum(-1, keepdim=True).clamp_min(eps)


def dense_window_kernel_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    phi_q: Tensor,
    phi_k: Tensor,
    *,
    window: int,
    global_tokens: int = 0,
    query_log_gain: Tensor,
    key_log_gain: Tensor | None = None,
    key_weights: Tensor | None = None,
    causal: bool = False,
    scale: float = 1.0,
    eps: float = 1e-6,
) -> Tensor:
    """The naive O(N²) definition of the LoLCATs hybrid,
    :func:`attnrewrite.variants.hybrid.window_kernel_attention`."""
    heads = query.shape[1]
    key, value, phi_k = (
        x.repeat_interleave(heads // x.shape[1], dim=1) for x in (key, value, phi_k)
    )
    i = torch.arange(query.shape[2], device=query.device)[:, None]
    j = torch.arange(key.shape[2], device=query.device)[None, :]
    distance = j // window - i // window
    near = ((distance >= -1) & (distance <= (0 if causal else 1))) | (j < global_tokens)
    allowed = (j <= i) if causal else torch.ones_like(near)
    weights = (
        torch.ones(1, 1, 1, key.shape[2], dtype=query.dtype, device=query.device)
        if key_weights is None
        else match_heads(key_weights, heads).unsqueeze(-2)
    )
    exact = near & allowed & (weights > 0)
    scores = ((query @ key.transpose(-1, -2)) * scale).masked_fill(~exact, float("-inf"))
    top = finite_or_zero(scores.amax(dim=-1, keepdim=True))
    far = (phi_q @ phi_k.transpose(-1, -2)) * query_log_gain.exp().expand(
        *query.shape[:3]
    ).unsqueeze(-1)
    if key_log_gain is not None:
        far = far * key_log_gain.repeat_interleave(
            heads // key_log_gain.shape[1], 1
        ).exp().unsqueeze(-2)
    a = torch.where(near, torch.exp(scores - top), far * (~near & allowed)) * weights
    return (a @ value) / a.sum(-1, keepdim=True).clamp_min(eps)
