"""The spelling catalogue: what the finder reports, and that rewrites keep each model's meaning."""

from __future__ import annotations

import pytest
import torch

import attnrewrite as ar
from attnrewrite.passes import graph as G
from attnrewrite.rewriter.capture import capture
from tests.passes.spellings import CASES, Case

IDS = [c.name for c in CASES]


def _params(cases: list[Case]) -> list:
    return [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in cases]


def _build(case: Case) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    model = case.build().eval()
    return model, case.inputs(2, 8)


_CAPTURED: dict[str, tuple[torch.nn.Module, tuple, torch.export.ExportedProgram]] = {}


def _captured(case: Case) -> tuple[torch.nn.Module, tuple, torch.export.ExportedProgram]:
    """The case's model, example and one capture of it, shared by every test below (capturing is
    most of their time; ``test_module_and_program_entry_points_agree`` takes the ``nn.Module``
    path). Sharing is safe: a rewrite works on its own copy of the program's graph and parameters
    (``capture``'s contract)."""
    if case.name not in _CAPTURED:
        model, args = _build(case)
        _CAPTURED[case.name] = (model, args, capture(model, args).program)
    return _CAPTURED[case.name]


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("case", _params(CASES))
def test_sites_found_with_their_semantics(case: Case) -> None:
    _, args, program = _captured(case)
    sites = ar.find_attention(program, args=args)
    assert len(sites) == case.sites, [s.name for s in sites]
    if case.masks:
        assert [str(s.mask) for s in sites] == list(case.masks)
    for s in sites:
        assert s.num_heads == 4 or "heads folded into the batch" in s.notes
        if s.attends_over == "tokens":
            assert s.head_dim == case.head_dim and s.value_dim == case.head_dim
        assert s.causal == s.mask.is_causal
    if case.kv_heads is not None:
        assert sites[0].num_kv_heads == case.kv_heads
    if case.cross is not None:
        assert sites[-1].is_cross == case.cross
    if case.sites:
        assert sites[0].weights_escape == case.escape
    if case.scale is not None:
        assert sites[0].scale == pytest.approx(case.scale, rel=1e-6)
    if case.sites:
        assert sites[0].attends_over == case.over


#: a spread of the catalogue (with and without a mask input, cross attention, no attention) for
#: the ``nn.Module`` entry point, which captures the model itself
MODULE_PATH_CASES = [c for c in CASES if not c.slow][5::9]


@pytest.mark.parametrize("case", MODULE_PATH_CASES, ids=lambda c: c.name)
def test_module_and_program_entry_points_agree(case: Case) -> None:
    model, args = _build(case)
    from_module = ar.find_attention(model, args=args)
    assert from_module == ar.find_attention(_captured(case)[2], args=args)
    assert len(from_module) == case.sites


@pytest.mark.parametrize("case", _params([c for c in CASES if c.sites]))
def test_softmax_rewrite_is_exact_at_another_shape(case: Case) -> None:
    model, args, program = _captured(case)
    rw = ar.rewrite(program, "softmax", args=args, check=True)  # each site checked on the example
    expected_rewritten = 0 if case.escape or case.refused else case.sites
    assert len(rw.report.rewritten) == expected_rewritten, str(rw.report)
    if case.refused:
        assert all(case.refused in row.reason for row in rw.report.skipped), str(rw.report)
    torch.manual_seed(1)
    other = case.inputs(3, 11)
    with torch.no_grad():
        ref, out = model(*other), rw(*other)
    assert _rel(out, ref) <= 1e-5


@pytest.mark.parametrize("case", _params([c for c in CASES if c.sites]))
def test_linear_rewrite_takes_kernel_masks_only(case: Case) -> None:
    _, args, program = _captured(case)
    rw = ar.rewrite(program, "linear", args=args)
    for row in rw.report.sites:
        keepable = (
            row.site.mask != ar.MaskClass.GENERAL
            and not row.site.weights_escape
            and not case.refused
            and row.site.attends_over == "tokens"
        )
        assert (row.status == "rewritten") == keepable, str(rw.report)
        if not keepable:
            assert row.reason
    with torch.no_grad():
        out = rw(*case.inputs(3, 11))
    assert torch.isfinite(out).all()


def test_dense_mask_disappears_after_linear_rewrite() -> None:
    """A key-padding mask expanded to (B, 1, N, N) is not computed by the rewritten graph."""
    case = next(c for c in CASES if c.name == "causal_and_key")
    model, _ = _build(case)
    args = case.inputs(2, 12)  # a length unlike any model dimension
    rw = ar.rewrite(model, "linear", args=args)
    n = args[0].shape[1]
    for node in rw.graph_module.graph.nodes:
        shape = G.shape(node)
        if shape is not None and len(shape) >= 2:
            square = G.same_size(shape[-1], shape[-2]) and not G.is_one(shape[-1])
            seq_sized = G.size_hint(shape[-1]) == n
            assert not (square and seq_sized), f"{node.format_node()} is still N x N"


def test_original_model_untouched() -> None:
    case = CASES[0]
    model, args = _build(case)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rw = ar.rewrite(model, "linear", args=args)
    with torch.no_grad():
        for p in rw.parameters():
            p.add_(1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_debug_explains_rejections(capsys) -> None:
    case = next(c for c in CASES if c.name == "neg_softmax_query_axis")
    model, args = _build(case)
    assert ar.find_attention(model, args=args, debug=True) == []
    assert "not attention" in capsys.readouterr().out


def test_catalogue_size() -> None:
    assert len([c for c in CASES if c.sites]) >= 25
    assert len([c for c in CASES if not c.sites]) >= 3
