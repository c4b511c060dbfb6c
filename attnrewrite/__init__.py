"""attnrewrite: find softmax attention in any PyTorch model and rewrite it into efficient variants.

Public API (see DESIGN.md)::

    sites = attnrewrite.find_attention(model, args=(x,))
    prog = attnrewrite.canonicalize(model, args=(x,))   # every site one attnrewrite::attention op
    rw = attnrewrite.rewrite(model, "linear", args=(x,))
    print(rw.report)
"""

from __future__ import annotations

from attnrewrite.errors import (
    AttnRewriteError,
    CaptureError,
    InputMismatchError,
    ParityError,
    UnknownVariantError,
    VariantOptionError,
)
from attnrewrite.rewriter.report import Rejected, Report, SiteRow, Status
from attnrewrite.rewriter.rewrite import RewrittenModel, canonicalize, find_attention, rewrite
from attnrewrite.site import AttentionSite, MaskClass
from attnrewrite.variants import register_variant, variants
from attnrewrite.variants.base import AttentionVariant

__version__ = "0.1.0"

__all__ = [
    "AttentionSite",
    "AttentionVariant",
    "AttnRewriteError",
    "CaptureError",
    "InputMismatchError",
    "MaskClass",
    "ParityError",
    "Rejected",
    "Report",
    "RewrittenModel",
    "SiteRow",
    "Status",
    "UnknownVariantError",
    "VariantOptionError",
    "canonicalize",
    "find_attention",
    "register_variant",
    "rewrite",
    "variants",
]


# -- deployment, measurement and calibration (implemented in their own rooms, imported lazily) -----


def compile(model, backend: str = "inductor", **torch_compile_kwargs):  # noqa: A001
    """``torch.compile`` a rewritten model (see ``attnrewrite.backends.inductor``)."""
    from attnrewrite.backends.inductor import compile_rewritten

    return compile_rewritten(model, backend=backend, **torch_compile_kwargs)


def export_onnx(model, path, args=None, kwargs=None, *, opset=None, **options):
    """Export a (rewritten or original) model to ONNX (see ``attnrewrite.backends.onnx``).

    With ``decode=True``, ``path`` is a directory: a rewritten causal decoder's prefill and step
    graphs (``prefill.onnx``, ``step.onnx``, ``decode.json``) for ``onnx_session(path).generate``.
    """
    from attnrewrite.backends.onnx import export_onnx as _export

    return _export(model, path, args=args, kwargs=kwargs, opset=opset, **options)


def onnx_session(path, providers=None, **options):
    """An ONNX Runtime session callable like the exported model (see
    ``attnrewrite.backends.onnx``). Outputs come back as containers; pass
    ``output_classes=[...]`` to rebuild your own classes (nothing named in the file is imported).
    On a directory from ``export_onnx(..., decode=True)``: a session with ``generate`` and
    ``stream`` running the decoding loop in ONNX Runtime."""
    from attnrewrite.backends.onnx import onnx_session as _session

    return _session(path, providers=providers, **options)


def dynamo_backend(variant: str = "softmax", **options):
    """A ``torch.compile`` backend that rewrites attention in each captured graph."""
    from attnrewrite.backends.dynamo import dynamo_backend as _backend

    return _backend(variant, **options)


def benchmark(model, variants, args=None, kwargs=None, **options):
    """Before/after latency, memory, accuracy and FLOPs (see ``attnrewrite.bench``)."""
    from attnrewrite.bench.benchmark import benchmark as _benchmark

    return _benchmark(model, variants, args=args, kwargs=kwargs, **options)


def calibrate(model, inputs, **options):
    """Train the rewritten sites' own parameters to imitate softmax (see
    ``attnrewrite.calibrate``)."""
    from attnrewrite.calibrate.calibrate import calibrate as _calibrate

    return _calibrate(model, inputs, **options)


__all__ += ["benchmark", "calibrate", "compile", "dynamo_backend", "export_onnx", "onnx_session"]
