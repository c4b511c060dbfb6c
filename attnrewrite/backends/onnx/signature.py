"""The I/O signature of an exported model: how ``(args, kwargs)`` map to ONNX inputs and how the
ONNX outputs are put back into the model's output structure.

:func:`~attnrewrite.backends.onnx.export.export_onnx` writes it as JSON into the ONNX model's
``metadata_props`` under :data:`METADATA_KEY`, so a session needs nothing but the ``.onnx`` file.
The JSON is read back from a file, which is data: :meth:`IOSignature.from_json` checks its shape
and refuses anything else, and an output class named in it is only ever a *name*, matched against
classes the caller passes (see :mod:`attnrewrite.backends.onnx.session`), never imported.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from attnrewrite.errors import BackendError

#: The ``metadata_props`` key holding how to flatten inputs and rebuild outputs (JSON).
METADATA_KEY = "attnrewrite.io"
#: The ``metadata_props`` key holding the rewrite report of an exported ``RewrittenModel``.
REPORT_KEY = "attnrewrite.report"
#: The version of the JSON written under :data:`METADATA_KEY`.
SIGNATURE_FORMAT = 1
_SCALARS = (type(None), bool, int, float, str)
# Real outputs nest a few levels (past_key_values: a tuple of per-layer tuples); a deeper
# description is not one we wrote, and reading it would only exhaust the interpreter's stack.
_MAX_DEPTH = 64


class OnnxSignatureError(BackendError, ValueError):
    """The attnrewrite metadata of an ONNX file is malformed, or its outputs cannot be rebuilt as
    the caller asked."""


# -- writing ---------------------------------------------------------------------------------------


def _constant(value: Any) -> dict[str, Any]:
    """A non-tensor leaf as JSON: the value itself when JSON has it, else its ``repr``."""
    if isinstance(value, _SCALARS):
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


def _input_leaves(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
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
        records.append(
            {"input": name, "dtype": str(leaf.dtype).removeprefix("torch."), "rank": leaf.dim()}
        )
    return [leaf for _, leaf in with_paths], repr(spec), records


def qualified_name(cls: type) -> str:
    """The name an output class is stored under: ``module.QualName``."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _describe_output(spec: pytree.TreeSpec, leaves: Iterator[dict[str, Any]]) -> dict[str, Any]:
    """A JSON description of an output pytree; tensor leaves refer to ONNX outputs by name."""
    if spec.is_leaf():
        return next(leaves)
    items = [_describe_output(child, leaves) for child in spec.children()]
    kind = spec.type
    if kind in (tuple, list):
        return {"kind": kind.__name__, "items": items}
    if kind is dict or (
        isinstance(kind, type)
        and issubclass(kind, dict)
        and not hasattr(kind, "__dataclass_fields__")
    ):
        return {"kind": "dict", "keys": list(spec.context), "items": items}
    context = spec.context
    if isinstance(context, type):  # namedtuple: the context is the class
        kind, context = context, list(getattr(context, "_fields", ()))
    keys = (
        list(context)
        if isinstance(context, (list, tuple)) and all(isinstance(k, str) for k in context)
        else None
    )
    return {
        "kind": "object",
        "class": qualified_name(kind),
        "keys": keys,
        "namedtuple": hasattr(kind, "_fields"),
        "items": items,
    }


# -- reading ---------------------------------------------------------------------------------------


def _check_output(desc: Any, where: str, depth: int = 0) -> None:
    """Raise :class:`OnnxSignatureError` unless ``desc`` is an output description as written by
    :func:`_describe_output` (nested dicts of known kinds; strings, lists and scalars only)."""

    def bad(why: str) -> OnnxSignatureError:
        return OnnxSignatureError(f"output description at {where}: {why}")

    if not isinstance(desc, dict):
        raise bad(f"expected an object, got {type(desc).__name__}")
    if depth > _MAX_DEPTH:
        raise bad(f"nested more than {_MAX_DEPTH} levels deep")
    if "output" in desc:
        if not isinstance(desc["output"], str):
            raise bad("'output' must be an ONNX output name")
        return
    if "constant" in desc:
        if not isinstance(desc["constant"], _SCALARS):
            raise bad("'constant' must be null, a boolean, a number or a string")
        return
    if "constant_repr" in desc:
        if not isinstance(desc["constant_repr"], str):
            raise bad("'constant_repr' must be a string")
        return
    kind, items = desc.get("kind"), desc.get("items")
    if kind not in ("tuple", "list", "dict", "object"):
        raise bad(f"unknown kind {kind!r} (expected tuple, list, dict or object)")
    if not isinstance(items, list):
        raise bad("'items' must be a list")
    keys = desc.get("keys")
    if kind == "dict" and not isinstance(keys, list):
        raise bad("a dict needs a list of 'keys'")
    if kind == "object":
        if not isinstance(desc.get("class"), str):
            raise bad("an object needs its class name as a string")
        if keys is not None and not (
            isinstance(keys, list) and all(isinstance(k, str) for k in keys)
        ):
            raise bad("'keys' of an object must be a list of strings or null")
        if not isinstance(desc.get("namedtuple", False), bool):
            raise bad("'namedtuple' must be a boolean")
    if keys is not None and len(keys) != len(items):
        raise bad(f"{len(keys)} keys for {len(items)} items")
    for i, item in enumerate(items):
        _check_output(item, f"{where}[{i}]", depth + 1)


def _check_input(leaf: Any, i: int) -> None:
    if not isinstance(leaf, dict):
        raise OnnxSignatureError(f"input {i}: expected an object, got {type(leaf).__name__}")
    if "input" in leaf:
        ok = (
            isinstance(leaf["input"], str)
            and isinstance(leaf.get("dtype"), str)
            and type(leaf.get("rank")) is int
        )
        if not ok:
            raise OnnxSignatureError(f"input {i}: a tensor needs 'input', 'dtype' and 'rank'")
    elif "constant" in leaf:
        if not isinstance(leaf["constant"], _SCALARS):
            raise OnnxSignatureError(f"input {i}: 'constant' must be a JSON scalar")
    elif not isinstance(leaf.get("constant_repr"), str):
        raise OnnxSignatureError(f"input {i}: neither a tensor nor a constant")


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
        return json.dumps(
            {
                "format": SIGNATURE_FORMAT,
                "input_structure": self.input_structure,
                "inputs": list(self.inputs),
                "output": self.output,
            }
        )

    @classmethod
    def from_json(cls, text: str) -> IOSignature:
        """Parse and check the JSON written by :meth:`to_json`.

        Raises:
            OnnxSignatureError: the text is not such JSON (malformed, another format version, an
                unknown output kind...).
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise OnnxSignatureError(f"not valid JSON: {str(exc)[:200]}") from None
        if not isinstance(data, dict):
            raise OnnxSignatureError(f"expected a JSON object, got {type(data).__name__}")
        if data.get("format") != SIGNATURE_FORMAT:
            raise OnnxSignatureError(
                f"format {data.get('format')!r} is not {SIGNATURE_FORMAT}, the one this version "
                "of attnrewrite reads; export the model again with it"
            )
        structure, inputs, output = (data.get(k) for k in ("input_structure", "inputs", "output"))
        if not isinstance(structure, str) or not isinstance(inputs, list):
            raise OnnxSignatureError("'input_structure' must be a string and 'inputs' a list")
        for i, leaf in enumerate(inputs):
            _check_input(leaf, i)
        _check_output(output, "output")
        return cls(structure, tuple(inputs), output)

    @property
    def input_names(self) -> list[str]:
        return [leaf["input"] for leaf in self.inputs if "input" in leaf]

    @property
    def output_names(self) -> list[str]:
        """The ONNX outputs the output description refers to."""
        return [d["output"] for d in _walk(self.output) if "output" in d]

    @property
    def class_names(self) -> tuple[str, ...]:
        """Qualified names of the output classes recorded at export (sorted, unique): the names
        ``output_classes`` of :func:`~attnrewrite.backends.onnx.session.onnx_session` matches."""
        return tuple(sorted({d["class"] for d in _walk(self.output) if d.get("kind") == "object"}))

    def describe_inputs(self) -> str:
        def one(leaf: dict[str, Any]) -> str:
            if "input" in leaf:
                return f"{leaf['input']}=Tensor(rank {leaf['rank']}, {leaf['dtype']})"
            return f"{leaf.get('name', '?')}={_show_constant(leaf)}"

        return ", ".join(one(leaf) for leaf in self.inputs)


def _walk(desc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield desc
    for item in desc.get("items", ()):
        yield from _walk(item)
