"""The project's exception hierarchy: every message says what went wrong and what to do."""

from __future__ import annotations


class AttnRewriteError(Exception):
    """Base class of every error raised by attnrewrite."""


class CaptureError(AttnRewriteError):
    """The model could not be captured as a graph (``torch.export`` failed)."""


class UnknownVariantError(AttnRewriteError, KeyError):
    """A variant name that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class VariantOptionError(AttnRewriteError, TypeError):
    """A variant option of the wrong name, type or value."""


class InputMismatchError(AttnRewriteError, ValueError):
    """A rewritten model was called with inputs unlike the captured example."""


class MatchError(AttnRewriteError):
    """An internal inconsistency while analysing an attention site."""


class CalibrationError(AttnRewriteError):
    """Calibration cannot run as asked (nothing to train, a loss the variant cannot take, ...)."""


class CalibrationInputError(CalibrationError, ValueError):
    """Calibration inputs that are not an iterable of ``(args, kwargs)`` pairs."""


class CalibrationDivergedError(CalibrationError, FloatingPointError):
    """A calibration loss became NaN or infinite.

    Attributes:
        site: name of the site whose loss was not finite (``"end-to-end"`` for the final step).
        step: the 1-based training step at which it happened.
        result: the partial calibration table up to that point (every parameter was restored).
    """

    def __init__(self, message: str, *, site: str, step: int, result: object = None) -> None:
        super().__init__(message)
        self.site = site
        self.step = step
        self.result = result


class TargetError(AttnRewriteError, ValueError):
    """A command-line or benchmark TARGET that names no model attnrewrite can build."""


class BenchmarkError(AttnRewriteError):
    """A benchmark that cannot run as configured (inputs, lengths, backends)."""


class BackendError(AttnRewriteError):
    """A deployment backend (``torch.compile``, ONNX export, ONNX Runtime) could not do as asked."""


class UnknownBackendError(BackendError, ValueError):
    """A ``torch.compile`` backend name that is not registered."""


class BackendUnavailableError(BackendError, RuntimeError):
    """A backend or execution provider that is not installed or has no device here."""


class OnnxExportError(BackendError):
    """A model that could not be exported to standard ONNX."""


class ParityError(AttnRewriteError, AssertionError):
    """``rewrite(..., check=True)``: the canonical graph does not reproduce the original model."""


class DecodeError(AttnRewriteError):
    """A rewritten model that cannot be decoded one token at a time (the message names the site
    or node), or a decode that does not reproduce the parallel forward."""
