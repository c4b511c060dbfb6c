"""Numerical robustness of every registered variant, in the conditions real models produce.

- Half precision (fp16, bf16) with large-magnitude queries and keys (norms 30-100, as after a
  LayerNorm-free projection or in late layers): every variant's output is finite, and the exact
  ``softmax`` variant stays close to a float64 reference.
- Fully padded sequences (every key of one batch element masked): a kernel or structural variant's
  output is finite; the ``softmax`` rewrite of a model equals the original wherever the original
  is finite, and is NaN nowhere the original is not.

Variant-level tests build each variant directly from a site record
(:func:`tests.variants.conftest.make_site`), with the canonical (B, H, N, d) inputs the rewriter
passes; a variant that refuses a site (``cls.refuse``) is not asked to run it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnrewrite as ar
from attnrewrite.variants import get_variant, variant_names
from attnrewrite.variants.base import AttentionVariant
from tests.fuzz.strategies import Spelling
from tests.variants.conftest import make_site

BATCH, HEADS, KV_HEADS, LENGTH, HEAD_DIM = 2, 4, 2, 24, 16
HALF = [torch.float16, torch.bfloat16]
VARIANTS = variant_names(builtin_only=True)  # not variants other tests register
#: Options a variant cannot do without (everything else keeps its defaults).
REQUIRED_OPTIONS = {"kernel": {"feature_map": lambda x: F.elu(x) + 1.0}}


def _variant(name: str, **site_fields) -> AttentionVariant:
    """The variant ``name`` built for a site, or a skip naming why it refuses that site."""
    try:
        cls = get_variant(name)
    except ImportError as exc:  # "every registered variant that imports": say which does not
        pytest.skip(f"variant '{name}' does not import: {exc}")
    site = make_site(
        num_heads=HEADS, num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, query_len=LENGTH, **site_fields
    )
    reason = cls.refuse(site)
    if reason:
        pytest.skip(f"'{name}' refuses this site: {reason}")
    return cls(site, seed=0, **REQUIRED_OPTIONS.get(name, {})).eval()


def _large(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Random directions with norms drawn uniformly from [30, 100] along the last axis."""
    x = torch.randn(*shape, generator=generator)
    norms = 30 + 70 * torch.rand(*shape[:-1], 1, generator=generator)
    return x / x.norm(dim=-1, keepdim=True) * norms


def _qkv(dtype: torch.dtype, large: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    make = (lambda *s: _large(s, g)) if large else (lambda *s: torch.randn(*s, generator=g))
    q = make(BATCH, HEADS, LENGTH, HEAD_DIM)
    k = make(BATCH, KV_HEADS, LENGTH, HEAD_DIM)
    v = torch.randn(BATCH, KV_HEADS, LENGTH, HEAD_DIM, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _key_mask(form: str, dtype: torch.dtype, fully_padded: bool) -> torch.Tensor:
    """A (B, 1, 1, N) key mask: the last sequence half padded, or the first one fully."""
    keep = torch.ones(BATCH, 1, 1, LENGTH, dtype=torch.bool)
    keep[-1, ..., LENGTH // 2 :] = False
    if fully_padded:
        keep[0] = False
    if form == "bool":
        return keep
    fill = float("-inf") if form == "neg_inf" else torch.finfo(dtype).min
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, fill)


def _softmax_reference(q, k, v, *, mask, causal: bool, scale: float) -> torch.Tensor:
    q, k, v = q.double(), k.double(), v.double()
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.double()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)


# -- half precision, large magnitudes --------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", ["none", "key", "causal", "causal+key"])
@pytest.mark.parametrize("name", VARIANTS)
def test_half_precision_large_magnitudes_give_finite_outputs(
    name: str, mask: str, dtype: torch.dtype
) -> None:
    variant = _variant(name, mask=mask)
    q, k, v = _qkv(dtype, large=True)
    key = _key_mask("bool", dtype, fully_padded=False) if "key" in mask else None
    causal = mask.startswith("causal")
    with torch.no_grad():
        out = variant(q, k, v, mask=key, causal=causal, scale=variant.site.scale)
    assert out.shape == (BATCH, HEADS, LENGTH, HEAD_DIM)
    assert out.dtype == dtype
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"'{name}' ({mask}, {dtype}): {bad} of {out.numel()} outputs not finite"


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("mask", ["none", "key", "causal"])
def test_softmax_variant_half_precision_large_magnitudes_is_accurate(
    mask: str, dtype: torch.dtype
) -> None:
    """Exact softmax in half precision: the error is that of rounding the inputs and output."""
    variant = _variant("softmax", mask=mask)
    q, k, v = _qkv(dtype, large=True)
    key = _key_mask("bool", dtype, fully_padded=False) if mask == "key" else None
    causal = mask == "causal"
    with torch.no_grad():
        out = variant(q, k, v, mask=key, causal=causal, scale=variant.site.scale)
    ref = _softmax_reference(q, k, v, mask=key, causal=causal, scale=variant.site.scale)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3
    err = ((out.double() - ref).abs().max() / ref.abs().max()).item()
    assert err <= tolerance, f"{dtype}: relative error {err:.2e}"


# -- fully padded sequences -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("form", ["bool", "neg_inf", "finfo_min"])
@pytest.mark.parametrize("causal", [False, True], ids=["key", "causal+key"])
@pytest.mark.parametrize("name", VARIANTS)
def test_fully_padded_sequence_gives_finite_outputs(
    name: str, causal: bool, form: str, dtype: torch.dtype
) -> None:
    if name == "softmax" and form != "finfo_min":
        # softmax over no key at all is 0/0: exact softmax need not be finite there; the
        # model-level test below checks it matches the original model instead.
        pytest.skip("exact softmax of a fully masked row is undefined (see the model-level test)")
    variant = _variant(name, mask="causal+key" if causal else "key")
    q, k, v = _qkv(dtype, large=False)
    mask = _key_mask(form, dtype, fully_padded=True)
    with torch.no_grad():
        out = variant(q, k, v, mask=mask, causal=causal, scale=variant.site.scale)
    bad = (~torch.isfinite(out)).sum().item()
    assert bad == 0, f"'{name}' ({form} mask, {dtype}): {bad} of {out.numel()} outputs not finite"
    # The sequences that are not fully padded are unaffected by the other one.
    mask_one = mask[1:]
    with torch.no_grad():
        alone = variant(q[1:], k[1:], v[1:], mask=mask_one, causal=causal, scale=variant.site.scale)
    assert torch.allclose(out[1:].float(), alone.float(), atol=1e-3, rtol=1e-3)


#: Model spellings of a key-padding mask (the fill values models use), for the model-level test.
PADDED_MODELS = {
    "additive_finfo_min": Spelling(key_mask="additive_pad", fill="finfo_min"),
    "additive_-1e4": Spelling(key_mask="additive_pad", fill="-1e4"),
    "additive_-1e9": Spelling(key_mask="additive_pad", fill="-1e9"),
    "additive_-inf": Spelling(key_mask="additive_pad", fill="-inf"),
    "masked_fill_finfo_min": Spelling(key_mask="fill", fill="finfo_min"),
    "masked_fill_-1e9": Spelling(key_mask="fill", fill="-1e9"),
    "masked_fill_-inf": Spelling(key_mask="fill", fill="-inf"),
    "where_finfo_min": Spelling(key_mask="where", fill="finfo_min"),
    "where_-inf": Spelling(key_mask="where", fill="-inf"),
    "causal_masked_fill_finfo_min": Spelling(
        key_mask="fill", fill="finfo_min", causal="arange", causal_form="gt"
    ),
    "sdpa_bool": Spelling(kind="sdpa", product="sdpa", scale_at="sdpa_default", key_mask="fill"),
    "sdpa_additive_finfo_min": Spelling(
        kind="sdpa",
        product="sdpa",
        scale_at="sdpa_default",
        key_mask="additive_pad",
        fill="finfo_min",
    ),
}


@pytest.mark.parametrize("spelling", list(PADDED_MODELS.values()), ids=list(PADDED_MODELS))
def test_softmax_rewrite_of_a_fully_padded_sequence_matches_the_original(
    spelling: Spelling,
) -> None:
    model = spelling.build()
    x, pad = spelling.inputs(2, 8)
    rw = ar.rewrite(model, "softmax", args=(x, pad))
    assert [r.status for r in rw.report.sites] == ["rewritten"], str(rw.report)
    pad = pad.clone()
    pad[0] = False  # every key of the first sequence is padding
    with torch.no_grad():
        ref, out = model(x, pad), rw(x, pad)
    finite = torch.isfinite(ref)
    assert not (torch.isnan(out) & ~torch.isnan(ref)).any(), "NaN where the original has none"
    assert torch.allclose(out[finite], ref[finite], rtol=1e-5, atol=1e-6), (
        f"max difference where the original is finite: "
        f"{(out[finite] - ref[finite]).abs().max().item():.2e}"
    )


def test_numerics_cover_every_registered_variant() -> None:
    """The parametrisation is the built-in registry: a new variant is covered without editing this
    file (variants other tests register at run time are theirs to check)."""
    from attnrewrite.variants import _TABLE

    assert set(VARIANTS) == set(_TABLE) and set(VARIANTS) <= set(ar.variants())
    assert {"softmax", "linear"} <= set(VARIANTS)
