"""cosFormer specifics: the cos/sin decomposition reproduces the re-weighting exactly."""

from __future__ import annotations

import math

import pytest
import torch

from attnrewrite.variants import get_variant

CosFormer = get_variant("cosformer")


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Inputs drawn from the global generator are the same whatever ran before."""
    torch.manual_seed(0)


@pytest.mark.parametrize(("q_len", "k_len"), [(9, 9), (5, 13), (13, 5)])
def test_feature_products_equal_the_cosine_reweighting(site_factory, q_len, k_len) -> None:
    variant = CosFormer(site_factory(num_heads=2, head_dim=8))
    query = torch.randn(1, 2, q_len, 8, dtype=torch.float64)
    key = torch.randn(1, 2, k_len, 8, dtype=torch.float64)
    phi_q, phi_k = variant.feature_maps(query, key, None)
    assert phi_q.shape[-1] == phi_k.shape[-1] == 16
    i = torch.arange(q_len, dtype=torch.float64)[:, None]
    j = torch.arange(k_len, dtype=torch.float64)[None, :]
    longest = max(q_len, k_len)
    expected = (query.relu() @ key.relu().transpose(-1, -2)) * torch.cos(
        math.pi / 2 * (i - j) / longest
    )
    assert torch.allclose(phi_q @ phi_k.transpose(-1, -2), expected, rtol=1e-12, atol=1e-12)


def test_reweighting_stays_positive_and_favours_nearby_keys(site_factory) -> None:
    variant = CosFormer(site_factory(num_heads=1, head_dim=4))
    ones = torch.ones(1, 1, 16, 4, dtype=torch.float64)
    phi_q, phi_k = variant.feature_maps(ones, ones, None)
    weight = phi_q @ phi_k.transpose(-1, -2)  # 4·cos(π/2·(i−j)/16)
    assert (weight > 0).all()
    assert torch.allclose(weight.diagonal(dim1=-2, dim2=-1), torch.full((1, 1, 16), 4.0).double())
    assert (weight[0, 0, 0, :-1] > weight[0, 0, 0, 1:]).all()
