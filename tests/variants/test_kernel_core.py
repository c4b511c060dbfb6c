"""Numerical tests of the shared kernel-attention core: parallel forms, recurrent step, decay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnrewrite.variants.kernel_core import (
    init_state,
    kernel_attention,
    random_projection,
    step,
)
from tests.variants.references import dense_kernel_reference


@dataclasses.dataclass(frozen=True)
class Shape:
    """One configuration of the core: heads, key-weight heads, lengths and chunk size."""

    heads: int = 4
    kv_heads: int = 4
    weight_heads: int | None = None  # None: no key weights
    q_len: int = 37
    k_len: int = 37
    chunk: int = 8
    value_dim: int = 5


SHAPES = {
    "plain": Shape(),
    "weights_shared": Shape(weight_heads=1),
    "grouped": Shape(kv_heads=2, weight_heads=1),
    "grouped_weights_per_query_head": Shape(kv_heads=2, weight_heads=4),
    "grouped_weights_per_kv_head": Shape(kv_heads=2, weight_heads=2),
    "multi_query": Shape(kv_heads=1, weight_heads=4),
    "one_chunk": Shape(q_len=5, k_len=5, weight_heads=1),
    "exact_multiple": Shape(q_len=32, k_len=32, chunk=16, weight_heads=1),
    "cross": Shape(q_len=23, k_len=41, weight_heads=1),
    "cross_longer_queries": Shape(q_len=41, k_len=23, weight_heads=1),
}


def _inputs(shape: Shape, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    phi_q = torch.rand(2, shape.heads, shape.q_len, 8, generator=g, dtype=dtype)
    phi_k = torch.rand(2, shape.kv_heads, shape.k_len, 8, generator=g, dtype=dtype)
    value = torch.randn(2, shape.kv_heads, shape.k_len, shape.value_dim, generator=g, dtype=dtype)
    weights = None
    if shape.weight_heads is not None:
        weights = (torch.rand(2, shape.weight_heads, shape.k_len, generator=g) > 0.3).to(dtype)
        weights[..., 0] = 1.0  # every causal row keeps at least one key
        weights = weights * torch.rand(weights.shape, generator=g, dtype=dtype) * 2
    return phi_q, phi_k, value, weights


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("name", SHAPES)
def test_parallel_matches_dense_reference(name: str, causal: bool) -> None:
    shape = SHAPES[name]
    phi_q, phi_k, value, weights = _inputs(shape)
    out = kernel_attention(
        phi_q, phi_k, value, key_weights=weights, causal=causal, chunk_size=shape.chunk
    )
    ref = dense_kernel_reference(phi_q, phi_k, value, key_weights=weights, causal=causal)
    assert out.shape == (2, shape.heads, shape.q_len, shape.value_dim)
    assert _relative_error(out, ref) < 1e-12


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_float32_matches_float64_reference(causal: bool) -> None:
    phi_q, phi_k, value, weights = _inputs(SHAPES["grouped"], dtype=torch.float32)
    out = kernel_attention(phi_q, phi_k, value, key_weights=weights, causal=causal, chunk_size=8)
    ref = dense_kernel_reference(
        phi_q.double(), phi_k.double(), value.double(), key_weights=weights.double(), causal=causal
    )
    assert out.dtype == torch.float32
    assert _relative_error(out, ref) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype: torch.dtype) -> None:
    phi_q, phi_k, value, weights = _inputs(SHAPES["grouped"], dtype=dtype)
    out = kernel_attention(phi_q, phi_k, value, key_weights=weights, causal=True, chunk_size=8)
    ref = dense_kernel_reference(
        phi_q.double(), phi_k.double(), value.double(), key_weights=weights.double(), causal=True
    )
    assert out.dtype == torch.float32
    assert _relative_error(out, ref) < 1e-5


def _decay(shape: Shape, seed: int = 1, strength: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(2, shape.kv_heads, shape.k_len, generator=g, dtype=torch.float64)
    return -strength * rate


def _recurrence(phi_q, phi_k, value, weights, log_decay):
    """S_t = g_t S_{t-1} + w_t φ(k_t) v_tᵀ written out per head (the definition, no grouping)."""
    heads = phi_q.shape[1]
    k = phi_k.repeat_interleave(heads // phi_k.shape[1], dim=1)
    v = value.repeat_interleave(heads // value.shape[1], dim=1)
    w = torch.ones(k.shape[:3], dtype=k.dtype) if weights is None else weights
    w = w.expand(k.shape[0], -1, -1).repeat_interleave(heads // w.shape[1], dim=1)
    ld = log_decay.repeat_interleave(heads // log_decay.shape[1], dim=1)
    state = torch.zeros(k.shape[0], heads, k.shape[-1], v.shape[-1], dtype=k.dtype)
    norm = torch.zeros(k.shape[0], heads, k.shape[-1], dtype=k.dtype)
    outs = []
    for t in range(phi_q.shape[2]):
        decay = ld[:, :, t].exp()
        state = (
            decay[..., None, None] * state
            + (w[:, :, t, None] * k[:, :, t])[..., None] * v[:, :, t, None, :]
        )
        norm = decay[..., None] * norm + w[:, :, t, None] * k[:, :, t]
        num = torch.einsum("bhm,bhmd->bhd", phi_q[:, :, t], state)
        den = torch.einsum("bhm,bhm->bh", phi_q[:, :, t], norm)
        outs.append(num / den[..., None])
    return torch.stack(outs, dim=2)


@pytest.mark.parametrize(
    "name", ["plain", "grouped", "grouped_weights_per_query_head", "multi_query", "one_chunk"]
)
def test_decayed_causal_matches_recurrence_and_reference(name: str) -> None:
    shape = SHAPES[name]
    phi_q, phi_k, value, weights = _inputs(shape)
    log_decay = _decay(shape)
    out = kernel_attention(
        phi_q,
        phi_k,
        value,
        key_weights=weights,
        causal=True,
        chunk_size=shape.chunk,
        log_decay=log_decay,
    )
    ref = dense_kernel_reference(
        phi_q, phi_k, value, key_weights=weights, causal=True, log_decay=log_decay
    )
    assert _relative_error(out, ref) < 1e-12
    assert _relative_error(out, _recurrence(phi_q, phi_k, value, weights, log_decay)) < 1e-12


def test_decay_stays_finite_over_long_sequences() -> None:
    # Π g over 1200 positions at g = e^-1 is e^-1200: a formulation that divides by cumulative
    # decays overflows even float64; differences of cumulative log-decays do not.
    shape = Shape(q_len=1200, k_len=1200, chunk=64, heads=1, kv_heads=1)
    phi_q, phi_k, value, _ = _inputs(shape)
    log_decay = torch.full((2, 1, 1200), -1.0, dtype=torch.float64)
    out = kernel_attention(
        phi_q.float(), phi_k.float(), value.float(), causal=True, log_decay=log_decay.float()
    )
    ref = dense_kernel_reference(phi_q, phi_k, value, causal=True, log_decay=log_decay)
    assert torch.isfinite(out).all()
    assert _relative_error(out, ref) < 1e-5


def test_decay_needs_causal() -> None:
    phi_q, phi_k, value, _ = _inputs(SHAPES["plain"])
    with pytest.raises(ValueError, match="causal"):
        kernel_attention(phi_q, phi_k, value, log_decay=_decay(SHAPES["plain"]))


@pytest.mark.parametrize("decayed", [False, True], ids=["plain", "decayed"])
@pytest.mark.parametrize(
    "name", ["plain", "grouped", "grouped_weights_per_query_head", "grouped_weights_per_kv_head"]
)
def test_step_over_sequence_equals_causal_parallel(name: str, decayed: bool) -> None:
    shape = SHAPES[name]
    phi_q, phi_k, value, weights = _inputs(shape)
    log_decay = _decay(shape) if decayed else None
    parallel = kernel_attention(
        phi_q,
        phi_k,
        value,
        key_weights=weights,
        causal=True,
        chunk_size=shape.chunk,
        log_decay=log_decay,
    )
    # Weights that differ per query head while keys are grouped need a state per query head.
    state_heads = max(shape.kv_heads, shape.weight_heads or 1)
    state = init_state(2, state_heads, 8, shape.value_dim, dtype=phi_q.dtype)
    outs = []
    for t in range(shape.q_len):
        out_t, state = step(
            state,
            phi_q[:, :, t],
            phi_k[:, :, t],
            value[:, :, t],
            None if weights is None else weights[:, :, t],
            log_decay_t=None if log_decay is None else log_decay[:, :, t],
        )
        outs.append(out_t)
    assert _relative_error(torch.stack(outs, dim=2), parallel) < 1e-12


def test_step_state_is_float32_for_half_inputs() -> None:
    state = init_state(1, 2, 8, 4, dtype=torch.float16)
    assert state[0].dtype == torch.float32 and state[0].shape == (1, 2, 8, 4)
    assert state[1].shape == (1, 2, 8)
    out, _ = step(
        state,
        torch.rand(1, 4, 8, dtype=torch.float16),
        torch.rand(1, 2, 8, dtype=torch.float16),
        torch.randn(1, 2, 4, dtype=torch.float16),
    )
    assert out.dtype == torch.float32 and out.shape == (1, 4, 4)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_gradcheck(causal: bool) -> None:
    shape = Shape(heads=2, kv_heads=1, weight_heads=1, q_len=7, k_len=7, chunk=4, value_dim=3)
    phi_q, phi_k, value, weights = _inputs(shape)
    inputs = tuple(x[:1].clone().requires_grad_() for x in (phi_q, phi_k, value))
    log_decay = _decay(shape)[:1].clone().requires_grad_() if causal else None

    def fn(q, k, v, *decay):
        log_decay = decay[0] if decay else None
        return kernel_attention(
            q, k, v, key_weights=weights[:1], causal=causal, chunk_size=4, log_decay=log_decay
        )

    assert torch.autograd.gradcheck(fn, inputs + ((log_decay,) if causal else ()))


def test_random_projection_blocks_are_orthogonal_and_reproducible() -> None:
    w = random_projection(20, 8, generator=torch.Generator().manual_seed(3))
    again = random_projection(20, 8, generator=torch.Generator().manual_seed(3))
    assert w.shape == (20, 8) and torch.equal(w, again)
    block = w[:8] / w[:8].norm(dim=-1, keepdim=True)
    assert torch.allclose(block @ block.T, torch.eye(8), atol=1e-5)
    plain = random_projection(20, 8, generator=torch.Generator().manual_seed(3), orthogonal=False)
    assert plain.shape == (20, 8) and not torch.allclose(plain, w)


def test_exclusive_prefix_sum_op_its_decomposition_and_gradient() -> None:
    from attnrewrite.variants.kernel_core import _prefix_sum_decomposition, exclusive_prefix_sum

    x = torch.randn(7, 3, 4, 5, dtype=torch.float64).transpose(1, 2)  # not contiguous
    for dim in (0, 1, -1):
        moved = x.movedim(dim, 0)
        sums = [torch.zeros_like(moved[0])] + [moved[:c].sum(0) for c in range(1, len(moved))]
        expected = torch.stack(sums).movedim(0, dim)
        assert torch.allclose(exclusive_prefix_sum(x, dim), expected)
        assert torch.allclose(_prefix_sum_decomposition(x, dim % x.dim()), expected)
        leaf = x.clone().requires_grad_()
        assert torch.autograd.gradcheck(lambda t, d=dim: exclusive_prefix_sum(t, d), (leaf,))
    assert exclusive_prefix_sum(x[:0]).shape == (0, 4, 3, 5)
