"""The pass pipeline: passes declared once as a sequence, run in order on one graph module.

Every pass is an object with a ``name`` that is called on the graph module and on the results of
the passes before it (``results[name]``, read-only) and returns a :class:`PassResult`. A pass that
needs what an earlier one found (canonicalisation needs the accepted sites, lowering the variant
modules) reads it from ``results`` rather than being built with it, so one declaration serves
every call (``rewrite`` in ``attnrewrite/rewriter/rewrite.py`` declares the whole pipeline in one
function, ``_pipeline``). Each pass can still be run alone with explicit arguments (the IR tests
do).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Protocol

from torch import fx

from attnrewrite.passes.base import PassResult, dead_code_elimination

Results = Mapping[str, PassResult]


class Pass(Protocol):
    """What the pipeline runs: ``name`` keys the result in ``results``."""

    name: ClassVar[str]

    def __call__(self, gm: fx.GraphModule, results: Results | None = None) -> PassResult: ...


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    """Every pass's result by name, in run order, and their diagnostics in one sequence."""

    graph_module: fx.GraphModule
    results: dict[str, PassResult]

    def __getitem__(self, name: str) -> PassResult:
        return self.results[name]

    def __contains__(self, name: str) -> bool:
        return name in self.results

    @property
    def diagnostics(self) -> tuple[Any, ...]:
        return tuple(d for result in self.results.values() for d in result.diagnostics)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """Run ``passes`` in order on one graph module (edited in place).

    With ``lint``, the graph is linted after every pass that changed it, so a broken edit is
    reported by the pass that made it. The graph module is recompiled once, at the end.
    """

    passes: Sequence[Pass]
    lint: bool = False

    def __call__(self, gm: fx.GraphModule) -> PipelineResult:
        results: dict[str, PassResult] = {}
        for step in self.passes:
            if step.name in results:
                raise ValueError(f"two passes are named {step.name!r}; names key the results")
            result = step(gm, results)
            results[step.name] = result
            if self.lint and result.modified:
                try:
                    gm.graph.lint()
                except Exception as exc:
                    raise RuntimeError(f"the graph is invalid after pass {step.name!r}") from exc
        gm.recompile()
        return PipelineResult(gm, results)

    def names(self) -> list[str]:
        return [step.name for step in self.passes]


@dataclasses.dataclass(frozen=True)
class DeadCodeElimination:
    """Remove nodes nothing uses, keeping every write a later read can see (``base.py``)."""

    name: ClassVar[str] = "dce"

    def __call__(self, gm: fx.GraphModule, results: Results | None = None) -> PassResult:
        removed = dead_code_elimination(gm)
        return PassResult(gm, removed > 0, {"removed": removed})


@dataclasses.dataclass(frozen=True)
class Named:
    """Run ``step`` under another name (a pass that appears twice in one pipeline)."""

    step: Pass
    label: str

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.label

    def __call__(self, gm: fx.GraphModule, results: Results | None = None) -> PassResult:
        return self.step(gm, results)
