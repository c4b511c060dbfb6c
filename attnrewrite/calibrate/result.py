"""The calibration table: one row per calibrated site, plus the optional end-to-end step."""

from __future__ import annotations

import dataclasses

#: What the error columns measure.
ERROR_METRIC = "relative MSE ‖y − softmax‖² / ‖softmax‖² of the site output on the calibration set"


@dataclasses.dataclass(frozen=True)
class SiteCalibration:
    """One calibrated site.

    Attributes:
        site: the site name (module path).
        variant: the variant's registry name.
        error_before: relative MSE of the site's output against softmax, before calibration,
            over every calibration batch (teacher-forced inputs).
        error_after: the same after calibration.
        steps: optimiser steps the site took.
        seconds: time spent on the site's forward and backward passes.
        reverted: the per-site step ended with a higher error than it started from, so the
            site's parameters were put back as they were (``error_after`` is then theirs).
    """

    site: str
    variant: str
    error_before: float
    error_after: float
    steps: int
    seconds: float
    reverted: bool = False


@dataclasses.dataclass(frozen=True)
class EndToEndCalibration:
    """The final end-to-end step: relative MSE of the model's outputs against the original's."""

    error_before: float
    error_after: float
    steps: int
    seconds: float
    #: The step made the model-output error worse on the calibration set, so the parameters were
    #: put back as the per-site step left them (``error_after`` is then the error they give).
    reverted: bool = False


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What :func:`~attnrewrite.calibrate.calibrate` did, as a table.

    Attributes:
        rows: one :class:`SiteCalibration` per calibrated site, in graph order.
        loss: the per-site loss (``"mse"`` or ``"attn_kl"``).
        batches: calibration batches recorded.
        seconds: wall time of the whole call.
        stopped: why training stopped: ``"steps"`` or ``"max_seconds"``.
        end_to_end: the end-to-end step, or ``None`` if it was not asked for.
    """

    rows: tuple[SiteCalibration, ...]
    loss: str
    batches: int
    seconds: float
    stopped: str = "steps"
    end_to_end: EndToEndCalibration | None = None
    metric: str = ERROR_METRIC

    def table(self) -> list[dict[str, str]]:
        return [
            {
                "site": r.site,
                "variant": r.variant,
                "error before": f"{r.error_before:.3g}",
                "error after": f"{r.error_after:.3g}",
                "reduction": "reverted"
                if r.reverted
                else _reduction(r.error_before, r.error_after),
                "steps": str(r.steps),
                "seconds": f"{r.seconds:.1f}",
            }
            for r in self.rows
        ]

    def _footer(self) -> list[str]:
        lines = [
            f"error: {self.metric}",
            f"loss: {self.loss}; {self.batches} batch(es); stopped by {self.stopped}; "
            f"{self.seconds:.1f} s in all",
        ]
        e2e = self.end_to_end
        if e2e is not None:
            lines.append(
                f"end-to-end: model-output relative MSE {e2e.error_before:.3g} -> "
                f"{e2e.error_after:.3g} in {e2e.steps} step(s), {e2e.seconds:.1f} s"
                + (
                    "; it made the error worse, so the parameters were reverted to the per-site "
                    "step's"
                    if e2e.reverted
                    else ""
                )
            )
        return lines

    def to_markdown(self) -> str:
        rows = self.table()
        if not rows:
            return "_no sites calibrated_"
        cols = list(rows[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
        return "\n".join([*lines, "", *(f"- {line}" for line in self._footer())])

    def __str__(self) -> str:
        rows = self.table()
        cols = list(rows[0]) if rows else ["site"]
        width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
        head = "  ".join(c.ljust(width[c]) for c in cols)
        body = ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
        return "\n".join([head, "-" * len(head), *body, *self._footer()])

    def _repr_markdown_(self) -> str:
        return self.to_markdown()


def _reduction(before: float, after: float) -> str:
    if before <= 0 or after != after:  # after != after: NaN
        return "-"
    return f"{before / max(after, 1e-30):.3g}x"
