"""rewrite(): inputs it accepts, site selection, per-site variants, report and options."""

from __future__ import annotations

import pytest
import torch

import attnrewrite as ar
from tests.passes.spellings import CASES, EncoderLayer, manual, plain


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _two_layer():
    class TwoLayer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = manual(plain)()
            self.second = EncoderLayer()

        def forward(self, x, pad):
            return self.second(self.first(x), pad)

    torch.manual_seed(0)
    x = torch.randn(2, 8, 32)
    pad = torch.ones(2, 8, dtype=torch.bool)
    pad[1, 5:] = False
    return TwoLayer().eval(), (x, pad)


def test_accepts_exported_program() -> None:
    model, args = _two_layer()
    program = torch.export.export(model, args, strict=False)
    rw = ar.rewrite(program, "linear", args=args)
    assert len(rw.report.rewritten) == 2
    assert torch.isfinite(rw(*args)).all()


class Traceable(torch.nn.Module):
    """Attention without Python control flow, so ``torch.fx.symbolic_trace`` can trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)
        self.softmax = torch.nn.Softmax(dim=-1)  # a leaf module in the traced graph

    def forward(self, x, pad):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 8).permute(2, 0, 3, 1, 4)
        bias = (1.0 - pad[:, None, None, :].float()) * -10000.0
        w = self.softmax(q @ k.transpose(-2, -1) / 8**0.5 + bias)
        return (w @ v).transpose(1, 2).reshape(b, n, 32)


def test_accepts_symbolic_trace_graph_module() -> None:
    torch.manual_seed(0)
    model = Traceable().eval()
    traced = torch.fx.symbolic_trace(model)
    case = next(c for c in CASES if c.name == "additive_key_mask")
    args = case.inputs(2, 8)
    sites = ar.find_attention(traced, args=args)
    assert [str(s.mask) for s in sites] == ["key"]
    rw = ar.rewrite(traced, "softmax", args=args)
    other = case.inputs(3, 10)
    assert _rel(rw(*other), model(*other)) <= 1e-5


def test_site_selection_and_per_site_variants() -> None:
    model, args = _two_layer()
    names = [s.name for s in ar.find_attention(model, args=args)]
    assert len(names) == 2
    only_first = ar.rewrite(model, "linear", args=args, sites=[names[0]])
    assert [r.status for r in only_first.report.sites] == ["rewritten", "skipped"]
    assert only_first.report.sites[1].reason == "not selected"
    by_predicate = ar.rewrite(model, "linear", args=args, sites=lambda s: s.mask == "key")
    assert [r.status for r in by_predicate.report.sites] == ["skipped", "rewritten"]
    mixed = ar.rewrite(model, {names[0]: "softmax", "second*": "linear"}, args=args)
    assert [r.variant for r in mixed.report.sites] == ["softmax", "linear"]
    assert set(mixed.variant_modules) == set(names)


def test_report_renders_and_counts() -> None:
    model, args = _two_layer()
    rw = ar.rewrite(model, "linear", args=args)
    text = str(rw.report)
    assert "2 site(s): 2 rewritten" in text and "key" in text
    assert rw.report.to_markdown().startswith("| site |")
    assert rw.report.counts() == {"rewritten": 2}


def test_variant_parameters_in_state_dict_and_original_untouched() -> None:
    model, args = _two_layer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rw = ar.rewrite(model, "softmax", args=args)
    keys = rw.state_dict().keys()
    assert any("second.layer.self_attn.in_proj_weight" in k or "in_proj_weight" in k for k in keys)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_debug_mode_checks_parity(capsys) -> None:
    model, args = _two_layer()
    ar.rewrite(model, "linear", args=args, debug=True)
    assert "canonical graph matches the original" in capsys.readouterr().out


def test_output_attentions_sites_are_left_alone() -> None:
    pytest.importorskip("transformers")
    from tests.zoo.hf_models import ZOO

    zm = next(z for z in ZOO if z.name == "bert")
    model = zm.build("eager")
    example = dict(zm.inputs(), output_attentions=True)
    sites = ar.find_attention(model, kwargs=example)
    assert sites and all(s.weights_escape for s in sites)
    rw = ar.rewrite(model, "linear", kwargs=example)
    assert all(r.status == "skipped" and "output_attentions" in r.reason for r in rw.report.sites)
    out, ref = rw(**example), model(**example)
    assert _rel(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    assert _rel(out.attentions[0], ref.attentions[0]) <= 1e-5


def test_unknown_option_and_variant_errors() -> None:
    model, args = _two_layer()
    with pytest.raises(ar.VariantOptionError, match="not options of linear"):
        ar.rewrite(model, "linear", args=args, window=3)
    with pytest.raises(ar.UnknownVariantError, match="registered variants: softmax, linear"):
        ar.rewrite(model, "nonesuch", args=args)


def test_emitted_factories_name_the_device() -> None:
    """Tensors the rewrite creates (positions, fill scalars) are placed on the model's device, so a
    model rewritten on a GPU does not mix devices (found on CUDA with Llama)."""
    pytest.importorskip("transformers")
    from attnrewrite.passes import graph as G
    from tests.zoo.hf_models import ZOO

    zm = next(z for z in ZOO if z.name == "llama")
    rw = ar.rewrite(zm.build("eager"), "linear", kwargs=zm.inputs())
    created = [
        n
        for n in rw.graph_module.graph.nodes
        if G.op_name(n) in ("arange", "scalar_tensor") and "nn_module_stack" not in n.meta
    ]
    assert created, "the causal+key rewrite builds its key row from positions"
    assert all(n.kwargs.get("device") == torch.device("cpu") for n in created)
