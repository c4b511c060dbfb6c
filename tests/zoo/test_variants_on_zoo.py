"""Every registered variant through ``rewrite`` on representative zoo models: the report follows the
variant's capabilities and the outputs are finite at another length than captured."""

from __future__ import annotations

import pytest
import torch

import attnrewrite as ar
from attnrewrite.rewriter.capture import capture
from attnrewrite.variants import get_variant, variant_names
from tests.zoo.hf_models import ZOO

pytest.importorskip("transformers", reason="the Hugging Face zoo needs the dev extra")

# Covers key, causal+key with grouped heads, general + cross key, causal + cross.
MODELS = [("bert", "eager"), ("llama", "sdpa"), ("t5", "eager"), ("bart", "sdpa")]
VARIANTS = [v for v in variant_names(builtin_only=True) if v not in ("softmax", "kernel")]
#: The survey families are rewritten on tiny BERT, Llama and ViT in their own test files; here
#: they run with -m slow only, to keep the default run within its budget.
_SLOW = {"reformer", "routing", "sinkhorn", "set_transformer", "memory_compressed", "axial",
         "transformer_xl"}  # fmt: skip
VARIANT_PARAMS = [
    pytest.param(v, id=v, marks=[pytest.mark.slow] if v in _SLOW else []) for v in VARIANTS
]


@pytest.fixture(scope="module")
def zoo():
    """Each model captured once; rewrites start from the ExportedProgram (no re-export)."""
    cache = {}
    for name, impl in MODELS:
        zm = next(z for z in ZOO if z.name == name)
        model = zm.build(impl)
        cache[(name, impl)] = (zm, model, capture(model, kwargs=zm.inputs()).program)
    return cache


@pytest.mark.parametrize("variant", VARIANT_PARAMS)
@pytest.mark.parametrize(("name", "impl"), MODELS, ids=[f"{n}-{i}" for n, i in MODELS])
def test_variant_on_zoo(variant: str, name: str, impl: str, zoo) -> None:
    zm, model, program = zoo[(name, impl)]
    cls = get_variant(variant)
    rw = ar.rewrite(program, variant, kwargs=zm.inputs(), seed=0)
    for row in rw.report.sites:
        expected_reason = cls.refuse(row.site)
        if expected_reason is None:
            assert row.status == "rewritten", str(rw.report)
        else:
            assert row.status == "skipped" and row.reason == expected_reason
    other = zm.inputs(batch=3, length=11, seed=1)
    with torch.no_grad():
        out = zm.hidden(rw(**other))
    assert torch.isfinite(out).all()
    assert out.shape == zm.hidden(model(**other)).shape
