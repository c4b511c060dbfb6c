"""The pass pipeline: declared once, run in order, every pass's result kept by name, diagnostics
gathered, a broken graph reported by the pass that broke it."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

import attnrewrite as ar
from attnrewrite.passes.base import PassResult
from attnrewrite.passes.pipeline import DeadCodeElimination, Pipeline
from attnrewrite.rewriter.capture import capture
from attnrewrite.rewriter.rewrite import FIND_PASSES, SelectVariants, _pipeline
from tests.passes.test_canonical import _example


def _select(lower: bool = True) -> SelectVariants:
    return SelectVariants("linear", None, 0, {}, lower)


@pytest.mark.parametrize(
    ("lower", "check", "names"),
    [
        (True, False, ["dce-before-find", "find", "select", "canonicalize", "lower", "dce"]),
        (
            True,
            True,
            ["dce-before-find", "find", "select", "canonicalize", "check", "lower", "dce"],
        ),
        (False, False, ["dce-before-find", "find", "select", "canonicalize", "dce"]),
    ],
)
def test_rewrite_pipeline_is_declared_once(lower, check, names):
    model, x, mask = _example()
    captured = capture(model, (x, mask))
    pipeline = _pipeline(model, captured, _select(lower), lower=lower, check=check, debug=False)
    assert pipeline.names() == names


def test_pipeline_keeps_every_result_and_runs_like_rewrite():
    model, x, mask = _example()
    captured = capture(model, (x, mask))
    pipeline = _pipeline(model, captured, _select(), lower=True, check=True, debug=True)
    done = pipeline(captured.graph_module)
    assert list(done.results) == pipeline.names()
    assert done["find"].stats["sites"] == 1 and not done["find"].modified
    assert done["canonicalize"].stats["canonicalized"] == 1
    assert done["lower"].stats == {"lowered": 1}
    assert done["dce"].stats["removed"] > 0
    # the graph the pipeline produced computes what rewrite() computes
    want = ar.rewrite(model, "linear", (x, mask))(x, mask)
    torch.testing.assert_close(done.graph_module(x, mask), want)


def test_find_passes_gather_rejections_as_diagnostics():
    class Gated(torch.nn.Module):
        def forward(self, x, mask):
            gate = x.mean(-1).softmax(-1)  # over tokens, but a gate, not attention
            return _example()[0](x, mask) * gate[..., None]

    _, x, mask = _example()
    done = Pipeline(FIND_PASSES)(capture(Gated().eval(), (x, mask)).graph_module)
    assert [d.stage for d in done.diagnostics] == ["find"]
    assert done["find"].stats["sites"] == 1


@dataclasses.dataclass(frozen=True)
class _Breaks:
    """A pass that leaves a node reading a value defined after it (an invalid graph)."""

    name: ClassVar[str] = "breaks"

    def __call__(self, gm, results=None):
        nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
        first, last = nodes[0], nodes[-1]
        first.args = (last, *first.args[1:])
        return PassResult(gm, True)


def test_lint_names_the_pass_that_broke_the_graph():
    model, x, mask = _example()
    gm = capture(model, (x, mask)).graph_module
    with pytest.raises(RuntimeError, match="after pass 'breaks'"):
        Pipeline((DeadCodeElimination(), _Breaks()), lint=True)(gm)


def test_pass_names_must_be_unique():
    model, x, mask = _example()
    gm = capture(model, (x, mask)).graph_module
    with pytest.raises(ValueError, match="two passes are named 'dce'"):
        Pipeline((DeadCodeElimination(), DeadCodeElimination()))(gm)
