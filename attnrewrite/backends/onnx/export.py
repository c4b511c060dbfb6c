"""Export to standard ONNX (:func:`export_onnx`).

Export goes through ``torch.export`` (non-strict) and the dynamo-based ``torch.onnx.export`` of
PyTorch 2.13, for a :class:`~attnrewrite.rewriter.rewrite.RewrittenModel` and for the original
``nn.Module`` alike, so a before/after comparison runs the same route:

- The model is called through a flat wrapper whose inputs are the tensors of the flattened
  ``(args, kwargs)`` pytree, in order, and whose outputs are the tensors of the flattened output.
  Every other leaf (``use_cache=False``, an ``int`` option...) is a constant of the export.
  How to flatten and rebuild both sides is stored in the ONNX model's ``metadata_props`` under
  :data:`~attnrewrite.backends.onnx.signature.METADATA_KEY` (JSON, see
  :mod:`attnrewrite.backends.onnx.signature`), so a session needs nothing but the ``.onnx`` file.
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
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from attnrewrite.backends.onnx.signature import (
    METADATA_KEY,
    REPORT_KEY,
    IOSignature,
    _constant,
    _describe_output,
    _identifier,
    _input_leaves,
    _key_name,
)
from attnrewrite.errors import OnnxExportError
from attnrewrite.ops import DECOMPOSITIONS
from attnrewrite.rewriter.capture import check_inputs
from attnrewrite.rewriter.rewrite import RewrittenModel

if TYPE_CHECKING:
    from attnrewrite.backends.onnx.decode import DecodeExport

#: ONNX domains of the standard operator set.
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})
# Protobuf cannot serialise a model over 2 GB; weights go to external data before that.
_INLINE_LIMIT_BYTES = 1_800_000_000


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


class _CompletedKwargs(nn.Module):
    """The rewritten graph, called without the keyword arguments capture fixed (``use_cache``):
    they are filled in, so the ONNX model takes exactly the inputs the user passes."""

    def __init__(self, model: RewrittenModel) -> None:
        super().__init__()
        self.graph_module = model.graph_module
        self._complete = model.complete_kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **self._complete(kwargs))


def _export_target(model: Any) -> nn.Module:
    if isinstance(model, RewrittenModel):
        # The exported graph itself: RewrittenModel.forward only adds error translation.
        if model.fixed_kwargs:
            return _CompletedKwargs(model)
        return model.graph_module
    if isinstance(model, torch.export.ExportedProgram):
        return model.module()
    if isinstance(model, nn.Module):
        return model
    raise OnnxExportError(
        f"export_onnx expects an nn.Module, a RewrittenModel or an ExportedProgram, got "
        f"{type(model).__name__}"
    )


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
    specs = tuple(
        {d: auto for d in range(min(2, x.dim()))} or None
        for x in leaves
        if isinstance(x, torch.Tensor)
    )
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
    found = {
        f"{n.domain}::{n.op_type}" for n in _nodes(model.graph) if n.domain not in STANDARD_DOMAINS
    }
    for function in model.functions:
        found |= {
            f"{n.domain}::{n.op_type}" for n in function.node if n.domain not in STANDARD_DOMAINS
        }
    return sorted(found)


def export_onnx(
    model: Any,
    path: str | Path,
    args: Any = None,
    kwargs: Any = None,
    opset: int | None = None,
    *,
    optimize_original: bool = False,
    dynamic: bool = True,
    decode: bool = False,
) -> OnnxExport | DecodeExport:
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
        decode: export a rewritten causal decoder for generation instead: ``path`` is a
            directory that receives ``prefill.onnx``, ``step.onnx`` (the decode state as explicit
            inputs and outputs) and ``decode.json``; run it with
            ``onnx_session(path).generate(...)`` (see :mod:`attnrewrite.backends.onnx.decode`).

    Returns:
        An :class:`OnnxExport` record (path, input and output names, dynamic axes, fusions), or
        with ``decode`` a :class:`~attnrewrite.backends.onnx.decode.DecodeExport`.

    Raises:
        OnnxExportError: ``torch.export`` or the ONNX translation failed, or an operator outside
            the standard domains was produced; with ``decode``, the model cannot decode
            (its :class:`~attnrewrite.errors.DecodeError` is raised as is).
    """
    if decode:
        from attnrewrite.backends.onnx.decode import export_decode

        if args is not None or kwargs is not None or optimize_original or not dynamic:
            raise OnnxExportError(
                "decode=True exports the prefill and step graphs from the rewritten model's "
                "captured example, with dynamic batch and length; leave out args, kwargs, "
                "optimize_original and dynamic"
            )
        return export_decode(model, path, opset=opset)
    args, kwargs = _default_inputs(model, args, kwargs)
    if isinstance(model, RewrittenModel):
        # Keyword arguments capture fixed (use_cache=False) are filled in by the target, not
        # inputs of the ONNX model.
        kwargs = {k: v for k, v in kwargs.items() if k not in model.fixed_kwargs}
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
            out_records.append(
                {"output": _identifier([_key_name(k) for k in p] or ["output"], taken)}
            )
        else:
            out_records.append(_constant(leaf))
    output_names = [r["output"] for r in out_records if "output" in r]
    if not output_names:
        raise OnnxExportError("the model returns no tensor; there is nothing to export to ONNX")
    signature = IOSignature(
        structure_repr, tuple(records), _describe_output(out_spec, iter(out_records))
    )

    what = type(target).__name__
    program = capture_program(
        flat,
        tensors,
        _dynamic_shapes(leaves, dynamic),
        what,
        hint="Export with dynamic=False, or check that the model runs under "
        "torch.export.export(model, args, kwargs, strict=False).",
    )
    onnx_program = translate_program(
        program, tensors, signature.input_names, output_names, opset, what
    )
    fusions = None
    if optimize_original:
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        _, fusions = optimize_for_ort(onnx_program.model)
        fusions = {k: int(v) for k, v in fusions.items() if v}
    onnx_program.model.metadata_props[METADATA_KEY] = signature.to_json()
    if isinstance(model, RewrittenModel):
        onnx_program.model.metadata_props[REPORT_KEY] = str(model.report)
    # With optimize_original the checker has no schema for ONNX Runtime's contrib operators (some,
    # like SimplifiedLayerNormalization, even sit in the default domain); ORT itself checks them.
    proto, external = save_checked(
        onnx_program, program, Path(path), what, standard=not optimize_original
    )
    return _export_record(Path(path), proto, output_names, fusions, external)


def capture_program(
    flat: nn.Module,
    tensors: tuple[torch.Tensor, ...],
    dynamic_shapes: Any,
    what: str,
    hint: str,
) -> torch.export.ExportedProgram:
    """``torch.export`` (non-strict) of a module taking and returning flat tensors, with the
    ``attnrewrite`` ops decomposed to ``aten`` (:data:`attnrewrite.ops.DECOMPOSITIONS`).

    Raises:
        OnnxExportError: ``torch.export`` failed; the message ends with ``hint``.
    """
    try:
        program = torch.export.export(flat, tensors, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as exc:
        raise OnnxExportError(
            f"torch.export could not capture {what} for ONNX: "
            f"{type(exc).__name__}: {str(exc)[:800]}\n{hint}"
        ) from exc
    if any(n.op == "call_function" and n.target in DECOMPOSITIONS for n in program.graph.nodes):
        # attnrewrite's own ops become aten ops ONNX translates: the canonical attention op
        # becomes sdpa, the chunk-state prefix sum of causal kernel attention a cumsum.
        program = program.run_decompositions(DECOMPOSITIONS)
    return program


def translate_program(
    program: torch.export.ExportedProgram,
    tensors: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int | None,
    what: str,
) -> Any:
    """The dynamo-based ``torch.onnx.export`` of ``program`` (quietly), made runnable by ONNX
    Runtime and single-assignment clean; returns the ``torch.onnx.ONNXProgram``.

    Raises:
        OnnxExportError: the exporter has no translation for an operator.
    """
    try:
        with _quiet_exporter():
            onnx_program = torch.onnx.export(
                program,
                tensors,
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except Exception as exc:
        raise OnnxExportError(
            f"the ONNX exporter could not translate {what}: "
            f"{type(exc).__name__}: {str(exc)[:800]}\nThe message names the operator it has no "
            "ONNX translation for; pass a different opset= or report it."
        ) from exc
    _make_runtime_compatible(onnx_program.model)
    _rename_shadowed_values(onnx_program.model)
    return onnx_program


def save_checked(
    onnx_program: Any,
    program: torch.export.ExportedProgram,
    path: Path,
    what: str,
    *,
    standard: bool = True,
) -> tuple[Any, bool]:
    """Save ``onnx_program`` at ``path`` (weights as external data past 2 GB) and, when
    ``standard``, check it holds standard operators only and passes ``onnx.checker``.

    Returns:
        The saved ``onnx.ModelProto`` (without external data) and whether data is external.

    Raises:
        OnnxExportError: a non-standard operator, or the checker refused the model.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.numel() * t.element_size() for t in program.state_dict.values())
    size += sum(
        t.numel() * t.element_size()
        for t in program.constants.values()
        if isinstance(t, torch.Tensor)
    )
    external = size > _INLINE_LIMIT_BYTES
    onnx_program.save(str(path), external_data=external)
    proto = onnx.load(str(path), load_external_data=False)
    if standard:
        custom = custom_domain_ops(proto)
        if custom:
            raise OnnxExportError(
                f"the export of {what} contains non-standard operators: "
                f"{', '.join(custom)}; only standard ONNX (domain '' / ai.onnx) is produced "
                "without optimize_original. Report the variant whose operator this is."
            )
        try:
            onnx.checker.check_model(str(path))
        except onnx.checker.ValidationError as exc:
            raise OnnxExportError(
                f"the exported model at {path} fails onnx.checker: {exc}"
            ) from exc
    return proto, external


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


def _export_record(
    path: Path, proto: Any, output_names: list[str], fusions: dict[str, int] | None, external: bool
) -> OnnxExport:
    notes = []
    dynamic_axes: dict[str, tuple[int, ...]] = {}
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        dynamic_axes[value.name] = tuple(
            i for i, d in enumerate(dims) if not d.HasField("dim_value")
        )
        fixed = [i for i, d in enumerate(dims[:2]) if d.HasField("dim_value")]
        if fixed:
            notes.append(
                f"input {value.name!r}: axes {fixed} are fixed (the model or a size-1 "
                "example fixes them)"
            )
    if external:
        notes.append("weights are stored as external data next to the .onnx file (over 2 GB)")
    opset = next((o.version for o in proto.opset_import if o.domain in STANDARD_DOMAINS), 0)
    return OnnxExport(
        path,
        tuple(i.name for i in proto.graph.input),
        tuple(output_names),
        dynamic_axes,
        opset,
        fusions,
        tuple(notes),
    )
