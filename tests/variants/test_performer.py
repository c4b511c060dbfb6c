"""Performer specifics: approximation quality, numerical stability, randomness and redraws."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnrewrite.variants import get_variant
from attnrewrite.variants.base import default_num_features

Performer = get_variant("performer")


def _qkv(seed: int, *, length: int = 64, dim: int = 16, amplitude: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return tuple(amplitude * torch.randn(1, 2, length, dim, generator=g) for _ in range(3))


def _logspace_reference(projection, query, key, value, causal: bool) -> torch.Tensor:
    """Performer's kernel attention evaluated in log space (float64): exact even where every
    feature product underflows."""
    x, y, w = query.double(), key.double(), projection.double()
    log_q = x @ w.T - (x * x).sum(-1, keepdim=True) / 2
    log_k = y @ w.T - (y * y).sum(-1, keepdim=True) / 2
    log_a = torch.logsumexp(log_q[..., :, None, :] + log_k[..., None, :, :], dim=-1)
    if causal:
        n = log_a.shape[-1]
        log_a = log_a.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(log_a, dim=-1) @ value.double()


def test_error_against_softmax_falls_as_features_grow(site_factory) -> None:
    # |q·√s| ≈ 1: the regime where FAVOR+ is a usable estimator. Eight seeds per m; each step
    # (×4 features) must lower the mean error by far more than its seed-to-seed spread.
    query, key, value = _qkv(0, amplitude=0.5)
    scale = 16**-0.5
    exact = F.scaled_dot_product_attention(query, key, value, scale=scale)
    site = site_factory(num_heads=2, head_dim=16)
    means = []
    for features in (16, 64, 256):
        errors = []
        for seed in range(8):
            variant = Performer(site, seed=seed, num_features=features)
            out = variant(query, key, value, scale=scale)
            errors.append(((out - exact).norm() / exact.norm()).item())
        means.append(sum(errors) / len(errors))
    assert means[0] > means[1] > means[2]
    assert means[2] < 0.6 * means[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_half_precision_with_large_norms_stays_finite(site_factory, causal, dtype) -> None:
    # |q| = |k| = 30 at scale 1: e^{-|x|²/2} = e^{-450} underflows even float64 unless shifted.
    query, key, value = _qkv(1)
    query = (30 * F.normalize(query, dim=-1)).to(dtype)
    key = (30 * F.normalize(key, dim=-1)).to(dtype)
    variant = Performer(site_factory(num_heads=2, head_dim=16), seed=0)
    out = variant(query, key, value.to(dtype), causal=causal, scale=1.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    if not causal:  # non-causal, the shifted features are accurate as well (see the docstring)
        ref = _logspace_reference(variant.projection, query, key, value.to(dtype), causal)
        assert ((out.double() - ref).abs().max() / ref.abs().max()).item() < 1e-2


def test_masked_keys_do_not_enter_the_stabilising_maximum(site_factory) -> None:
    # Padding vectors of huge norm, masked out, must not underflow the real keys.
    query, key, value = _qkv(2)
    padded_key = torch.cat([key, 1e3 * torch.ones(1, 2, 8, 16)], dim=2)
    padded_value = torch.cat([value, torch.zeros(1, 2, 8, 16)], dim=2)
    keep = torch.ones(1, 1, 1, 72, dtype=torch.bool)
    keep[..., 64:] = False
    variant = Performer(site_factory(num_heads=2, head_dim=16), seed=0)
    out = variant(query, padded_key, padded_value, mask=keep, scale=0.25)
    ref = variant(query, key, value, scale=0.25)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)


def test_deterministic_given_seed_and_different_across_seeds(site_factory) -> None:
    site = site_factory(num_heads=2, head_dim=16)
    query, key, value = _qkv(3)
    first = Performer(site, seed=7)(query, key, value, scale=0.25)
    again = Performer(site, seed=7)(query, key, value, scale=0.25)
    other = Performer(site, seed=8)(query, key, value, scale=0.25)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_projection_is_a_buffer_in_state_dict(site_factory) -> None:
    site = site_factory(num_heads=2, head_dim=16)
    variant = Performer(site, seed=1)
    assert variant.state_dict()["projection"].shape == (default_num_features(16), 16)
    assert not list(variant.parameters())
    clone = Performer(site, seed=2)
    clone.load_state_dict(variant.state_dict())
    query, key, value = _qkv(4)
    assert torch.equal(clone(query, key, value), variant(query, key, value))


def test_num_features_option(site_factory) -> None:
    variant = Performer(site_factory(num_heads=2, head_dim=16), num_features=48)
    assert variant.projection.shape == (48, 16)


def test_redraw_only_in_training_mode(site_factory) -> None:
    site = site_factory(num_heads=2, head_dim=16)
    query, key, value = _qkv(5)
    variant = Performer(site, seed=3, redraw=True)
    initial = variant.projection.clone()
    variant.eval()
    variant(query, key, value)
    assert torch.equal(variant.projection, initial)
    variant.train()
    variant(query, key, value)
    first = variant.projection.clone()
    variant(query, key, value)
    assert not torch.equal(first, initial) and not torch.equal(first, variant.projection)
    # Redraws are reproducible: a second module with the same seed draws the same sequence.
    twin = Performer(site, seed=3, redraw=True).train()
    twin(query, key, value)
    assert torch.equal(twin.projection, first)
    fixed = Performer(site, seed=3).train()
    fixed(query, key, value)
    assert torch.equal(fixed.projection, initial)
