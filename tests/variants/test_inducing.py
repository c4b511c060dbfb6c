"""Set Transformer (induced attention) and memory-compressed attention: each equals its own formula
computed densely and independently (sdpa through the inducing points; F.conv1d compression and one
dense softmax over compressed blocks plus the own block), masks, refusals, gradients, memory,
export, rewrite of tiny BERT / Llama, ONNX Runtime and Inductor (slow)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.export import Dim

import attnrewrite as ar
from attnrewrite.errors import VariantOptionError
from attnrewrite.variants import get_variant
from attnrewrite.variants.blockwise import safe_softmax
from tests.variants.conftest import make_site
from tests.variants.test_patterns import (
    Call,
    LargestAllocation,
    largest_allocation,
    relative_error,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
MASKS = {
    "none": (False, None),
    "key": (False, "bool"),
    "key-additive": (False, "additive"),
    "causal": (True, None),
    "causal+key": (True, "bool"),
}


def inputs(q_len: int, k_len: int, mask_kind: str | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(2, HEADS, q_len, HEAD_DIM, generator=gen)
    key = torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen)
    value = torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen)
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(2, 1, 1, k_len, dtype=torch.bool)
        mask[0, ..., k_len - 6 :] = False
        mask[1, ..., 1::3] = False
    elif mask_kind == "additive":
        mask = torch.randn(2, HEADS, 1, k_len, generator=gen)
    return query, key, value, mask


def build(name: str, n: int = 32, **options):
    site = make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, query_len=n)
    return get_variant(name)(site, seed=0, **options)


def expand(x):
    return x.repeat_interleave(HEADS // KV_HEADS, 1)


# -- Set Transformer -------------------------------------------------------------------------------


def induced_reference(variant, query, key, value, mask, scale):
    points = variant.inducing.expand(query.shape[0], -1, -1, -1)
    summaries = F.scaled_dot_product_attention(
        points, expand(key), expand(value), attn_mask=mask, scale=scale
    )
    return F.scaled_dot_product_attention(query, points, summaries, scale=scale)


@pytest.mark.parametrize("mask_name", ["none", "key", "key-additive"])
@pytest.mark.parametrize(("q_len", "k_len"), [(32, 32), (19, 41)], ids=["self", "cross"])
def test_set_transformer_equals_its_formula(q_len, k_len, mask_name):
    _, mask_kind = MASKS[mask_name]
    query, key, value, mask = inputs(q_len, k_len, mask_kind)
    variant = build("set_transformer", num_inducing=6)
    out = variant(query, key, value, mask=mask, scale=0.3)
    assert relative_error(out, induced_reference(variant, query, key, value, mask, 0.3)) <= 1e-5


def test_set_transformer_masked_keys_do_not_leak_and_all_masked_gives_zero():
    query, key, value, mask = inputs(20, 20, "bool")
    variant = build("set_transformer", num_inducing=4)
    out = variant(query, key, value, mask=mask, scale=0.3)
    key[0, :, -6:] += 50.0
    value[0, :, -6:] -= 50.0
    torch.testing.assert_close(variant(query, key, value, mask=mask, scale=0.3), out)
    nothing = torch.zeros(2, 1, 1, 20, dtype=torch.bool)
    assert variant(query, key, value, mask=nothing, scale=0.3).abs().max() == 0


def test_set_transformer_refuses_causal_and_general_and_trains():
    cls = get_variant("set_transformer")
    assert "not causal" in cls.refuse(make_site(causal=True))
    assert cls.refuse(make_site(mask="general")) is not None
    assert cls.refuse(make_site(mask="key", is_cross=True)) is None
    variant = build("set_transformer", num_inducing=4)
    assert set(variant.state_dict()) == {"inducing"}
    query, key, value, _ = inputs(16, 16, None)
    variant(query, key, value, scale=0.3).square().sum().backward()
    assert variant.inducing.grad.abs().sum() > 0


# -- memory-compressed -----------------------------------------------------------------------------


def compressed_reference(variant, query, key, value, mask, causal, scale):
    """Independent dense form: F.conv1d compression, one softmax over [blocks ; raw keys]."""
    stride = variant.options.stride
    k_len = key.shape[2]
    weights = None
    if mask is not None:
        weights = (
            mask.float() if mask.dtype == torch.bool else torch.exp(mask - mask.amax(-1, True))
        )
        weights = weights.squeeze(-2)  # (B|1, H|1, Nk)
    key_h, value_h = expand(key), expand(value)
    kept = torch.ones(1, 1, k_len) if weights is None else (weights > 0).float()
    pad = (-k_len) % stride

    def conv(x, weight):  # (B, H, N, d) -> (B, H, N/k, d)
        b, h, n, d = x.shape
        x = F.pad((x * kept.unsqueeze(-1)).reshape(b * h, n, d).transpose(1, 2), (0, pad))
        kernel = weight.permute(1, 2, 0)  # (out, in, k)
        return F.conv1d(x, kernel, stride=stride).transpose(1, 2).reshape(b, h, -1, kernel.shape[0])

    ck, cv = conv(key_h, variant.key_compression), conv(value_h, variant.value_compression)
    blocks = ck.shape[2]
    scores_c = query @ ck.transpose(-1, -2) * scale
    if weights is not None:
        padded = F.pad(weights.expand(2, HEADS, k_len), (0, pad))
        real = F.pad(torch.ones(k_len), (0, pad)).reshape(blocks, stride).sum(-1)
        mean = padded.reshape(2, HEADS, blocks, stride).sum(-1) / real
        scores_c = scores_c + torch.log(mean).unsqueeze(-2)
    if not causal:
        return safe_softmax(scores_c) @ cv
    q_len = query.shape[2]
    i = torch.arange(q_len)[:, None]
    scores_c = scores_c.masked_fill(~(torch.arange(blocks)[None, :] < i // stride), float("-inf"))
    j = torch.arange(k_len)[None, :]
    scores_r = query @ key_h.transpose(-1, -2) * scale
    own = (j // stride == i // stride) & (j <= i)
    if mask is not None and mask.dtype == torch.bool:
        own = own & mask
    elif mask is not None:
        scores_r = scores_r + mask
    scores_r = scores_r.masked_fill(~own, float("-inf"))
    weights_all = safe_softmax(torch.cat([scores_c, scores_r], dim=-1))
    return weights_all @ torch.cat([cv, value_h.expand(2, -1, -1, -1)], dim=-2)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize(
    ("q_len", "k_len"), [(32, 32), (30, 30), (21, 43)], ids=["multiple", "ragged", "cross"]
)
def test_memory_compressed_equals_its_formula(q_len, k_len, mask_name):
    causal, mask_kind = MASKS[mask_name]
    query, key, value, mask = inputs(q_len, k_len, mask_kind)
    variant = build("memory_compressed", stride=4)
    with torch.no_grad():  # trained-looking weights, so that every tap matters
        variant.key_compression.add_(0.1 * torch.randn_like(variant.key_compression))
        variant.value_compression.add_(0.1 * torch.randn_like(variant.value_compression))
    out = variant(query, key, value, mask=mask, causal=causal, scale=0.3)
    ref = compressed_reference(variant, query, key, value, mask, causal, 0.3)
    assert not out.isnan().any() and relative_error(out, ref) <= 1e-5


def test_memory_compressed_starts_as_average_pooling_and_is_exact_at_stride_one():
    query, key, value, _ = inputs(24, 24, None)
    pooled = build("memory_compressed", stride=4)(query, key, value, scale=0.3)
    mean_k = expand(key).unflatten(2, (6, 4)).mean(3)
    mean_v = expand(value).unflatten(2, (6, 4)).mean(3)
    ref = F.scaled_dot_product_attention(query, mean_k, mean_v, scale=0.3)
    assert relative_error(pooled, ref) <= 1e-5
    exact = build("memory_compressed", stride=1)(query, key, value, causal=True, scale=0.3)
    ref = F.scaled_dot_product_attention(
        query, expand(key), expand(value), is_causal=True, scale=0.3
    )
    assert relative_error(exact, ref) <= 1e-5


def test_memory_compressed_gradients_and_parameters():
    query, key, value, mask = inputs(26, 26, "bool")
    variant = build("memory_compressed", stride=4)
    assert set(variant.state_dict()) == {"key_compression", "value_compression"}
    leaves = [t.clone().requires_grad_() for t in (query, key, value)]
    refs = [t.clone().requires_grad_() for t in (query, key, value)]
    out = variant(*leaves, mask=mask, causal=True, scale=0.3)
    ref = compressed_reference(variant, *refs, mask, True, 0.3)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for got, want in zip(leaves, refs, strict=True):
        assert relative_error(got.grad, want.grad) <= 1e-4
    assert variant.key_compression.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["set_transformer", "memory_compressed"])
def test_half_precision(name, dtype):
    query, key, value, mask = inputs(30, 30, "bool")
    variant = build(name)
    causal = name == "memory_compressed"
    out = variant(
        query.to(dtype), key.to(dtype), value.to(dtype), mask=mask, causal=causal, scale=0.3
    )
    ref = variant(query, key, value, mask=mask, causal=causal, scale=0.3)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out.float(), ref) <= 3e-2


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("set_transformer", {"num_inducing": 0}),
        ("memory_compressed", {"stride": 0}),
        ("memory_compressed", {"stride": 2.0}),
    ],
)
def test_bad_options_raise(name, options):
    with pytest.raises(VariantOptionError):
        build(name, **options)


def test_memory_slopes():
    def induced(n: int) -> int:
        variant = get_variant("set_transformer")(
            make_site(num_heads=1, head_dim=4), num_inducing=16
        )
        query, key, value = (torch.randn(1, 1, n, 4) for _ in range(3))
        with torch.no_grad(), LargestAllocation() as recorder:
            variant(query, key, value, mask=torch.ones(1, 1, 1, n, dtype=torch.bool), scale=0.5)
        return recorder.largest

    sizes = [induced(n) for n in (256, 1024)]
    assert math.log(sizes[1] / sizes[0]) / math.log(4) <= 1.1
    # Memory-compressed attention is O(N²/k) by design: far below N² at k = 8.
    sizes = [largest_allocation("memory_compressed", {"stride": 8}, n) for n in (256, 1024)]
    assert sizes[1] <= 1024 * 1024 // 6


def test_export_with_dynamic_length():
    for name, causal in (("set_transformer", False), ("memory_compressed", True)):
        module = Call(build(name), causal=causal)
        length = Dim("length", min=2, max=4096)
        example = inputs(30, 30, "bool")
        shapes = ({2: length}, {2: length}, {2: length}, {3: length})
        program = torch.export.export(module, example, dynamic_shapes=shapes, strict=False)
        for other in (3, 45):
            batch = inputs(other, other, "bool", seed=1)
            torch.testing.assert_close(program.module()(*batch), module(*batch))


# -- end to end ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "model_name"),
    [
        ("set_transformer", "bert"),
        ("memory_compressed", "llama"),
        pytest.param("set_transformer", "llama", marks=pytest.mark.slow),  # refused: causal
        pytest.param("memory_compressed", "bert", marks=pytest.mark.slow),
    ],
)
def test_rewrite_tiny_bert_and_llama(name, model_name):
    pytest.importorskip("transformers")
    from tests.zoo.hf_models import ZOO

    zm = next(z for z in ZOO if z.name == model_name)
    rw = ar.rewrite(zm.build("sdpa"), name, kwargs=zm.inputs(length=12), seed=0)
    cls = get_variant(name)
    for row in rw.report.sites:
        reason = cls.refuse(row.site)
        assert (row.status == "rewritten") == (reason is None), str(rw.report)
        assert reason is None or row.reason == reason
    other = zm.inputs(batch=3, length=19, seed=1)
    with torch.no_grad():
        assert torch.isfinite(zm.hidden(rw(**other))).all()


@pytest.mark.slow
def test_memory_compressed_onnx_and_inductor(tmp_path):
    pytest.importorskip("onnxruntime")
    from attnrewrite.backends.onnx import sequence_shapes
    from tests.variants.test_content import only_block_quadratic
    from tests.zoo.hf_models import ZOO

    zm = next(z for z in ZOO if z.name == "llama")
    rw = ar.rewrite(zm.build("sdpa"), "memory_compressed", kwargs=zm.inputs(length=24), stride=4)
    other = zm.inputs(batch=3, length=43, seed=1)
    with torch.no_grad():
        eager = rw(**other).last_hidden_state
        compiled = ar.compile(rw, backend="inductor")(**other).last_hidden_state
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)
    path = tmp_path / "mca.onnx"
    ar.export_onnx(rw, path)
    out = ar.onnx_session(path)(**other)
    ort = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    assert torch.allclose(torch.as_tensor(ort), eager, atol=1e-4, rtol=1e-4)
    shapes = sequence_shapes(path)
    # Scores against compressed blocks are N x N/k by design; nothing is N x N.
    assert shapes.symbols and shapes.unknown == () and only_block_quadratic(shapes)


# -- calibration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [("set_transformer", {"num_inducing": 4}), ("memory_compressed", {"stride": 2})],
)
def test_calibration_lowers_every_site_error(name, options):
    from attnrewrite.calibrate.calibrate import calibrate
    from tests.calibrate.test_calibrate import BERT, QK_GAIN, batches

    pytest.importorskip("transformers")
    model = BERT.build("eager")
    with torch.no_grad():  # peaked attention, as in a trained model (tests/calibrate)
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(QK_GAIN)
            layer.attention.self.key.weight.mul_(QK_GAIN)
    rw = ar.rewrite(model, name, kwargs=BERT.inputs(), seed=0, **options)
    result = calibrate(rw, batches(), steps=30, progress=False)
    assert len(result.rows) == 2
    for row in result.rows:
        assert row.error_after < 0.8 * row.error_before, row
