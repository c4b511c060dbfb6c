"""The rewrite report: one row per site, rendered as a table."""

from __future__ import annotations

import dataclasses
from collections import Counter

from attnrewrite.site import AttentionSite, Rejected

__all__ = ["Rejected", "Report", "SiteRow"]


@dataclasses.dataclass(frozen=True)
class SiteRow:
    """What happened to one site: ``status`` is ``"rewritten"`` or ``"skipped"`` (``reason``)."""

    name: str
    site: AttentionSite
    variant: str
    status: str
    reason: str = ""


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
        return dict(Counter(r.status for r in self.sites))

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
                    "mask": str(s.mask),
                    "causal": "yes" if s.causal else "no",
                    "cross": "yes" if s.is_cross else "no",
                    "scale": f"{s.scale:.4g}",
                    "variant": r.variant,
                    "status": r.status,
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
            return "no attention sites found"
        cols = list(rows[0])
        width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        head = "  ".join(c.ljust(width[c]) for c in cols)
        body = ["  ".join(str(r[c]).ljust(width[c]) for c in cols) for r in rows]
        c = self.counts()
        summary = (
            f"{len(rows)} site(s): {c.get('rewritten', 0)} rewritten, {c.get('skipped', 0)} skipped"
        )
        notes = [f"note: {n}" for n in self.notes]
        return "\n".join([head, "-" * len(head), *body, summary, *notes])

    def _repr_markdown_(self) -> str:
        return self.to_markdown()
