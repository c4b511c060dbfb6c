"""Deployment backends for rewritten models: TorchInductor, ONNX / ONNX Runtime, a Dynamo backend.

Each backend lives in its own module and is imported lazily by the public wrappers in
``attnrewrite/__init__.py`` (``compile``, ``export_onnx``, ``onnx_session``, ``dynamo_backend``), so
importing attnrewrite never imports Inductor, onnxscript or onnxruntime:

- :mod:`attnrewrite.backends.inductor`: ``torch.compile`` of a rewritten model's graph, full graph
  and dynamic sequence length.
- :mod:`attnrewrite.backends.onnx`: export to standard-op ONNX with dynamic batch and sequence
  axes, and an ONNX Runtime session called like the model (torch tensors in and out).
- :mod:`attnrewrite.backends.dynamo`: a ``torch.compile`` backend that rewrites attention in every
  graph Dynamo captures, for models ``torch.export`` cannot capture whole.
"""

from __future__ import annotations
