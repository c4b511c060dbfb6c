"""The benchmark's result: one row per (length, backend, variant), JSON, Markdown and a plot."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ORIGINAL = "original"


@dataclasses.dataclass(frozen=True)
class BenchRow:
    """One measured configuration. Times in milliseconds, memory in MiB, FLOPs per forward call.

    Attributes:
        backend: ``eager``, ``inductor`` or ``onnxruntime``.
        variant: the row's label: ``"original"`` for the model as given, else the variant's label.
        variant_name: the registered variant (``None`` for the original).
        length: sequence length N; ``batch``: batch size.
        status: ``"ok"``, or ``"error: ..."``, ``"unavailable: ..."``, ``"not applied: ..."``.
        sites_rewritten, sites_total: how many attention sites the variant replaced.
        median_ms, q1_ms, q3_ms, min_ms, max_ms: latency over ``repeats`` timed calls (warm-up
            excluded), with the interquartile range and the extremes as the spread.
        setup_s: untimed one-off work before the timed calls at this length: warm-up call(s)
            (Inductor compiles in its first call at a new length) plus, on the first length, ONNX
            export and session creation.
        rewrite_s: time ``attnrewrite.rewrite`` took (once per variant).
        speedup: original median / this median, same backend and length.
        flops: FLOPs of one forward call (torch's FlopCounterMode convention, see ``bench.flops``).
        gflops_per_s: flops / median time.
        flop_bound_speedup: original FLOPs / these FLOPs (the speedup a FLOP-bound run would get).
        flop_bound_fraction: speedup / flop_bound_speedup (how much of it was achieved).
        peak_mb: peak resident memory the forward call adds (see ``bench.memory``), from its own
            process; ``memory_ratio``: peak_mb / original peak_mb (same backend and length).
        max_rel_error: max|y - y_orig| / max|y_orig| against the eager original.
        cosine: cosine of sequence-mean-pooled outputs against the eager original (batch mean).
    """

    backend: str
    variant: str
    variant_name: str | None
    length: int
    batch: int
    status: str = "ok"
    sites_rewritten: int | None = None
    sites_total: int | None = None
    repeats: int = 0
    median_ms: float | None = None
    q1_ms: float | None = None
    q3_ms: float | None = None
    min_ms: float | None = None
    max_ms: float | None = None
    setup_s: float | None = None
    rewrite_s: float | None = None
    speedup: float | None = None
    flops: int | None = None
    gflops_per_s: float | None = None
    flop_bound_speedup: float | None = None
    flop_bound_fraction: float | None = None
    peak_mb: float | None = None
    memory_ratio: float | None = None
    memory_status: str | None = None
    max_rel_error: float | None = None
    cosine: float | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclasses.dataclass(frozen=True)
class Crossover:
    """The first length at which ``variant`` beats the original on ``backend`` (see metrics)."""

    backend: str
    variant: str
    length: float | None
    how: str

    def describe(self) -> str:
        if self.length is None:
            return self.how
        prefix = "<= " if self.how == "at or below" else "~" if self.how == "interpolated" else ""
        return f"{prefix}{self.length:.0f}"


@dataclasses.dataclass
class BenchmarkResult:
    """What :func:`attnrewrite.benchmark` returns.

    Attributes:
        rows: one :class:`BenchRow` per (length, backend, variant), the original included.
        crossovers: one :class:`Crossover` per (backend, variant).
        meta: how the run was made (lengths, batch, repeats, threads, versions, machine, notes).
    """

    rows: list[BenchRow]
    crossovers: list[Crossover]
    meta: dict[str, Any]

    # -- access ----------------------------------------------------------------------------------
    @property
    def lengths(self) -> list[int]:
        return sorted({r.length for r in self.rows})

    @property
    def backends(self) -> list[str]:
        return list(dict.fromkeys(r.backend for r in self.rows))

    @property
    def variants(self) -> list[str]:
        return list(dict.fromkeys(r.variant for r in self.rows))

    def row(self, backend: str, variant: str, length: int) -> BenchRow | None:
        for r in self.rows:
            if (r.backend, r.variant, r.length) == (backend, variant, length):
                return r
        return None

    # -- output ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "meta": self.meta,
            "rows": [dataclasses.asdict(r) for r in self.rows],
            "crossovers": [dataclasses.asdict(c) for c in self.crossovers],
        }

    def to_json(self, path: str | Path) -> Path:
        """Write the result as JSON (``meta``, ``rows``, ``crossovers``); return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> BenchmarkResult:
        data = json.loads(Path(path).read_text())
        return cls(
            [BenchRow(**r) for r in data["rows"]],
            [Crossover(**c) for c in data["crossovers"]],
            data["meta"],
        )

    def to_markdown(self) -> str:
        """Markdown tables: every measured row, then the crossover lengths, then notes."""
        head = [
            "backend",
            "variant",
            "N",
            "median ms",
            "IQR ms",
            "speedup",
            "GFLOP",
            "FLOP-bound",
            "achieved",
            "GFLOP/s",
            "peak MiB",
            "memory x",
            "max rel err",
            "cosine",
            "status",
        ]
        lines = [_md_row(head), _md_row(["---"] * len(head))]
        for r in sorted(
            self.rows,
            key=lambda r: (
                self.backends.index(r.backend),
                r.length,
                self.variants.index(r.variant),
            ),
        ):
            iqr = None if r.q1_ms is None or r.q3_ms is None else f"{r.q1_ms:.3g}-{r.q3_ms:.3g}"
            lines.append(
                _md_row(
                    [
                        r.backend,
                        r.variant,
                        r.length,
                        _fmt(r.median_ms),
                        iqr or "-",
                        _fmt(r.speedup, "x"),
                        _fmt(None if r.flops is None else r.flops / 1e9),
                        _fmt(r.flop_bound_speedup, "x"),
                        _fmt(r.flop_bound_fraction),
                        _fmt(r.gflops_per_s),
                        _fmt(r.peak_mb),
                        _fmt(r.memory_ratio, "x"),
                        _fmt(r.max_rel_error, sci=True),
                        _fmt(r.cosine, digits=5),
                        r.status
                        if r.memory_status in (None, "ok")
                        else f"{r.status}; memory {r.memory_status}",
                    ]
                )
            )
        out = ["\n".join(lines)]
        if self.crossovers:
            cross = [
                _md_row(["backend", "variant", "crossover N (faster than original from)"]),
                _md_row(["---"] * 3),
            ]
            cross += [_md_row([c.backend, c.variant, c.describe()]) for c in self.crossovers]
            out.append("\n".join(cross))
        notes = self.meta.get("notes") or []
        if notes:
            out.append("\n".join(f"- {n}" for n in notes))
        return "\n\n".join(out)

    def plot(self, path: str | Path) -> Path:
        """Time and memory against length, log-log, one line per variant (and backend)."""
        from attnrewrite.bench.plot import plot_result

        return plot_result(self, Path(path))

    def __str__(self) -> str:
        return self.to_markdown()


def _md_row(cells: Sequence[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _fmt(value: float | None, suffix: str = "", *, sci: bool = False, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if sci:
        return f"{value:.1e}"
    return f"{value:.{digits}g}{suffix}"
