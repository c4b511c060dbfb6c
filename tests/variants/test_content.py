"""Content-based sparse variants (reformer, routing, sinkhorn) and their bucketed core.

Numerical: each variant equals dense softmax whose mask is its own pair set written out as an
N x N boolean matrix, rebuilt here from the variant's buckets (or sorting network) with dense
comparisons, for every mask class it keeps, lengths on and off chunk multiples, grouped heads and
cross-attention, forward and backward. Structural: no tensor grows like N². End-to-end: rewrite of
tiny BERT and Llama, ONNX Runtime at another length without an N x N value, Inductor (slow),
calibration (routing's k-means, sinkhorn's sorting network).
"""

from __future__ import annotations

import math

import pytest
import torch

import attnrewrite as ar
from attnrewrite.site import MaskClass
from attnrewrite.variants import get_variant
from attnrewrite.variants.blockwise import safe_softmax
from tests.variants.conftest import make_site
from tests.variants.test_patterns import Call, largest_allocation, relative_error

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
VARIANTS = {
    "reformer": {"bucket_size": 8, "num_hashes": 3, "num_buckets": 4},
    "routing": {"chunk_size": 8, "num_clusters": 4},
    "sinkhorn": {"block_size": 8},
}
MASKS = {
    "none": (False, False),
    "key": (False, True),
    "causal": (True, False),
    "causal+key": (True, True),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_inputs(q_len: int, k_len: int, masked: bool, additive: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(2, HEADS, q_len, HEAD_DIM, generator=gen)
    key = torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen)
    value = torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen)
    mask = None
    if masked and additive:
        mask = torch.randn(2, 1, 1, k_len, generator=gen)
        mask[0, ..., k_len - 5 :] = float("-inf")
    elif masked:
        # Batch 0: the last keys are padding; batch 1: every key masked (rows must give 0).
        mask = torch.ones(2, 1, 1, k_len, dtype=torch.bool)
        mask[0, ..., k_len - 7 :] = False
        mask[1] = False
    return query, key, value, mask


def build(name: str, q_len: int, seed: int = 0, **extra):
    site = make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, query_len=q_len)
    return get_variant(name)(site, seed=seed, **{**VARIANTS[name], **extra})


def chunk_of(buckets: torch.Tensor, chunk: int) -> torch.Tensor:
    """(..., N) buckets -> chunk of every position after a stable sort by bucket."""
    order = torch.sort(buckets, dim=-1, stable=True).indices
    return torch.argsort(order, dim=-1) // chunk


def dense_pairs(variant, query, key, mask, causal: bool, scale: float):
    """(B, H, Nq, Nk) pair set of the variant, plus an additive bias on the pairs (sinkhorn)."""
    q_len, k_len = query.shape[2], key.shape[2]
    i = torch.arange(q_len)[:, None]
    j = torch.arange(k_len)[None, :]
    bias = torch.zeros(query.shape[0], HEADS, q_len, k_len)
    if variant.name == "sinkhorn":
        block = variant.options.block_size
        partner, beta = variant.partners(query, key, mask, causal, scale)  # (B, H, C)
        own = (i // block == j // block).expand(query.shape[0], HEADS, q_len, k_len)
        mate = partner[:, :, i // block] == j // block  # (B, H, Nq, Nk)
        bias = torch.where(mate & ~own, beta[:, :, i // block].expand_as(bias), bias)
        pairs = own | mate
    else:
        chunk = (
            variant.options.bucket_size
            if variant.name == "reformer"
            else (variant.options.chunk_size)
        )
        count = math.ceil(q_len / chunk)
        key_chunk = math.ceil(k_len / count)
        if variant.name == "reformer":
            q_buckets, k_buckets = variant.buckets(query), variant.buckets(key)
        else:
            q_buckets, k_buckets = variant.clusters(query), variant.clusters(key)
        k_buckets = k_buckets.repeat_interleave(HEADS // KV_HEADS, dim=1)
        qc = chunk_of(q_buckets, chunk).unsqueeze(-1)  # (B, H, R, Nq, 1)
        kc = chunk_of(k_buckets, key_chunk).unsqueeze(-2)  # (B, H, R, 1, Nk)
        pairs = ((qc == kc) | (kc == (qc - 1) % count)).any(dim=2)
    if causal:
        pairs = pairs & (j <= i)
        if variant.name != "sinkhorn":
            pairs = pairs | (i == j)  # the diagonal is always kept
    return pairs, bias


def dense_reference(variant, query, key, value, mask, causal, scale):
    pairs, bias = dense_pairs(variant, query, key, mask, causal, scale)
    group = HEADS // KV_HEADS
    key_h, value_h = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key_h.transpose(-1, -2) * scale + bias
    if mask is not None and mask.dtype == torch.bool:
        pairs = pairs & mask
    elif mask is not None:
        scores = scores + mask
    return safe_softmax(scores.masked_fill(~pairs, float("-inf"))) @ value_h


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("length", [32, 37], ids=["chunk-multiple", "ragged"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_equals_dense_softmax_over_its_pairs(name, length, mask_name):
    causal, masked = MASKS[mask_name]
    query, key, value, mask = make_inputs(length, length, masked)
    variant = build(name, length)
    out = variant(query, key, value, mask=mask, causal=causal, scale=0.3)
    ref = dense_reference(variant, query, key, value, mask, causal, 0.3)
    assert out.shape == ref.shape and out.dtype == query.dtype and not out.isnan().any()
    assert relative_error(out, ref) <= 1e-5
    if masked:
        assert out[1].abs().max() == 0  # every key masked: zeros, not NaN


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_cross_attention_and_additive_key_mask(name, causal):
    query, key, value, mask = make_inputs(21, 45, True, additive=True)
    variant = build(name, 21)
    out = variant(query, key, value, mask=mask, causal=causal, scale=0.3)
    ref = dense_reference(variant, query, key, value, mask, causal, 0.3)
    assert relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_gradients_match_dense(name):
    query, key, value, mask = make_inputs(29, 29, True, additive=True)
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    refs = [t.clone().requires_grad_() for t in (query, key, value)]
    variant = build(name, 29)
    out = variant(*inputs, mask=mask, causal=True, scale=0.3)
    # Sinkhorn's partner bias depends on q and k through the sorting network: keep its gradient.
    pairs, bias = dense_pairs(variant, refs[0], refs[1], mask, True, 0.3)
    group = HEADS // KV_HEADS
    scores = refs[0] @ refs[1].repeat_interleave(group, 1).transpose(-1, -2) * 0.3 + bias + mask
    ref = safe_softmax(scores.masked_fill(~pairs, float("-inf"))) @ refs[2].repeat_interleave(
        group, 1
    )
    upstream = torch.randn_like(ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for got, want in zip(inputs, refs, strict=True):
        assert relative_error(got.grad, want.grad) <= 1e-4


def test_sinkhorn_sorting_network_receives_gradient():
    query, key, value, _ = make_inputs(40, 40, False)
    variant = build("sinkhorn", 40)
    variant(query, key, value, causal=True, scale=0.3).square().sum().backward()
    for parameter in (variant.query_sort, variant.key_sort, variant.partner_gain):
        assert parameter.grad.abs().sum() > 0
    assert set(variant.state_dict()) == {"query_sort", "key_sort", "partner_gain"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_half_precision_is_finite(name, dtype):
    query, key, value, mask = make_inputs(37, 37, True)
    variant = build(name, 37)
    out = variant(
        query.to(dtype), key.to(dtype), value.to(dtype), mask=mask[:1], causal=True, scale=0.3
    )
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = variant(query, key, value, mask=mask[:1], causal=True, scale=0.3)
    # Half-precision hashing may put a few vectors in other buckets: compare most rows only.
    close = ((out[0].float() - ref[0]).abs().amax(-1) < 3e-2).float().mean()
    assert close > 0.9


def test_single_chunk_is_exact_softmax():
    """A sequence of one chunk: every query sees every key once (no double counting)."""
    query, key, value, mask = make_inputs(7, 7, True, additive=True)
    for name in VARIANTS:
        out = build(name, 7)(query, key, value, mask=mask, scale=0.3)
        group = HEADS // KV_HEADS
        ref = torch.nn.functional.scaled_dot_product_attention(
            query,
            key.repeat_interleave(group, 1),
            value.repeat_interleave(group, 1),
            attn_mask=mask,
            scale=0.3,
        )
        assert relative_error(out[:1], ref[:1]) <= 1e-5, name


def test_reformer_rotations_are_seeded_buffers():
    first, again, other = (
        build("reformer", 32, 1),
        build("reformer", 32, 1),
        build("reformer", 32, 2),
    )
    assert torch.equal(first.rotations, again.rotations)
    assert not torch.equal(first.rotations, other.rotations)
    assert list(first.parameters()) == [] and first.rotations.shape == (HEAD_DIM, 3, 2)


def test_capabilities_and_refusals():
    for name in VARIANTS:
        cls = get_variant(name)
        assert "arXiv:" in cls.__doc__
        assert cls.refuse(make_site(mask="causal+key", is_cross=True)) is None
        reason = cls.refuse(make_site(mask="general"))
        assert reason and "general" in reason
    default = get_variant("reformer")(make_site(query_len=1000))
    assert default.num_buckets == 16  # ⌈1000 / 64⌉ rounded up to even


@pytest.mark.parametrize("name", list(VARIANTS))
def test_memory_is_linear(name):
    # Fixed bucket and cluster counts: the attention's memory (hashing/routing is O(N·count)).
    options = {
        "reformer": {"bucket_size": 16, "num_hashes": 2, "num_buckets": 8},
        "routing": {"chunk_size": 16, "num_clusters": 8},
        "sinkhorn": {"block_size": 16},
    }[name]
    sizes = [largest_allocation(name, options, n) for n in (256, 1024)]
    growth = math.log(sizes[1] / sizes[0]) / math.log(4)
    bound = 1.35 if name == "sinkhorn" else 1.15  # sinkhorn's (N/b)² block sort is small here
    assert sizes[1] <= 1024 * 1024 // 8 and growth <= bound, growth


def test_routing_refine_is_kmeans_and_lowers_error():
    from attnrewrite.calibrate.mode import SiteCall

    gen = torch.Generator().manual_seed(0)
    query, key, value, _ = make_inputs(64, 64, False)
    # Clustered data: four directions plus noise, tokens in random order.
    centres = torch.nn.functional.normalize(torch.randn(4, HEAD_DIM, generator=gen), dim=-1) * 3
    key = centres[torch.randint(0, 4, (2, KV_HEADS, 64), generator=gen)] + 0.3 * key
    query = centres[torch.randint(0, 4, (2, HEADS, 64), generator=gen)] + 0.3 * query
    variant = build("routing", 64, chunk_size=16)
    exact = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(2, 1), value.repeat_interleave(2, 1), scale=0.3
    )

    def error() -> float:
        return ((variant(query, key, value, scale=0.3) - exact).norm() / exact.norm()).item()

    before = error()
    variant.refine([SiteCall(query, key, value, None, False, 0.3, exact)])
    assert torch.allclose(variant.centroids.norm(dim=-1), torch.ones(KV_HEADS, 4))
    assert error() < 0.8 * before


# -- end to end ------------------------------------------------------------------------------------


def _model(name: str):
    pytest.importorskip("transformers")
    from tests.zoo.hf_models import ZOO

    zm = next(z for z in ZOO if z.name == name)
    return zm, zm.build("eager" if name == "bert" else "sdpa")


# Every variant on BERT (key mask); on Llama (causal+key, grouped heads) reformer by default and
# the others as slow tests: the same core path, and each capture costs seconds.
REWRITES = [
    *((name, "bert") for name in VARIANTS),
    ("reformer", "llama"),
    *(pytest.param(name, "llama", marks=pytest.mark.slow) for name in ("routing", "sinkhorn")),
]


@pytest.mark.parametrize(("name", "model_name"), REWRITES)
def test_rewrite_tiny_bert_and_llama(name, model_name):
    expected = {"bert": MaskClass.KEY, "llama": MaskClass.CAUSAL_KEY}[model_name]
    zm, model = _model(model_name)
    options = {
        "reformer": {"bucket_size": 4},
        "routing": {"chunk_size": 4},
        "sinkhorn": {"block_size": 4},
    }[name]
    rw = ar.rewrite(model, name, kwargs=zm.inputs(length=12), seed=0, **options)
    assert len(rw.report.rewritten) == 2, str(rw.report)
    assert all(row.site.mask == expected for row in rw.report.rewritten)
    other = zm.inputs(batch=3, length=19, seed=1)
    with torch.no_grad():
        out = zm.hidden(rw(**other))
    assert torch.isfinite(out).all() and out.shape == zm.hidden(model(**other)).shape


@pytest.mark.slow  # ONNX export of a BERT takes over a minute on a busy two-core machine
@pytest.mark.parametrize("name", ["reformer", "sinkhorn"])
def test_onnx_runtime_at_another_length_without_quadratic_values(name, tmp_path):
    pytest.importorskip("onnxruntime")
    from attnrewrite.backends.onnx import sequence_shapes

    zm, model = _model("bert")
    options = {"reformer": {"bucket_size": 8}, "sinkhorn": {"block_size": 8}}[name]
    # use_cache=False explicitly: capture fills it in for Hugging Face models, and an ONNX
    # session is called with exactly the exported structure.
    example = {**zm.inputs(length=24), "use_cache": False}
    rw = ar.rewrite(model, name, kwargs=example, seed=0, **options)
    path = tmp_path / f"{name}.onnx"
    ar.export_onnx(rw, path)
    other = {**zm.inputs(batch=3, length=43, seed=1), "use_cache": False}
    out = ar.onnx_session(path)(**other)
    ort = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    with torch.no_grad():
        eager = rw(**other).last_hidden_state
    assert torch.allclose(torch.as_tensor(ort), eager, atol=1e-4, rtol=1e-4)
    shapes = sequence_shapes(path)
    assert shapes.symbols and shapes.unknown == ()
    assert only_block_quadratic(shapes), shapes.quadratic


def only_block_quadratic(shapes) -> bool:
    """Every value with two growing axes grows at most once like N itself (the others are block
    counts N/b): Sinkhorn's block sort; an N x N value has the bare symbol twice."""
    return all(sum(dim in shapes.symbols for dim in dims) <= 1 for _, dims in shapes.quadratic)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(VARIANTS))
def test_inductor_matches_eager(name):
    variant = build(name, 37)
    module = Call(variant, causal=True)
    compiled = ar.compile(module, backend="inductor", fullgraph=True)  # no graph break inside
    for length in (37, 50):
        inputs = make_inputs(length, length, True, seed=length)
        torch.testing.assert_close(compiled(*inputs), module(*inputs), atol=1e-5, rtol=1e-4)


# -- calibration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "options"),
    [
        pytest.param("routing", {"chunk_size": 4, "num_clusters": 3}, id="routing-kmeans"),
        pytest.param(
            "sinkhorn", {"block_size": 4}, id="sinkhorn-sorting-network", marks=pytest.mark.slow
        ),
    ],
)
def test_calibration_lowers_site_errors(name, options):
    pytest.importorskip("transformers")
    from attnrewrite.calibrate.calibrate import calibrate
    from tests.calibrate.test_calibrate import BERT, QK_GAIN, batches

    model = BERT.build("eager")
    with torch.no_grad():  # peaked attention, as in a trained model (tests/calibrate)
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(QK_GAIN)
            layer.attention.self.key.weight.mul_(QK_GAIN)
    rw = ar.rewrite(model, name, kwargs=BERT.inputs(), seed=0, **options)
    result = calibrate(rw, batches(), steps=40, progress=False)
    assert len(result.rows) == 2
    # Never worse per site (a refinement or training that raised a site's error is undone), and
    # lower overall: k-means of the centroids, gradient steps of the sorting network.
    assert all(row.error_after <= row.error_before for row in result.rows)
    assert sum(r.error_after for r in result.rows) < 0.97 * sum(r.error_before for r in result.rows)
