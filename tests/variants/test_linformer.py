"""Linformer: exact in the identity case (k = N, E = F = I), segment-mean initialisation, masks,
refusals, parameters and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from attnrewrite.errors import VariantOptionError
from attnrewrite.variants import get_variant
from attnrewrite.variants.linformer import LinformerAttention, segment_means
from tests.variants.conftest import make_site
from tests.variants.test_patterns import Call, relative_error

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8


def inputs(q_len: int, k_len: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, HEADS, q_len, HEAD_DIM, generator=gen),
        torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen),
        torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen),
    )


def key_mask(kind: str | None, k_len: int) -> torch.Tensor | None:
    if kind == "bool":
        mask = torch.ones(2, 1, 1, k_len, dtype=torch.bool)
        mask[0, ..., k_len - 5 :] = False
        return mask
    if kind == "additive":
        return torch.randn(2, HEADS, 1, k_len, generator=torch.Generator().manual_seed(3))
    return None


def identity_linformer(n: int) -> LinformerAttention:
    variant = get_variant("linformer")(
        make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, query_len=n), k=n
    )
    with torch.no_grad():
        variant.key_projection.copy_(torch.eye(n))
        variant.value_projection.copy_(torch.eye(n))
    return variant


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("q_len", [20, 13], ids=["self", "cross"])
def test_identity_projection_is_exact_attention(q_len, mask_kind):
    n = 20
    query, key, value = inputs(q_len, n)
    mask = key_mask(mask_kind, n)
    out = identity_linformer(n)(query, key, value, mask=mask, scale=0.4)
    ref = F.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), attn_mask=mask, scale=0.4
    )
    assert relative_error(out, ref) <= 1e-5


def test_defaults_and_segment_mean_initialisation():
    variant = get_variant("linformer")(make_site(query_len=600))
    assert variant.max_len == 600 and variant.projected_len == 256
    assert variant.key_projection.shape == (256, 600)
    # Row r averages segment r: rows sum to 1, segments tile the positions without overlap.
    init = variant.key_projection.detach()
    torch.testing.assert_close(init.sum(dim=-1), torch.ones(256))
    assert ((init > 0).sum(dim=0) == 1).all()
    torch.testing.assert_close(variant.value_projection.detach(), segment_means(256, 600))
    unknown = get_variant("linformer")(make_site().replace(key_len="s0"))
    assert unknown.max_len == 512


def test_untrained_rewrite_attends_over_segment_means():
    n, k = 24, 6
    variant = get_variant("linformer")(
        make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, query_len=n), k=k, max_len=n
    )
    query, key, value = inputs(n, n)
    pooled_key = key.unflatten(2, (k, n // k)).mean(dim=3).repeat_interleave(2, 1)
    pooled_value = value.unflatten(2, (k, n // k)).mean(dim=3).repeat_interleave(2, 1)
    ref = F.scaled_dot_product_attention(query, pooled_key, pooled_value, scale=0.4)
    assert relative_error(variant(query, key, value, scale=0.4), ref) <= 1e-5


def test_masked_keys_do_not_leak_and_short_sequences_work():
    variant = get_variant("linformer")(
        make_site(num_heads=HEADS, num_kv_heads=KV_HEADS), k=8, max_len=64
    )
    query, key, value = inputs(30, 30)  # shorter than max_len: leading columns of E, F
    mask = key_mask("bool", 30)
    out = variant(query, key, value, mask=mask, scale=0.4)
    key[0, :, 25:] += 100.0
    value[0, :, 25:] -= 100.0
    assert torch.isfinite(out).all()
    torch.testing.assert_close(variant(query, key, value, mask=mask, scale=0.4), out)


def test_parameters_are_trainable_and_in_state_dict():
    variant = get_variant("linformer")(
        make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, query_len=16), k=4, max_len=16
    )
    assert set(variant.state_dict()) == {"key_projection", "value_projection"}
    query, key, value = inputs(16, 16)
    variant(query, key, value, scale=0.4).square().sum().backward()
    assert variant.key_projection.grad.abs().sum() > 0
    assert variant.value_projection.grad.abs().sum() > 0


def test_refuses_causal_and_general_sites():
    reason = LinformerAttention.refuse(make_site(causal=True))
    assert reason and "not causal" in reason
    assert LinformerAttention.refuse(make_site(mask="general")) is not None
    assert LinformerAttention.refuse(make_site(mask="key", is_cross=True)) is None


def test_longer_site_than_max_len_is_refused_at_construction():
    with pytest.raises(VariantOptionError, match="max_len"):
        get_variant("linformer")(make_site(query_len=100), max_len=64)


@pytest.mark.parametrize(
    "options",
    [{"k": "8"}, {"k": 0}, {"max_len": 1.5}, {"k": 32, "max_len": 16}, {"window": 4}],
)
def test_bad_options_raise(options):
    with pytest.raises(VariantOptionError):
        get_variant("linformer")(make_site(), **options)


def test_exports_with_dynamic_length():
    variant = get_variant("linformer")(
        make_site(num_heads=HEADS, num_kv_heads=KV_HEADS), k=8, max_len=64
    )
    module = Call(variant, causal=False)
    length = Dim("length", min=2, max=64)
    example = (*inputs(40, 40), key_mask("bool", 40))
    program = torch.export.export(
        module, example, dynamic_shapes=({2: length},) * 3 + ({3: length},), strict=False
    )
    other = (*inputs(23, 23, seed=1), key_mask("bool", 23))
    torch.testing.assert_close(program.module()(*other), module(*other))


def test_refuse_sees_the_options_and_the_rewrite_skips_the_site():
    """A site longer than ``max_len`` is refused with a reason (not an exception from the
    constructor), so the rest of the model is still rewritten."""
    import attnrewrite as ar

    site = make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, key_len=40)
    assert "max_len >= 40" in LinformerAttention.refuse(site, {"max_len": 16})
    assert LinformerAttention.refuse(site, {"max_len": 64}) is None

    class Attend(nn.Module):
        def forward(self, q, k, v):
            return (q @ k.transpose(-2, -1) * 0.5).softmax(-1) @ v

    q = torch.randn(2, 2, 12, 8)
    static = torch.export.export(Attend(), (q, q, q))  # the key length is known: 12
    rw = ar.rewrite(static, "linformer", args=(q, q, q), max_len=8)
    (row,) = rw.report.sites
    assert row.status == "skipped" and "max_len >= 12" in row.reason
    torch.testing.assert_close(rw(q, q, q), Attend()(q, q, q))
