"""Before/after measurement of rewritten models: latency, peak memory, output error, FLOPs.

``attnrewrite.benchmark(model, variants, ...)`` (:func:`attnrewrite.bench.benchmark.benchmark`)
returns a :class:`~attnrewrite.bench.results.BenchmarkResult` with ``.rows``, ``.to_json(path)``,
``.to_markdown()`` and ``.plot(path)``. Module map: ``benchmark`` (the run), ``inputs`` (inputs at
other lengths), ``flops`` (FLOP counting), ``memory`` and ``_worker`` (peak memory in a process per
configuration), ``runners`` (eager / Inductor / ONNX Runtime), ``metrics`` (statistics, error,
crossover), ``results`` and ``plot`` (output), ``targets`` (TARGET strings of the CLI).
"""

from __future__ import annotations

from attnrewrite.bench.benchmark import benchmark, parse_variants
from attnrewrite.bench.results import BenchmarkResult, BenchRow, Crossover

__all__ = ["BenchRow", "BenchmarkResult", "Crossover", "benchmark", "parse_variants"]
