"""A ``torch.compile`` backend that rewrites attention in every graph Dynamo captures.

For models ``torch.export`` cannot capture whole (data-dependent Python branches, graph breaks):
Dynamo splits them into graphs at each break, and this backend rewrites each graph on its own::

    backend = attnrewrite.dynamo_backend("linear")
    compiled = torch.compile(model, backend=backend)
    compiled(x)                      # compiles (and rewrites) at the first call
    print(backend.report)            # every site of every graph so far

Per graph: the Dynamo graph is captured again with ``torch.export`` (non-strict) on the concrete
example inputs, keeping dynamic exactly the dimensions and integer inputs that Dynamo made
dynamic, so a graph compiled for "any length" stays valid for any length; the export goes to
``attnrewrite.rewrite``; the rewritten graph goes to Inductor (``compile_fx``). A graph that
cannot be exported or rewritten runs unchanged (still through Inductor), and the reason is kept in
:attr:`RewritingBackend.fallbacks`. A graph without a rewritten site is compiled as Dynamo gave it.

Site names come from Dynamo's module paths, e.g. ``L['self'].encoder.layer.0.attention``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from attnrewrite.errors import BackendError, VariantOptionError
from attnrewrite.rewriter.report import Report
from attnrewrite.variants import get_variant

_COMPILERS = ("inductor", "eager")


@dataclasses.dataclass(frozen=True)
class GraphFallback:
    """A Dynamo graph that was compiled without rewriting, and why."""

    graph_index: int
    reason: str


def _hint(value: Any) -> Any:
    """The concrete value behind a ``SymInt`` example input, without adding a guard."""
    if isinstance(value, torch.SymInt):
        # int() would guard on (specialise) the size in the enclosing Dynamo frame.
        return value.node.hint
    return value


def _dynamic_shapes(gm: fx.GraphModule, example_inputs: list[Any]) -> tuple[list[Any], list[Any]]:
    """Concrete example arguments and export ``dynamic_shapes`` mirroring Dynamo's choices."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    dynamic = torch.export.Dim.DYNAMIC
    args, shapes = [], []
    for node, value in zip(placeholders, example_inputs, strict=True):
        seen = node.meta.get("example_value", value)
        args.append(_hint(value))
        if isinstance(value, torch.SymInt) or isinstance(seen, torch.SymInt):
            shapes.append(dynamic)
        elif isinstance(seen, torch.Tensor):
            # Dynamo made exactly these axes symbolic; parameters and buffers keep static sizes.
            spec = {
                d: dynamic for d, size in enumerate(seen.shape) if isinstance(size, torch.SymInt)
            }
            shapes.append(spec or None)
        else:
            shapes.append(None)
    return args, shapes


def _export(gm: fx.GraphModule, args: list[Any], shapes: list[Any]) -> torch.export.ExportedProgram:
    parameters = list(inspect.signature(gm.forward).parameters.values())
    # Dynamo's lazily recompiled graph modules expose forward(*args); others name each input.
    varargs = bool(parameters) and parameters[0].kind == inspect.Parameter.VAR_POSITIONAL
    dynamic_shapes = (tuple(shapes),) if varargs else tuple(shapes)
    return torch.export.export(gm, tuple(args), dynamic_shapes=dynamic_shapes, strict=False)


def _check_arguments(variant: Any, options: dict[str, Any]) -> None:
    """Refuse unknown variants and options now, not later as a fallback in every graph."""
    names = [variant] if isinstance(variant, str) else list(dict(variant).values())
    known = {"sites", "seed"}
    for name in names:
        known |= set(get_variant(name).option_names())  # UnknownVariantError for a bad name
    unknown = sorted(set(options) - known)
    if unknown:
        raise VariantOptionError(
            f"option(s) {', '.join(map(repr, unknown))} are not options of rewrite() or of "
            f"{', '.join(names)}; known: {', '.join(sorted(known))}, and compiler="
        )


class RewritingBackend:
    """The backend object returned by :func:`dynamo_backend`.

    Attributes:
        variant: the variant name (or ``{pattern: name}`` dict) given to ``attnrewrite.rewrite``.
        options: the other ``attnrewrite.rewrite`` options (``sites=``, ``seed=``, variant options).
        compiler: ``"inductor"`` (default) or ``"eager"`` (run the rewritten graph as is: for
            debugging, and for tests that must not wait for Inductor).
        reports: one :class:`Report` per rewritten graph, in compilation order.
        fallbacks: graphs compiled unchanged because they could not be rewritten, with the reason.
    """

    def __init__(
        self, variant: Any = "softmax", *, compiler: str = "inductor", **options: Any
    ) -> None:
        if compiler not in _COMPILERS:
            raise BackendError(f"compiler must be one of {', '.join(_COMPILERS)}, got {compiler!r}")
        _check_arguments(variant, options)
        self.variant = variant
        self.options = options
        self.compiler = compiler
        self.reports: list[Report] = []
        self.fallbacks: list[GraphFallback] = []
        self._graphs = 0

    @property
    def report(self) -> Report:
        """All sites of all graphs compiled so far, in one report."""
        rows = tuple(row for r in self.reports for row in r.sites)
        notes = [f"graph {f.graph_index} not rewritten: {f.reason}" for f in self.fallbacks]
        # Every graph reaches the rewriter as an ExportedProgram made here; not news to the user.
        notes += [n for r in self.reports for n in r.notes if "ExportedProgram" not in n]
        if self._graphs and not rows:
            # Nothing to rewrite is news when the model has attention: it ran outside every
            # graph Dynamo captured (nn.TransformerEncoder's fused fast path in eval mode, a
            # custom kernel, an op Dynamo cannot trace), so no rewrite could see it.
            notes.append(
                f"no attention site in the {self._graphs} graph(s) Dynamo captured: if the model "
                "has attention, it ran outside the graphs (e.g. nn.TransformerEncoder's fast path "
                "in eval mode; call model.train() or pass need_weights/masks that disable it)"
            )
        rejected = tuple(x for r in self.reports for x in r.rejected)
        return Report(rows, tuple(dict.fromkeys(notes)), rejected=rejected)

    def __repr__(self) -> str:
        return (
            f"RewritingBackend({self.variant!r}, compiler={self.compiler!r}, "
            f"graphs={self._graphs}, rewritten_sites={len(self.report.rewritten)})"
        )

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        index = self._graphs
        self._graphs += 1
        target: fx.GraphModule = gm
        try:
            target = self._rewrite(gm, example_inputs)
        except Exception as exc:  # noqa: BLE001 - whatever export or rewrite refuses: run unchanged
            self.fallbacks.append(GraphFallback(index, f"{type(exc).__name__}: {str(exc)[:300]}"))
        if self.compiler == "eager":
            return target
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(target, example_inputs)

    def _rewrite(self, gm: fx.GraphModule, example_inputs: list[Any]) -> fx.GraphModule:
        from torch._subclasses.fake_tensor import FakeTensor

        from attnrewrite.rewriter.rewrite import rewrite

        args, shapes = _dynamic_shapes(gm, example_inputs)
        if any(isinstance(a, FakeTensor) for a in args):
            raise BackendError(
                "Dynamo passed fake example inputs; there is nothing to run torch.export on"
            )
        # Leave Dynamo's tracing context while exporting: otherwise the guards torch.export
        # installs for its own tracing land in the enclosing frame's guards, which then fail.
        with torch._guards.tracing(None):
            # A copy: non-strict export leaves hooks on the module it traces, which would then
            # reach Inductor's cache key (and make it unpicklable) for a graph kept unchanged.
            program = _export(copy.deepcopy(gm), args, shapes)
            rewritten = rewrite(program, self.variant, args=tuple(args), **self.options)
        self.reports.append(rewritten.report)
        if not rewritten.report.rewritten:
            return gm
        return _without_export_guards(rewritten.graph_module)


def _without_export_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the input-guard call ``torch.export`` puts at the top of an unlifted module.

    Inside Dynamo it is redundant: Dynamo guards this graph's inputs itself, and the export kept
    dynamic exactly what Dynamo made dynamic. Kept, it runs on every call, and Inductor cannot
    pickle it, so the graph would miss Inductor's compilation cache.
    """
    guards = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    for node in guards:
        if not node.users:
            gm.graph.erase_node(node)
    if guards and not any(n.target == "_guards_fn" for n in gm.graph.nodes):
        delattr(gm, "_guards_fn")
        gm.recompile()
    return gm


def dynamo_backend(variant: Any = "softmax", **options: Any) -> RewritingBackend:
    """A ``torch.compile`` backend that rewrites attention in each captured graph.

    Args:
        variant: a variant name or ``{site pattern: variant}`` dict, as for ``attnrewrite.rewrite``.
        **options: ``attnrewrite.rewrite`` options (``sites=``, ``seed=``, variant options), and
            ``compiler="inductor"`` (default) or ``"eager"`` for what runs the rewritten graphs.

    Returns:
        A :class:`RewritingBackend`: pass it as ``torch.compile(model, backend=...)``; after the
        first call its ``.reports`` (per graph) and ``.report`` (merged) say what was rewritten.
    """
    return RewritingBackend(variant, **options)
