"""Which values of an exported ONNX graph grow quadratically with the sequence length
(:func:`sequence_shapes`): the check behind "the rewritten model has no N×N tensor"."""

from __future__ import annotations

import dataclasses
import re
from typing import Any


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
    symbols = sorted(
        {
            dims[axis].dim_param
            for value in model.graph.input
            if len(dims := value.type.tensor_type.shape.dim) > axis and dims[axis].dim_param
        }
    )
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, symbols)) + r")\b") if symbols else None
    quadratic, unknown, checked = [], [], 0
    for value in [*model.graph.value_info, *model.graph.output]:
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            unknown.append(value.name)
            continue
        dims = [
            d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim
        ]
        if any(d == "" for d in dims):
            unknown.append(value.name)
            continue
        checked += 1
        growing = [d for d in dims if isinstance(d, str) and pattern and pattern.search(d)]
        if len(growing) >= 2:
            quadratic.append((value.name, tuple(dims)))
    return SequenceShapes(tuple(symbols), tuple(quadratic), tuple(unknown), checked)
