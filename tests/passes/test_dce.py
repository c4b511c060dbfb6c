"""dead_code_elimination: in-place writes through views survive, dead private ones go.

Numerical: capture, DCE, run, compare with the original (each spelling of a write into a view or
a preallocated buffer). End-to-end: ``rewrite(..., "softmax")`` of such models. Structural: an
in-place write nothing observes is still removed, so unused attention weights stay dead.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import attnrewrite as ar
from attnrewrite.passes.base import dead_code_elimination
from attnrewrite.rewriter.capture import capture

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class Writes(nn.Module):
    """A model whose only job is one spelling of an in-place write (no attention)."""

    def __init__(self, forward: Forward) -> None:
        super().__init__()
        self.body = forward
        self.proj = nn.Linear(8, 8)
        self.register_buffer("table", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self, x)


def _fill_through_index(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = torch.zeros(x.shape[0], x.shape[1], 8)
    t[:, 1] = 1.0
    return x + t


def _copy_from_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = torch.zeros_like(x)
    t[:, 1] = x[:, 0]
    return x + t


def _copy_into_slice(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    buf = x.new_zeros(x.shape[0], x.shape[1], 16)
    buf[..., :8].copy_(m.proj(x))
    return buf * 2


def _index_put(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    scale = torch.zeros(8)
    index = torch.arange(0, 8, 2)
    scale.index_put_((index,), m.table[index])
    shift = torch.zeros_like(x)
    shift[..., index] = 1.0  # advanced indexing on a view: index_put_ into the view
    return x * scale + shift


def _slice_scatter_like(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # A write into a narrowed view of a view (what slice_scatter spells functionally).
    t = torch.zeros_like(x)
    t.narrow(1, 1, 2).narrow(2, 0, 4).add_(x[:, :2, 4:])
    return t - x


def _preallocated_key_value(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # DeepSeek's MLA writes keys and values into slices of one preallocated tensor.
    kv = x.new_empty(x.shape[0], x.shape[1], 2, 8)
    kv[:, :, 0] = m.proj(x)
    kv[:, :, 1] = x
    return kv.sum(2)


def _out_variant(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The written tensor is the ``out=`` argument, not the first one.
    buf = torch.zeros_like(x)
    torch.add(x, m.table, out=buf)
    return buf * x


def _write_then_read_view(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    t = torch.ones_like(x)
    view = t.view(-1)
    view.mul_(3.0)
    return x + t


WRITES = {
    "fill_through_index": _fill_through_index,
    "copy_from_input": _copy_from_input,
    "copy_into_slice": _copy_into_slice,
    "index_put": _index_put,
    "slice_scatter_like": _slice_scatter_like,
    "preallocated_key_value": _preallocated_key_value,
    "out_variant": _out_variant,
    "write_then_read_view": _write_then_read_view,
}


def _model(name: str) -> Writes:
    torch.manual_seed(0)
    return Writes(WRITES[name]).eval()


@pytest.mark.parametrize("name", list(WRITES))
def test_capture_and_dce_keep_writes_through_views(name: str) -> None:
    model = _model(name)
    x = torch.randn(2, 5, 8)
    gm = capture(model, (x,)).graph_module
    dead_code_elimination(gm)
    gm.graph.lint()
    gm.recompile()
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
        other = torch.randn(3, 7, 8)
        assert torch.equal(gm(other), model(other))


@pytest.mark.parametrize("name", ["fill_through_index", "copy_into_slice", "out_variant"])
def test_rewrite_of_a_model_with_writes_through_views_is_exact(name: str) -> None:
    model = _model(name)
    x = torch.randn(2, 5, 8)
    rw = ar.rewrite(model, "softmax", args=(x,))
    with torch.no_grad():
        assert torch.equal(rw(x), model(x))


class RelativeBiasInPlace(nn.Module):
    """Attention whose scores get a relative-position bias added in place into a view.

    timm's MViTv2 (``cal_rel_pos_spatial``) adds decomposed relative positions into
    ``attn[:, :, 1:, 1:]`` (the class token excluded) in place.
    """

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.rel = nn.Parameter(torch.randn(heads, 1, 1) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        attn[:, :, 1:, 1:] += self.rel
        return (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def test_rewrite_refuses_a_site_whose_scores_are_written_in_place() -> None:
    torch.manual_seed(0)
    model = RelativeBiasInPlace().eval()
    x = torch.randn(2, 6, 16)
    rw = ar.rewrite(model, "softmax", args=(x,))
    # The finder does not analyse writes into the scores: the site is refused, not mis-rewritten.
    [row] = rw.report.sites
    assert row.status == "skipped" and "in place" in row.reason
    with torch.no_grad():
        assert torch.equal(rw(x), model(x))


class DeadPrivateWrite(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = x.softmax(-1)
        weights.mul_(2.0)  # written, then never read: the write is dead
        return x * 3


def test_dead_private_in_place_write_is_removed() -> None:
    x = torch.randn(2, 5, 8)
    gm = capture(DeadPrivateWrite(), (x,)).graph_module
    removed = dead_code_elimination(gm)
    ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert removed > 0
    assert not any("softmax" in op or "mul_" in op for op in ops)


class WritesInput(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x[:, 0].zero_()  # a write into the caller's tensor is observable: it stays
        return x.sum(1)


def test_write_into_an_input_is_kept() -> None:
    x = torch.randn(2, 5, 8)
    gm = capture(WritesInput(), (x.clone(),)).graph_module
    dead_code_elimination(gm)
    gm.recompile()
    mine, theirs = x.clone(), x.clone()
    assert torch.equal(gm(mine), WritesInput()(theirs))
    assert torch.equal(mine, theirs)


class VmappedMask(torch.nn.Module):
    """A causal mask built with torch.vmap (as Hugging Face's mask functions do): export leaves
    vmap's level bookkeeping as calls whose results nothing reads; they must survive DCE."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        n = x.shape[1]
        positions = torch.arange(n)
        allowed = torch.vmap(lambda i: positions <= i)(positions)  # (N, N), causal
        scores = (q @ k.transpose(-2, -1) * 0.25).masked_fill(~allowed, float("-inf"))
        return scores.softmax(-1) @ v


def test_vmap_bookkeeping_survives_dead_code_elimination() -> None:
    import attnrewrite as ar

    torch.manual_seed(0)
    model = VmappedMask().eval()
    rw = ar.rewrite(model, "softmax", args=(torch.randn(2, 8, 16),), check=True)
    assert len(rw.report.rewritten) == 1
    other = torch.randn(3, 11, 16)
    with torch.no_grad():
        ref, out = model(other), rw(other)
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
