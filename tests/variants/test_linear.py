"""``linear`` against a naive O(N²) reference of its own definition."""

from __future__ import annotations

import math

import pytest
import torch

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import MaskClass
from attnrewrite.variants.linear import LinearAttention, elu_feature_map
from tests.variants.conftest import make_site


def reference(q, k, v, *, keep=None, bias=None, causal=False, scale=1.0):
    """out_i = Σ_j w_j φ(q_i√s)·φ(k_j√s) v_j / Σ_j w_j φ(q_i√s)·φ(k_j√s), computed densely."""
    h = q.shape[1]
    k = k.repeat_interleave(h // k.shape[1], dim=1)
    v = v.repeat_interleave(h // v.shape[1], dim=1)
    r = math.sqrt(scale)
    a = elu_feature_map(q * r) @ elu_feature_map(k * r).transpose(-1, -2)
    if keep is not None:
        a = a * keep[:, :, None, :].to(a.dtype)
    if bias is not None:
        a = a * torch.exp(bias)[:, :, None, :]
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=torch.bool).tril()
    return (a @ v) / a.sum(-1, keepdim=True)


def _rel(out, ref):
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("mask", ["none", "bool", "additive"])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (4, 2)])
@pytest.mark.parametrize("length", [37, 64, 5])
def test_linear_matches_dense_reference(causal, mask, heads, kv_heads, length):
    torch.manual_seed(0)
    q = torch.randn(2, heads, length, 16)
    k = torch.randn(2, kv_heads, length, 16)
    v = torch.randn(2, kv_heads, length, 12)
    keep = torch.rand(2, 1, length) > 0.3
    keep[..., 0] = True
    bias = torch.randn(2, 1, length)
    site = make_site(
        num_heads=heads,
        num_kv_heads=kv_heads,
        mask="key" if mask != "none" else "none",
        causal=causal,
    )
    variant = LinearAttention(site, chunk_size=16)
    m = {"none": None, "bool": keep[:, :, None, :], "additive": bias[:, :, None, :]}[mask]
    out = variant(q, k, v, mask=m, causal=causal, scale=0.25)
    ref = reference(
        q,
        k,
        v,
        keep=keep if mask == "bool" else None,
        bias=bias if mask == "additive" else None,
        causal=causal,
        scale=0.25,
    )
    assert _rel(out, ref) <= 1e-5


def test_linear_cross_attention_lengths():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 7, 8), torch.randn(1, 2, 19, 8), torch.randn(1, 2, 19, 8)
    out = LinearAttention(make_site(num_heads=2, head_dim=8))(q, k, v, scale=0.5)
    assert _rel(out, reference(q, k, v, scale=0.5)) <= 1e-5


def test_scale_spelling_does_not_matter():
    """φ is applied to q·√s and k·√s: scaling q by s with scale 1 gives another result, but the
    canonical form (unscaled q, scale s) is what the rewriter always passes."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8) for _ in range(3))
    variant = LinearAttention(make_site(num_heads=2, head_dim=8))
    a = variant(q, k, v, scale=0.125)
    b = variant(q * math.sqrt(0.125), k * math.sqrt(0.125), v, scale=1.0)
    assert torch.allclose(a, b, atol=1e-6)


def test_causal_chunked_memory_is_not_per_position():
    """The causal form carries one state per chunk: no (B, H, N, d, d) tensor is created."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    n, d = 1024, 16
    q, k, v = (torch.randn(1, 1, n, d) for _ in range(3))
    with Largest():
        LinearAttention(make_site(num_heads=1, head_dim=d), chunk_size=64)(q, k, v, causal=True)
    assert Largest.largest < n * d * d  # per-position states would need N·d² elements


def test_linear_options_are_checked():
    with pytest.raises(VariantOptionError, match="chunk_size"):
        LinearAttention(make_site(), chunk_size="64")
    with pytest.raises(VariantOptionError, match="no option"):
        LinearAttention(make_site(), window=3)
    assert LinearAttention.refuse(make_site(mask=MaskClass.GENERAL))
    assert LinearAttention.refuse(make_site(mask=MaskClass.CAUSAL_KEY)) is None
