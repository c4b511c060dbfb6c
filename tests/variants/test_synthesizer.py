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


def reference(variant, query, value, mask, causal):
    """The definition written out per head and query row, in float64: logits B_i (dense: the
    MLP on q_i; random: R_i; factorized: R₁_i·R₂ᵀ), the mask added (booleans: -inf), future keys
    -inf when causal, then softmax over the allowed keys (a row with none is 0) times v."""
    params = {k: v.double() for k, v in variant.named_parameters()}
    batch, heads, q_len, _ = query.shape
    k_len = value.shape[2]
    group = heads // value.shape[1]
    out = torch.zeros(batch, heads, q_len, value.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(q_len):
                if variant.options.mode == "dense":
                    hidden = torch.relu(
                        query[b, h, i].double() @ params["hidden_weight"][h]
                        + params["hidden_bias"][h]
                    )
                    row = hidden @ params["logit_weight"][h, :, :k_len]
                    row = row + params["logit_bias"][h, :k_len]
                elif variant.options.mode == "random":
                    row = params["logits"][h, i, :k_len].clone()
                else:
                    row = params["key_factor"][h, :k_len] @ params["query_factor"][h, i]
                if mask is not None:
                    m = mask.expand(batch, heads, q_len, k_len)[b, h, i]
                    row = row.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else row + m
                if causal:
                    row[i + 1 :] = float("-inf")
                if torch.isinf(row).all():
                    continue
                out[b, h, i] = torch.softmax(row, dim=0) @ value[b, h // group].double()
    return out


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", [None, "bool", "additive", "general-empty-row"])
@pytest.mark.parametrize("mode", MODES)
def test_matches_the_dense_definition(mode, mask_kind, causal):
    """Trained-looking parameters, every mask kind (a query row with no allowed key included),
    against :func:`reference`: the fused path of dense and factorized_random computes the
    definition."""
    n = 12
    query, key, value = inputs(n, n)
    if mask_kind == "general-empty-row":
        mask = key_mask("bool", n).expand(2, HEADS, n, n).clone()
        mask[1, 2, 5, :] = False  # query 5 of head 2 in batch 1 sees no key at all
    else:
        mask = key_mask(mask_kind, n)
    variant = synthesizer(mode, randomise=True)
    with torch.no_grad():
        out = variant(query, key, value, mask=mask, causal=causal, scale=0.4)
    want = reference(variant, query, value, mask, causal)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


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


def test_a_row_with_no_allowed_key_is_zero_in_onnx_runtime(tmp_path):
    """ONNX's Softmax gives NaN on a row of -inf (torch's kernels give 0): the fused path zeroes
    such rows itself, so ONNX Runtime computes the definition too."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    n = 12
    query, key, value = inputs(n, n)
    mask = key_mask("bool", n).expand(2, HEADS, n, n).clone()
    mask[1, 2, 5, :] = False
    variant = synthesizer("dense", randomise=True)
    module = Call(variant, causal=False).eval()
    path = tmp_path / "synthesizer.onnx"
    torch.onnx.export(module, (query, key, value, mask), path, dynamo=True, verbose=False)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    feeds = {name: t.numpy() for name, t in zip(names, (query, key, value, mask), strict=True)}
    got = torch.from_numpy(session.run(None, feeds)[0])
    want = reference(variant, query, value, mask, causal=False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
