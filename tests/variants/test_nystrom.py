"""Nyströmformer: exact with one landmark per token (up to the pseudo-inverse), masks, refusals,
no parameters and export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

from attnrewrite.errors import VariantOptionError
from attnrewrite.variants import get_variant
from attnrewrite.variants.nystrom import NystromAttention, iterative_pinv
from tests.variants.conftest import make_site
from tests.variants.test_linformer import HEADS, KV_HEADS, inputs, key_mask
from tests.variants.test_patterns import Call, relative_error

# With m = N, out = A·pinv(A)·A·v = A·v: any error is the iterative pseudo-inverse's. Measured on
# these inputs (softmax matrices with condition numbers 1e3..5e4): 30 iterations reach 1e-13 in
# float64 (so the formula is exact); the default 6 iterations leave 1.1e-2..6.2e-2 in float32
# (1.4e-3 after 10, 5e-5 after 15), hence the 0.1 bound below.
EXACT_TOLERANCE_FLOAT64 = 1e-8
DEFAULT_ITERATIONS_TOLERANCE = 0.1


def nystrom(n: int, **options) -> NystromAttention:
    site = make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, query_len=n)
    return get_variant("nystrom")(site, **options)


def reference(query, key, value, mask, scale):
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_one_landmark_per_token_is_exact_attention(mask_kind):
    n = 24
    query, key, value = (t.double() for t in inputs(n, n))
    mask = key_mask(mask_kind, n)
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    variant = nystrom(n, num_landmarks=n, pinv_iterations=30)
    out = variant(query, key, value, mask=mask, scale=0.4)
    assert relative_error(out, reference(query, key, value, mask, 0.4)) <= EXACT_TOLERANCE_FLOAT64


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
@pytest.mark.parametrize("scale", [0.05, 0.4])
def test_default_iterations_stay_within_measured_tolerance(mask_kind, scale):
    n = 24
    query, key, value = inputs(n, n)
    mask = key_mask(mask_kind, n)
    out = nystrom(n, num_landmarks=n)(query, key, value, mask=mask, scale=scale)
    ref = reference(query, key, value, mask, scale)
    assert relative_error(out, ref) <= DEFAULT_ITERATIONS_TOLERANCE


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    gen = torch.Generator().manual_seed(0)
    matrix = torch.softmax(torch.randn(3, 8, 8, generator=gen, dtype=torch.float64), dim=-1)
    pinv = iterative_pinv(matrix, iterations=30)
    torch.testing.assert_close(pinv, torch.linalg.pinv(matrix), rtol=1e-8, atol=1e-8)


def test_masked_keys_are_excluded():
    n = 40
    query, key, value = inputs(n, n)
    mask = key_mask("bool", n)
    mask[1] = False  # a batch element with every key masked
    variant = nystrom(n, num_landmarks=8)
    out = variant(query, key, value, mask=mask, scale=0.4)
    assert torch.isfinite(out).all() and out[1].abs().max() == 0
    key[0, :, n - 5 :] += 50.0
    value[0, :, n - 5 :] -= 50.0
    torch.testing.assert_close(variant(query, key, value, mask=mask, scale=0.4), out)


@pytest.mark.parametrize(("q_len", "k_len"), [(5, 5), (9, 30), (30, 9)])
def test_short_and_cross_lengths_stay_finite(q_len, k_len):
    query, key, value = inputs(q_len, k_len)
    out = nystrom(q_len, num_landmarks=8)(query, key, value, scale=0.4)
    assert out.shape == (2, HEADS, q_len, value.shape[-1]) and torch.isfinite(out).all()


def test_no_parameters_and_refuses_causal():
    assert not nystrom(8).state_dict()
    reason = NystromAttention.refuse(make_site(causal=True))
    assert reason and "not causal" in reason
    assert NystromAttention.refuse(make_site(mask="general")) is not None
    assert NystromAttention.refuse(make_site(mask="key")) is None


@pytest.mark.parametrize(
    "options", [{"num_landmarks": 1.5}, {"num_landmarks": 0}, {"pinv_iterations": "6"}]
)
def test_bad_options_raise(options):
    with pytest.raises(VariantOptionError):
        get_variant("nystrom")(make_site(), **options)


def test_exports_with_dynamic_length():
    module = Call(nystrom(40, num_landmarks=8), causal=False)
    length = Dim("length", min=2, max=4096)
    example = (*inputs(40, 40), key_mask("bool", 40))
    program = torch.export.export(
        module, example, dynamic_shapes=({2: length},) * 3 + ({3: length},), strict=False
    )
    for other in (6, 57):  # fewer tokens than landmarks, and more
        args = (*inputs(other, other, seed=1), key_mask("bool", other))
        torch.testing.assert_close(program.module()(*args), module(*args))


def landmark_reference(query, key, value, mask, scale, m):
    """Nyströmformer written out in float64 with fewer landmarks than tokens (N divisible by m):
    landmarks are the means of m consecutive segments (key landmarks over kept keys only), the
    key landmarks carry log(share of kept keys) as a bias (the masked mean's weight; -inf for a
    segment with none), and out = K₁ · pinv(K₂) · K₃ · v with K₁ = softmax(q·L̃ᵀ·s + b),
    K₂ = softmax(Q̃·L̃ᵀ·s + b), K₃ = softmax(Q̃·kᵀ·s + mask), pinv from torch.linalg."""
    group = query.shape[1] // key.shape[1]
    key, value = (
        key.repeat_interleave(group, 1).double(),
        value.repeat_interleave(group, 1).double(),
    )
    query = query.double()
    batch, heads, n, _ = key.shape
    if mask is None:
        kept, additive = torch.ones(batch, 1, 1, n), torch.zeros(batch, 1, 1, n)
    elif mask.dtype == torch.bool:
        kept = mask.double()
        additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    else:
        kept, additive = mask.double().exp(), mask.double()
    kept = kept.expand(batch, heads, 1, n)[:, :, 0]  # (B, H, N) weights of the keys
    size = n // m
    q_land = query.unflatten(2, (m, size)).mean(3)
    present = (kept > 0).double().unflatten(2, (m, size))  # keys in each segment's mean
    k_land = (key.unflatten(2, (m, size)) * present[..., None]).sum(3)
    k_land = k_land / present.sum(3, keepdim=True).clamp_min(1)
    share = kept.unflatten(2, (m, size)).mean(3)
    bias = torch.where(share > 0, share.log(), torch.full_like(share, float("-inf")))[:, :, None]
    k1 = torch.softmax(query @ k_land.transpose(-1, -2) * scale + bias, -1)
    k2 = torch.softmax(q_land @ k_land.transpose(-1, -2) * scale + bias, -1)
    k3 = torch.softmax(q_land @ key.transpose(-1, -2) * scale + additive.double(), -1)
    return k1 @ torch.linalg.pinv(k2) @ k3 @ value


@pytest.mark.parametrize("mask_kind", [None, "bool", "additive"])
def test_fewer_landmarks_than_tokens_match_the_definition(mask_kind):
    n, m = 24, 6
    query, key, value = (t.double() for t in inputs(n, n))
    mask = key_mask(mask_kind, n)
    mask = mask.double() if mask is not None and mask.is_floating_point() else mask
    out = nystrom(n, num_landmarks=m, pinv_iterations=40)(query, key, value, mask=mask, scale=0.4)
    want = landmark_reference(query, key, value, mask, 0.4, m)
    # 40 iterations of the iterative pseudo-inverse against an SVD one: 2e-8 at most seen here
    assert relative_error(out, want) <= 1e-6
