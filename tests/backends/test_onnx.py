"""``attnrewrite.export_onnx`` and ``attnrewrite.onnx_session``.

Each (case, variant) is exported once per module at the example shape and run in ONNX Runtime at
another batch size and length. The "no N×N tensor" check reads symbolic shapes: the exporter
names the sequence axis (e.g. ``s85``) and ``onnx.shape_inference`` carries it through every
value (``64*((s85 + 63)//64)`` for a padded length); a value with two axes that mention it is
quadratic in N. The check only counts when every value's shape is known, which it asserts, and
a positive control (exact softmax) shows that it does find the score matrix.
"""

from __future__ import annotations

from pathlib import Path

import onnx
import onnxruntime
import pytest
import torch

import attnrewrite as ar
from attnrewrite.backends.onnx import (
    METADATA_KEY,
    OnnxOutputs,
    custom_domain_ops,
    sequence_shapes,
)
from attnrewrite.errors import BackendUnavailableError, InputMismatchError
from tests.backends.conftest import (
    CASES,
    EXAMPLE,
    OTHER,
    TOLERANCE,
    call,
    matrix_params,
    relative_error,
)

CASE_NAMES = list(CASES)
ORIGINAL = "original"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, built, rewritten):
    """Export each (case, variant or ``"original"``) once; returns (model, OnnxExport)."""
    folder = tmp_path_factory.mktemp("onnx")
    cache: dict[tuple[str, str, bool], tuple[torch.nn.Module, ar.backends.onnx.OnnxExport]] = {}

    def get(case: str, variant: str, optimize: bool = False):
        key = (case, variant, optimize)
        if key not in cache:
            path = folder / f"{case}-{variant}{'-ort' if optimize else ''}.onnx"
            if variant == ORIGINAL:
                model = built(case)
                args, kwargs = CASES[case].inputs(*EXAMPLE, 0)
                record = ar.export_onnx(model, path, args=args, kwargs=kwargs,
                                        optimize_original=optimize)
            else:
                model = rewritten(case, variant)
                record = ar.export_onnx(model, path)  # example inputs default to the capture's
            cache[key] = model, record
        return cache[key]

    return get


@pytest.fixture(scope="module")
def sessions(exported):
    cache: dict[tuple[str, str, bool], ar.backends.onnx.OnnxSession] = {}

    def get(case: str, variant: str, optimize: bool = False):
        if (case, variant, optimize) not in cache:
            cache[(case, variant, optimize)] = ar.onnx_session(
                exported(case, variant, optimize)[1].path)
        return cache[(case, variant, optimize)]

    return get


def _parity(case: str, model, session) -> float:
    inputs = CASES[case].inputs(*OTHER, 1)  # another batch size and length than exported
    main = CASES[case].main_output
    return relative_error(main(call(session, inputs)), main(call(model, inputs)))


def _check_standard_and_dynamic(record) -> None:
    assert custom_domain_ops(record.path) == []
    onnx.checker.check_model(str(record.path))
    for name in record.input_names:
        assert {0, 1} <= set(record.dynamic_axes[name]), (name, record.dynamic_axes)
    proto = onnx.load(str(record.path))
    # Weights (and random-feature buffers) are initializers, not graph inputs.
    assert len(proto.graph.initializer) > 0
    assert {i.name for i in proto.graph.input} == set(record.input_names)


# The default run exports the linear rewrites and exact softmax on the small hand-written model;
# every other (variant, case) pair runs with -m slow (exports take 5-20 s each on two cores).
FAST = {("linear", case) for case in CASE_NAMES} | {("softmax", "einsum")}


@pytest.mark.parametrize(("variant", "case"), matrix_params(CASE_NAMES, FAST))
def test_ort_matches_eager_with_standard_ops(variant: str, case: str, exported, sessions) -> None:
    model, record = exported(case, variant)
    _check_standard_and_dynamic(record)
    assert _parity(case, model, sessions(case, variant)) <= TOLERANCE


@pytest.mark.parametrize("case", CASE_NAMES)
def test_linear_graph_has_no_sequence_squared_value(case: str, exported) -> None:
    model, record = exported(case, "linear")
    assert model.report.rewritten, str(model.report)
    shapes = sequence_shapes(record.path)
    assert shapes.symbols, "the sequence axis was not exported as a symbolic dimension"
    assert shapes.unknown == (), "shapes not inferred; the check would be inconclusive"
    assert shapes.checked > 50
    assert shapes.quadratic == ()


def test_softmax_graph_is_found_quadratic(exported) -> None:
    """Positive control for the check above: exact attention has (B, H, N, N) scores."""
    shapes = sequence_shapes(exported("einsum", "softmax")[1].path)
    assert shapes.unknown == ()
    assert any(dims[-2:] == (s, s) for _, dims in shapes.quadratic for s in shapes.symbols)


def test_original_model_exports_for_a_before_after_comparison(exported, sessions) -> None:
    model, record = exported("bert", ORIGINAL)
    _check_standard_and_dynamic(record)
    out = call(sessions("bert", ORIGINAL), CASES["bert"].inputs(*OTHER, 1))
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.pooler_output.shape == (OTHER[0], 32)
    assert _parity("bert", model, sessions("bert", ORIGINAL)) <= TOLERANCE


def test_optimize_original_fuses_into_contrib_ops(exported, sessions) -> None:
    model, record = exported("bert", ORIGINAL, optimize=True)
    assert record.fusions and record.fusions.get("attention", 0) + record.fusions.get("sdpa", 0) > 0
    assert any(op.startswith("com.microsoft::") for op in custom_domain_ops(record.path))
    assert _parity("bert", model, sessions("bert", ORIGINAL, True)) <= TOLERANCE


def test_signature_is_stored_in_the_model(exported) -> None:
    _, record = exported("llama", "linear")
    meta = {p.key: p.value for p in onnx.load(str(record.path)).metadata_props}
    assert METADATA_KEY in meta and "use_cache" in meta[METADATA_KEY]
    assert record.input_names == ("attention_mask", "input_ids")  # keyword arguments, by name
    assert record.output_names == ("last_hidden_state",)


def test_session_rejects_a_changed_non_tensor_argument(sessions) -> None:
    session = sessions("llama", "linear")
    kwargs = CASES["llama"].inputs(*OTHER, 1)[1]
    with pytest.raises(InputMismatchError, match="'use_cache' is True.*fixed it to False"):
        session(**{**kwargs, "use_cache": True})


def test_session_rejects_a_missing_argument_and_a_wrong_dtype(sessions) -> None:
    session = sessions("llama", "linear")
    kwargs = CASES["llama"].inputs(*OTHER, 1)[1]
    with pytest.raises(InputMismatchError, match="exported for inputs .*use_cache=False"):
        session(input_ids=kwargs["input_ids"], attention_mask=kwargs["attention_mask"])
    with pytest.raises(InputMismatchError, match="int64"):
        session(**{**kwargs, "input_ids": kwargs["input_ids"].int()})


def test_session_takes_keyword_arguments_in_any_order(sessions) -> None:
    session = sessions("llama", "linear")
    kwargs = CASES["llama"].inputs(*OTHER, 1)[1]
    reordered = dict(reversed(list(kwargs.items())))
    a, b = session(**kwargs), session(**reordered)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)


def test_cuda_provider_is_refused_clearly_when_unavailable(exported) -> None:
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    with pytest.raises(BackendUnavailableError, match="CUDAExecutionProvider.*onnxruntime-gpu"):
        ar.onnx_session(exported("einsum", "linear")[1].path, providers="cuda")


def test_session_of_a_file_exported_elsewhere(tmp_path: Path) -> None:
    """Without our metadata, inputs go positionally and outputs come back as a tuple."""
    model = torch.nn.Linear(4, 3).eval()
    x = torch.randn(2, 4)
    torch.onnx.export(model, (x,), str(tmp_path / "plain.onnx"), dynamo=True, verbose=False,
                      external_data=False)
    session = ar.onnx_session(tmp_path / "plain.onnx")
    assert session.signature is None
    (out,) = session(x)
    assert relative_error(out, model(x).detach()) <= 1e-6


def test_outputs_without_their_class_keep_names_and_positions() -> None:
    out = OnnxOutputs(last_hidden_state=torch.zeros(1), pooler_output=torch.ones(1))
    assert out.pooler_output is out[1] is out["pooler_output"]
    with pytest.raises(AttributeError):
        _ = out.attentions
