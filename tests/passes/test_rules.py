"""The finder's rule tables (``find_attention.SCORE_LAYOUTS``, ``SCORE_RULES``, ``PROBS_RULES``).

Structural: the tables are well formed and the driver tries rules in table order. Numerical: the
key-major spelling (k·qᵀ normalised over axis −2, the layout added as one table entry) rewrites to
``linear`` attention equal to a dense float64 reference of the module's own q, k, v, also when
queries and keys differ in length. Negative: the look-alikes that layout could be mistaken for.
"""

from __future__ import annotations

import pytest
import torch
from torch import fx

import attnrewrite as ar
from attnrewrite.passes import find_attention as fa
from tests.fuzz.strategies import linear_attention_reference, relative_error
from tests.passes.spellings import (
    CASES,
    D_MODEL,
    S,
    _x,
    _x_cross,
    key_major,
    manual,
    plain,
    softmax_query_axis,
)

TABLES = {"SCORE_RULES": fa.SCORE_RULES, "PROBS_RULES": fa.PROBS_RULES}


# -- structural --------------------------------------------------------------------------------


@pytest.mark.parametrize("table", TABLES.values(), ids=TABLES.keys())
def test_rules_are_named_and_apply_to_ops(table: tuple[fa.Rule, ...]) -> None:
    names = [rule.name for rule in table]
    assert len(set(names)) == len(names), names
    for rule in table:
        assert rule.ops and all(isinstance(op, str) and op for op in rule.ops), rule.name
        assert callable(rule.match), rule.name


def test_score_layouts_name_both_matrix_axes() -> None:
    assert len({layout.name for layout in fa.SCORE_LAYOUTS}) == len(fa.SCORE_LAYOUTS)
    assert len({layout.key_axis for layout in fa.SCORE_LAYOUTS}) == len(fa.SCORE_LAYOUTS)
    for layout in fa.SCORE_LAYOUTS:
        assert {layout.key_axis, layout.query_axis} == {-2, -1}, layout
    assert fa.SCORE_LAYOUTS[0].key_last  # the usual (…, query, key) layout is tried first


def test_first_match_tries_applicable_rules_in_order() -> None:
    graph = fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    seen: list[str] = []

    def answer(name: str, result: object):
        def match(n: fx.Node) -> object:
            seen.append(name)
            return result

        return match

    rules = (
        fa.Rule("other op", frozenset({"add"}), answer("other op", "never")),
        fa.Rule("declines", frozenset({"mul"}), answer("declines", None)),
        fa.Rule("takes it", frozenset({"mul", "div"}), answer("takes it", "taken")),
        fa.Rule("too late", frozenset({"mul"}), answer("too late", "late")),
    )
    assert fa.first_match(rules, node) == "taken"
    assert seen == ["declines", "takes it"]
    assert fa.first_match(rules, x) is None  # a placeholder has no op any rule names


# -- the key-major spelling ----------------------------------------------------------------------


def _linear_matches_reference(model: torch.nn.Module, capture: tuple, other: tuple) -> float:
    """Relative error of the ``linear`` rewrite against dense linear attention of the model's own
    projections (elu + 1 feature map, the site's scale split as √s on q and k)."""
    rw = ar.rewrite(model, "linear", args=capture)
    assert [row.status for row in rw.report.sites] == ["rewritten"], str(rw.report)
    with torch.no_grad():
        q, k, v = model.qkv(*other)
        attended = linear_attention_reference(q, k, v, scale=S, weights=None, causal=False)
        ref = model.merge(attended.float())
        return relative_error(rw(*other), ref)


@pytest.mark.parametrize(
    "name", ["plain", "key_major_scores", "key_major_einsum"], ids=lambda name: name
)
def test_linear_rewrite_equals_dense_linear_attention(name: str) -> None:
    case = next(c for c in CASES if c.name == name)
    torch.manual_seed(0)
    model = case.build().eval()
    torch.manual_seed(1)
    assert _linear_matches_reference(model, case.inputs(2, 8), case.inputs(3, 11)) <= 1e-4


def test_key_major_cross_attention_keeps_query_and_key_apart() -> None:
    """Queries and keys of different lengths: an axis read the wrong way round would show."""
    torch.manual_seed(0)
    model = manual(key_major)().eval()
    capture = _x_cross(2, 8)
    (site,) = ar.find_attention(model, args=capture)
    # Lengths are reported as ints, or as "s0=8" when captured symbolic.
    assert [int(str(n).split("=")[-1]) for n in (site.query_len, site.key_len)] == [8, 11]
    assert site.is_cross and site.scale == pytest.approx(S)
    assert "key-major scores (k·qᵀ, softmax over dim -2)" in site.notes
    other = _x_cross(3, 6)
    rw = ar.rewrite(model, "softmax", args=capture, check=True)
    with torch.no_grad():
        assert relative_error(rw(*other), model(*other)) <= 1e-5
    assert _linear_matches_reference(model, capture, other) <= 1e-4


# -- negatives: what the key-major layout must not take -------------------------------------------


class _ScoreColumnPooling(torch.nn.Module):
    """softmax(x·w, dim=1) over a (B, N, 1) column of scores, then pᵀ·x: softmax pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.score = torch.nn.Parameter(torch.randn(D_MODEL, 1) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = (x @ self.score).softmax(dim=1)
        return w.transpose(1, 2) @ x


class _LearnedQueryPooling(_ScoreColumnPooling):
    """The same pooling spelled query-major: w as one learned query, softmax(wᵀ·xᵀ, dim=-1)·x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.score.t().expand(x.shape[0], 1, -1)
        return (query @ x.transpose(1, 2)).softmax(dim=-1) @ x


def test_softmax_pooling_is_attention_with_one_query_in_either_layout() -> None:
    """Softmax pooling and a learned pooling query are one computation: both are one site with a
    single query, and the exact rewrite reproduces both at another shape."""
    torch.manual_seed(0)
    column = _ScoreColumnPooling().eval()
    learned = _LearnedQueryPooling().eval()
    learned.load_state_dict(column.state_dict())
    x, other = _x(2, 8), _x(3, 11)
    torch.testing.assert_close(learned(*x), column(*x))
    for model in (column, learned):
        (site,) = ar.find_attention(model, args=x)
        assert (site.query_len, site.head_dim, site.mask) == (1, D_MODEL, "none")
        rw = ar.rewrite(model, "softmax", args=x)
        torch.testing.assert_close(rw(*other), model(*other), rtol=1e-5, atol=1e-6)


def test_key_major_look_alike_is_not_attention() -> None:
    torch.manual_seed(0)
    model = manual(softmax_query_axis)().eval()
    rw = ar.rewrite(model, "softmax", args=_x(2, 8))
    assert rw.report.sites == ()
    reason = "does not contract the key axis"
    assert any(reason in row.reason for row in rw.report.rejected), rw.report.rejected


def test_query_major_spelling_is_unchanged_by_the_key_major_layout() -> None:
    torch.manual_seed(0)
    (site,) = ar.find_attention(manual(plain)().eval(), args=_x(2, 8))
    assert not any("key-major" in note for note in site.notes)
