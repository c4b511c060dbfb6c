"""Generic kernel variant specifics: the required feature map, callables and modules."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnrewrite.errors import VariantOptionError
from attnrewrite.variants import get_variant
from tests.variants.references import dense_kernel_reference

Kernel = get_variant("kernel")


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    """Inputs drawn from the global generator are the same whatever ran before."""
    torch.manual_seed(0)


def test_missing_feature_map_says_what_to_pass(site_factory) -> None:
    with pytest.raises(VariantOptionError, match="feature_map is required"):
        Kernel(site_factory())


def test_callable_feature_map(site_factory) -> None:
    def elu_plus_one(x):
        return F.elu(x) + 1

    variant = Kernel(site_factory(num_heads=2, head_dim=8), feature_map=elu_plus_one)
    query, key, value = (torch.randn(1, 2, 10, 8) for _ in range(3))
    out = variant(query, key, value, scale=0.5)
    root = 0.5**0.5
    ref = dense_kernel_reference(elu_plus_one(query * root), elu_plus_one(key * root), value)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6)
    assert "elu_plus_one" in repr(variant)


def test_module_feature_map_is_a_trainable_submodule(site_factory) -> None:
    feature_map = nn.Sequential(nn.Linear(8, 6), nn.Softplus())
    variant = Kernel(site_factory(num_heads=2, head_dim=8), feature_map=feature_map)
    assert set(variant.state_dict()) == {"feature_map.0.weight", "feature_map.0.bias"}
    query, key, value = (torch.randn(1, 2, 10, 8) for _ in range(3))
    variant(query, key, value, causal=True).square().sum().backward()
    assert feature_map[0].weight.grad is not None
    assert variant.double().feature_map[0].weight.dtype == torch.float64
