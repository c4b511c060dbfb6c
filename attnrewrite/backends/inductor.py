"""``torch.compile`` for rewritten models (TorchInductor by default).

A :class:`~attnrewrite.rewriter.rewrite.RewrittenModel` is compiled through its ``graph_module``:
the graph ``torch.export`` captured, with each rewritten site a call of its variant module. That
graph has no Python control flow left, so it compiles as one graph (``fullgraph=True`` is the
default here: a graph break would mean a variant does something Dynamo cannot trace, a bug to
surface rather than hide). Shapes are dynamic by default (``dynamic=True``), so one compiled graph
serves every batch size and sequence length the capture kept dynamic — no recompilation per length.

One PyTorch limitation is worked around: ``torch.export`` turns ``with torch.no_grad():`` regions
(Hugging Face rotary embeddings have one) into ``wrap_with_set_grad_enabled`` higher-order ops,
which Dynamo refuses to trace with dynamic shapes ("unexpected freevars", a graph break, so
``fullgraph=True`` fails). The compiled graph calls such a region through a plain ``with`` block
instead (same grad mode, same body), on a copy of the graph that shares the model's weights.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn

from attnrewrite.errors import UnknownBackendError
from attnrewrite.ops import register_inductor_decomposition
from attnrewrite.rewriter.report import Report
from attnrewrite.rewriter.rewrite import RewrittenModel


class CompiledModel(nn.Module):
    """A compiled model, called like the model it was compiled from.

    Attributes:
        compiled: the ``torch.compile`` result (an ``OptimizedModule``).
        report: the rewrite report of a compiled :class:`RewrittenModel`, else ``None``.
        backend: the ``torch.compile`` backend used (a name or a callable).
    """

    def __init__(
        self,
        compiled: nn.Module,
        report: Report | None,
        backend: Any,
        complete_kwargs: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self.compiled = compiled
        self.report = report
        self.backend = backend
        self._complete_kwargs = complete_kwargs

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any
    ) -> torch.Tensor:
        """:meth:`RewrittenModel.generate` with the prefill and step graphs compiled by this
        backend (dynamic batch, lengths and positions: no recompilation per step)."""
        return self._decoder().generate(input_ids, attention_mask, **options)

    def stream(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any
    ):
        """:meth:`RewrittenModel.stream`, compiled."""
        return self._decoder().stream(input_ids, attention_mask, **options)

    def _decoder(self):
        model = self.__dict__.get("_rewritten")
        if model is None:
            raise UnknownBackendError(
                "generate needs a compiled RewrittenModel (attnrewrite.compile(rewritten)); this "
                "CompiledModel wraps a plain module"
            )
        backend = self.backend

        def compiler(gm: fx.GraphModule) -> Any:
            return torch.compile(traceable_graph(gm), backend=backend, dynamic=True, fullgraph=True)

        return model.decoder(compiler, key=f"compile:{backend}")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._complete_kwargs is not None:
            # Keyword arguments capture fixed (use_cache=False) are inputs of the graph.
            kwargs = self._complete_kwargs(kwargs)
        return self.compiled(*args, **kwargs)


def known_backends() -> list[str]:
    """The ``torch.compile`` backend names registered here (``inductor``, ``eager``...)."""
    # exclude_tags=() also lists the debugging backends ("eager", "aot_eager"), which are the
    # cheap way to check a graph compiles at all.
    return sorted(torch._dynamo.list_backends(exclude_tags=()))


def check_backend(backend: Any) -> Any:
    """``backend`` itself when ``torch.compile`` accepts it, else :class:`UnknownBackendError`."""
    if callable(backend):
        return backend
    names = known_backends()
    if not isinstance(backend, str) or backend not in names:
        raise UnknownBackendError(
            f"unknown torch.compile backend {backend!r}; use one of {', '.join(names)} "
            '("inductor" to generate kernels, "eager" to only check that Dynamo captures '
            "the graph) "
            "or pass a backend callable"
        )
    return backend


def _run_with_grad_mode(enabled: bool, body: nn.Module, *args: Any) -> Any:
    with torch.set_grad_enabled(enabled):
        return body(*args)


def _run_with_autocast(
    device_type: str,
    dtype: torch.dtype | None,
    enabled: bool,
    cache_enabled: bool | None,
    body: nn.Module,
    *args: Any,
) -> Any:
    with torch.autocast(device_type, dtype, enabled, cache_enabled):
        return body(*args)


def traceable_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm``, or a copy whose export context regions are ``with`` blocks Dynamo can trace.

    The copy shares every parameter, buffer and submodule with ``gm``; ``gm`` is not modified.
    """
    replacements = {
        torch.ops.higher_order.wrap_with_set_grad_enabled: _run_with_grad_mode,
        torch.ops.higher_order.wrap_with_autocast: _run_with_autocast,
    }
    if not any(n.op == "call_function" and n.target in replacements for n in gm.graph.nodes):
        return gm
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # keeps the pytree calling convention
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in replacements:
            node.target = replacements[node.target]
    copied = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    copied.meta.update(gm.meta)
    return copied


def compile_rewritten(
    model: nn.Module, backend: Any = "inductor", **torch_compile_kwargs: Any
) -> CompiledModel:
    """``torch.compile`` a rewritten (or any) model.

    Args:
        model: a :class:`RewrittenModel` (its ``graph_module`` is compiled), or any ``nn.Module``
            (compiled as is: useful to compile the original for a before/after comparison).
        backend: a ``torch.compile`` backend name (``"inductor"``, ``"eager"``, ``"aot_eager"``...)
            or a backend callable.
        **torch_compile_kwargs: passed to ``torch.compile``. Defaults: ``dynamic=True`` (one graph
            for every sequence length), and for a :class:`RewrittenModel` ``fullgraph=True``.

    Returns:
        A :class:`CompiledModel` called like ``model``; compilation happens at the first call.

    Raises:
        UnknownBackendError: ``backend`` is neither a registered name nor callable.
    """
    backend = check_backend(backend)
    register_inductor_decomposition()  # canonical attention ops (if any) fuse as sdpa
    options = {"dynamic": True, **torch_compile_kwargs}
    if isinstance(model, RewrittenModel):
        options.setdefault("fullgraph", True)
        # Compile the exported graph itself, not RewrittenModel.forward: its only extra is error
        # translation (try/except), which Dynamo would have to trace around.
        compiled = torch.compile(traceable_graph(model.graph_module), backend=backend, **options)
        result = CompiledModel(compiled, model.report, backend, model.complete_kwargs)
        result.__dict__["_rewritten"] = model  # not a submodule: its parameters are not repeated
        return result
    return CompiledModel(torch.compile(model, backend=backend, **options), None, backend)
