"""Checkpoint and resume of a calibration, with ``torch.distributed.checkpoint`` (DCP).

``calibrate(..., checkpoint=path)`` saves its state every ``checkpoint_every`` optimiser steps and
at the end of every stage, and a later call with the same ``path``, model, inputs and options
continues where the saved state left off: a preempted job is resubmitted unchanged. The state is
tensors only: the selected sites' variant modules (parameters and buffers), the LoRA adapters,
Adam's moments and step counts, the stage and the step within it, and what the stage needs to
finish its table (the parameters it started from, to revert to; its error before). Recording is
redone on resume (it is deterministic and not trained), so the table has the same rows.

Layout: ``path/state-<n>/`` is one DCP checkpoint (under ``torchrun`` every rank writes its part;
calibration state is replicated, so DCP writes each tensor once), and ``path/LATEST`` names the
newest complete one; it is written after the checkpoint, so a job killed while saving resumes
from the previous one. Older ones are removed.

DCP reads its metadata with ``pickle``: resume only from checkpoints you wrote, as with
``torch.load(weights_only=False)``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException

from attnrewrite.calibrate.distributed import Ranks
from attnrewrite.errors import CalibrationInputError

#: Calibration stages in order; the checkpoint stores the index.
STAGES = ("sites", "end_to_end", "lora", "done")


class Checkpoint:
    """Where a calibration saves its state, and what it saved last."""

    def __init__(self, path: str | os.PathLike[str], every: int, ranks: Ranks) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise CalibrationInputError(
                f"checkpoint_every must be a positive int (optimiser steps), got {every!r}"
            )
        self.path = Path(path)
        self.every = every
        self.ranks = ranks

    def latest(self) -> Path | None:
        marker = self.path / "LATEST"
        if not marker.is_file():
            return None
        name = marker.read_text().strip()
        found = self.path / name
        if not name.startswith("state-") or not (found / ".metadata").is_file():
            raise CalibrationInputError(
                f"{marker} names {name!r}, which is not a complete checkpoint in {self.path}; "
                "remove the directory to start over"
            )
        return found

    def load(self, template: dict[str, Tensor]) -> dict[str, Tensor] | None:
        """The saved state in the shapes of ``template`` (copied, not in place), or ``None``
        when nothing was saved yet. Raises if the saved state is of another calibration."""
        where = self.latest()
        if where is None:
            return None
        state = {k: v.detach().clone() for k, v in template.items()}
        try:
            with _quiet():
                dcp.load(state, checkpoint_id=str(where), no_dist=not self.ranks.distributed)
        except (Exception, CheckpointException) as exc:
            raise CalibrationInputError(
                f"the checkpoint in {where} does not fit this calibration (another model, "
                f"variant, layers= or lora_rank=?): {exc}. Give another checkpoint path, or "
                "remove this one to start over"
            ) from exc
        return state

    def save(self, state: dict[str, Tensor], serial: int) -> None:
        name = f"state-{serial}"
        target = self.path / name
        if self.ranks.main:
            self.path.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
        self._barrier()
        with _quiet():
            dcp.save(
                {k: v.detach() for k, v in state.items()},
                checkpoint_id=str(target),
                no_dist=not self.ranks.distributed,
            )
        self._barrier()
        if self.ranks.main:
            temporary = self.path / "LATEST.tmp"
            temporary.write_text(name)
            temporary.replace(self.path / "LATEST")
            for old in self.path.glob("state-*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        self._barrier()

    def _barrier(self) -> None:
        if self.ranks.distributed:
            dist.barrier()


class _quiet(warnings.catch_warnings):
    """DCP warns that it runs in a single process when no group is initialised: that is meant."""

    def __enter__(self) -> None:
        super().__enter__()
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")


def meta(stage: str, step: int, serial: int) -> Tensor:
    return torch.tensor([STAGES.index(stage), step, serial], dtype=torch.int64)


def unpack_meta(value: Tensor) -> tuple[str, int, int]:
    stage, step, serial = (int(x) for x in value.tolist())
    return STAGES[stage], step, serial
