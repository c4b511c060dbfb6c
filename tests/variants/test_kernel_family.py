"""Table-driven numerical tests shared by every kernel variant.

Each variant is compared with a naive dense O(N²) reference of *its own* kernel, with the feature
map written out here from the variant's parameters and buffers (not by calling the variant's
feature code), in float64. Scenarios cover non-causal and causal attention, key padding as a
boolean and as an additive float mask, grouped key/value heads, Nq ≠ Nk and lengths that are not
multiples of the chunk size.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.export import Dim

from attnrewrite.errors import VariantOptionError
from attnrewrite.variants import get_variant
from attnrewrite.variants.base import AttentionVariant
from attnrewrite.variants.kernel import FeatureMapAttention
from attnrewrite.variants.kernel_core import init_state, step
from tests.variants.references import dense_kernel_reference, dense_window_kernel_reference

HEAD_DIM = 16
CHUNK = 16


class SoftplusFeatures(nn.Module):
    """A trainable feature map for the generic ``kernel`` variant: softplus(W x + b)."""

    def __init__(self, dim: int = HEAD_DIM, features: int = 12) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, features)

    def forward(self, x: Tensor) -> Tensor:
        return F.softplus(self.proj(x))


# -- reference feature maps, written from each variant's parameters ------------------------------


def _per_query_head(param: Tensor, heads: int) -> Tensor:
    return param.repeat_interleave(heads // param.shape[0], dim=0)


def _ref_kernel(variant, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    proj = variant.feature_map.proj
    w, b = proj.weight.double(), proj.bias.double()
    return F.softplus(q @ w.T + b), F.softplus(k @ w.T + b)


def _ref_performer(variant, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    w = variant.projection.double()
    m = w.shape[0]

    def phi(x: Tensor) -> Tensor:
        return torch.exp(x @ w.T - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(m)

    return phi(q), phi(k)


def _ref_rfa(variant, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    w = variant.projection.double()
    sigma = variant.log_sigma.detach().double().exp()  # per key/value head

    def phi(x: Tensor, sigma_per_head: Tensor) -> Tensor:
        angle = (x / x.norm(dim=-1, keepdim=True)) @ w.T / sigma_per_head[:, None, None]
        return torch.cat([angle.sin(), angle.cos()], dim=-1) / math.sqrt(w.shape[0])

    return phi(q, _per_query_head(sigma, q.shape[1])), phi(k, sigma)


def _ref_t2r(variant, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    w, b = variant.weight.detach().double(), variant.bias.detach().double()

    def phi(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.relu(torch.einsum("bhnd,hmd->bhnm", x, w) + b[:, None, :])

    heads = q.shape[1]
    return phi(q, _per_query_head(w, heads), _per_query_head(b, heads)), phi(k, w, b)


def _ref_linear(variant, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    return F.elu(q) + 1, F.elu(k) + 1


def _ref_hedgehog(variant, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    def phi(x: Tensor, w: Tensor) -> Tensor:
        z = torch.einsum("bhnd,hmd->bhnm", x, w.detach().double())
        return torch.softmax(torch.cat([z, -z], dim=-1), dim=-1)

    return phi(q, variant.query_weight), phi(k, variant.key_weight)


def _ref_cosformer(q: Tensor, k: Tensor, v: Tensor, weights: Tensor | None, causal: bool) -> Tensor:
    """cosFormer written directly: A_ij = w_j relu(q_i)·relu(k_j) cos(π/2·(i − j)/M)."""
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    i = torch.arange(q.shape[2], dtype=torch.float64)[:, None]
    j = torch.arange(k.shape[2], dtype=torch.float64)[None, :]
    longest = max(q.shape[2], k.shape[2])
    reweighting = torch.cos(math.pi / 2 * (i - j) / longest)
    a = (torch.relu(q) @ torch.relu(k).transpose(-1, -2)) * reweighting
    if weights is not None:
        a = a * weights.unsqueeze(-2)
    if causal:
        a = a * (j <= i)
    return (a @ v) / a.sum(-1, keepdim=True).clamp_min(1e-6)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A row of the variant table: registry name, options, and its reference feature map."""

    name: str
    options: Callable[[], dict] = dict
    features: Callable | None = None  # (variant, q, k) -> (φq, φk); None: cosFormer's formula
    perturb: bool = False  # jitter parameters so per-head mappings are actually tested
    causal_only: bool = False
    window: bool = False  # the LoLCATs hybrid (an exact sliding window): no recurrent step

    def build(self, site, seed: int = 0, chunk: int = CHUNK) -> AttentionVariant:
        variant = get_variant(self.name)(site, seed=seed, chunk_size=chunk, **self.options())
        if self.perturb:
            g = torch.Generator().manual_seed(seed + 100)
            with torch.no_grad():
                for param in variant.parameters():
                    param.add_(0.3 * torch.randn(param.shape, generator=g))
        return variant


VARIANTS = {
    "linear": Variant("linear", dict, _ref_linear),
    "kernel": Variant("kernel", lambda: {"feature_map": SoftplusFeatures()}, _ref_kernel),
    "performer": Variant("performer", dict, _ref_performer),
    "rfa": Variant("rfa", lambda: {"learn_sigma": True}, _ref_rfa, perturb=True),
    "rfa_gate": Variant("rfa", lambda: {"gate": True}, None, perturb=True, causal_only=True),
    "cosformer": Variant("cosformer", dict, None),
    "t2r": Variant("t2r", dict, _ref_t2r, perturb=True),
    "hedgehog": Variant("hedgehog", dict, _ref_hedgehog, perturb=True),
    "t2r_window": Variant(
        "t2r", lambda: {"window": 8, "global_tokens": 2}, _ref_t2r, perturb=True, window=True
    ),
    "hedgehog_window": Variant(
        "hedgehog",
        lambda: {"window": 5, "feature_dim": 12},
        _ref_hedgehog,
        perturb=True,
        window=True,
    ),
}


def _reference(row: Variant, variant, q, k, v, weights, causal, scale) -> Tensor:
    """The dense float64 reference of ``row``'s kernel on float64 copies of the inputs."""
    root = math.sqrt(scale)
    q, k, v = q.double() * root, k.double() * root, v.double()
    if row.name == "cosformer":
        return _ref_cosformer(q, k, v, weights, causal)
    if row.name == "rfa" and variant.options.gate:
        logit = torch.einsum("bhnd,hd->bhn", k, variant.gate_weight.detach().double())
        logit = logit + variant.gate_bias.detach().double()[:, None]
        heads = q.shape[1]
        admit = 1 - torch.sigmoid(logit)
        log_decay = F.logsigmoid(logit)
        if weights is not None and weights.shape[1] == heads and heads != k.shape[1]:
            admit = admit.repeat_interleave(heads // k.shape[1], dim=1)
            log_decay = log_decay.repeat_interleave(heads // k.shape[1], dim=1)
        admit = admit if weights is None else admit * weights
        phi_q, phi_k = _ref_rfa(variant, q, k)
        return dense_kernel_reference(
            phi_q, phi_k, v, key_weights=admit, causal=True, log_decay=log_decay
        )
    phi_q, phi_k = row.features(variant, q, k)
    if row.window:
        # q and k already carry √scale each.
        return dense_window_kernel_reference(
            q,
            k,
            v,
            phi_q,
            phi_k,
            window=variant.options.window,
            global_tokens=variant.options.global_tokens,
            query_log_gain=variant.log_gain.detach().double()[:, None]
            + torch.einsum("bhnd,hd->bhn", q, variant.query_gate.detach().double()),
            key_log_gain=torch.einsum("bhnd,hd->bhn", k, variant.key_gate.detach().double()),
            key_weights=weights,
            causal=causal,
        )
    return dense_kernel_reference(phi_q, phi_k, v, key_weights=weights, causal=causal)


@dataclasses.dataclass(frozen=True)
class Scenario:
    heads: int = 4
    kv_heads: int = 4
    q_len: int = 37
    k_len: int = 37
    causal: bool = False
    # None, "bool" or "float" (one mask for all heads), "bool_per_head" or "float_per_head".
    mask: str | None = None


SCENARIOS = {
    "plain": Scenario(),
    "causal": Scenario(causal=True),
    "key_bool": Scenario(mask="bool"),
    "key_float": Scenario(mask="float_per_head"),
    "causal_key_bool": Scenario(causal=True, mask="bool"),
    "causal_key_float": Scenario(causal=True, mask="float"),
    "grouped": Scenario(kv_heads=2, mask="bool_per_head"),
    "grouped_causal": Scenario(kv_heads=1, causal=True, mask="float"),
    "grouped_causal_mask_per_head": Scenario(kv_heads=2, causal=True, mask="bool_per_head"),
    "cross": Scenario(q_len=23, k_len=41, mask="bool"),
    "short_causal": Scenario(q_len=5, k_len=5, causal=True),
}


def _make_inputs(sc: Scenario, batch: int = 2, seed: int = 0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, sc.heads, sc.q_len, HEAD_DIM, generator=g)
    k = torch.randn(batch, sc.kv_heads, sc.k_len, HEAD_DIM, generator=g)
    v = torch.randn(batch, sc.kv_heads, sc.k_len, HEAD_DIM, generator=g)
    mask = weights = None
    if sc.mask is not None:
        mask_heads = sc.heads if sc.mask.endswith("per_head") else 1
        keep = torch.rand(batch, mask_heads, 1, sc.k_len, generator=g) > 0.3
        keep[..., 0] = True  # the first key stays, so no causal row is empty
        if sc.mask.startswith("bool"):
            mask, weights = keep, keep.squeeze(-2).double()
        else:
            bias = torch.randn(batch, mask_heads, 1, sc.k_len, generator=g)
            mask = bias.masked_fill(~keep, float("-inf"))
            weights = mask.squeeze(-2).double().exp()
    return q.to(dtype), k.to(dtype), v.to(dtype), mask, weights


def _site(sc: Scenario, site_factory):
    return site_factory(
        num_heads=sc.heads,
        num_kv_heads=sc.kv_heads,
        head_dim=HEAD_DIM,
        causal=sc.causal,
        is_cross=sc.q_len != sc.k_len,
        query_len=sc.q_len,
        key_len=sc.k_len,
    )


def _relative_error(out: Tensor, ref: Tensor) -> float:
    return ((out.double() - ref).abs().max() / ref.abs().max()).item()


def _cases():
    for vname, row in VARIANTS.items():
        for sname, sc in SCENARIOS.items():
            if row.causal_only and not sc.causal:
                continue
            yield pytest.param(vname, sname, id=f"{vname}-{sname}")


@pytest.mark.parametrize(("vname", "sname"), list(_cases()))
def test_matches_dense_reference_of_its_kernel(vname: str, sname: str, site_factory) -> None:
    row, sc = VARIANTS[vname], SCENARIOS[sname]
    variant = row.build(_site(sc, site_factory))
    q, k, v, mask, weights = _make_inputs(sc)
    scale = HEAD_DIM**-0.5
    out = variant(q, k, v, mask=mask, causal=sc.causal, scale=scale)
    ref = _reference(row, variant, q, k, v, weights, sc.causal, scale)
    assert out.shape == (2, sc.heads, sc.q_len, HEAD_DIM) and out.dtype == torch.float32
    if row.window:
        # The hybrid's far part is the whole kernel sum minus its in-window terms: in float32 that
        # difference loses digits when the window holds most of the kernel mass. In float64 the
        # same code meets the tight bound, so the definition itself is exact.
        assert _relative_error(out, ref) <= 1e-4
        out = variant.double()(
            q.double(),
            k.double(),
            v.double(),
            mask=mask if mask is None or mask.dtype == torch.bool else mask.double(),
            causal=sc.causal,
            scale=scale,
        )
    assert _relative_error(out, ref) <= 1e-5


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("vname", VARIANTS)
def test_gradcheck_float64(vname: str, causal: bool, site_factory) -> None:
    row = VARIANTS[vname]
    if row.causal_only and not causal:
        pytest.skip("causal-only configuration")
    sc = Scenario(heads=2, kv_heads=1, q_len=7, k_len=7, causal=causal, mask="float")
    variant = row.build(_site(sc, site_factory), chunk=4).double()
    q, k, v, mask, _ = _make_inputs(sc, batch=1, dtype=torch.float64)
    inputs = tuple(x.clone().requires_grad_() for x in (q, k, v))

    def fn(q, k, v):
        return variant(q, k, v, mask=mask.double(), causal=causal, scale=0.5)

    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


def _scaled_features(variant, q, k, scale):
    root = math.sqrt(scale)
    return variant.feature_maps(q * root, k * root, None)


@pytest.mark.parametrize(
    "vname", [n for n, row in VARIANTS.items() if not (row.causal_only or row.window)]
)
def test_step_over_sequence_equals_causal_forward(vname: str, site_factory) -> None:
    sc = Scenario(kv_heads=2, q_len=21, k_len=21, causal=True)
    variant = VARIANTS[vname].build(_site(sc, site_factory))
    q, k, v, _, _ = _make_inputs(sc)
    parallel = variant(q, k, v, causal=True, scale=0.25)
    phi_q, phi_k = _scaled_features(variant, q, k, 0.25)
    state = init_state(2, sc.kv_heads, phi_k.shape[-1], HEAD_DIM)
    outs = []
    for t in range(sc.q_len):
        out_t, state = step(state, phi_q[:, :, t], phi_k[:, :, t], v[:, :, t])
        outs.append(out_t)
    assert _relative_error(torch.stack(outs, dim=2), parallel.double()) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("vname", VARIANTS)
def test_half_precision_inputs_compute_in_float32(
    vname: str, dtype: torch.dtype, site_factory
) -> None:
    sc = SCENARIOS["grouped_causal"]
    variant = VARIANTS[vname].build(_site(sc, site_factory))
    q, k, v, mask, _ = _make_inputs(sc, dtype=dtype)
    out = variant(q, k, v, mask=mask, causal=True, scale=0.25)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = variant(q.float(), k.float(), v.float(), mask=mask, causal=True, scale=0.25)
    tol = 1e-3 if dtype == torch.float16 else 8e-3  # only the final rounding differs
    assert _relative_error(out.float(), ref.double()) < tol


class _Attend(nn.Module):
    def __init__(self, variant: AttentionVariant, causal: bool) -> None:
        super().__init__()
        self.variant, self.causal = variant, causal

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        return self.variant(q, k, v, mask=mask, causal=self.causal, scale=0.25)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("vname", VARIANTS)
def test_exports_with_dynamic_length(vname: str, causal: bool, site_factory) -> None:
    row = VARIANTS[vname]
    if row.causal_only and not causal:
        pytest.skip("causal-only configuration")
    sc = Scenario(kv_heads=2, q_len=40, k_len=40, causal=causal, mask="bool")
    variant = row.build(_site(sc, site_factory)).eval()
    q, k, v, mask, _ = _make_inputs(sc, batch=1)
    seq = Dim("seq", min=2, max=8192)
    program = torch.export.export(
        _Attend(variant, causal),
        (q, k, v, mask),
        dynamic_shapes=({2: seq}, {2: seq}, {2: seq}, {3: seq}),
        strict=False,
    )
    # Another length, not a multiple of the chunk and on the other side of it.
    q2, k2, v2, mask2, _ = _make_inputs(dataclasses.replace(sc, q_len=77, k_len=77), batch=1)
    exported = program.module()(q2, k2, v2, mask2)
    eager = variant(q2, k2, v2, mask=mask2, causal=causal, scale=0.25)
    assert torch.allclose(exported, eager, rtol=1e-5, atol=1e-6)


BAD_OPTIONS = [
    ("performer", {"num_features": "64"}),
    ("performer", {"num_features": 0}),
    ("performer", {"redraw": 1}),
    ("rfa", {"sigma": "1.0"}),
    ("rfa", {"sigma": -1.0}),
    ("rfa", {"learn_sigma": None}),
    ("rfa", {"gate": "yes"}),
    ("cosformer", {"chunk_size": 1.5}),
    ("cosformer", {"chunk_size": 0}),
    ("cosformer", {"window": 4}),
    ("t2r", {"feature_dim": 2.5}),
    ("t2r", {"feature_dim": 0}),
    ("hedgehog", {"feature_dim": "8"}),
    ("hedgehog", {"window": -1}),
    ("t2r", {"global_tokens": 1}),
    ("t2r", {"window": 4, "global_tokens": -2}),
    ("kernel", {"feature_map": 3}),
    ("kernel", {}),
]


@pytest.mark.parametrize(("vname", "options"), BAD_OPTIONS, ids=lambda x: str(x))
def test_bad_options_raise_variant_option_error(vname: str, options: dict, site_factory) -> None:
    with pytest.raises(VariantOptionError):
        get_variant(vname)(site_factory(head_dim=HEAD_DIM), **options)


@pytest.mark.parametrize(
    ("vname", "arxiv"),
    [
        ("linear", "2006.16236"),
        ("kernel", "1908.11775"),
        ("performer", "2009.14794"),
        ("rfa", "2103.02143"),
        ("cosformer", "2202.08791"),
        ("t2r", "2103.13076"),
        ("hedgehog", "2402.04347"),
    ],
)
def test_registry_entry_cites_its_paper(vname: str, arxiv: str) -> None:
    cls = get_variant(vname)
    assert cls.name == vname and issubclass(cls, FeatureMapAttention)
    assert arxiv in cls.__doc__ and "Cost" in cls.__doc__
