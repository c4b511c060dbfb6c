"""Axial and Transformer-XL patterns: dense masked softmax over each pattern written out as an
N x N boolean matrix, for every mask class, ragged lengths, grouped heads and cross-attention,
forward and backward; memory; export; rewrite of tiny ViT / BERT / Llama; Inductor (slow)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.export import Dim

import attnrewrite as ar
from attnrewrite.errors import VariantOptionError
from attnrewrite.site import ALL_MASK_CLASSES
from attnrewrite.variants import get_variant
from attnrewrite.variants.block_patterns import default_grid
from tests.variants.conftest import make_site
from tests.variants.test_patterns import (
    MASKS,
    Call,
    dense_reference,
    largest_allocation,
    make_inputs,
    relative_error,
)

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
CASES = {
    "axial-cls": ("axial", {"grid": (5, 6), "global_tokens": 1}, (31, 35)),
    "axial-plain": ("axial", {"grid": (4, 4), "global_tokens": 0}, (16, 19)),
    "transformer_xl": ("transformer_xl", {"segment": 6}, (36, 37)),
}


def dense_pattern(name: str, options: dict, q_len: int, k_len: int, causal: bool):
    i = torch.arange(q_len)[:, None]
    j = torch.arange(k_len)[None, :]
    if name == "axial":
        g, width = options["global_tokens"], options["grid"][1]
        grid = (i >= g) & (j >= g)
        same_row = (i - g) // width == (j - g) // width
        same_column = (i - g) % width == (j - g) % width
        keep = (grid & (same_row | same_column)) | (i < g) | (j < g)
    else:
        distance = i // options["segment"] - j // options["segment"]
        keep = (distance == 0) | (distance == 1)
    return keep & (j <= i) if causal else keep


def build(case: str, q_len: int):
    name, options, _ = CASES[case]
    site = make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, query_len=q_len)
    return get_variant(name)(site, **options)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("length_index", [0, 1], ids=["grid", "ragged"])
@pytest.mark.parametrize("case", list(CASES))
def test_equals_dense_masked_softmax(case, length_index, mask_name):
    causal, mask_kind = MASKS[mask_name]
    name, options, lengths = CASES[case]
    n = lengths[length_index]
    query, key, value, mask = make_inputs(n, n, mask_kind)
    out = build(case, n)(query, key, value, mask=mask, causal=causal, scale=0.3)
    ref = dense_reference(query, key, value, dense_pattern(name, options, n, n, causal), mask, 0.3)
    assert out.shape == ref.shape and not out.isnan().any()
    assert relative_error(out, ref) <= 1e-5
    if mask_kind == "key":
        assert out[1].abs().max() == 0


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", list(CASES))
def test_cross_attention_and_gradients(case, causal):
    name, options, lengths = CASES[case]
    q_len, k_len = lengths[1], lengths[0] + 9
    query, key, value, bias = make_inputs(q_len, k_len, "additive")
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    refs = [t.clone().requires_grad_() for t in (query, key, value)]
    out = build(case, q_len)(*inputs, mask=bias, causal=causal, scale=0.3)
    ref = dense_reference(*refs, dense_pattern(name, options, q_len, k_len, causal), bias, 0.3)
    assert relative_error(out, ref) <= 1e-5
    upstream = torch.randn_like(ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for got, want in zip(inputs, refs, strict=True):
        assert relative_error(got.grad, want.grad) <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_half_precision(case, dtype):
    name, options, lengths = CASES[case]
    n = lengths[1]
    query, key, value, _ = make_inputs(n, n, None)
    out = build(case, n)(query.to(dtype), key.to(dtype), value.to(dtype), causal=True, scale=0.3)
    ref = dense_reference(query, key, value, dense_pattern(name, options, n, n, True), None, 0.3)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out.float(), ref) <= 2e-2


def test_default_grid_follows_the_site():
    assert default_grid(197) == ((14, 14), 1)  # ViT-B/16: [CLS] + 14 x 14
    assert default_grid(256) == ((16, 16), 0)
    assert default_grid(30) == ((5, 6), 0)
    assert default_grid("s0") == ((32, 32), 0)
    variant = get_variant("axial")(make_site(query_len=50), grid=(7, 7))
    assert variant.grid == (7, 7) and variant.global_tokens == 1


@pytest.mark.parametrize("name", ["axial", "transformer_xl"])
def test_capabilities(name):
    cls = get_variant(name)
    assert cls.mask_classes == ALL_MASK_CLASSES and cls.supports_causal and cls.supports_cross
    assert "arXiv:" in cls.__doc__
    assert cls.refuse(make_site(mask="general", causal=True, is_cross=True)) is None


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("axial", {"grid": (0, 4)}),
        ("axial", {"grid": (4,)}),
        ("axial", {"global_tokens": -1}),
        ("transformer_xl", {"segment": 0}),
        ("transformer_xl", {"window": 3}),
    ],
)
def test_bad_options_raise(name, options):
    with pytest.raises(VariantOptionError):
        get_variant(name)(make_site(), **options)


@pytest.mark.parametrize(
    ("name", "options", "exponent"),
    [("axial", {}, 1.5), ("transformer_xl", {"segment": 16}, 1.0)],
)
def test_memory_is_subquadratic(name, options, exponent):
    sizes = [largest_allocation(name, options, n) for n in (256, 1024)]
    growth = math.log(sizes[1] / sizes[0]) / math.log(4)
    assert sizes[1] <= 1024 * 1024 // 8 and growth <= exponent + 0.15, growth


@pytest.mark.parametrize(
    "case",
    ["axial-cls", *(pytest.param(c, marks=pytest.mark.slow) for c in CASES if c != "axial-cls")],
)
def test_exports_with_dynamic_length(case):
    n = CASES[case][2][1]
    module = Call(build(case, n), causal=case != "axial-plain")
    length = Dim("length", min=2, max=4096)
    shapes = ({2: length}, {2: length}, {2: length}, {3: length})
    program = torch.export.export(
        module, make_inputs(n, n, "key"), dynamic_shapes=shapes, strict=False
    )
    for other in (3, n + 20):
        inputs = make_inputs(other, other, "key", seed=1)
        torch.testing.assert_close(program.module()(*inputs), module(*inputs))


# -- end to end ------------------------------------------------------------------------------------


def _zoo(name: str):
    pytest.importorskip("transformers")
    from tests.zoo.hf_models import ZOO

    zm = next(z for z in ZOO if z.name == name)
    return zm, zm.build("sdpa")


def test_axial_on_tiny_vit_keeps_cls_global():
    zm, model = _zoo("vit")
    rw = ar.rewrite(model, "axial", kwargs=zm.inputs())
    assert len(rw.report.rewritten) == 2, str(rw.report)
    variant = next(iter(rw.variant_modules.values()))
    tokens = rw.report.rewritten[0].site.query_len
    side = math.isqrt(tokens - 1)
    assert variant.grid == (side, side) and variant.global_tokens == 1
    other = zm.inputs(batch=3, seed=1)
    with torch.no_grad():
        out = zm.hidden(rw(**other))
    assert torch.isfinite(out).all() and out.shape == zm.hidden(model(**other)).shape


@pytest.mark.parametrize(
    ("name", "model_name"),
    [
        ("axial", "bert"),
        ("transformer_xl", "llama"),
        pytest.param("axial", "llama", marks=pytest.mark.slow),
        pytest.param("transformer_xl", "bert", marks=pytest.mark.slow),
    ],
)
def test_rewrite_tiny_bert_and_llama(name, model_name):
    zm, model = _zoo(model_name)
    rw = ar.rewrite(model, name, kwargs=zm.inputs(length=12), seed=0)
    assert len(rw.report.rewritten) == 2, str(rw.report)
    other = zm.inputs(batch=3, length=19, seed=1)
    with torch.no_grad():
        out = zm.hidden(rw(**other))
    assert torch.isfinite(out).all()


@pytest.mark.slow
def test_transformer_xl_onnx_and_inductor(tmp_path):
    pytest.importorskip("onnxruntime")
    from attnrewrite.backends.onnx import sequence_shapes

    # Eager BERT: its key mask stays (B, 1, 1, N), and the blockwise core gathers a key-only mask
    # without expanding it to (B, 1, N, N) (an Expand that ONNX would materialise).
    pytest.importorskip("transformers")
    from tests.zoo.hf_models import ZOO

    zm = next(z for z in ZOO if z.name == "bert")
    model = zm.build("eager")
    example = {**zm.inputs(length=24), "use_cache": False}
    rw = ar.rewrite(model, "transformer_xl", kwargs=example, segment=8)
    other = {**zm.inputs(batch=3, length=43, seed=1), "use_cache": False}
    with torch.no_grad():
        eager = rw(**other).last_hidden_state
        compiled = ar.compile(rw, backend="inductor")(**other).last_hidden_state
    assert torch.allclose(compiled, eager, atol=1e-4, rtol=1e-4)
    path = tmp_path / "txl.onnx"
    ar.export_onnx(rw, path)
    out = ar.onnx_session(path)(**other)
    ort = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    assert torch.allclose(torch.as_tensor(ort), eager, atol=1e-4, rtol=1e-4)
    shapes = sequence_shapes(path)
    assert shapes.symbols and shapes.unknown == () and shapes.quadratic == ()
