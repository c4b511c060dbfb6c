"""``rewrite(..., check=True)`` (every catalogue spelling is rewritten with it in
tests/passes/test_find_attention.py), the rejected list, and errors contained per site."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attnrewrite as ar
from attnrewrite.errors import ParityError
from attnrewrite.passes import canonicalize, find_attention
from tests.passes.spellings import D_MODEL, Projections


class TwoSites(Projections):
    """Two attention sites and one router softmax that is not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D_MODEL, 3)

    def forward(self, x):
        q, k, v = self.qkv(x)
        first = (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v
        second = (first @ k.transpose(-2, -1) * 0.2).softmax(-1) @ v
        gate = self.router(x).softmax(-1).sum(-1, keepdim=True)  # (B, N, 1): a router
        return self.merge(second) * gate


def _model_and_input() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return TwoSites().eval(), torch.randn(2, 8, D_MODEL)


def test_check_names_the_site_whose_canonical_form_is_wrong(monkeypatch) -> None:
    model, x = _model_and_input()
    real = canonicalize._build

    def wrong_scale(emit, match, rows, dense=False):
        if match.site.name.endswith("#1"):
            match = type(match)(**{**match.__dict__, "site": match.site.replace(scale=1.0)})
        return real(emit, match, rows, dense)

    monkeypatch.setattr(canonicalize, "_build", wrong_scale)
    with pytest.raises(ParityError, match=r"<root>#1 \(relative error"):
        ar.rewrite(model, "softmax", args=(x,), check=True)
    ar.rewrite(model, "softmax", args=(x,))  # without check the wrong graph is not looked at


def test_rejected_softmaxes_are_in_the_report() -> None:
    model, x = _model_and_input()
    rw = ar.rewrite(model, "linear", args=(x,))
    assert len(rw.report.sites) == 2
    (router,) = rw.report.rejected
    assert router.stage == "find" and router.node.startswith("softmax")
    assert "linear" in router.reason  # the router's logits come from a linear layer, no q·kᵀ
    # ... and the printed report says so, with where
    (line,) = [line for line in str(rw.report).splitlines() if line.startswith("not a site")]
    assert router.reason in line and f"[{router.module or '<root>'}]" in line


def test_an_error_while_finding_one_site_spares_the_others(monkeypatch) -> None:
    model, x = _model_and_input()
    real = find_attention._manual_site
    calls = []

    def flaky(gm, softmax, analysis):
        calls.append(softmax)
        if len(calls) == 1:
            raise ValueError("injected failure")
        return real(gm, softmax, analysis)

    monkeypatch.setattr(find_attention, "_manual_site", flaky)
    rw = ar.rewrite(model, "softmax", args=(x,))
    assert len(rw.report.rewritten) == 1
    errors = [r for r in rw.report.rejected if r.stage == "find-error"]
    assert len(errors) == 1 and "ValueError: injected failure" in errors[0].reason
    with torch.no_grad():
        assert torch.allclose(rw(x), model(x), rtol=1e-5, atol=1e-6)


def test_an_error_while_canonicalising_one_site_spares_the_others(monkeypatch) -> None:
    model, x = _model_and_input()
    real = canonicalize._build

    def flaky(emit, match, rows, dense=False):
        if match.site.name.endswith("#0"):
            raise IndexError("injected failure")
        return real(emit, match, rows, dense)

    monkeypatch.setattr(canonicalize, "_build", flaky)
    rw = ar.rewrite(model, "linear", args=(x,))
    by_name = {r.name: r for r in rw.report.sites}
    assert by_name["<root>#0"].status == "skipped"
    assert "internal error (IndexError: injected failure)" in by_name["<root>#0"].reason
    assert by_name["<root>#1"].status == "rewritten"
    with torch.no_grad():
        assert torch.isfinite(rw(x)).all()


class OutputUpdatedInPlace(Projections):
    """The site's output updated in place afterwards (Nyströmformer: ``context += conv(v)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, kernel_size=(3, 1), padding=(1, 0), groups=4)

    def forward(self, x):
        q, k, v = self.qkv(x)
        out = (q @ k.transpose(-2, -1) * 0.3).softmax(-1) @ v
        out += self.conv(v)
        return self.merge(out)


def test_check_compares_what_the_site_computed_before_later_in_place_updates() -> None:
    torch.manual_seed(0)
    model, x = OutputUpdatedInPlace().eval(), torch.randn(2, 8, D_MODEL)
    rw = ar.rewrite(model, "softmax", (x,), check=True)
    assert rw.report.counts() == {"rewritten": 1}
    other = torch.randn(3, 11, D_MODEL)
    with torch.no_grad():
        torch.testing.assert_close(rw(other), model(other), rtol=1e-5, atol=1e-6)
