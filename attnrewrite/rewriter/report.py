"""The rewrite report: one row per site, rendered as a table."""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter

from attnrewrite.site import AttentionSite, Rejected

__all__ = ["Rejected", "Report", "SiteRow", "Status"]


class Status(str, enum.Enum):
    """What happened to a site (compares equal to its string value)."""

    REWRITTEN = "rewritten"  # lowered to its variant
    SKIPPED = "skipped"  # left as the model wrote it; the row's reason says why
    CANONICAL = "canonical"  # ``attnrewrite.canonicalize``: one canonical attention op

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class SiteRow:
    """What happened to one site: ``status`` (a :class:`Status`) and, if skipped, ``reason``."""

    name: str
    site: AttentionSite
    variant: str
    status: Status
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))


@dataclasses.dataclass(frozen=True)
class Report:
    sites: tuple[SiteRow, ...]
    notes: tuple[str, ...] = ()
    stats: tuple[tuple[str, object], ...] = ()
    #: Every softmax looked at and not taken as a site, with the reason (also printed by debug).
    rejected: tuple[Rejected, ...] = ()

    @property
    def rewritten(self) -> list[SiteRow]:
        return [r for r in self.sites if r.status == "rewritten"]

    @property
    def skipped(self) -> list[SiteRow]:
        return [r for r in self.sites if r.status == "skipped"]

    def counts(self) -> dict[str, int]:
        return dict(Counter(str(r.status) for r in self.sites))

    def rows(self) -> list[dict[str, object]]:
        out = []
        for r in self.sites:
            s = r.site
            out.append(
                {
                    "site": r.name,
                    "kind": s.kind,
                    "shape": f"H={s.num_heads} kv={s.num_kv_heads} d={s.head_dim} "
                    f"Nq={s.query_len} Nk={s.key_len}",
                    "mask": str(s.mask) + (f" (window {s.window})" if s.window else ""),
                    "causal": "yes" if s.causal else "no",
                    "cross": "yes" if s.is_cross else "no",
                    "scale": f"{s.scale:.4g}",
                    "variant": r.variant,
                    "status": str(r.status),
                    "reason": r.reason,
                }
            )
        return out

    def to_markdown(self) -> str:
        rows = self.rows()
        if not rows:
            return "_no attention sites found_"
        cols = list(rows[0])
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
        return "\n".join(lines)

    def __str__(self) -> str:
        rows = self.rows()
        if not rows:
            return "\n".join(["no attention sites found", *self._rejected_lines()])
        cols = list(rows[0])
        width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        head = "  ".join(c.ljust(width[c]) for c in cols)
        body = ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
        c = self.counts()
        done = ", ".join(f"{c[s]} {s}" for s in Status if s in c and s is not Status.SKIPPED)
        summary = (
            f"{len(rows)} site(s): {done or '0 rewritten'}, {c.get(Status.SKIPPED, 0)} skipped"
        )
        notes = [f"note: {n}" for n in self.notes]
        return "\n".join([head, "-" * len(head), *body, summary, *self._rejected_lines(), *notes])

    def _rejected_lines(self) -> list[str]:
        """One line per reason a softmax was not taken as a site, with where (up to three)."""
        by_reason: dict[str, list[str]] = {}
        for r in self.rejected:
            by_reason.setdefault(r.reason, []).append(r.module or "<root>")
        lines = []
        for reason, modules in by_reason.items():
            where = ", ".join(modules[:3]) + (
                f", +{len(modules) - 3} more" if len(modules) > 3 else ""
            )
            lines.append(f"not a site ({len(modules)}x): {reason} [{where}]")
        return lines

    def _repr_markdown_(self) -> str:
        return self.to_markdown()
