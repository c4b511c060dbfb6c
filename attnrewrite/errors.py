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
