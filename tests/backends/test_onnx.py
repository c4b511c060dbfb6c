"""``attnrewrite.export_onnx`` and ``attnrewrite.onnx_session``.

Each (case, variant) is exported once per module at the example shape and run in ONNX Runtime at
another batch size and length. The "no N×N tensor" check reads symbolic shapes: the exporter
names the sequence axis (e.g. ``s85``) and ``onnx.shape_inference`` carries it through every
value (``64*((s85 + 63)//64)`` for a padded length); a value with two axes that mention it is
quadratic in N. The check only counts when every value's shape is known, which it asserts, and
a positive control (exact softmax) shows that it does find the score matrix.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper
from torch.utils import _pytree as pytree

import attnrewrite as ar
from attnrewrite.backends.onnx import (
    METADATA_KEY,
    OnnxOutputs,
    OnnxSignatureError,
    custom_domain_ops,
    onnx_session,
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
                record = ar.export_onnx(
                    model, path, args=args, kwargs=kwargs, optimize_original=optimize
                )
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
                exported(case, variant, optimize)[1].path
            )
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
    inputs = CASES["bert"].inputs(*OTHER, 1)
    out = call(sessions("bert", ORIGINAL), inputs)
    # By default a ModelOutput comes back as a record with the same names and positions ...
    assert type(out) is OnnxOutputs
    assert out.pooler_output.shape == (OTHER[0], 32) and out[1] is out.pooler_output
    assert _parity("bert", model, sessions("bert", ORIGINAL)) <= TOLERANCE
    # ... and as its own class when the caller passes that class.
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions as cls

    session = onnx_session(record.path, output_classes=[cls])
    assert session.signature.class_names == (f"{cls.__module__}.{cls.__qualname__}",)
    rebuilt = call(session, inputs)
    assert type(rebuilt) is cls
    assert torch.equal(rebuilt.last_hidden_state, out.last_hidden_state)


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
    torch.onnx.export(
        model, (x,), str(tmp_path / "plain.onnx"), dynamo=True, verbose=False, external_data=False
    )
    session = ar.onnx_session(tmp_path / "plain.onnx")
    assert session.signature is None
    (out,) = session(x)
    assert relative_error(out, model(x).detach()) <= 1e-6


def test_outputs_without_their_class_keep_names_and_positions() -> None:
    out = OnnxOutputs(last_hidden_state=torch.zeros(1), pooler_output=torch.ones(1))
    assert out.pooler_output is out[1] is out["pooler_output"]
    with pytest.raises(AttributeError):
        _ = out.attentions


# -- a loaded file is data: classes named in it are never imported or constructed -----------------

X = torch.randn(2, 4)


def _tensor(name: str) -> dict[str, str]:
    return {"output": name}


def _record(cls: str, keys: list[str] | None, items: list[dict[str, Any]], namedtuple=False):
    return {"kind": "object", "class": cls, "keys": keys, "namedtuple": namedtuple, "items": items}


def _signature(output: Any) -> str:
    return json.dumps(
        {
            "format": 1,
            "input_structure": repr(pytree.tree_structure(((X,), {}))),
            "inputs": [{"input": "x", "dtype": "float32", "rank": 2}],
            "output": output,
        }
    )


def _crafted_file(path: Path, metadata: str) -> Path:
    """A two-output ONNX model (``a = x``, ``b = -x``) whose attnrewrite metadata is ``metadata``,
    as anyone can write it: the file, not export_onnx, decides what the metadata says."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in "ab"]
    nodes = [helper.make_node("Identity", ["x"], ["a"]), helper.make_node("Neg", ["x"], ["b"])]
    model = helper.make_model(
        helper.make_graph(nodes, "crafted", [x], outputs),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    helper.set_model_props(model, {METADATA_KEY: metadata})
    onnx.save(model, str(path))
    return path


def _payload_module(folder: Path, marker: Path) -> str:
    """A module on ``sys.path`` that writes ``marker`` when imported or when its class is built."""
    name = f"attnrewrite_payload_{uuid.uuid4().hex}"
    (folder / f"{name}.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "class Payload:\n"
        "    def __init__(self, *args, **kwargs):\n"
        f"        open({str(marker)!r}, 'w').write('constructed')\n"
    )
    return name


# (stored class, keys, namedtuple, items beyond the tensors); {marker} is the file a payload writes.
PAYLOADS = {
    "module_on_sys_path": ("{module}.Payload", ["a", "b"], False, []),
    "module_not_installed": ("attnrewrite_no_such_module.Output", ["a", "b"], False, []),
    "subprocess_popen": (
        "subprocess.Popen",
        ["args", "shell"],
        False,
        [{"constant": "touch {marker}"}, {"constant": True}],
    ),
    "os_system": ("os.system", None, True, [{"constant": "touch {marker}"}]),
    "builtins_exec": ("builtins.exec", None, True, [{"constant": "open('{marker}', 'w')"}]),
}


@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_a_class_named_in_the_file_is_never_imported_or_called(
    payload: str, tmp_path: Path, monkeypatch
) -> None:
    marker = tmp_path / "payload-ran"
    monkeypatch.syspath_prepend(str(tmp_path))
    module = _payload_module(tmp_path, marker)
    cls, keys, namedtuple, constants = PAYLOADS[payload]
    cls = cls.format(module=module)
    constants = [
        {k: v.format(marker=marker) if isinstance(v, str) else v for k, v in c.items()}
        for c in constants
    ]
    items = constants or [_tensor("a"), _tensor("b")]
    output = {"kind": "tuple", "items": [_tensor("a"), _record(cls, keys, items, namedtuple)]}
    session = ar.onnx_session(_crafted_file(tmp_path / "crafted.onnx", _signature(output)))
    assert session.signature.class_names == (cls,)

    first, named = session(X)

    assert torch.equal(first, X)
    assert type(named) is (tuple if keys is None else OnnxOutputs)
    if constants:  # the would-be arguments come back as plain values
        assert list(named.values() if keys else named) == [c["constant"] for c in constants]
    else:
        assert torch.equal(named.b, -X)
    assert module not in sys.modules and "attnrewrite_no_such_module" not in sys.modules
    assert not marker.exists(), marker.read_text()
    # Control: the payload is live, so the checks above prove it was not imported.
    __import__(module)
    assert marker.read_text() == "imported"
    del sys.modules[module]


class Pair(NamedTuple):
    first: torch.Tensor
    second: torch.Tensor


class Fields:
    def __init__(self, first: torch.Tensor, second: torch.Tensor) -> None:
        self.first, self.second = first, second


def _name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


# (class the file names, output_classes, the type that comes back)
REBUILDS = {
    "default_namedtuple": (Pair, None, OnnxOutputs),
    "default_keywords": (Fields, None, OnnxOutputs),
    "namedtuple_passed": (Pair, [Pair], Pair),
    "keywords_passed": (Fields, [Pair, Fields], Fields),
    "single_class": (Pair, Pair, Pair),
    "other_class_passed": (Pair, [Fields], OnnxOutputs),
    "moved_class_by_mapping": ("old.location.Pair", {"old.location.Pair": Pair}, Pair),
}


@pytest.mark.parametrize("case", list(REBUILDS))
def test_output_classes_rebuild_only_the_classes_passed(case: str, tmp_path: Path) -> None:
    stored, output_classes, expected = REBUILDS[case]
    stored = stored if isinstance(stored, str) else _name(stored)
    desc = _record(
        stored,
        ["first", "second"],
        [_tensor("a"), _tensor("b")],
        namedtuple=stored.endswith("Pair"),
    )
    path = _crafted_file(tmp_path / "pair.onnx", _signature(desc))
    out = onnx_session(path, output_classes=output_classes)(X)
    assert type(out) is expected
    assert torch.equal(out.first, X) and torch.equal(out.second, -X)
    if expected is not Fields:
        assert torch.equal(out[1], -X)


def test_an_output_class_that_cannot_take_the_fields_is_a_clear_error(tmp_path: Path) -> None:
    desc = _record(_name(Fields), ["first", "third"], [_tensor("a"), _tensor("b")])
    path = _crafted_file(tmp_path / "fields.onnx", _signature(desc))
    session = onnx_session(path, output_classes=[Fields])
    with pytest.raises(OnnxSignatureError, match="could not be built.*first, third"):
        session(X)


def test_output_classes_takes_only_classes(tmp_path: Path) -> None:
    path = _crafted_file(tmp_path / "pair.onnx", _signature(_tensor("a")))
    with pytest.raises(TypeError, match="output_classes takes classes"):
        onnx_session(path, output_classes=[sys.exit])


def _nested(depth: int) -> dict[str, Any]:
    desc: dict[str, Any] = _tensor("a")
    for _ in range(depth):
        desc = {"kind": "tuple", "items": [desc]}
    return desc


MALFORMED = {
    "not_json": ("{'format': 1", "not valid JSON"),
    "a_list": ("[1, 2]", "expected a JSON object"),
    "another_format": (json.dumps({"format": 99}), "format 99"),
    "unknown_kind": (_signature({"kind": "eval", "items": []}), "unknown kind 'eval'"),
    "class_not_a_string": (_signature(_record(["os", "system"], None, [])), "class name"),
    "keys_and_items_differ": (_signature(_record("a.B", ["x"], [])), "1 keys for 0 items"),
    "constant_not_scalar": (_signature({"constant": {"__class__": "os.system"}}), "'constant'"),
    "output_not_in_graph": (_signature(_tensor("z")), "outputs the graph lacks: z"),
    "nested_too_deep": (_signature(_nested(200)), "nested more than"),
    "json_too_deep": ("[" * 100_000 + "]" * 100_000, "not valid JSON"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_metadata_is_refused_when_loading(case: str, tmp_path: Path) -> None:
    metadata, reason = MALFORMED[case]
    path = _crafted_file(tmp_path / "malformed.onnx", metadata)
    with pytest.raises(OnnxSignatureError, match=f"'{METADATA_KEY}' metadata of .*{reason}"):
        ar.onnx_session(path)


def test_decoder_captured_without_its_cache_exports_and_compiles(tmp_path) -> None:
    """A Hugging Face decoder called with token ids only is captured with use_cache=False (said
    in the notes); ONNX Runtime and torch.compile then take the same inputs as the model."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(0, 100, (2, 8))
    rw = ar.rewrite(model, "linear", kwargs={"input_ids": ids})
    assert any("use_cache=False" in note for note in rw.report.notes)
    path = tmp_path / "decoder.onnx"
    ar.export_onnx(rw, path, kwargs={"input_ids": ids})
    other = torch.randint(0, 100, (3, 11))
    with torch.no_grad():
        want = rw(input_ids=other).logits
        got = ar.onnx_session(path)(input_ids=other).logits
        compiled = ar.compile(rw, backend="eager")(input_ids=other).logits
    assert relative_error(got, want) <= 1e-5
    assert relative_error(compiled, want) <= 1e-6
