"""RFA specifics: the kernel it estimates, σ, the normaliser clamp and the recency gate."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnrewrite.errors import VariantOptionError
from attnrewrite.variants import get_variant
from attnrewrite.variants.kernel_core import init_state, step
from tests.variants.references import dense_kernel_reference

RFA = get_variant("rfa")


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Inputs drawn from the global generator are the same whatever ran before."""
    torch.manual_seed(0)


def _qkv(seed: int, length: int = 24, kv_heads: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(1, 4, length, 16, generator=g),
        torch.randn(1, kv_heads, length, 16, generator=g),
        torch.randn(1, kv_heads, length, 16, generator=g),
    )


@pytest.mark.parametrize("sigma", [0.7, 1.5])
def test_features_estimate_the_gaussian_kernel_on_unit_vectors(site_factory, sigma) -> None:
    # φ(x)·φ(y) → exp(−|x̂ − ŷ|²/2σ²) = exp((x̂·ŷ − 1)/σ²) as the number of features grows.
    site = site_factory(num_heads=1, head_dim=16)
    variant = RFA(site, seed=0, num_features=20000, sigma=sigma)
    x, y = torch.randn(1, 1, 6, 16), torch.randn(1, 1, 5, 16)
    phi_x, phi_y = variant.feature_maps(x, y, None)
    cosine = F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(-1, -2)
    assert phi_x.shape[-1] == 40000
    assert torch.allclose(
        phi_x @ phi_y.transpose(-1, -2), ((cosine - 1) / sigma**2).exp(), atol=0.03
    )


def test_scale_has_no_effect_after_normalisation(site_factory) -> None:
    variant = RFA(site_factory(num_heads=4, num_kv_heads=2, head_dim=16), seed=0)
    query, key, value = _qkv(0)
    small, large = variant(query, key, value, scale=0.1), variant(query, key, value, scale=3.0)
    assert torch.allclose(small, large, atol=1e-5)


def test_non_positive_normaliser_is_clamped_like_the_reference(site_factory) -> None:
    # A key opposite to the query, and every frequency chosen so that ω·(q̂ − k̂)/σ = π: each
    # feature pair contributes cos π = −1, so the estimated kernel — the whole normaliser — is −1.
    # The output stays finite and equals the reference with the same clamp.
    sigma = 0.5
    variant = RFA(site_factory(num_heads=1, head_dim=16), sigma=sigma, num_features=4)
    query = torch.randn(1, 1, 1, 16)
    key, value = -query, torch.randn(1, 1, 1, 16)
    with torch.no_grad():
        variant.projection.copy_((math.pi * sigma / 2 * F.normalize(query, dim=-1)).reshape(1, 16))
    phi_q, phi_k = variant.feature_maps(query, key, None)
    assert torch.allclose(phi_q @ phi_k.transpose(-1, -2), torch.tensor(-1.0), atol=1e-5)
    out = variant(query, key, value)
    ref = dense_kernel_reference(phi_q.double(), phi_k.double(), value.double())
    assert torch.isfinite(out).all()
    assert torch.allclose(out.double(), ref, rtol=1e-4)


def test_learn_sigma_makes_a_trainable_parameter_per_kv_head(site_factory) -> None:
    site = site_factory(num_heads=4, num_kv_heads=2, head_dim=16, causal=True)
    fixed = RFA(site, sigma=2.0)
    assert "log_sigma" in fixed.state_dict() and not list(fixed.parameters())
    learned = RFA(site, sigma=2.0, learn_sigma=True)
    assert learned.log_sigma.shape == (2,)
    assert torch.allclose(learned.log_sigma, torch.full((2,), math.log(2.0)))
    query, key, value = _qkv(1)
    learned(query, key, value, causal=True).sum().backward()
    assert learned.log_sigma.grad is not None and learned.log_sigma.grad.abs().sum() > 0


def test_gate_needs_a_causal_site(site_factory) -> None:
    with pytest.raises(VariantOptionError, match="causal"):
        RFA(site_factory(num_heads=4, head_dim=16, causal=False), gate=True)
    variant = RFA(site_factory(num_heads=4, head_dim=16, causal=True), gate=True)
    query, key, value = _qkv(2, kv_heads=4)
    with pytest.raises(ValueError, match="causal"):
        variant(query, key, value, causal=False)


def test_gate_parameters_train_and_start_near_one(site_factory) -> None:
    variant = RFA(site_factory(num_heads=4, num_kv_heads=2, head_dim=16, causal=True), gate=True)
    assert set(dict(variant.named_parameters())) == {"gate_weight", "gate_bias"}
    log_gate, admit = variant.gate_terms(torch.randn(1, 2, 5, 16))
    start = torch.sigmoid(torch.tensor(3.0)).item()
    assert torch.allclose(log_gate.exp(), torch.full_like(log_gate, start))
    assert torch.allclose(admit, 1 - log_gate.exp())
    query, key, value = _qkv(3)
    variant(query, key, value, causal=True).square().sum().backward()
    assert variant.gate_weight.grad.abs().sum() > 0 and variant.gate_bias.grad.abs().sum() > 0


def test_gated_step_equals_gated_causal_forward(site_factory) -> None:
    # The recurrence RFA-Gate is defined by: S_t = g_t S_{t-1} + (1 - g_t) φ(k_t) v_tᵀ.
    variant = RFA(
        site_factory(num_heads=4, num_kv_heads=2, head_dim=16, causal=True),
        seed=1,
        gate=True,
        chunk_size=8,
    )
    with torch.no_grad():
        variant.gate_weight.normal_(0, 0.5)
    query, key, value = _qkv(4, length=29)
    keep = torch.rand(1, 1, 1, 29) > 0.2
    keep[..., 0] = True
    parallel = variant(query, key, value, mask=keep, causal=True)
    phi_q, phi_k = variant.feature_maps(query, key, None)
    log_gate, admit = variant.gate_terms(key)
    weights = admit * keep.squeeze(-2)
    state = init_state(1, 2, phi_k.shape[-1], 16)
    outs = []
    for t in range(29):
        out_t, state = step(
            state,
            phi_q[:, :, t],
            phi_k[:, :, t],
            value[:, :, t],
            weights[:, :, t],
            log_decay_t=log_gate[:, :, t],
        )
        outs.append(out_t)
    assert torch.allclose(torch.stack(outs, dim=2), parallel, rtol=1e-5, atol=1e-6)
