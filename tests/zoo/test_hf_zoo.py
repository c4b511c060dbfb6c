"""Tiny random-init Hugging Face models: every site found, masks right, rewrites keep meaning."""

from __future__ import annotations

import pytest
import torch

import attnrewrite as ar
from attnrewrite.rewriter.capture import capture
from tests.zoo.hf_models import ZOO, ZooModel

pytest.importorskip("transformers", reason="the Hugging Face zoo needs the dev extra")

CASES = [(zm, impl) for zm in ZOO for impl in zm.impls]
IDS = [f"{zm.name}-{impl}" for zm, impl in CASES]


@pytest.fixture(scope="module")
def built():
    cache: dict[tuple[str, str], torch.nn.Module] = {}

    def get(zm: ZooModel, impl: str) -> torch.nn.Module:
        if (zm.name, impl) not in cache:
            cache[(zm.name, impl)] = zm.build(impl)
        return cache[(zm.name, impl)]

    return get


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize(("zm", "impl"), CASES, ids=IDS)
def test_zoo_softmax_exact_and_linear_finite(zm: ZooModel, impl: str, built) -> None:
    model = built(zm, impl)
    example = zm.inputs()
    # One capture for the finder and both rewrites (capturing is most of this test's time; the
    # nn.Module entry points are tested throughout tests/passes and tests/rewriter).
    program = capture(model, kwargs=example).program
    sites = ar.find_attention(program, kwargs=example)
    assert [str(s.mask) for s in sites] == list(zm.expected_masks)
    assert all(s.causal == s.mask.is_causal for s in sites)

    exact = ar.rewrite(program, "softmax", kwargs=example, check=True)
    assert len(exact.report.rewritten) == len(sites), str(exact.report)
    other = zm.inputs(batch=3, length=11, seed=1)  # another batch size and length than captured
    with torch.no_grad():
        ref = zm.hidden(model(**other))
        assert _rel(zm.hidden(exact(**other)), ref) <= 1e-5

    linear = ar.rewrite(program, "linear", kwargs=example)
    for row in linear.report.sites:
        if row.site.mask == ar.MaskClass.GENERAL:
            assert row.status == "skipped" and "general" in row.reason
        else:
            assert row.status == "rewritten", str(linear.report)
    with torch.no_grad():
        assert torch.isfinite(zm.hidden(linear(**other))).all()
