"""Synthesizer: shapes, parameters and gradients per mode, uniform initialisation, masks and
causality respected, length limits and export."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import ALL_MASK_CLASSES
from attnrewrite.variants import get_variant
from attnrewrite.variants.synthesizer import SynthesizerAttention
from tests.variants.conftest import make_site
from tests.variants.test_linformer import HEADS, KV_HEADS, inputs, key_mask
from tests.variants.test_patterns import Call

MODES = ["dense", "random", "factorized_random"]
PARAMETERS = {
    "dense": {"hidden_weight", "hidden_bias", "logit_weight", "logit_bias"},
    "random": {"logits"},
    "factorized_random": {"query_factor", "key_factor"},
}


def synthesizer(mode: str, max_len: int = 32, randomise: bool = False) -> SynthesizerAttention:
    site = make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=8, query_len=max_len)
    variant = get_variant("synthesizer")(site, mode=mode, seed=0)
    if randomise:  # trained-looking logits, so that masking is not trivially uniform
        gen = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for parameter in variant.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=gen))
    return variant


@pytest.mark.parametrize("mode", MODES)
def test_shapes_parameters_and_gradients(mode):
    variant = synthesizer(mode)
    assert set(variant.state_dict()) == PARAMETERS[mode]
    query, key, value = inputs(20, 27)  # cross-attention: Nq != Nk
    out = variant(query, key, value, mask=key_mask("bool", 27), scale=0.4)
    assert out.shape == (2, HEADS, 20, 8) and out.dtype == query.dtype
    out.square().sum().backward()
    # The zero-initialised last layer receives gradient at once (the others once it is non-zero).
    last = {"dense": "logit_weight", "random": "logits", "factorized_random": "key_factor"}[mode]
    assert dict(variant.named_parameters())[last].grad.abs().sum() > 0


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mode", MODES)
def test_untrained_rewrite_is_a_masked_mean_of_values(mode, causal):
    n = 16
    query, key, value = inputs(n, n)
    mask = key_mask("bool", n)
    allowed = mask.expand(2, HEADS, n, n)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool).tril()
    weights = allowed.float() / allowed.float().sum(-1, keepdim=True)
    expected = weights @ value.repeat_interleave(2, 1)
    out = synthesizer(mode)(query, key, value, mask=mask, causal=causal, scale=0.4)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("mask_kind", ["bool", "additive-inf", "general"])
@pytest.mark.parametrize("mode", MODES)
def test_masked_keys_get_zero_weight(mode, mask_kind):
    n = 16
    query, key, value = inputs(n, n)
    mask = key_mask("bool", n)  # batch 0: the last 5 keys are padding
    if mask_kind == "additive-inf":
        mask = torch.zeros(2, 1, 1, n).masked_fill(~mask, float("-inf"))
    elif mask_kind == "general":  # also hide the first 3 keys of batch 1 from every query
        mask = mask.expand(2, HEADS, n, n).clone()
        mask[1, :, :, :3] = False
    variant = synthesizer(mode, randomise=True)
    out = variant(query, key, value, mask=mask, scale=0.4)
    value[0, :, n - 5 :] += 100.0
    if mask_kind == "general":
        value[1, :, :3] += 100.0
    torch.testing.assert_close(variant(query, key, value, mask=mask, scale=0.4), out)


@pytest.mark.parametrize("mode", MODES)
def test_causal_rows_ignore_future_keys(mode):
    query, key, value = inputs(16, 16)
    variant = synthesizer(mode, randomise=True)
    out = variant(query, key, value, causal=True, scale=0.4)
    value[:, :, 10:] += 100.0
    again = variant(query, key, value, causal=True, scale=0.4)
    torch.testing.assert_close(again[:, :, :10], out[:, :, :10])
    assert not torch.allclose(again[:, :, 10:], out[:, :, 10:])


def test_capabilities_and_defaults():
    assert SynthesizerAttention.mask_classes == ALL_MASK_CLASSES
    assert (
        SynthesizerAttention.refuse(make_site(mask="general", causal=True, is_cross=True)) is None
    )
    assert get_variant("synthesizer")(make_site(query_len=40, key_len=70)).max_len == 70
    assert (
        get_variant("synthesizer")(make_site().replace(key_len="s0", query_len="s0")).max_len == 512
    )


def test_lengths_beyond_max_len_are_refused():
    with pytest.raises(VariantOptionError, match="max_len"):
        get_variant("synthesizer")(make_site(query_len=100), max_len=64)
    query, key, value = inputs(40, 40)
    with pytest.raises(RuntimeError, match="max_len"):
        synthesizer("random", max_len=32)(query, key, value)


@pytest.mark.parametrize(
    "options", [{"mode": "conv"}, {"mode": 1}, {"max_len": "64"}, {"factor": 0}, {"rank": 2}]
)
def test_bad_options_raise(options):
    with pytest.raises(VariantOptionError):
        get_variant("synthesizer")(make_site(), **options)


@pytest.mark.parametrize("mode", MODES)
def test_exports_with_dynamic_length(mode):
    module = Call(synthesizer(mode, max_len=64, randomise=True), causal=True)
    length = Dim("length", min=2, max=64)
    example = (*inputs(40, 40), key_mask("bool", 40))
    program = torch.export.export(
        module, example, dynamic_shapes=({2: length},) * 3 + ({3: length},), strict=False
    )
    other = (*inputs(23, 23, seed=1), key_mask("bool", 23))
    torch.testing.assert_close(program.module()(*other), module(*other))
