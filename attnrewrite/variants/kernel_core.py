"""The shared core of kernel (feature-map) attention.

With a feature map φ, attention becomes a kernel smoother (Tsai et al. 2019, arXiv:1908.11775):

    out_i = Σ_j w_j φ(q_i)·φ(k_j) v_j / Σ_j w_j φ(q_i)·φ(k_j)

where w_j are per-key weights (the exact form of a key-only mask, 0 for masked keys). Non-causal
attention is computed as φ(Q) (Σ_j w_j φ(k_j) v_jᵀ): O(N·m·dv) time and O(m·dv) state. Causal
attention (j <= i) is computed in chunks of C positions: the exact masked product inside a chunk
plus a prefix state carried from the previous chunks, as an exclusive cumulative sum over chunk
states: time O(N·C·m + N·m·dv), memory O(N·C + (N/C)·m·dv) — never an O(N·m·dv) per-position
cumsum and no Python loop over positions, so it exports to ONNX and compiles without graph breaks.
Sequence lengths may be symbolic (``torch.export`` with a dynamic length): nothing converts a
length to a Python int or branches on tensor values.

Causal attention may also carry a per-position decay g_t = exp(log_decay_t) ∈ (0, 1] (gated
recency, as in RFA-Gate): the state obeys S_t = g_t S_{t-1} + w_t φ(k_t) v_tᵀ, so key j reaches
query i with the factor Π_{j<l<=i} g_l. The chunked form applies the decays inside a chunk as a
(C, C) matrix and between chunks as a (N/C, N/C) matrix, both built from differences of cumulative
log-decays that are never positive, so nothing overflows however long the sequence.

The same arithmetic is available one position at a time (:func:`init_state`, :func:`step`) for
autoregressive decoding; applying ``step`` along a sequence reproduces the causal parallel output.

All accumulation happens in float32 for float16/bfloat16 inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnrewrite.variants.base import compute_dtype

#: ``chunk_size=None``: the chunk follows the feature size (:func:`default_chunk`).
DEFAULT_CHUNK = None


def default_chunk(features: int) -> int:
    """The causal chunk for m features: m rounded up to a power of two, within [32, 128].

    Measured under Inductor on one CPU thread at N = 4096 with m = dv (BENCHMARKS.md, issue 15):
    the fastest chunk was 32 for m = 32, 64 for m = 64, and 64 or 128 (equal) for m = 128. A
    larger chunk spends more on the exact products inside it (O(N·C·(m + dv))), a smaller one
    more on the carried states (O(N/C · m·dv) summed and read per chunk).
    """
    return min(max(32, 1 << (features - 1).bit_length()), 128)


#: The recurrent state of causal kernel attention: S (B, Hs, m, dv) and z (B, Hs, m).
KernelState = tuple[Tensor, Tensor]


def _group(x: Tensor, kv_heads: int) -> Tensor:
    """(B, H, ...) -> (B, Hkv, G, ...): query heads grouped by the key/value head they read."""
    b, h = x.shape[0], x.shape[1]
    return x.reshape(b, kv_heads, h // kv_heads, *x.shape[2:])


def match_heads(x: Tensor, heads: int) -> Tensor:
    """Repeat a per-head tensor (B, h, ...) along dim 1 to ``heads`` heads (h = 1 broadcasts).

    Head g of ``x`` serves heads g·r .. g·r + r − 1 with r = heads // h, as grouped key/value
    heads do; a tensor with 1 or ``heads`` heads is returned as it is.
    """
    if x.shape[1] in (1, heads):
        return x
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def _weighted_keys(phi_k: Tensor, weights: Tensor | None, heads: int) -> tuple[Tensor, int]:
    """Fold per-key weights into φ(k). Returns (B, Hkv', Nk, m) and Hkv' (heads of the result)."""
    if weights is None:
        return phi_k, phi_k.shape[1]
    w = weights.to(phi_k.dtype)
    if w.shape[1] not in (1, phi_k.shape[1]):
        # Weights per query head with grouped keys: give every query head its own keys.
        phi_k = phi_k.repeat_interleave(heads // phi_k.shape[1], dim=1)
    return phi_k * w.unsqueeze(-1), phi_k.shape[1]


def kernel_attention(
    phi_q: Tensor,
    phi_k: Tensor,
    value: Tensor,
    *,
    key_weights: Tensor | None = None,
    causal: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK,
    eps: float = 1e-6,
    log_decay: Tensor | None = None,
) -> Tensor:
    """Kernel attention on feature-mapped queries and keys.

    Args:
        phi_q: (B, H, Nq, m) query features.
        phi_k: (B, Hkv, Nk, m) key features, H % Hkv == 0.
        value: (B, Hkv, Nk, dv).
        key_weights: (B|1, 1|Hkv|H, Nk) non-negative per-key weights, or None.
        causal: restrict key j to j <= i.
        chunk_size: causal chunk length C; None picks :func:`default_chunk` of m.
        eps: the normaliser is clamped to at least ``eps``.
        log_decay: (B|1, 1|Hkv|H, Nk) log of the per-position decay g_t (<= 0), causal only.

    Returns:
        (B, H, Nq, dv) in float32 for half inputs, else the input dtype.

    Raises:
        ValueError: ``log_decay`` without ``causal`` (a decay needs an order of positions).
    """
    num, den = kernel_sums(
        phi_q,
        phi_k,
        value,
        key_weights=key_weights,
        causal=causal,
        chunk_size=chunk_size,
        log_decay=log_decay,
    )
    return num / den.clamp_min(eps).unsqueeze(-1)


def kernel_sums(
    phi_q: Tensor,
    phi_k: Tensor,
    value: Tensor,
    *,
    key_weights: Tensor | None = None,
    causal: bool = False,
    chunk_size: int | None = DEFAULT_CHUNK,
    log_decay: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The numerator Σ_j A_ij v_j (B, H, Nq, dv) and normaliser Σ_j A_ij (B, H, Nq) of
    :func:`kernel_attention` (same arguments), before the division: for variants that add other
    terms to both (a sliding window of exact scores, see :mod:`attnrewrite.variants.hybrid`).
    """
    if log_decay is not None and not causal:
        raise ValueError("log_decay (gated recency) needs causal=True: it decays along positions")
    acc = compute_dtype(phi_q.dtype)
    phi_q, phi_k, value = phi_q.to(acc), phi_k.to(acc), value.to(acc)
    heads = phi_q.shape[1]
    phi_k, kv_heads = _weighted_keys(phi_k, key_weights, heads)
    if value.shape[1] != kv_heads:
        value = value.repeat_interleave(kv_heads // value.shape[1], dim=1)
    q = _group(phi_q, kv_heads)  # (B, Hkv, G, Nq, m)
    if not causal:
        num, den = _non_causal(q, phi_k, value)
    else:
        if log_decay is not None:
            log_decay = match_heads(log_decay.to(acc), kv_heads)
        chunk = default_chunk(phi_q.shape[-1]) if chunk_size is None else chunk_size
        num, den = _causal_chunked(q, phi_k, value, chunk, log_decay)
    return num.flatten(1, 2), den.flatten(1, 2)


def _non_causal(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """q: (B, Hkv, G, Nq, m); k: (B, Hkv, Nk, m); v: (B, Hkv, Nk, dv) -> numerator
    (B, Hkv, G, Nq, dv) and normaliser (B, Hkv, G, Nq)."""
    b, h, g, q_len, m = q.shape
    q = q.reshape(b, h, g * q_len, m)  # the group's queries share their key/value head's state
    state = torch.matmul(k.transpose(-1, -2), v)  # (B, Hkv, m, dv)
    # The normaliser as a product and a sum, not a matmul with an (m, 1) vector nor an extra
    # ones column on V (a copy of V): Inductor fuses the query side into the kernel that divides,
    # leaving one extra read of φ(K) for Σ_j φ(k_j).
    norm = k.sum(dim=-2)  # (B, Hkv, m)
    den = (q * norm.unsqueeze(-2)).sum(dim=-1)
    num = torch.matmul(q, state)
    return num.reshape(b, h, g, q_len, v.shape[-1]), den.reshape(b, h, g, q_len)


def _causal_chunked(
    q: Tensor, k: Tensor, v: Tensor, chunk: int, log_decay: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Causal kernel attention, chunked: numerator (B, Hkv, G, Nq, dv) and normaliser
    (B, Hkv, G, Nq).

    q: (B, Hkv, G, Nq, m); k: (B, Hkv, Nk, m); v: (B, Hkv, Nk, dv); log_decay: (B|1, Hkv|1, Nk).
    """
    q_len, k_len = q.shape[-2], k.shape[-2]
    length = max(q_len, k_len) if isinstance(q_len, int) and isinstance(k_len, int) else q_len
    # Pad both sequences to a multiple of the chunk; padded keys have zero features (no weight).
    # At least two chunks: with a symbolic length that could give one chunk, torch.export would
    # specialise on whether the chunk axis has size 1. sym_max also keeps "padded = C# · C" a
    # product its solver can divide (C# + 1 would be expanded to C·C# + C, which it cannot).
    padded = torch.sym_max((length + chunk - 1) // chunk, 2) * chunk
    b, h, g, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    # Everything below is a batch of (C#·B·Hkv) chunk problems multiplied with bmm, chunk axis
    # first. Shapes change only by splitting an axis (unflatten, the symbolic part left to -1)
    # or merging axes that start with the symbolic one (flatten), and crops are negative pads:
    # torch.export's solver cannot prove the divisibility facts that other orders or general
    # reshapes, batched einsum or slicing ask about a symbolic length, and would specialise it.
    if log_decay is None:
        return _plain_chunked(q, k, v, chunk, padded)
    qc = chunk_first(F.pad(q, (0, 0, 0, padded - q_len)), chunk)  # (C#, B, Hkv, G, C, m)
    qc = qc.flatten(3, 4).flatten(0, 2)  # (C#·B·Hkv, G·C, m): the chunk's queries of one group
    kc = chunk_first(F.pad(k, (0, 0, 0, padded - k_len)), chunk).flatten(0, 2)
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = torch.bmm(qc, kc.transpose(1, 2)).unflatten(1, (g, chunk))
    # The normaliser rides along as an extra value column of ones.
    ones = torch.ones_like(v[..., :1])
    vc = F.pad(torch.cat([v, ones], dim=-1), (0, 0, 0, padded - k_len))
    vc = chunk_first(vc, chunk).flatten(0, 2)  # (C#·B·Hkv, C, dv+1)
    log_decay = F.pad(log_decay, (0, padded - k_len)).expand(b, h, -1)
    carried, decay = _decayed_prefix(qc, kc, vc, log_decay, keep, (b * h, g, chunk))
    scores = scores * decay.unsqueeze(1)
    out = carried + torch.bmm(scores.flatten(1, 2), vc)  # (C#·B·Hkv, G·C, dv+1)
    out = unchunk_queries(q_len, padded, b, h, g, chunk)(out)
    return out[..., :dv], out[..., dv]


def _plain_chunked(q: Tensor, k: Tensor, v: Tensor, chunk: int, padded) -> tuple[Tensor, Tensor]:
    """Causal kernel attention without decay, chunked (the common case).

    q: (B, Hkv, G, Nq, m); k: (B, Hkv, Nk, m); v: (B, Hkv, Nk, dv). With static lengths the
    chunks stay where they are in memory: (B, Hkv, P, ·) is viewed as a batch of (B·Hkv·C#)
    chunk problems, so keys, values and (without grouped heads) queries and outputs are never
    copied into another layout, and the chunk states are summed along their chunk axis. With a
    symbolic length (torch.export) the chunk axis goes first, (C#·B·Hkv): the exporter's solver
    proves the divisibility facts of that order only (see :func:`_causal_chunked`).
    """
    q_len = q.shape[-2]
    b, h, g = q.shape[0], q.shape[1], q.shape[2]
    q, k, v = (F.pad(x, (0, 0, 0, padded - x.shape[-2])) for x in (q, k, v))
    if isinstance(padded, int):
        qc = q.unflatten(3, (-1, chunk)).transpose(2, 3)  # (B, Hkv, C#, G, C, m)
        qc = qc.flatten(3, 4).flatten(0, 2)  # (B·Hkv·C#, G·C, m); a view if G = 1
        kc, vc = (x.unflatten(2, (-1, chunk)).flatten(0, 2) for x in (k, v))
        per_head, chunk_axis = (b * h, -1), 1

        def unchunk(x: Tensor) -> Tensor:
            x = x.unflatten(0, (b, h, -1)).unflatten(3, (g, chunk)).transpose(2, 3)
            return F.pad(x.flatten(3, 4), (0, 0, 0, q_len - padded))
    else:
        qc = chunk_first(q, chunk).flatten(3, 4).flatten(0, 2)  # (C#·B·Hkv, G·C, m)
        kc, vc = (chunk_first(x, chunk).flatten(0, 2) for x in (k, v))
        per_head, chunk_axis = (-1, b * h), 0
        unchunk = unchunk_queries(q_len, padded, b, h, g, chunk)
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    scores = torch.bmm(qc, kc.transpose(1, 2)).unflatten(1, (g, chunk))
    scores = (scores * keep.to(scores.dtype)).flatten(1, 2)  # (·, G·C, C)
    # Per chunk, the state Kᵀ V and the key sum Σ φ(k) (the normaliser's state), kept apart: a
    # ones column on V would make every product dv + 1 wide, a size matmul kernels handle far
    # worse than dv. The state carried into a chunk sums the states of the chunks before it.
    chunk_state = torch.bmm(kc.transpose(1, 2), vc).unflatten(0, per_head)
    chunk_norm = kc.sum(dim=1).unflatten(0, per_head)
    prefix = exclusive_prefix_sum(chunk_state, chunk_axis).flatten(0, 1)  # (·, m, dv)
    prefix_norm = exclusive_prefix_sum(chunk_norm, chunk_axis).flatten(0, 1)
    # Earlier chunks through the carried state, then the exact lower-triangular product inside
    # the chunk.
    num = torch.baddbmm(torch.bmm(qc, prefix), scores, vc)  # (·, G·C, dv)
    den = (qc * prefix_norm.unsqueeze(1)).sum(dim=-1) + scores.sum(dim=-1)
    return unchunk(num), unchunk(den.unsqueeze(-1)).squeeze(-1)


def unchunk_queries(q_len, padded: int, b: int, h: int, g: int, chunk: int):
    """(C#·B·Hkv, G·C, e) -> (B, Hkv, G, Nq, e): the chunked queries back in sequence order, the
    padding cropped (a negative pad)."""

    def unchunk(x: Tensor) -> Tensor:
        x = x.unflatten(0, (-1, b, h)).unflatten(3, (g, chunk)).permute(1, 2, 3, 0, 4, 5)
        return F.pad(x.flatten(3, 4), (0, 0, 0, q_len - padded))

    return unchunk


def exclusive_prefix_sum(x: Tensor, dim: int = 0) -> Tensor:
    """Σ_{c' < c} x[c'] along ``dim`` (zero at c = 0): the states carried into each chunk.

    One call of the op ``attnrewrite::exclusive_prefix_sum``, whose kernel adds one slice at a
    time into a preallocated output: a memory-bound pass at the speed of a copy. ``aten.cumsum``
    along a leading axis (Inductor has no CPU lowering for scans and calls it) takes about five
    times as long on these shapes, the largest cost of causal kernel attention after the
    products. For ONNX the op decomposes into ``cumsum`` (:data:`DECOMPOSITIONS`)."""
    return torch.ops.attnrewrite.exclusive_prefix_sum(x, dim % x.dim())


def _prefix_sum_decomposition(x: Tensor, dim: int) -> Tensor:
    """The op in ``aten`` terms: the inclusive sum shifted by one (pad one in front, crop one at
    the end), which avoids the cancellation of cumsum − self."""
    pad = [0, 0] * (x.dim() - 1 - dim) + [1, -1]
    return F.pad(x.cumsum(dim=dim), pad)


@torch.library.custom_op("attnrewrite::exclusive_prefix_sum", mutates_args=())
def _prefix_sum_kernel(x: Tensor, dim: int) -> Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[dim] == 0:
        return out
    out.select(dim, 0).zero_()
    for c in range(1, x.shape[dim]):
        torch.add(out.select(dim, c - 1), x.select(dim, c - 1), out=out.select(dim, c))
    return out


@_prefix_sum_kernel.register_fake
def _prefix_sum_fake(x: Tensor, dim: int) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _prefix_sum_setup(ctx, inputs, output) -> None:
    ctx.dim = inputs[1]


def _prefix_sum_backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
    # out[c] = Σ_{c' < c} x[c'], so dx[c] = Σ_{c > c'} grad[c]: the same sum from the other end.
    return exclusive_prefix_sum(grad.flip(ctx.dim), ctx.dim).flip(ctx.dim), None


_prefix_sum_kernel.register_autograd(_prefix_sum_backward, setup_context=_prefix_sum_setup)

#: Decompositions of this module's ops into ``aten``, for exporters (see ``attnrewrite.ops``).
DECOMPOSITIONS = {torch.ops.attnrewrite.exclusive_prefix_sum.default: _prefix_sum_decomposition}


def chunk_first(x: Tensor, chunk: int) -> Tensor:
    """(B, Hkv, [G,] P, d) -> (P/C, B, Hkv, [G,] C, d), contiguous."""
    x = x.unflatten(-2, (-1, chunk))
    order = (x.dim() - 3, *range(x.dim() - 3), x.dim() - 2, x.dim() - 1)
    return x.permute(order).contiguous()


def _decayed_prefix(
    qc: Tensor, kc: Tensor, vc: Tensor, log_decay: Tensor, keep: Tensor, dims: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """Decayed causal attention: what earlier chunks contribute, and the decay inside a chunk.

    qc: (C#·B·Hkv, G·C, m); kc: (C#·B·Hkv, C, m); vc: (C#·B·Hkv, C, dv+1) with the ones column;
    log_decay: (B, Hkv, P) padded with zeros (g = 1: padded positions come after every real one).
    Returns the carried numerator/denominator (C#·B·Hkv, G·C, dv+1) and the within-chunk decay
    (C#·B·Hkv, C, C), zero above the diagonal.
    """
    heads, g, chunk = dims  # heads = B·Hkv
    local = chunk_first(log_decay.unsqueeze(-1), chunk).squeeze(-1).flatten(1, 2)
    local = local.cumsum(dim=-1)  # (C#, B·Hkv, C): G_a, the log-decay from the chunk start to a
    total = local[..., -1]  # log-decay across a whole chunk
    # exp(G_a - G_b) for b <= a; differences are <= 0, masked to -inf above the diagonal *before*
    # the exp so no inf (and no inf·0 = nan in the backward pass) ever appears.
    within = (local.unsqueeze(-1) - local.unsqueeze(-2)).masked_fill(~keep, float("-inf"))
    within = within.exp().flatten(0, 1)
    # Each chunk's state as seen at its end: keys decayed by exp(G_end - G_b) <= 1.
    to_end = (total.unsqueeze(-1) - local).exp().flatten(0, 1).unsqueeze(-1)
    chunk_state = torch.bmm((kc * to_end).transpose(1, 2), vc)  # (C#·B·Hkv, m, dv+1)
    state_shape = chunk_state.shape[1:]
    chunk_state = chunk_state.unflatten(0, (-1, heads)).flatten(2).transpose(0, 1)
    # Chunk c' reaches the start of chunk c > c' decayed by the chunks strictly between them:
    # exp(U_{c-1} - U_{c'}) with U the inclusive cumsum of chunk totals; (B·Hkv, C#, C#).
    cum = total.cumsum(dim=0).T
    before = (cum - total.T).unsqueeze(-1) - cum.unsqueeze(-2)
    n_chunks = before.shape[-1]
    earlier = torch.ones(n_chunks, n_chunks, dtype=torch.bool, device=kc.device).tril(-1)
    carry = before.masked_fill(~earlier, float("-inf")).exp()
    prefix = torch.bmm(carry, chunk_state).transpose(0, 1).contiguous()  # (C#, B·Hkv, ...)
    prefix = prefix.flatten(0, 1).unflatten(-1, state_shape)
    # From the chunk start to position a the carried state decays by exp(G_a).
    into = local.exp().flatten(0, 1)[:, None, :, None]
    carried = torch.bmm(qc, prefix).unflatten(1, (g, chunk)) * into
    return carried.flatten(1, 2), within


def init_state(
    batch: int,
    heads: int,
    feature_dim: int,
    value_dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> KernelState:
    """The empty recurrent state (S, z) of causal kernel attention, for :func:`step`.

    Args:
        batch: B.
        heads: state heads Hs: the key/value heads Hkv, or the query heads H when key weights
            differ per query head while keys are grouped (each query head then sums its own keys).
        feature_dim: m, the feature size of φ.
        value_dim: dv.
        dtype: dtype of the inputs; half precision is accumulated in float32.
        device: where the state lives.

    Returns:
        S: zeros (B, Hs, m, dv) and z: zeros (B, Hs, m).
    """
    acc = compute_dtype(dtype)
    return (
        torch.zeros(batch, heads, feature_dim, value_dim, dtype=acc, device=device),
        torch.zeros(batch, heads, feature_dim, dtype=acc, device=device),
    )


def step(
    state: KernelState,
    phi_q_t: Tensor,
    phi_k_t: Tensor,
    v_t: Tensor,
    key_weight_t: Tensor | None = None,
    *,
    log_decay_t: Tensor | None = None,
    eps: float = 1e-6,
) -> tuple[Tensor, KernelState]:
    """One position of causal kernel attention: add key t to the state, then read query t.

    S_t = g_t S_{t-1} + w_t φ(k_t) v_tᵀ, z_t = g_t z_{t-1} + w_t φ(k_t),
    out_t = φ(q_t)ᵀ S_t / max(φ(q_t)ᵀ z_t, eps), with g_t = exp(log_decay_t) (1 without decay).
    Applied along a sequence it equals :func:`kernel_attention` with ``causal=True``.

    Args:
        state: (S (B, Hs, m, dv), z (B, Hs, m)) from :func:`init_state` or the previous step.
        phi_q_t: (B, H, m) query features at position t.
        phi_k_t: (B, Hkv, m) key features at position t (Hs % Hkv == 0).
        v_t: (B, Hkv, dv) value at position t.
        key_weight_t: (B|1, 1|Hkv|Hs) weight of key t, or None.
        log_decay_t: (B|1, 1|Hkv|Hs) log of the decay g_t applied to the state before key t,
            or None.
        eps: the normaliser is clamped to at least ``eps``.

    Returns:
        out_t (B, H, dv) in the state's dtype, and the new state.
    """
    acc_state, acc_norm = state
    acc = acc_state.dtype
    state_heads = acc_state.shape[1]
    phi_k_t = match_heads(phi_k_t.to(acc), state_heads)
    v_t = match_heads(v_t.to(acc), state_heads)
    if key_weight_t is not None:
        phi_k_t = phi_k_t * match_heads(key_weight_t.to(acc), state_heads).unsqueeze(-1)
    if log_decay_t is not None:
        decay = match_heads(log_decay_t.to(acc), state_heads).exp().unsqueeze(-1)  # (B|1, 1|Hs, 1)
        acc_state = acc_state * decay.unsqueeze(-1)
        acc_norm = acc_norm * decay
    acc_state = acc_state + phi_k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
    acc_norm = acc_norm + phi_k_t
    q = _group(phi_q_t.to(acc), state_heads)  # (B, Hs, G, m)
    num = torch.einsum("bhgm,bhmd->bhgd", q, acc_state)
    den = torch.einsum("bhgm,bhm->bhg", q, acc_norm)
    out = num / den.clamp_min(eps).unsqueeze(-1)
    return out.flatten(1, 2), (acc_state, acc_norm)


def random_projection(
    num_features: int,
    dim: int,
    *,
    generator: torch.Generator,
    orthogonal: bool = True,
) -> Tensor:
    """Gaussian random features ω_1..ω_m ~ N(0, I_d) as rows of an (m, d) float32 matrix.

    With ``orthogonal`` the rows come in blocks of d mutually orthogonal directions (QR of a
    Gaussian matrix) whose norms are redrawn as those of Gaussian vectors (chi with d degrees of
    freedom): each row is still marginally N(0, I_d), but the estimator's variance is lower
    (Choromanski et al. 2021, arXiv:2009.14794, Theorem 2).
    """
    if not orthogonal:
        return torch.randn(num_features, dim, generator=generator)
    blocks = []
    for _ in range((num_features + dim - 1) // dim):
        basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=generator))
        blocks.append(basis.T)
    directions = torch.cat(blocks, dim=0)[:num_features]
    norms = torch.randn(num_features, dim, generator=generator).norm(dim=-1, keepdim=True)
    return directions * norms
