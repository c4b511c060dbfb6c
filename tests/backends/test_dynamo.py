"""``attnrewrite.dynamo_backend``: rewriting inside ``torch.compile`` for models export rejects.

The default run uses ``compiler="eager"`` (the rewritten graphs run as FX graphs), which tests the
rewriting itself in seconds; the Inductor path is the slow test at the end.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attnrewrite as ar
from attnrewrite.backends import dynamo as dynamo_module
from attnrewrite.errors import BackendError, CaptureError, UnknownVariantError, VariantOptionError
from tests.backends.conftest import TOLERANCE, EinsumAttention, relative_error


class BranchOnValues(nn.Module):
    """Attention, then a Python branch on a tensor's value: ``torch.export`` cannot capture it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = EinsumAttention()

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.attn(x, keep)
        if h.mean() > 0:
            return h * 2.0
        return h - 1.0


class TwoBlocksWithABreak(nn.Module):
    """Two attention blocks with a graph break between them: two Dynamo graphs."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.first, self.second = EinsumAttention(), EinsumAttention()

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        h = self.first(x, keep)
        torch._dynamo.graph_break()
        return self.second(h, keep)


def _inputs(batch: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[0, length - 5 :] = False
    return torch.randn(batch, length, 32, generator=g), keep


LENGTHS = ((2, 16), (3, 23), (3, 40))  # the second call makes Dynamo recompile with dynamic shapes


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _reference(model: nn.Module, variant: str) -> nn.Module:
    """The model with each attention block rewritten on its own (export can capture those)."""
    ref = copy.deepcopy(model)
    for name, child in list(ref.named_children()):
        if isinstance(child, EinsumAttention):
            setattr(ref, name, ar.rewrite(child, variant, args=_inputs(2, 16, 0)))
    return ref


def _max_error(compiled, reference) -> float:
    errors = []
    for i, (batch, length) in enumerate(LENGTHS):
        x, keep = _inputs(batch, length, i)
        with torch.no_grad():
            errors.append(relative_error(compiled(x, keep), reference(x, keep)))
    return max(errors)


def test_the_branch_is_out_of_torch_export_reach() -> None:
    with pytest.raises(CaptureError, match="dynamo_backend"):
        ar.rewrite(BranchOnValues().eval(), "linear", args=_inputs(2, 16, 0))


@pytest.mark.parametrize("variant", ["softmax", "linear"])
def test_branching_model_is_rewritten_and_matches_eager(variant: str) -> None:
    model = BranchOnValues().eval()
    backend = ar.dynamo_backend(variant, compiler="eager")
    compiled = torch.compile(model, backend=backend)
    assert _max_error(compiled, _reference(model, variant)) <= TOLERANCE
    if variant == "softmax":
        assert _max_error(compiled, model) <= 1e-5  # the exact variant changes nothing
    rows = backend.report.rewritten
    assert rows and all(r.variant == variant and r.name.endswith("attn") for r in rows)
    assert backend.fallbacks == []
    assert len(backend.reports) >= 2  # one per compiled graph (static, then dynamic)


def test_each_graph_around_a_break_is_rewritten() -> None:
    model = TwoBlocksWithABreak().eval()
    backend = ar.dynamo_backend("linear", compiler="eager")
    compiled = torch.compile(model, backend=backend)
    assert _max_error(compiled, _reference(model, "linear")) <= TOLERANCE
    names = {r.name.rsplit(".", 1)[-1] for r in backend.report.rewritten}
    assert names == {"first", "second"}


def test_a_graph_that_cannot_be_exported_runs_unchanged(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise RuntimeError("export refused for the test")

    monkeypatch.setattr(dynamo_module, "_export", refuse)
    model = BranchOnValues().eval()
    backend = ar.dynamo_backend("linear", compiler="eager")
    assert _max_error(torch.compile(model, backend=backend), model) <= 1e-5
    assert backend.fallbacks and "export refused for the test" in backend.fallbacks[0].reason
    assert backend.report.rewritten == []
    assert any("not rewritten" in note for note in backend.report.notes)


def test_bad_arguments_are_refused_before_compiling() -> None:
    with pytest.raises(UnknownVariantError):
        ar.dynamo_backend("no-such-variant")
    with pytest.raises(VariantOptionError, match="num_featurez"):
        ar.dynamo_backend("linear", num_featurez=3)
    with pytest.raises(BackendError, match="inductor"):
        ar.dynamo_backend("linear", compiler="tvm")


@pytest.mark.slow
def test_inductor_runs_the_rewritten_graphs() -> None:
    model = BranchOnValues().eval()
    backend = ar.dynamo_backend("linear")
    compiled = torch.compile(model, backend=backend)
    assert _max_error(compiled, _reference(model, "linear")) <= TOLERANCE
    assert backend.report.rewritten and backend.fallbacks == []


def test_attention_outside_every_graph_is_said_in_the_notes() -> None:
    """nn.TransformerEncoder in eval mode with a padding mask takes its fused fast path: no
    softmax reaches the graph, and the report says so instead of staying silent."""
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 6, 16)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1, 4:] = True
    backend = ar.dynamo_backend("linear", compiler="eager")
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(encoder, backend=backend)(x, src_key_padding_mask=pad)
        ref = encoder(x, src_key_padding_mask=pad)
    assert torch.allclose(out[0], ref[0], atol=1e-5)
    report = backend.report
    if report.sites:  # this torch traced the slow path: then the sites must be there and rewritten
        assert report.rewritten
    else:
        assert any("ran outside the graphs" in note for note in report.notes), report.notes
