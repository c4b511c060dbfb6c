"""One callable per (backend, model): eager, TorchInductor or ONNX Runtime.

Every backend goes through the public API (``attnrewrite.compile``, ``attnrewrite.export_onnx``,
``attnrewrite.onnx_session``), so the benchmark measures what users deploy. A backend that cannot
be set up raises :class:`BackendUnavailable` with the reason; the benchmark reports it in the rows
instead of stopping.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import attnrewrite

#: Backend names accepted by :func:`attnrewrite.benchmark`, with their aliases.
BACKENDS: dict[str, str] = {
    "eager": "eager",
    "inductor": "inductor",
    "onnxruntime": "onnxruntime",
    "ort": "onnxruntime",
    "onnx": "onnxruntime",
}


class BackendUnavailable(Exception):
    """A backend that cannot run this model here; ``str(exc)`` says why."""


@dataclasses.dataclass
class Runner:
    """``call(args, kwargs)`` runs the model on one backend.

    Attributes:
        setup_s: one-off seconds spent before the first call (ONNX export and session creation);
            Inductor compiles lazily, inside its first call.
        notes: remarks for the report (a fallback that was taken, for instance).
    """

    call: Callable[[tuple[Any, ...], dict[str, Any]], Any]
    setup_s: float = 0.0
    notes: tuple[str, ...] = ()


def _eager(model: nn.Module) -> Runner:
    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return model(*args, **kwargs)

    return Runner(call)


def _inductor(model: nn.Module) -> Runner:
    notes: tuple[str, ...] = ()
    try:
        compiled = attnrewrite.compile(model, backend="inductor")
    except ModuleNotFoundError as exc:
        if "attnrewrite.backends" not in str(exc):
            raise BackendUnavailable(f"{type(exc).__name__}: {exc}") from exc
        # The deployment backends are optional in a partial checkout; plain torch.compile is what
        # attnrewrite.compile wraps, so the timings stay meaningful.
        compiled = torch.compile(model, backend="inductor")
        notes = ("attnrewrite.backends is not available; used torch.compile(backend='inductor')",)
    except Exception as exc:  # noqa: BLE001 - any failure makes this backend unavailable
        raise BackendUnavailable(
            f"attnrewrite.compile failed: {type(exc).__name__}: {exc}"
        ) from exc

    def call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with torch.inference_mode():
            return compiled(*args, **kwargs)

    return Runner(call, notes=notes)


def _onnxruntime(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], path: Path
) -> Runner:
    try:
        import onnxruntime  # noqa: F401 - only to fail early with a clear reason
    except ImportError as exc:
        raise BackendUnavailable("onnxruntime is not installed: pip install onnxruntime") from exc
    start = time.perf_counter()
    try:
        attnrewrite.export_onnx(model, str(path), args=args, kwargs=kwargs)
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(f"ONNX export backend missing ({exc})") from exc
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailable(f"ONNX export failed: {type(exc).__name__}: {exc}") from exc
    session = open_onnx_session(path)
    setup_s = time.perf_counter() - start

    def call(call_args: tuple[Any, ...], call_kwargs: dict[str, Any]) -> Any:
        return session(*call_args, **call_kwargs)

    return Runner(call, setup_s=setup_s)


def open_onnx_session(path: Path | str) -> Callable[..., Any]:
    """``attnrewrite.onnx_session(path)``, with failures as :class:`BackendUnavailable`."""
    try:
        return attnrewrite.onnx_session(str(path))
    except ModuleNotFoundError as exc:
        raise BackendUnavailable(f"ONNX Runtime backend missing ({exc})") from exc
    except Exception as exc:  # noqa: BLE001
        raise BackendUnavailable(
            f"ONNX Runtime session failed: {type(exc).__name__}: {exc}"
        ) from exc


def onnx_runner(path: Path | str) -> Runner:
    """A runner for an already exported ONNX file (used by the memory worker)."""
    session = open_onnx_session(path)
    return Runner(lambda args, kwargs: session(*args, **kwargs))


def prepare(
    backend: str,
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    onnx_path: Path,
) -> Runner:
    """A :class:`Runner` of ``model`` on ``backend`` (a key of :data:`BACKENDS`)."""
    backend = BACKENDS[backend]
    if backend == "eager":
        return _eager(model)
    if backend == "inductor":
        return _inductor(model)
    return _onnxruntime(model, args, kwargs, onnx_path)
