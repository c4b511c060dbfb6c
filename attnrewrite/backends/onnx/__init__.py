"""Export to standard ONNX, and run it with ONNX Runtime called like the PyTorch model.

- :mod:`~attnrewrite.backends.onnx.signature`: the I/O signature (how ``(args, kwargs)`` map to
  ONNX inputs and ONNX outputs back to the model's output), stored as JSON in the file.
- :mod:`~attnrewrite.backends.onnx.export`: :func:`export_onnx`, standard operators only, with
  dynamic batch and sequence axes.
- :mod:`~attnrewrite.backends.onnx.shapes`: :func:`sequence_shapes`, which values of an exported
  graph grow quadratically with the sequence length.
- :mod:`~attnrewrite.backends.onnx.session`: :func:`onnx_session`, an ONNX Runtime session with
  torch tensors in and out; a loaded file never imports or constructs a class it names.
- :mod:`~attnrewrite.backends.onnx.decode`: generation: ``export_onnx(rw, dir, decode=True)``
  writes prefill and step graphs with the decode state as explicit inputs and outputs, and
  ``onnx_session(dir).generate(...)`` runs the decoding loop over them.

onnx, onnxscript and onnxruntime are imported inside the functions that use them, so importing
this package needs only torch.
"""

from __future__ import annotations

from attnrewrite.backends.onnx.decode import DecodeExport, DecodeSignature, OnnxDecodeSession
from attnrewrite.backends.onnx.export import (
    STANDARD_DOMAINS,
    OnnxExport,
    custom_domain_ops,
    export_onnx,
)
from attnrewrite.backends.onnx.session import (
    OnnxOutputs,
    OnnxSession,
    OutputClasses,
    onnx_session,
)
from attnrewrite.backends.onnx.shapes import SequenceShapes, sequence_shapes
from attnrewrite.backends.onnx.signature import (
    METADATA_KEY,
    REPORT_KEY,
    IOSignature,
    OnnxSignatureError,
)

__all__ = [
    "METADATA_KEY",
    "DecodeExport",
    "DecodeSignature",
    "OnnxDecodeSession",
    "REPORT_KEY",
    "STANDARD_DOMAINS",
    "IOSignature",
    "OnnxExport",
    "OnnxOutputs",
    "OnnxSession",
    "OnnxSignatureError",
    "OutputClasses",
    "SequenceShapes",
    "custom_domain_ops",
    "export_onnx",
    "onnx_session",
    "sequence_shapes",
]
