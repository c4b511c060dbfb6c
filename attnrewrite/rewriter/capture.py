"""Capture a model as an ATen-level FX graph with ``torch.export`` (non-strict).

Batch and sequence dimensions (axes 0 and 1 of every tensor input) are exported as ``Dim.AUTO``:
dynamic where the model allows, specialised where it does not (``torch.export`` decides and we
report
which). A size-1 example axis is always specialised by ``torch.export``; the report says so.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from attnrewrite.errors import CaptureError, InputMismatchError


@dataclasses.dataclass
class Captured:
    """A captured graph module and how it was captured."""

    graph_module: fx.GraphModule
    program: torch.export.ExportedProgram | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dynamic: bool
    notes: list[str]


def _auto_dynamic(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Dim.AUTO`` on axes 0 and 1 of every tensor input, keyed as ``torch.export`` binds them."""
    auto = torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return {d: auto for d in range(min(2, x.dim()))}
        return None

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {
        name: pytree.tree_map(spec, value, is_leaf=lambda x: isinstance(x, torch.Tensor))
        for name, value in bound.items()
    }


def check_inputs(args: Any, kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args is None and not kwargs:
        raise InputMismatchError(
            "example inputs are required to capture the model: pass args=(x,) and/or kwargs={...} "
            "with tensors shaped like real inputs (batch >= 2 keeps the batch size dynamic)"
        )
    if args is None:
        args = ()
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    return args, dict(kwargs or {})


def _private_copy(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program's module with its own parameters and buffers (never the user's tensors)."""
    with warnings.catch_warnings():
        # torch's pytree specs warn about a deprecated isinstance check while being deep-copied.
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(program.module())


def capture(model: Any, args: Any = None, kwargs: Any = None, *, dynamic: bool = True) -> Captured:
    """Capture ``model`` (an ``nn.Module``, ``GraphModule`` or ``ExportedProgram``).

    The returned graph module owns copies of the parameters and buffers: editing or training it
    never touches ``model``.
    """
    if isinstance(model, torch.export.ExportedProgram):
        gm = _private_copy(model)
        a, k = (args, kwargs) if args is not None or kwargs else model.example_inputs or ((), {})
        a, k = check_inputs(a, k)
        return Captured(gm, model, a, k, dynamic=True, notes=["captured from an ExportedProgram"])
    if not isinstance(model, nn.Module):
        raise CaptureError(
            "expected an nn.Module, torch.fx.GraphModule or ExportedProgram, "
            f"got {type(model).__name__}"
        )
    args, kwargs = check_inputs(args, kwargs)
    notes: list[str] = []
    errors: list[str] = []
    program = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attempts = [True, False] if dynamic else [False]
        for dyn in attempts:
            try:
                shapes = _auto_dynamic(model, args, kwargs) if dyn else None
                program = torch.export.export(
                    model, args, kwargs, dynamic_shapes=shapes, strict=False
                )
                if not dyn and dynamic:
                    notes.append(
                        f"captured with static shapes (dynamic capture failed: {errors[-1][:160]})"
                    )
                break
            except Exception as exc:  # noqa: BLE001 - re-raised below with our message on top
                errors.append(f"{type(exc).__name__}: {exc}")
                last = exc
    if program is None:
        hint = ""
        if "not a known type" in errors[-1] and "Cache" in errors[-1]:
            hint = " (a Hugging Face model returning a cache: pass use_cache=False in kwargs)"
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}{hint}: {errors[-1][:600]}\n"
            "If the model has data-dependent Python control flow or graph breaks, rewrite it "
            "inside torch.compile instead: torch.compile(model, backend=attnrewrite.dynamo_backend("
            "'<variant>'))."
        ) from last
    gm = _private_copy(program)
    if any(
        isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == 1
        for x in pytree.tree_leaves((args, kwargs))
    ):
        notes.append(
            "the example batch size is 1, so the batch axis was specialised to 1; "
            "capture with a batch of 2 or more to keep it dynamic"
        )
    return Captured(gm, program, args, kwargs, dynamic=True, notes=notes)
