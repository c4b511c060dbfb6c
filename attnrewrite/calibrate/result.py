"""The calibration table: one row per calibrated site, plus the optional end-to-end step."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

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


#: What the end-to-end figures measure, by end-to-end loss.
OUTPUT_METRICS = {
    "mse": "model-output relative MSE",
    "kl": "next-token KL(original ‖ rewritten) per position",
}


@dataclasses.dataclass(frozen=True)
class EndToEndCalibration:
    """The end-to-end step: the model's outputs against the original's (``metric``)."""

    error_before: float
    error_after: float
    steps: int
    seconds: float
    #: The step made the model-output error worse on the calibration set, so the parameters were
    #: put back as the per-site step left them (``error_after`` is then the error they give).
    reverted: bool = False
    #: ``"mse"`` (relative MSE of every floating-point output) or ``"kl"`` (next-token KL).
    loss: str = "mse"


@dataclasses.dataclass(frozen=True)
class LoRACalibration:
    """The LoRA stage: adapters on the attention projections, trained on the end-to-end loss.

    Attributes:
        rank: the adapters' rank.
        adapters: one ``"site: role"`` per adapter (``role`` query, key, value, output or a fused
            combination).
        parameters: trainable numbers the adapters add.
        error_before: end-to-end loss before the stage (after the earlier stages).
        error_after: the same after it.
        steps: optimiser steps.
        seconds: time of the stage.
        reverted: the stage raised the loss, so the adapters were removed.
        missing: sites where no projection was found (so none of theirs was adapted).
        loss: the end-to-end loss (``"mse"`` or ``"kl"``).
    """

    rank: int
    adapters: tuple[str, ...]
    parameters: int
    error_before: float
    error_after: float
    steps: int
    seconds: float
    reverted: bool = False
    missing: tuple[str, ...] = ()
    loss: str = "mse"


@dataclasses.dataclass(frozen=True)
class FrozenSharding:
    """How the frozen weights were sharded during a calibration (``shard_frozen=True``).

    Attributes:
        stages: the per-layer stages the rewritten graph was split into, each gathered on its own.
        parameters: frozen parameter numbers of the rewritten model (each tensor counted once).
        held: per rank, the frozen numbers it held while calibrating (its shards, without
            FSDP's padding).
        largest_stage: the most frozen numbers one stage gathers at once.
        shared: frozen numbers read by several stages (tied embeddings): sharded with the whole
            model and gathered for the whole forward.
    """

    stages: int
    parameters: int
    held: tuple[int, ...]
    largest_stage: int
    shared: int


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
        lora: the LoRA stage, or ``None`` if it was not asked for.
        world_size: processes that calibrated together (``torch.distributed``), 1 without.
        dropped_batches: batches left out because they did not fill a global batch of
            ``world_size`` batches (0 in a single process).
        resumed: the stage and step a checkpoint was resumed from (``"sites@120"``), or ``None``.
        sharding: how the frozen weights were sharded (``shard_frozen=True`` under
            ``torch.distributed``), or ``None`` when they were not.
    """

    rows: tuple[SiteCalibration, ...]
    loss: str
    batches: int
    seconds: float
    stopped: str = "steps"
    end_to_end: EndToEndCalibration | None = None
    metric: str = ERROR_METRIC
    lora: LoRACalibration | None = None
    world_size: int = 1
    dropped_batches: int = 0
    resumed: str | None = None
    sharding: FrozenSharding | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, dicts, numbers, strings): what :meth:`to_json` writes."""
        return dataclasses.asdict(self)

    def to_json(self, **options: Any) -> str:
        """The result as JSON (``json.dumps`` options, e.g. ``indent=2``)."""
        return json.dumps(self.to_dict(), **options)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CalibrationResult:
        data = dict(data)
        data["rows"] = tuple(SiteCalibration(**row) for row in data["rows"])
        if data.get("end_to_end") is not None:
            data["end_to_end"] = EndToEndCalibration(**data["end_to_end"])
        if data.get("lora") is not None:
            lora = dict(data["lora"])
            lora["adapters"], lora["missing"] = tuple(lora["adapters"]), tuple(lora["missing"])
            data["lora"] = LoRACalibration(**lora)
        if data.get("sharding") is not None:
            sharding = dict(data["sharding"])
            sharding["held"] = tuple(sharding["held"])
            data["sharding"] = FrozenSharding(**sharding)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> CalibrationResult:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> bool:
        """Write :meth:`to_json` to ``path``. Under ``torch.distributed`` only rank 0 writes (every
        rank holds the same result); returns whether this process wrote."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return False
        Path(path).write_text(self.to_json(indent=2) + "\n")
        return True

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
        if self.world_size > 1:
            lines.append(
                f"{self.world_size} processes (torch.distributed), data sharded by rank"
                + (f"; {self.dropped_batches} batch(es) left out" if self.dropped_batches else "")
            )
        sharding = self.sharding
        if sharding is not None:
            lines.append(
                f"frozen weights sharded (FSDP2) in {sharding.stages} stage(s): "
                f"{max(sharding.held)} of {sharding.parameters} held per rank at most, "
                f"{sharding.largest_stage} gathered for the largest stage"
                + (f", {sharding.shared} shared by several" if sharding.shared else "")
            )
        if self.resumed:
            lines.append(f"resumed from a checkpoint at {self.resumed}")
        e2e = self.end_to_end
        if e2e is not None:
            lines.append(
                f"end-to-end: {OUTPUT_METRICS[e2e.loss]} {e2e.error_before:.3g} -> "
                f"{e2e.error_after:.3g} in {e2e.steps} step(s), {e2e.seconds:.1f} s"
                + (
                    "; it made the error worse, so the parameters were reverted to the per-site "
                    "step's"
                    if e2e.reverted
                    else ""
                )
            )
        lora = self.lora
        if lora is not None:
            lines.append(
                f"LoRA: {len(lora.adapters)} adapter(s) of rank {lora.rank} "
                f"({lora.parameters} parameters); {OUTPUT_METRICS[lora.loss]} "
                f"{lora.error_before:.3g} -> {lora.error_after:.3g} in {lora.steps} step(s), "
                f"{lora.seconds:.1f} s"
                + (
                    "; it made the loss worse, so the adapters were removed"
                    if lora.reverted
                    else ""
                )
            )
            lines += [f"LoRA: {m}" for m in lora.missing]
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
