"""T2R specifics: per-head trainable feature maps, initialisation, feature_dim."""

from __future__ import annotations

import pytest
import torch

from attnrewrite.variants import get_variant

T2R = get_variant("t2r")


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Inputs drawn from the global generator are the same whatever ran before."""
    torch.manual_seed(0)


def test_parameters_per_kv_head_in_state_dict_and_trainable(site_factory) -> None:
    variant = T2R(site_factory(num_heads=4, num_kv_heads=2, head_dim=16, causal=True), seed=0)
    state = variant.state_dict()
    assert state["weight"].shape == (2, 16, 16) and state["bias"].shape == (2, 16)
    query = torch.randn(1, 4, 20, 16)
    key, value = torch.randn(1, 2, 20, 16), torch.randn(1, 2, 20, 16)
    variant(query, key, value, causal=True, scale=0.25).square().sum().backward()
    assert variant.weight.grad.abs().sum() > 0 and variant.bias.grad.abs().sum() > 0


def test_initialisation_is_orthogonal_zero_bias_and_seeded(site_factory) -> None:
    site = site_factory(num_heads=2, head_dim=16)
    variant = T2R(site, seed=5, feature_dim=12)
    assert variant.weight.shape == (2, 12, 16)
    for head in variant.weight.detach():
        assert torch.allclose(head @ head.T, torch.eye(12), atol=1e-5)
    assert torch.equal(variant.bias.detach(), torch.zeros(2, 12))
    assert torch.equal(T2R(site, seed=5, feature_dim=12).weight, variant.weight)
    assert not torch.equal(T2R(site, seed=6, feature_dim=12).weight, variant.weight)
    # The heads get different maps.
    assert not torch.allclose(variant.weight[0], variant.weight[1])
