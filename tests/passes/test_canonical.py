"""The canonical op ``torch.ops.attnrewrite.attention`` and the canonical program.

Op: its reference kernel against an independent dense softmax(q·kᵀ·s + m)·v (grouped heads, bool
and additive masks, causal), its fake kernel's shape, its gradients, its decomposition.
Program: ``ar.canonicalize`` turns every site into exactly that op (Before/Expected graphs
compared structurally), runs like the model, and survives ``torch.export.save``/``load`` with the
site recoverable from the op's argument. Lowering reads the op and nothing else.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import attnrewrite as ar
from attnrewrite.ops import ATTENTION, decode_site, encode_site, is_attention, site_of
from attnrewrite.passes.lower import LowerToVariants
from attnrewrite.variants import get_variant


def _dense(q, k, v, mask=None, causal=False, scale=1.0):
    """Naive reference: repeat KV heads, full score matrix, softmax, weighted sum."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    s = q @ k.transpose(-2, -1) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    if causal:
        n, m = s.shape[-2:]
        keep = torch.ones(n, m, dtype=torch.bool).tril()
        s = s.masked_fill(~keep, -math.inf)
    return s.softmax(-1) @ v


def _qkv(b=2, h=4, hkv=2, n=6, d=8, dv=5):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(b, h, n, d, generator=g),
        torch.randn(b, hkv, n, d, generator=g),
        torch.randn(b, hkv, n, dv, generator=g),
    )


@pytest.mark.parametrize("mask_kind", ["none", "bool-key", "additive-general"])
@pytest.mark.parametrize("causal", [False, True])
def test_op_reference_is_softmax_attention(mask_kind, causal):
    q, k, v = _qkv()
    mask = None
    if mask_kind == "bool-key":
        mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
        mask[0, ..., 4:] = False
    elif mask_kind == "additive-general":
        mask = torch.randn(1, 4, 6, 6)
    got = torch.ops.attnrewrite.attention(q, k, v, mask, causal, 0.3)
    want = _dense(q, k, v, mask, causal, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_op_fake_kernel_and_gradients():
    q, k, v = _qkv(dv=3)
    with torch._subclasses.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        out = ATTENTION(fq, fk, fv, None, True, 0.5, 0.0, "")
    assert tuple(out.shape) == (2, 4, 6, 3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    twins = [t.clone().requires_grad_() for t in (q, k, v)]
    ATTENTION(*leaves, None, True, 0.5, 0.0, "").square().sum().backward()
    _dense(*twins, causal=True, scale=0.5).square().sum().backward()
    for a, b in zip(leaves, twins):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)


def test_op_decomposes_to_sdpa():
    class Call(nn.Module):
        def forward(self, q, k, v):
            return ATTENTION(q, k, v, None, True, 0.25, 0.0, "")

    q, k, v = _qkv()
    program = torch.export.export(Call(), (q, k, v))
    assert any(is_attention(n) for n in program.graph.nodes)
    flat = program.run_decompositions(ar.ops.DECOMPOSITIONS)
    targets = {n.target for n in flat.graph.nodes if n.op == "call_function"}
    assert ATTENTION not in targets
    assert torch.ops.aten.scaled_dot_product_attention.default in targets
    torch.testing.assert_close(flat.module()(q, k, v), _dense(q, k, v, causal=True, scale=0.25))


class Manual(nn.Module):
    """softmax(q·kᵀ·s + mask)·v spelled by hand, projections around it."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads) + mask
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d))


def _example():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    mask = torch.zeros(2, 1, 1, 5)
    mask[1, ..., 3:] = -1e9
    return Manual().eval(), x, mask


def test_canonical_program_before_expected():
    """Before: matmul, div, add, softmax, matmul. Expected: the projections, views and one
    canonical op reading q, k, v, the model's mask and the site's scale; no softmax left."""
    model, x, mask = _example()
    prog = ar.canonicalize(model, (x, mask))
    calls = [n for n in prog.graph_module.graph.nodes if n.op == "call_function"]
    ops = [getattr(n.target, "__name__", str(n.target)) for n in calls]
    assert [n for n in calls if is_attention(n)] == [
        n for n in calls if "attention" in str(n.target)
    ]
    assert sum(map(is_attention, calls)) == 1
    assert not any(name.startswith("_softmax") or name.startswith("softmax") for name in ops)
    (node,) = [n for n in calls if is_attention(n)]
    args = ar.ops.operands(node)
    assert args["scale"] == pytest.approx(1 / math.sqrt(8))
    assert args["causal"] is False
    placeholders = [n for n in prog.graph_module.graph.nodes if n.op == "placeholder"]
    assert args["mask"] in placeholders  # the model's own mask, read as it is
    q_val, k_val, v_val = (args[n].meta["val"] for n in ("query", "key", "value"))
    assert tuple(q_val.shape[1:]) == (2, 5, 8) and tuple(v_val.shape[1:]) == (2, 5, 8)
    assert site_of(node) == prog.report.sites[0].site
    assert prog.report.sites[0].status == ar.Status.CANONICAL
    torch.testing.assert_close(prog(x, mask), model(x, mask), rtol=1e-5, atol=1e-6)


def test_canonical_program_saves_and_loads(tmp_path):
    model, x, mask = _example()
    prog = ar.canonicalize(model, (x, mask))
    path = tmp_path / "canonical.pt2"
    torch.export.save(prog.export(), path)
    loaded = torch.export.load(path)
    nodes = [n for n in loaded.graph.nodes if is_attention(n)]
    assert len(nodes) == 1
    loaded_site = decode_site(ar.ops.operands(nodes[0])["site"])
    assert loaded_site == prog.report.sites[0].site
    longer = torch.randn(3, 9, 16)
    wider = torch.zeros(3, 1, 1, 9)
    torch.testing.assert_close(
        loaded.module()(longer, wider), model(longer, wider), rtol=1e-5, atol=1e-6
    )


def test_site_json_round_trip_keeps_every_field():
    model, x, mask = _example()
    (site,) = ar.find_attention(model, (x, mask))
    assert decode_site(encode_site(site)) == site.replace(
        query_len=site.query_len if isinstance(site.query_len, int) else str(site.query_len),
        key_len=site.key_len if isinstance(site.key_len, int) else str(site.key_len),
    )


def test_lower_reads_only_the_canonical_op():
    """Lowering a canonical program by hand equals ``rewrite`` with the same variant."""
    model, x, mask = _example()
    prog = ar.canonicalize(model, (x, mask))
    gm = prog.graph_module
    (node,) = [n for n in gm.graph.nodes if is_attention(n)]
    site = site_of(node)
    LowerToVariants({site.name: get_variant("softmax")(site)})(gm)
    gm.recompile()
    assert not any(is_attention(n) for n in gm.graph.nodes)
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    torch.testing.assert_close(gm(x, mask), model(x, mask), rtol=1e-5, atol=1e-6)


def test_passes_share_one_result_shape():
    """find, canonicalise and lower each return a PassResult; find's rejections and a failed
    canonicalisation come back as diagnostics (stage and reason), not as printed text."""
    from attnrewrite.passes.canonicalize import Canonicalize
    from attnrewrite.passes.find_attention import FindAttention
    from attnrewrite.rewriter.capture import capture

    class Router(nn.Module):
        def forward(self, x, mask):
            gate = x.mean(-1).softmax(-1)  # a softmax over tokens that is not attention
            return Manual()(x, mask) * gate[..., None]

    torch.manual_seed(0)
    _, x, mask = _example()
    gm = capture(Router().eval(), (x, mask)).graph_module
    found = FindAttention()(gm)
    assert found.modified is False and found.stats["sites"] == 1
    assert [d.stage for d in found.diagnostics] == ["find"]
    assert found.diagnostics[0].reason
    canon = Canonicalize(tuple(found.stats["matches"]))(gm)
    assert canon.modified and canon.stats["canonicalized"] == 1 and canon.diagnostics == ()
    (node,) = [n for n in gm.graph.nodes if is_attention(n)]
    site = site_of(node)
    lowered = LowerToVariants({site.name: get_variant("linear")(site)})(gm)
    assert lowered.modified and lowered.stats == {"lowered": 1}
