"""Small, named helpers for reading an ATen-level FX graph.

Every pass reads nodes through these helpers instead of poking at ``node.args`` by position, so a
change of overload (``softmax.int`` vs ``_softmax.default``) or of positional vs keyword arguments
does not change the analysis.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
from torch import fx, nn

from attnrewrite.passes.vocab import SCALAR_COPIES

_NO_DEFAULT = object()


def op_name(node: fx.Node) -> str:
    """The ATen packet name of a call (``"softmax"`` for ``aten.softmax.int``), else ``""``.

    In-place variants read as their functional op (``div_`` -> ``div``): the training IR that
    ``torch.export`` produces keeps the in-place ops models write (Falcon scales scores with
    ``div_``), and for dataflow the value they produce is the functional result.
    """
    if node.op != "call_function":
        return ""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        name = target.overloadpacket.__name__
        return name[:-1] if is_inplace(node) else name
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target.__name__
    if target is operator.getitem:
        return "getitem"
    return getattr(target, "__name__", "")


def is_inplace(node: fx.Node) -> bool:
    """An ATen in-place op (``add_``), which writes its first argument."""
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = target.overloadpacket.__name__
    return (
        name.endswith("_")
        and not name.startswith("__")
        and bool(target._schema.arguments)
        and target._schema.arguments[0].alias_info is not None
        and target._schema.arguments[0].alias_info.is_write
    )


def overload_name(node: fx.Node) -> str:
    target = node.target
    return target._overloadname if isinstance(target, torch._ops.OpOverload) else ""


def arg(node: fx.Node, name: str, default: Any = _NO_DEFAULT) -> Any:
    """Argument ``name`` of an ATen call, by its schema name, whether passed by position or
    keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        for i, a in enumerate(target._schema.arguments):
            if a.name == name:
                if i < len(node.args):
                    return node.args[i]
                if a.has_default_value():
                    return a.default_value
                break
    if default is _NO_DEFAULT:
        raise KeyError(f"{node.format_node()} has no argument {name!r}")
    return default


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def is_tensor(node: Any) -> bool:
    return isinstance(val(node), torch.Tensor)


def shape(node: Any) -> tuple[Any, ...] | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def rank(node: Any) -> int:
    s = shape(node)
    return -1 if s is None else len(s)


def dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """Whether two (possibly symbolic) sizes are provably equal."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - symbolic reasoning is best effort; unequal if unsure
        return False


def is_one(size: Any) -> bool:
    return same_size(size, 1)


def as_int(size: Any) -> int | None:
    """A size as a Python int when it is static (or provably constant), else ``None``."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        expr = size.node.expr
        if getattr(expr, "is_number", False):
            return int(expr)
    return None


def size_hint(size: Any) -> int:
    """The example value of a (possibly symbolic) size, for ordering decisions only."""
    if isinstance(size, int):
        return size
    if isinstance(size, torch.SymInt):
        hint = getattr(size.node, "hint", None)
        if hint is not None:
            return int(hint)
        fixed = as_int(size)
        if fixed is not None:
            return fixed
    return 0


def size_text(size: Any) -> Any:
    """A size for the report: an int, or the symbolic expression with its example value."""
    if isinstance(size, int):
        return size
    hint = size_hint(size)
    return f"{size}={hint}" if hint else str(size)


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def scalar_value(x: Any, gm: fx.GraphModule | None = None) -> float | None:
    """The value of a Python number or a one-element constant tensor (buffer/lifted constant).

    Parameters are not constants (they may be trained later), so they return ``None``.
    """
    if isinstance(x, bool):
        return float(x)
    if isinstance(x, (int, float)):
        return float(x)
    if not isinstance(x, fx.Node):
        return None
    if x.op == "get_attr" and gm is not None:
        obj = fetch_attr(gm, str(x.target))
        if isinstance(obj, torch.nn.Parameter):
            return None
        if isinstance(obj, torch.Tensor) and obj.numel() == 1:
            return float(obj.reshape(()).item())
        return None
    name = op_name(x)
    if name in ("full", "scalar_tensor") and rank(x) == 0 or name == "lift_fresh_copy":
        inner = arg(
            x, "fill_value" if name == "full" else "s" if name == "scalar_tensor" else "self"
        )
        return scalar_value(inner, gm)
    if name in ("sqrt", "reciprocal", "neg") and rank(x) in (0,):
        inner = scalar_value(x.args[0], gm)
        if inner is None:
            return None
        return {"sqrt": math.sqrt, "reciprocal": lambda v: 1.0 / v, "neg": lambda v: -v}[name](
            inner
        )
    if name in SCALAR_COPIES and rank(x) == 0:
        return scalar_value(x.args[0], gm)
    return None


def fetch_attr(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def set_attr(holder: nn.Module, name: str, obj: Any) -> None:
    """Put ``obj`` on ``holder`` as what it is: a submodule, a parameter, a buffer or a plain
    attribute (``name`` has no dots)."""
    if isinstance(obj, nn.Module):
        holder.add_module(name, obj)
    elif isinstance(obj, nn.Parameter):
        holder.register_parameter(name, obj)
    elif isinstance(obj, torch.Tensor):
        holder.register_buffer(name, obj)
    else:
        setattr(holder, name, obj)


def module_path(node: fx.Node) -> str:
    """The innermost module path of a node, from ``nn_module_stack`` (``""`` at the top level)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # torch.export spells paths as attribute accesses; keep the dotted module path.
    return path.replace("L['self'].", "").replace("L__self___", "")
