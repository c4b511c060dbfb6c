"""Export to standard ONNX, and run it with ONNX Runtime called like the PyTorch model.

Export (:func:`export_onnx`) goes through ``torch.export`` (non-strict) and the dynamo-based
``torch.onnx.export`` of PyTorch 2.13, for a :class:`~attnrewrite.rewriter.rewrite.RewrittenModel`
and for the original ``nn.Module`` alike, so a before/after comparison runs the same route:

- The model is called through a flat wrapper whose inputs are the tensors of the flattened
  ``(args, kwargs)`` pytree, in order, and whose outputs are the tensors of the flattened output.
  Every other leaf (``use_cache=False``, an ``int`` option...) is a constant of the export.
  How to flatten and rebuild both sides is stored in the ONNX model's ``metadata_props`` under
  :data:`METADATA_KEY` (JSON), so :func:`onnx_session` needs nothing but the ``.onnx`` file.
- Axes 0 and 1 (batch, sequence) of every input tensor are ``Dim.AUTO``: dynamic unless the model
  fixes them (``torch.export`` specialises a size-1 axis; export with a batch of 2 or more).
- Parameters and buffers (random features included) become initializers, inside the file up to
  2 GB and in an external-data file next to it beyond.
- Only standard ONNX operators (domain ``""``/``ai.onnx``) are accepted; the exported file passes
  ``onnx.checker.check_model``. The single exception is ``optimize_original=True``, which runs
  onnxscript's ONNX Runtime fusions and may insert ``com.microsoft`` contrib operators.

Variant operations (``einsum``, ``cumsum``, ``scaled_dot_product_attention`` with grouped heads and
boolean masks, ``F.pad`` with negative pads...) all lower to standard operators in this exporter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import json
import logging
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from attnrewrite.errors import BackendUnavailableError, InputMismatchError, OnnxExportError
from attnrewrite.rewriter.capture import check_inputs
from attnrewrite.rewriter.rewrite import RewrittenModel

#: The ``metadata_props`` key holding how to flatten inputs and rebuild outputs (JSON).
METADATA_KEY = "attnrewrite.io"
#: The ``metadata_props`` key holding the rewrite report of an exported ``RewrittenModel``.
REPORT_KEY = "attnrewrite.report"
#: ONNX domains of the standard operator set.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
# Protobuf cannot serialise a model over 2 GB; weights go to external data before that.
_INLINE_LIMIT_BYTES = 1_800_000_000
_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
}


# -- how inputs are flattened and outputs rebuilt -------------------------------------------------


def _constant(value: Any) -> dict[str, Any]:
    """A non-tensor leaf as JSON: the value itself when JSON has it, else its ``repr``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"constant": value}
    return {"constant_repr": repr(value)}


def _same_constant(leaf: dict[str, Any], value: Any) -> bool:
    if "constant" in leaf:
        expected = leaf["constant"]
        # bool is an int: True == 1 must not pass for use_cache=True against an exported 1.
        return type(value) is type(expected) and value == expected
    return repr(value) == leaf["constant_repr"]


def _show_constant(leaf: dict[str, Any]) -> str:
    return repr(leaf["constant"]) if "constant" in leaf else leaf["constant_repr"]


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _identifier(parts: Sequence[str], taken: set[str]) -> str:
    name = re.sub(r"\W", "_", "_".join(parts)).strip("_") or "value"
    unique, i = name, 1
    while unique in taken:
        unique, i = f"{name}_{i}", i + 1
    taken.add(unique)
    return unique


def _positional_names(model: nn.Module, count: int) -> list[str]:
    """Names of the first ``count`` positional parameters of ``model.forward`` (``args_i`` else)."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for i in range(count):
        p = params[i] if i < len(params) else None
        plain = p is not None and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        names.append(p.name if plain else f"args_{i}")
    return names


def _input_leaves(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[list[Any], str, list[dict[str, Any]]]:
    """Flatten ``(args, kwargs)``: the leaves, the structure's repr, and one record per leaf.

    Keyword arguments are sorted by name, so the order they are passed in does not matter.
    """
    with_paths, spec = pytree.tree_flatten_with_path((tuple(args), dict(sorted(kwargs.items()))))
    positional = _positional_names(model, len(args))
    taken: set[str] = set()
    records = []
    for path, leaf in with_paths:
        top = positional[path[1].idx] if path[0].idx == 0 else _key_name(path[1])
        name = _identifier([top, *(_key_name(k) for k in path[2:])], taken)
        if not isinstance(leaf, torch.Tensor):
            records.append({"name": name, **_constant(leaf)})
            continue
        records.append({"input": name, "dtype": str(leaf.dtype).removeprefix("torch."),
                        "rank": leaf.dim()})
    return [leaf for _, leaf in with_paths], repr(spec), records


def _describe_output(spec: pytree.TreeSpec, leaves: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """A JSON description of an output pytree; tensor leaves refer to ONNX outputs by name."""
    if spec.is_leaf():
        return next(leaves)
    items = [_describe_output(child, leaves) for child in spec.children()]
    kind = spec.type
    if kind in (tuple, list):
        return {"kind": kind.__name__, "items": items}
    if kind is dict or (isinstance(kind, type) and issubclass(kind, dict)
                        and not hasattr(kind, "__dataclass_fields__")):
        return {"kind": "dict", "keys": list(spec.context), "items": items}
    context = spec.context
    if isinstance(context, type):  # namedtuple: the context is the class
        kind, context = context, list(getattr(context, "_fields", ()))
    keys = list(context) if isinstance(context, (list, tuple)) and all(
        isinstance(k, str) for k in context) else None
    return {"kind": "object", "class": f"{kind.__module__}.{kind.__qualname__}", "keys": keys,
            "namedtuple": hasattr(kind, "_fields"), "items": items}


@dataclasses.dataclass(frozen=True)
class IOSignature:
    """How a model's ``(args, kwargs)`` map to ONNX inputs and ONNX outputs back to its output.

    Attributes:
        input_structure: ``repr`` of the pytree structure of ``(args, sorted kwargs)``.
        inputs: one record per leaf: ``{"input": name, "dtype", "rank"}`` for a tensor, or
            ``{"name", "constant": value}`` (``"constant_repr": repr`` when JSON has no such
            value) for a non-tensor argument, fixed at export.
        output: a JSON description of the output structure (see ``_describe_output``).
    """

    input_structure: str
    inputs: tuple[dict[str, Any], ...]
    output: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps({"format": 1, "input_structure": self.input_structure,
                           "inputs": list(self.inputs), "output": self.output})

    @classmethod
    def from_json(cls, text: str) -> IOSignature:
        data = json.loads(text)
        return cls(data["input_structure"], tuple(data["inputs"]), data["output"])

    @property
    def input_names(self) -> list[str]:
        return [leaf["input"] for leaf in self.inputs if "input" in leaf]

    def describe_inputs(self) -> str:
        def one(leaf: dict[str, Any]) -> str:
            if "input" in leaf:
                return f"{leaf['input']}=Tensor(rank {leaf['rank']}, {leaf['dtype']})"
            return f"{leaf.get('name', '?')}={_show_constant(leaf)}"

        return ", ".join(one(leaf) for leaf in self.inputs)


class _FlatCall(nn.Module):
    """``model`` called with only the tensors of its inputs; returns only its output tensors."""

    def __init__(self, model: nn.Module, leaves: list[Any], structure: pytree.TreeSpec) -> None:
        super().__init__()
        self.model = model
        self._leaves = leaves
        self._structure = structure

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        supply = iter(tensors)
        leaves = [next(supply) if isinstance(x, torch.Tensor) else x for x in self._leaves]
        args, kwargs = pytree.tree_unflatten(leaves, self._structure)
        out = self.model(*args, **kwargs)
        return tuple(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))


# -- export ----------------------------------------------------------------------------------------


def _boolean_where_rule() -> Any:
    """An onnxscript rewrite rule: ``Where`` on boolean values as ``Or(And(c, x), And(Not(c), y))``.

    ONNX allows ``Where`` on any type, but ONNX Runtime's CPU provider has no boolean kernel
    (microsoft/onnxruntime#24127), and boolean masks produce such nodes (``torch.where`` and
    ``masked_fill`` on a bool mask). The logic form is exact and standard.
    """
    from onnxscript import ir
    from onnxscript.rewriter.pattern import RewriteRuleClassBase

    class BooleanWhere(RewriteRuleClassBase):
        def pattern(self, op: Any, condition: Any, x: Any, y: Any) -> Any:
            return op.Where(condition, x, y)

        def check(self, context: Any, condition: Any, x: Any, y: Any, **_: Any) -> bool:
            return x.dtype == ir.DataType.BOOL and y.dtype == ir.DataType.BOOL

        def rewrite(self, op: Any, condition: Any, x: Any, y: Any, **_: Any) -> Any:
            return op.Or(op.And(condition, x), op.And(op.Not(condition), y))

    return BooleanWhere.rule()


def _make_runtime_compatible(model: Any) -> None:
    """Rewrite standard operators ONNX Runtime cannot run into equivalent ones, in place."""
    from onnxscript.rewriter import rewrite

    rewrite(model, pattern_rewrite_rules=[_boolean_where_rule()])



@dataclasses.dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: the ``.onnx`` file.
        input_names, output_names: ONNX graph inputs and outputs, in order.
        dynamic_axes: input name -> the axes that stayed dynamic.
        opset: the default-domain opset of the model.
        fusions: ONNX Runtime fusions applied per pattern (``optimize_original=True``), else None.
        notes: what the caller should know (axes that were fixed, external data...).
    """

    path: Path
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, tuple[int, ...]]
    opset: int
    fusions: dict[str, int] | None = None
    notes: tuple[str, ...] = ()


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    # The exporter warns at first use about every torchvision op it cannot register when
    # torchvision is absent; that is noise for attention models.
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export_target(model: Any) -> nn.Module:
    if isinstance(model, RewrittenModel):
        # The exported graph itself: RewrittenModel.forward only adds error translation.
        return model.graph_module
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, nn.Module):
        return model
    raise OnnxExportError(
        f"export_onnx expects an nn.Module, a RewrittenModel or an ExportedProgram, got "
        f"{type(model).__name__}")


def _default_inputs(model: Any, args: Any, kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args is None and kwargs is None:
        if isinstance(model, RewrittenModel):
            return model.example_inputs
        if isinstance(model, torch.export.ExportedProgram) and model.example_inputs:
            return model.example_inputs
    return check_inputs(args, kwargs)


def _dynamic_shapes(leaves: list[Any], dynamic: bool) -> tuple[Any, ...] | None:
    if not dynamic:
        return None
    auto = torch.export.Dim.AUTO
    specs = tuple({d: auto for d in range(min(2, x.dim()))} or None
                  for x in leaves if isinstance(x, torch.Tensor))
    return (specs,)  # one entry: _FlatCall.forward's *tensors


def _nodes(graph: Any) -> Iterator[Any]:
    """Every node of an ONNX ``GraphProto``, subgraphs (If/Loop/Scan bodies) included."""
    import onnx

    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _nodes(g)


def custom_domain_ops(model: Any) -> list[str]:
    """``domain::OpType`` of every node outside the standard ONNX domains (sorted, unique).

    Args:
        model: an ``onnx.ModelProto`` or a path to one.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    found = {f"{n.domain}::{n.op_type}" for n in _nodes(model.graph)
             if n.domain not in STANDARD_DOMAINS}
    for function in model.functions:
        found |= {f"{n.domain}::{n.op_type}" for n in function.node
                  if n.domain not in STANDARD_DOMAINS}
    return sorted(found)


def export_onnx(model: Any, path: str | Path, args: Any = None, kwargs: Any = None,
                opset: int | None = None, *, optimize_original: bool = False,
                dynamic: bool = True) -> OnnxExport:
    """Export a rewritten or original model to ONNX with standard operators.

    Args:
        model: a :class:`RewrittenModel`, any ``nn.Module`` (e.g. the original, for a
            before/after comparison) or a ``torch.export.ExportedProgram``.
        path: the ``.onnx`` file to write (parent folders are created).
        args, kwargs: example inputs; default: the rewritten model's captured example.
        opset: the ONNX opset; default: the exporter's.
        optimize_original: run onnxscript's ONNX Runtime fusions (attention, LayerNorm, GELU,
            rotary embeddings... into ``com.microsoft`` contrib operators), the fairest "before"
            for ONNX Runtime timings. The result may contain contrib operators and then runs on
            ONNX Runtime only. Meant for the original model; on a rewritten one it fuses the parts
            that were not rewritten the same way, which keeps a comparison fair.
        dynamic: keep the batch and sequence axes (0 and 1 of each input) dynamic.

    Returns:
        An :class:`OnnxExport` record (path, input and output names, dynamic axes, fusions).

    Raises:
        OnnxExportError: ``torch.export`` or the ONNX translation failed, or an operator outside
            the standard domains was produced.
    """
    import onnx

    args, kwargs = _default_inputs(model, args, kwargs)
    target = _export_target(model)
    leaves, structure_repr, records = _input_leaves(target, args, kwargs)
    structure = pytree.tree_structure((tuple(args), dict(sorted(kwargs.items()))))
    tensors = tuple(x for x in leaves if isinstance(x, torch.Tensor))
    flat = _FlatCall(target, leaves, structure).eval()

    # Run once to learn the output structure (names of the ONNX outputs, how to rebuild them).
    with torch.no_grad():
        out = target(*args, **kwargs)
    out_paths, out_spec = pytree.tree_flatten_with_path(out)
    taken: set[str] = set()
    out_records = []
    for p, leaf in out_paths:
        if isinstance(leaf, torch.Tensor):
            out_records.append({"output": _identifier([_key_name(k) for k in p] or ["output"],
                                                      taken)})
        else:
            out_records.append(_constant(leaf))
    output_names = [r["output"] for r in out_records if "output" in r]
    if not output_names:
        raise OnnxExportError("the model returns no tensor; there is nothing to export to ONNX")
    signature = IOSignature(structure_repr, tuple(records),
                            _describe_output(out_spec, iter(out_records)))

    try:
        program = torch.export.export(
            flat, tensors, dynamic_shapes=_dynamic_shapes(leaves, dynamic), strict=False)
    except Exception as exc:
        raise OnnxExportError(
            f"torch.export could not capture {type(target).__name__} for ONNX: "
            f"{type(exc).__name__}: {str(exc)[:800]}\nExport with dynamic=False, or check that "
            "the model runs under torch.export.export(model, args, kwargs, strict=False).") from exc
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program, tensors, dynamo=True, input_names=signature.input_names,
                output_names=output_names, opset_version=opset, optimize=True, verbose=False)
    except Exception as exc:
        raise OnnxExportError(
            f"the ONNX exporter could not translate {type(target).__name__}: "
            f"{type(exc).__name__}: {str(exc)[:800]}\nThe message names the operator it has no "
            "ONNX translation for; pass a different opset= or report it.") from exc

    _make_runtime_compatible(onnx_program.model)
    _rename_shadowed_values(onnx_program.model)
    fusions = None
    if optimize_original:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        _, fusions = optimize_for_ort(onnx_program.model)
        fusions = {k: int(v) for k, v in fusions.items() if v}
    onnx_program.model.metadata_props[METADATA_KEY] = signature.to_json()
    if isinstance(model, RewrittenModel):
        onnx_program.model.metadata_props[REPORT_KEY] = str(model.report)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    size += sum(t.numel() * t.element_size() for t in program.constants.values()
                if isinstance(t, torch.Tensor))
    external = size > _INLINE_LIMIT_BYTES
    onnx_program.save(str(path), external_data=external)

    proto = onnx.load(str(path), load_external_data=False)
    if not optimize_original:
        custom = custom_domain_ops(proto)
        if custom:
            raise OnnxExportError(
                f"the export of {type(target).__name__} contains non-standard operators: "
                f"{', '.join(custom)}; only standard ONNX (domain '' / ai.onnx) is produced "
                "without optimize_original. Report the variant whose operator this is.")
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:
            raise OnnxExportError(
                f"the exported model at {path} fails onnx.checker: {exc}") from exc
    # With optimize_original the checker has no schema for ONNX Runtime's contrib operators (some,
    # like SimplifiedLayerNormalization, even sit in the default domain); ORT itself checks them.
    return _export_record(path, proto, output_names, fusions, external)


def _rename_shadowed_values(model: Any) -> None:
    """Rename node outputs that carry a graph input's name.

    Graph inputs are named after the model's arguments; an internal value can end up with the same
    name (a model argument called ``pad`` and the ``pad`` a variant computes), which breaks ONNX's
    single-assignment rule. Internal names are free to change.
    """
    taken = {v.name for v in model.graph.inputs}
    for node in model.graph:
        for value in node.outputs:
            if value.name in taken and value not in model.graph.outputs:
                k = 1
                while f"{value.name}__{k}" in taken:
                    k += 1
                value.name = f"{value.name}__{k}"
                taken.add(value.name)


def _export_record(path: Path, proto: Any, output_names: list[str], fusions: dict[str, int] | None,
                   external: bool) -> OnnxExport:
    notes = []
    dynamic_axes: dict[str, tuple[int, ...]] = {}
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        dynamic_axes[value.name] = tuple(
            i for i, d in enumerate(dims) if not d.HasField("dim_value"))
        fixed = [i for i, d in enumerate(dims[:2]) if d.HasField("dim_value")]
        if fixed:
            notes.append(f"input {value.name!r}: axes {fixed} are fixed (the model or a size-1 "
                         "example fixes them)")
    if external:
        notes.append("weights are stored as external data next to the .onnx file (over 2 GB)")
    opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)
    return OnnxExport(path, tuple(i.name for i in proto.graph.input), tuple(output_names),
                      dynamic_axes, opset, fusions, tuple(notes))


# -- analysis --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SequenceShapes:
    """Intermediate values of an ONNX graph classified by how their size grows with the sequence.

    Attributes:
        symbols: the symbolic dimension names of the inputs' sequence axis.
        quadratic: ``(value name, shape)`` of values with two or more sequence-sized axes.
        unknown: names of values whose shape inference left a dimension without value or name
            (they cannot be classified; a sound "no N×N tensor" claim needs this to be empty).
        checked: how many values had a complete symbolic shape.
    """

    symbols: tuple[str, ...]
    quadratic: tuple[tuple[str, tuple[str | int, ...]], ...]
    unknown: tuple[str, ...]
    checked: int


def sequence_shapes(model: Any, axis: int = 1) -> SequenceShapes:
    """Find values whose shape has more than one axis growing with the sequence length.

    Symbolic shape inference (``onnx.shape_inference`` with data propagation) is run over the
    exported graph; a dimension grows with the sequence when its symbolic expression mentions a
    symbol of the inputs' sequence axis (``s15``, ``64*((s15 + 63)//64)``...). An attention score
    matrix (B, H, N, N) has two; the state of linear attention (B, H, d, d) has none. The result is
    only conclusive when :attr:`SequenceShapes.unknown` is empty, so callers should check it.

    Args:
        model: an ``onnx.ModelProto`` or a path to one (exported with dynamic shapes).
        axis: the sequence axis of the inputs.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    symbols = sorted({dims[axis].dim_param for value in model.graph.input
                      if len(dims := value.type.tensor_type.shape.dim) > axis
                      and dims[axis].dim_param})
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b") if symbols else None
    quadratic, unknown, checked = [], [], 0
    for value in [*model.graph.value_info, *model.graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            unknown.append(value.name)
            continue
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param
                for d in tensor_type.shape.dim]
        if any(d == "" for d in dims):
            unknown.append(value.name)
            continue
        checked += 1
        growing = [d for d in dims if isinstance(d, str) and pattern and pattern.search(d)]
        if len(growing) >= 2:
            quadratic.append((value.name, tuple(dims)))
    return SequenceShapes(tuple(symbols), tuple(quadratic), tuple(unknown), checked)


# -- ONNX Runtime ---------------------------------------------------------------------------------


class OnnxOutputs(dict):
    """Outputs rebuilt without their original class: a dict that also answers attributes and
    integer positions, like a Hugging Face ``ModelOutput`` does."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


def _resolve_providers(providers: Any) -> list[Any]:
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, (str, tuple)):
        providers = [providers]
    available = ort.get_available_providers()
    resolved: list[Any] = []
    for entry in providers:
        name, options = (entry if isinstance(entry, tuple) else (entry, None))
        name = _PROVIDER_ALIASES.get(str(name).lower(), name)
        if name not in available:
            hint = (" (install onnxruntime-gpu built for your CUDA version, and use a machine with "
                    "an NVIDIA GPU)" if name == "CUDAExecutionProvider" else "")
            raise BackendUnavailableError(
                f"ONNX Runtime execution provider {name!r} is not available here{hint}; "
                f"available: {', '.join(available)}")
        resolved.append((name, options) if options else name)
    names = [p[0] if isinstance(p, tuple) else p for p in resolved]
    if "CPUExecutionProvider" not in names:
        # Operators an accelerator provider does not implement fall back to the CPU.
        resolved.append("CPUExecutionProvider")
    return resolved


class OnnxSession:
    """An ONNX Runtime session called like the exported model: torch tensors in and out.

    Inputs are flattened as at export (keyword arguments by name, in any order); arguments that
    were not tensors at export (``use_cache=False``...) were fixed there and must be passed with
    the same value. The output has the model's structure: its own class (e.g. a Hugging Face
    ``ModelOutput``) when it can be imported here, else an :class:`OnnxOutputs` dict with attribute
    access; tuples, lists and dicts as such. Outputs live on the device of the first input tensor.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        signature: the :class:`IOSignature` stored at export, or ``None`` for an ONNX file not
            written by :func:`export_onnx` (then inputs are taken positionally or by ONNX input
            name and the outputs returned as a tuple).
        providers: the execution providers in use.
    """

    def __init__(self, path: str | Path, providers: Any = None, *,
                 session_options: Any = None) -> None:
        import onnxruntime as ort

        requested = _resolve_providers(providers)
        self.path = Path(path)
        self.session = ort.InferenceSession(str(self.path), sess_options=session_options,
                                            providers=requested)
        self.providers = self.session.get_providers()
        for entry in requested:
            name = entry[0] if isinstance(entry, tuple) else entry
            if name not in self.providers:
                # ORT falls back to the CPU quietly when a provider's libraries fail to load.
                raise BackendUnavailableError(
                    f"ONNX Runtime could not start execution provider {name!r} (it fell back to "
                    f"{', '.join(self.providers)}); check its CUDA/cuDNN libraries")
        meta = self.session.get_modelmeta().custom_metadata_map
        self.signature = IOSignature.from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None
        self._onnx_inputs = [i.name for i in self.session.get_inputs()]
        self._onnx_outputs = [o.name for o in self.session.get_outputs()]

    def __repr__(self) -> str:
        return f"OnnxSession({str(self.path)!r}, providers={self.providers})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        feeds, device = self._feeds(args, kwargs)
        arrays = self.session.run(self._onnx_outputs, feeds)
        tensors = {name: torch.from_numpy(a).to(device) for name, a in
                   zip(self._onnx_outputs, arrays, strict=True)}
        if self.signature is None:
            return tuple(tensors.values())
        return _rebuild(self.signature.output, tensors)

    def _feeds(self, args: tuple[Any, ...], kwargs: dict[str, Any]
               ) -> tuple[dict[str, Any], torch.device]:
        if self.signature is None:
            named = dict(zip(self._onnx_inputs, args, strict=False))
            named.update(kwargs)
            tensors = [x for x in named.values() if isinstance(x, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")
            return {k: _numpy(v) for k, v in named.items() if k in self._onnx_inputs}, device
        signature = self.signature
        leaves, structure = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
        if repr(structure) != signature.input_structure or len(leaves) != len(signature.inputs):
            raise InputMismatchError(
                f"this ONNX model was exported for inputs {signature.describe_inputs()} "
                f"(structure {signature.input_structure}); it was called with structure "
                f"{structure!r}. Pass the same positional and keyword arguments as at export.")
        feeds: dict[str, Any] = {}
        device = None
        for leaf, value in zip(signature.inputs, leaves, strict=True):
            if "input" not in leaf:
                if isinstance(value, torch.Tensor) or not _same_constant(leaf, value):
                    raise InputMismatchError(
                        f"argument {leaf.get('name', '?')!r} is {value!r}, but the export fixed it "
                        f"to {_show_constant(leaf)}: non-tensor arguments are constants of an ONNX "
                        "model; pass the exported value, or export again with the value you need.")
                continue
            name = leaf["input"]
            if not isinstance(value, torch.Tensor):
                raise InputMismatchError(
                    f"input {name!r} must be a tensor (rank {leaf['rank']}, {leaf['dtype']}), got "
                    f"{type(value).__name__}")
            dtype = str(value.dtype).removeprefix("torch.")
            if dtype != leaf["dtype"] or value.dim() != leaf["rank"]:
                raise InputMismatchError(
                    f"input {name!r} was exported as rank {leaf['rank']} {leaf['dtype']}, got rank "
                    f"{value.dim()} {dtype}; convert it (e.g. .to(torch.{leaf['dtype']})).")
            device = device or value.device
            if name in self._onnx_inputs:  # an input the graph does not read was dropped
                feeds[name] = _numpy(value)
        return feeds, device or torch.device("cpu")


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _rebuild(desc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Any:
    if "output" in desc:
        return tensors[desc["output"]]
    if "constant" in desc:
        return desc["constant"]
    if "constant_repr" in desc:
        return desc["constant_repr"]
    items = [_rebuild(d, tensors) for d in desc["items"]]
    kind = desc["kind"]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    if kind == "dict":
        return dict(zip(desc["keys"], items, strict=True))
    keys = desc.get("keys")
    cls = _import_class(desc["class"])
    if cls is not None:
        try:
            if desc.get("namedtuple"):
                return cls(*items)
            if keys is not None:
                return cls(**dict(zip(keys, items, strict=True)))
        except Exception:  # noqa: BLE001 - a class we cannot rebuild: fall back to a plain record
            pass
    if keys is None:
        return tuple(items)
    return OnnxOutputs(zip(keys, items, strict=True))


def _import_class(qualified: str) -> type | None:
    module, _, name = qualified.rpartition(".")
    try:
        obj: Any = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, ValueError):
        return None
    return obj if isinstance(obj, type) else None


def onnx_session(path: str | Path, providers: Any = None, *,
                 session_options: Any = None) -> OnnxSession:
    """An ONNX Runtime session for a file written by :func:`export_onnx`, called like the model.

    Args:
        path: the ``.onnx`` file.
        providers: ``None`` for the CPU; ``"cuda"`` (or ``"CUDAExecutionProvider"``), a list of
            provider names, or ``(name, options)`` pairs. The CPU provider is appended as the
            fallback for operators an accelerator does not implement.
        session_options: an ``onnxruntime.SessionOptions`` (thread counts, profiling...).

    Raises:
        BackendUnavailableError: a requested provider is not installed or could not start.
    """
    return OnnxSession(path, providers, session_options=session_options)
