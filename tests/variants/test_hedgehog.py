"""Hedgehog specifics: separate query/key maps per head, identity initialisation."""

from __future__ import annotations

import pytest
import torch

from attnrewrite.variants import get_variant

Hedgehog = get_variant("hedgehog")


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Inputs drawn from the global generator are the same whatever ran before."""
    torch.manual_seed(0)


def test_parameters_in_state_dict_start_at_identity_and_train(site_factory) -> None:
    variant = Hedgehog(site_factory(num_heads=4, num_kv_heads=2, head_dim=8, causal=True))
    state = variant.state_dict()
    assert state["query_weight"].shape == (4, 8, 8) and state["key_weight"].shape == (2, 8, 8)
    assert torch.equal(state["query_weight"], torch.eye(8).expand(4, 8, 8))
    query = torch.randn(1, 4, 12, 8)
    key, value = torch.randn(1, 2, 12, 8), torch.randn(1, 2, 12, 8)
    variant(query, key, value, causal=True, scale=0.5).square().sum().backward()
    assert variant.query_weight.grad.abs().sum() > 0 and variant.key_weight.grad.abs().sum() > 0


def test_features_are_a_softmax_over_both_signs(site_factory) -> None:
    variant = Hedgehog(site_factory(num_heads=1, head_dim=4), feature_dim=6)
    assert variant.query_weight.shape == (1, 6, 4)
    x = torch.randn(1, 1, 5, 4)
    phi_q, _ = variant.feature_maps(x, x, None)
    assert phi_q.shape == (1, 1, 5, 12)
    assert torch.allclose(phi_q.sum(-1), torch.ones(1, 1, 5))
    # Identity start (rectangular when m > d): the first d pairs are e^{±x}, normalised.
    z = torch.cat([x, torch.zeros(1, 1, 5, 2)], dim=-1)
    assert torch.allclose(phi_q, torch.softmax(torch.cat([z, -z], dim=-1), dim=-1))
