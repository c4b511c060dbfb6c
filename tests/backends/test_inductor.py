"""``attnrewrite.compile``: full graph, dynamic sequence length, parity with eager.

Dynamo-only runs (``backend="eager"``) check capture (no graph break inside any variant, one
graph for every length) in seconds; Inductor runs generate kernels and take 10-60 s each on two
cores, so all but one representative Inductor parity test are marked slow.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import attnrewrite as ar
from attnrewrite.backends.inductor import CompiledModel
from attnrewrite.errors import UnknownBackendError
from tests.backends.conftest import (
    CASES,
    COMPILE_FAILURES,
    OTHER,
    TOLERANCE,
    call,
    relative_error,
    variant_params,
)

CASE_NAMES = list(CASES)


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _check_parity_at_two_lengths(case: str, rw, compiled) -> list[float]:
    """Run at OTHER, then at a third length with recompilation forbidden; errors vs eager."""
    errors = []
    batch, length = OTHER
    for i, n in enumerate((length, length + 17)):
        inputs = CASES[case].inputs(batch, n, i + 1)
        if i == 0:
            out = call(compiled, inputs)
        else:
            # A graph specialised to the first length would have to recompile here, and fail.
            with torch.compiler.set_stance("fail_on_recompile"):
                out = call(compiled, inputs)
        ref = call(rw, inputs)
        main = CASES[case].main_output
        errors.append(relative_error(main(out), main(ref)))
    return errors


def test_unknown_backend_is_refused_with_the_known_names(rewritten) -> None:
    with pytest.raises(UnknownBackendError, match="inductor.*eager|eager.*inductor"):
        ar.compile(rewritten("einsum", "linear"), backend="inductr")


def test_original_model_compiles_too(built) -> None:
    compiled = ar.compile(built("einsum"), backend="eager")
    assert isinstance(compiled, CompiledModel) and compiled.report is None
    inputs = CASES["einsum"].inputs(*OTHER, 1)
    assert relative_error(call(compiled, inputs), call(built("einsum"), inputs)) <= 1e-6


@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize(
    "variant", variant_params(fast=("softmax", "linear"), known_failures=COMPILE_FAILURES)
)
def test_full_graph_and_one_graph_for_every_length(variant: str, case: str, rewritten) -> None:
    rw = rewritten(case, variant)
    counter = CompileCounterWithBackend("eager")
    compiled = ar.compile(rw, backend=counter)  # fullgraph=True, dynamic=True by default
    assert compiled.report is rw.report
    errors = _check_parity_at_two_lengths(case, rw, compiled)
    assert max(errors) <= 1e-6, errors  # Dynamo alone does not change the arithmetic
    assert counter.frame_count == 1


@pytest.fixture(scope="module")
def bert_linear_inductor(rewritten):
    rw = rewritten("bert", "linear")
    counter = CompileCounterWithBackend("inductor")
    return rw, ar.compile(rw, backend=counter), counter


def test_inductor_matches_eager_without_recompiling(bert_linear_inductor) -> None:
    """The representative Inductor test of the default run: tiny BERT with padding, ``linear``."""
    rw, compiled, counter = bert_linear_inductor
    assert rw.report.rewritten, str(rw.report)
    errors = _check_parity_at_two_lengths("bert", rw, compiled)
    assert max(errors) <= TOLERANCE, errors
    graphs = [g for g in counter.graphs if len(g.graph.nodes) > 2]
    assert len(graphs) == 1  # one real graph (Inductor may also trace an empty helper frame)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASE_NAMES)
@pytest.mark.parametrize("variant", variant_params(known_failures=COMPILE_FAILURES))
def test_inductor_parity_every_variant(variant: str, case: str, rewritten) -> None:
    rw = rewritten(case, variant)
    errors = _check_parity_at_two_lengths(case, rw, ar.compile(rw, backend="inductor"))
    assert max(errors) <= TOLERANCE, errors
