"""Pattern variants (local, Sparse Transformer, Longformer, BigBird) and their blockwise core.

Numerical: each variant equals dense softmax attention whose mask is the pattern written out as an
N x N boolean matrix (the only place dense masks appear), for every mask class, lengths that are and
are not multiples of the block, grouped key/value heads and cross-attention, forward and backward.
Structural: no tensor the pattern path allocates grows like N². Export: a dynamic sequence length.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
from torch.export import Dim
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import ALL_MASK_CLASSES
from attnrewrite.variants import get_variant
from attnrewrite.variants.blockwise import block_gather, ceil_div, safe_softmax
from tests.variants.conftest import make_site

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
TOLERANCE = 1e-5  # max abs error / max abs reference, float32


def window(w: int) -> Callable:
    return lambda i, j: (i - j).abs() <= w


@dataclasses.dataclass(frozen=True)
class PatternCase:
    """A variant with options, the pattern it must compute (dense form) and lengths to try."""

    name: str
    options: dict
    lengths: tuple[int, ...]  # one a multiple of the block size, one not

    def dense_pattern(self, variant, q_len: int, k_len: int, causal: bool) -> torch.Tensor:
        i = torch.arange(q_len)[:, None]
        j = torch.arange(k_len)[None, :]
        o = self.options
        if self.name == "local":
            keep = (i - j).abs() <= o["window"]
        elif self.name == "sparse_strided":
            keep = ((i - j).abs() < o["stride"]) | ((i - j) % o["stride"] == 0)
        elif self.name == "sparse_fixed":
            block, count = o["block"], o["num_summary"]
            keep = (i // block == j // block) | (j % block >= block - count)
        else:  # longformer, bigbird
            g = o["global_tokens"]
            keep = ((i - j).abs() <= o["window"]) | (i < g) | (j < g)
            if self.name == "bigbird":
                b = o["block_size"]
                picks = variant.random_blocks(
                    ceil_div(q_len, b), ceil_div(k_len, b), causal, torch.device("cpu")
                )
                keep = keep | (picks[i // b] == (j // b)[..., None]).any(-1)
        return keep & (j <= i) if causal else keep


CASES = [
    PatternCase("local", {"window": 5}, (32, 37)),
    PatternCase("local", {"window": 9, "block_size": 4}, (24, 27)),
    PatternCase("sparse_strided", {"stride": 6}, (36, 37)),
    PatternCase("sparse_fixed", {"block": 6, "num_summary": 2}, (36, 41)),
    PatternCase("longformer", {"window": 5, "global_tokens": 3, "block_size": 8}, (32, 37)),
    PatternCase(
        "bigbird",
        {"window": 4, "global_tokens": 3, "num_random": 2, "block_size": 4},
        (32, 37),
    ),
]
CASE_IDS = [f"{c.name}-{'-'.join(f'{k}{v}' for k, v in c.options.items())}" for c in CASES]

# name -> (causal, what mask to pass): the mask classes of DESIGN.md.
MASKS = {
    "none": (False, None),
    "causal": (True, None),
    "key": (False, "key"),
    "causal+key": (True, "key"),
    "general-additive": (False, "additive"),
    "general-bool": (False, "bool"),
    "causal+general": (True, "additive"),
}


def make_inputs(q_len: int, k_len: int, mask_kind: str | None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(2, HEADS, q_len, HEAD_DIM, generator=gen)
    key = torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen)
    value = torch.randn(2, KV_HEADS, k_len, HEAD_DIM, generator=gen)
    mask = None
    if mask_kind == "key":
        # Batch 0: the last keys are padding; batch 1: every key masked (rows must give 0).
        mask = torch.ones(2, 1, 1, k_len, dtype=torch.bool)
        mask[0, ..., k_len - 7 :] = False
        mask[1] = False
    elif mask_kind == "additive":
        mask = torch.randn(2, HEADS, q_len, k_len, generator=gen)
    elif mask_kind == "bool":
        mask = torch.rand(1, HEADS, q_len, k_len, generator=gen) > 0.3
    return query, key, value, mask


def dense_reference(query, key, value, pattern, mask, scale):
    """softmax over the dense pattern (and mask); rows with no allowed key are 0."""
    group = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
    scores = query @ key.transpose(-1, -2) * scale
    allowed = pattern.expand_as(scores)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        scores = scores + mask
    return safe_softmax(scores.masked_fill(~allowed, float("-inf"))) @ value


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def build(case: PatternCase, q_len: int = 32, seed: int = 0):
    site = make_site(num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, query_len=q_len)
    return get_variant(case.name)(site, seed=seed, **case.options)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("length_index", [0, 1], ids=["block-multiple", "ragged"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pattern_equals_dense_masked_softmax(case, length_index, mask_name):
    causal, mask_kind = MASKS[mask_name]
    n = case.lengths[length_index]
    query, key, value, mask = make_inputs(n, n, mask_kind)
    variant = build(case, n)
    out = variant(query, key, value, mask=mask, causal=causal, scale=0.3)
    ref = dense_reference(query, key, value, case.dense_pattern(variant, n, n, causal), mask, 0.3)
    assert out.shape == ref.shape and out.dtype == query.dtype
    assert not out.isnan().any()
    assert relative_error(out, ref) <= TOLERANCE
    if mask_kind == "key":
        assert out[1].abs().max() == 0  # every key masked: zeros, not NaN


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pattern_cross_attention(case, causal):
    q_len, k_len = case.lengths[1], case.lengths[0] + 11
    query, key, value, bias = make_inputs(q_len, k_len, "additive")
    variant = build(case, q_len)
    out = variant(query, key, value, mask=bias, causal=causal, scale=0.3)
    pattern = case.dense_pattern(variant, q_len, k_len, causal)
    ref = dense_reference(query, key, value, pattern, bias, 0.3)
    assert relative_error(out, ref) <= TOLERANCE


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_pattern_gradients_match_dense(case):
    n = case.lengths[1]
    query, key, value, mask = make_inputs(n, n, "additive")
    inputs = [t.clone().requires_grad_() for t in (query, key, value)]
    refs = [t.clone().requires_grad_() for t in (query, key, value)]
    variant = build(case, n)
    out = variant(*inputs, mask=mask, causal=True, scale=0.3)
    ref = dense_reference(*refs, case.dense_pattern(variant, n, n, True), mask, 0.3)
    upstream = torch.randn_like(ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for got, want in zip(inputs, refs, strict=True):
        assert relative_error(got.grad, want.grad) <= 1e-4


@pytest.mark.parametrize("case", CASES[:1] + CASES[2:], ids=CASE_IDS[:1] + CASE_IDS[2:])
def test_pattern_half_precision_keeps_dtype(case):
    n = case.lengths[1]
    query, key, value, _ = make_inputs(n, n, None)
    variant = build(case, n)
    out = variant(query.bfloat16(), key.bfloat16(), value.bfloat16(), causal=True, scale=0.3)
    ref = dense_reference(query, key, value, case.dense_pattern(variant, n, n, True), None, 0.3)
    assert out.dtype == torch.bfloat16
    assert relative_error(out.float(), ref) <= 2e-2


def test_block_gather_reads_rows_and_grouped_heads():
    """The shared gather (pattern core, LoLCATs hybrid, memory-compressed): padding reads row 0,
    query head h reads key/value head h // (H / Hkv)."""
    q_pos = torch.tensor([[0, 1, 2], [3, 4, 5]])  # Nq = 5: position 5 is padding
    k_pos = torch.tensor([[-1, 0, 1], [2, 3, 6]])  # Nk = 4: -1 and 6 are padding
    gather = block_gather(q_pos, k_pos, 5, 4, heads=4, kv_heads=2)
    assert gather.query_index.tolist() == [[0, 1, 2], [3, 4, 0]]
    assert gather.key_index.tolist() == [[0, 0, 1], [2, 3, 0]]
    query = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 4, 5, 1)
    key = torch.arange(2.0).view(1, 2, 1, 1) * 10 + torch.arange(4.0).view(1, 1, 4, 1)
    assert gather.queries(query).shape == (1, 4, 2, 3, 1)
    keys = gather.keys(key)  # (1, H, G, K, 1): head h reads head h // 2, then the key rows
    assert keys.shape == (1, 4, 2, 3, 1)
    assert keys[0, :, 1, :, 0].tolist() == [[2, 3, 0], [2, 3, 0], [12, 13, 10], [12, 13, 10]]


def test_bigbird_random_blocks_are_seeded_and_deterministic():
    case = CASES[-1]
    first, again, other = build(case, seed=1), build(case, seed=1), build(case, seed=2)
    device = torch.device("cpu")
    picks = first.random_blocks(50, 50, False, device)
    assert torch.equal(picks, again.random_blocks(50, 50, False, device))
    assert not torch.equal(picks, other.random_blocks(50, 50, False, device))
    assert picks.min() >= 0 and picks.max() < 50
    causal = first.random_blocks(50, 50, True, device)
    assert (causal <= torch.arange(50)[:, None]).all()  # causal draws never lie in the future


@pytest.mark.parametrize(
    "name", ["local", "sparse_strided", "sparse_fixed", "longformer", "bigbird"]
)
def test_pattern_capabilities(name):
    cls = get_variant(name)
    assert cls.mask_classes == ALL_MASK_CLASSES and cls.supports_causal and cls.supports_cross
    assert "arXiv:" in cls.__doc__
    site = make_site(mask="general", causal=True, is_cross=True)
    assert cls.refuse(site) is None


def test_sparse_defaults_follow_the_site_length():
    site = make_site(query_len=1000)
    assert get_variant("sparse_strided")(site).stride == 32  # ≈ √1000
    assert get_variant("sparse_fixed")(site).block == 32
    symbolic = make_site(query_len=32).replace(key_len="s0")
    assert get_variant("sparse_strided")(symbolic).stride == 64


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("local", {"window": "5"}),
        ("local", {"window": 2.5}),
        ("local", {"window": -1}),
        ("local", {"block_size": 0}),
        ("sparse_strided", {"stride": 0}),
        ("sparse_strided", {"stride": True}),
        ("sparse_fixed", {"block": 4, "num_summary": 5}),
        ("longformer", {"global_tokens": 1.0}),
        ("bigbird", {"num_random": -1}),
        ("bigbird", {"block_size": None}),
        ("bigbird", {"unknown": 1}),
    ],
)
def test_pattern_bad_options_raise(name, options):
    with pytest.raises(VariantOptionError):
        get_variant(name)(make_site(), **options)


# -- structure: memory grows like N·w (or N·√N), never N² ------------------------------------------


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage (in elements) any operation returns; views do not count."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                elements = tensor.untyped_storage().nbytes() // tensor.element_size()
                self.largest = max(self.largest, elements)
        return out


def largest_allocation(name: str, options: dict, n: int) -> int:
    site = make_site(num_heads=1, head_dim=4, query_len=n)
    variant = get_variant(name)(site, **options)
    query, key, value = (torch.randn(1, 1, n, 4) for _ in range(3))
    mask = torch.ones(1, 1, 1, n, dtype=torch.bool)
    with torch.no_grad(), LargestAllocation() as recorder:
        variant(query, key, value, mask=mask, causal=True, scale=0.5)
    return recorder.largest


@pytest.mark.parametrize(
    ("name", "options", "exponent"),
    [
        ("local", {"window": 16}, 1.0),
        ("longformer", {"window": 16, "global_tokens": 4}, 1.0),
        ("bigbird", {"window": 16, "global_tokens": 16, "num_random": 2, "block_size": 16}, 1.0),
        ("sparse_strided", {}, 1.5),  # stride ≈ √N from the site
        ("sparse_fixed", {}, 1.5),
    ],
)
def test_pattern_memory_is_subquadratic(name, options, exponent):
    small, large = 256, 1024
    sizes = [largest_allocation(name, options, n) for n in (small, large)]
    assert sizes[1] <= large * large // 8  # far below one N x N matrix
    growth = math.log(sizes[1] / sizes[0]) / math.log(large / small)
    assert growth <= exponent + 0.15, f"largest tensor grows like N^{growth:.2f}"


# -- export ----------------------------------------------------------------------------------------


class Call(torch.nn.Module):
    def __init__(self, variant, causal: bool) -> None:
        super().__init__()
        self.variant, self.causal = variant, causal

    def forward(self, query, key, value, mask):
        return self.variant(query, key, value, mask=mask, causal=self.causal, scale=0.3)


@pytest.mark.parametrize("case", [CASES[0], *CASES[2:]], ids=[CASE_IDS[0], *CASE_IDS[2:]])
def test_pattern_exports_with_dynamic_length(case):
    n = case.lengths[1]
    variant = build(case, n)
    module = Call(variant, causal=case.name in ("local", "sparse_fixed", "bigbird"))
    length = Dim("length", min=2, max=4096)
    shapes = ({2: length}, {2: length}, {2: length}, {3: length})
    program = torch.export.export(
        module, make_inputs(n, n, "key"), dynamic_shapes=shapes, strict=False
    )
    for other in (3, n + 20):  # shorter than one block, and longer
        inputs = make_inputs(other, other, "key", seed=1)
        torch.testing.assert_close(program.module()(*inputs), module(*inputs))


# -- the band fast path of `local` ---------------------------------------------------------------


def _dense_window(q, k, v, w, causal, keep, scale):
    """softmax over |i − j| <= w (and j <= i), keys dropped by ``keep`` (B, 1|H, 1, N): the
    definition, written densely; rows with no key give 0."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    n = q.shape[2]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = ((i - j).abs() <= w) & ((j <= i) if causal else True)
    allowed = allowed & keep if keep is not None else allowed
    scores = (q @ k.transpose(-1, -2) * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, -1).nan_to_num(0.0) @ v


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "shared", "per-head"])
@pytest.mark.parametrize(("w", "block"), [(0, None), (5, None), (16, 8), (40, 16)])
def test_local_band_path_matches_the_dense_window(causal, mask, w, block, monkeypatch) -> None:
    from attnrewrite.variants import blockwise, patterns

    calls, plain = [], []
    real = patterns.band_attention
    monkeypatch.setattr(
        patterns, "band_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    real_plain = blockwise._plain_band
    monkeypatch.setattr(
        blockwise, "_plain_band", lambda *a, **kw: plain.append(1) or real_plain(*a, **kw)
    )
    heads, kv_heads = 4, 2
    site = make_site(num_heads=heads, num_kv_heads=kv_heads, head_dim=16, causal=causal)
    variant = get_variant("local")(site, window=w, block_size=block)
    g = torch.Generator().manual_seed(0)
    lengths = (1, 2, 37, 70)
    for n in lengths:
        q = torch.randn(2, heads, n, 16, generator=g)
        k, v = (torch.randn(2, kv_heads, n, 16, generator=g) for _ in range(2))
        keep = None
        if mask is not None:
            keep = torch.ones(2, 1 if mask == "shared" else heads, 1, n, dtype=torch.bool)
            keep[1, ..., n // 2 :] = False
            keep[0, -1, ..., :3] = False
        out = variant(q, k, v, mask=keep, causal=causal, scale=0.3)
        expected = _dense_window(q, k, v, w, causal, keep, 0.3)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) == len(lengths)  # every call took the band path
    # without a mask, at these static lengths, its in-place layout
    assert len(plain) == (len(lengths) if mask is None else 0)


BAND_CASES = [
    PatternCase("longformer", {"window": 5, "global_tokens": 3, "block_size": 8}, (1, 2, 37)),
    PatternCase("longformer", {"window": 3, "global_tokens": 20, "block_size": None}, (7, 45)),
    PatternCase("longformer", {"window": 4, "global_tokens": 0, "block_size": None}, (9, 30)),
    CASES[-1],
    PatternCase(
        "bigbird",
        {"window": 9, "global_tokens": 0, "num_random": 3, "block_size": 4},
        (2, 41),
    ),
    PatternCase(
        "bigbird",
        {"window": 2, "global_tokens": 6, "num_random": 0, "block_size": 5},
        (4, 33),
    ),
    PatternCase("sparse_strided", {"stride": 6}, (1, 5, 37)),
    PatternCase("sparse_strided", {"stride": 1}, (1, 9)),
    PatternCase("sparse_strided", {"stride": 4}, (16, 30)),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask", [None, "shared", "per-head"])
@pytest.mark.parametrize(
    "case", BAND_CASES, ids=[f"{c.name}-{i}" for i, c in enumerate(BAND_CASES)]
)
def test_band_path_with_columns_matches_the_dense_pattern(case, mask, causal, monkeypatch):
    """Longformer's and BigBird's global tokens and random blocks as block columns of the band
    path (and global query rows), and the strided pattern's lanes, against the pattern written out
    densely: lengths shorter than a block and than the global tokens, every key of a row masked,
    grouped heads."""
    from attnrewrite.variants import patterns

    calls = []
    real = patterns.band_attention
    monkeypatch.setattr(
        patterns, "band_attention", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    for n in case.lengths:
        query, key, value, _ = make_inputs(n, n, None, seed=n)
        keep = None
        if mask is not None:
            keep = torch.ones(2, 1 if mask == "shared" else HEADS, 1, n, dtype=torch.bool)
            keep[1, ..., n // 2 :] = False
            keep[0, -1, ..., :3] = False
        variant = build(case, n)
        out = variant(query, key, value, mask=keep, causal=causal, scale=0.3)
        pattern = case.dense_pattern(variant, n, n, causal)
        ref = dense_reference(query, key, value, pattern, keep, 0.3).nan_to_num(0.0)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(calls) == len(case.lengths)
