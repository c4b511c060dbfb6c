"""Calibration under ``torch.distributed``: one process per rank, started by ``torchrun``.

``calibrate`` needs no change of call to run on several processes: when a default process group
is initialised (``torch.distributed.init_process_group`` in the user's script, any backend; gloo on
CPU) with more than one rank, it

- **shards the data**: every rank is given the same list of batches, and rank r keeps batches
  r, r + W, r + 2W, ... (W the world size): a *global batch* k is the W batches kW ... kW + W − 1,
  one per rank, so a step on global batch k costs each rank one batch. A remainder of fewer than W
  batches is left out (said in the result);
- **records only its own batches**, so the memory of the recorded calls is divided by W;
- **sums gradients over ranks** (``all_reduce``) before every optimiser step. Every loss is a sum
  over the batch divided by a normaliser that does not depend on the parameters (‖teacher‖², a
  number of tokens), and the normaliser is summed over ranks first: the summed gradient is then
  the gradient of the loss of the global batch, as if one process had run the W batches
  concatenated. Data-parallel semantics, with the same parameters on every rank at every step;
- reports the same table on every rank (errors are sums over ranks), shows progress on rank 0
  only, and lets only rank 0 write result files (:meth:`CalibrationResult.save`);
- with ``shard_frozen=True``, also **shards the frozen weights** (the rewritten model's own copy
  of the original's) with FSDP2 for the length of the call: the graph is split into one stage per
  layer, each rank holds 1/W of every frozen weight and gathers a layer's only while it runs,
  while the parameters that train stay replicated and are summed as above. The trained
  parameters are the same; afterwards the model holds its full weights again. Tested on CPU with
  gloo (FSDP2 runs there on a ``cpu`` device mesh). See :mod:`attnrewrite.calibrate.sharding`
  for how, and for its limits.

A single process (no process group, or a group of one) runs exactly as before: every collective
below is then the identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Ranks:
    """Where this process stands: its rank and the world size (1 and 0 without a group)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> Ranks:
        if dist.is_available() and dist.is_initialized():
            return Ranks(dist.get_rank(), dist.get_world_size())
        return Ranks()

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that shows progress and writes files."""
        return self.rank == 0

    def shard(self, batches: Sequence[T]) -> tuple[list[T], int]:
        """This rank's batches (r, r + W, ...) of the whole global batches, and how many
        batches were left out because they do not fill a global batch."""
        usable = len(batches) - len(batches) % self.world
        return list(batches[self.rank : usable : self.world]), len(batches) - usable

    def sum(self, values: Sequence[float] | Tensor) -> Tensor:
        """Element-wise sum over ranks, as a float64 CPU tensor (a copy)."""
        tensor = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def each(self, value: float) -> list[float]:
        """Every rank's ``value``, in rank order (one all-reduce)."""
        values = torch.zeros(self.world, dtype=torch.float64)
        values[self.rank] = value
        return self.sum(values).tolist()

    def sum_gradients(self, parameters: Iterable[nn.Parameter]) -> None:
        """Replace every gradient by its sum over ranks (one flat all-reduce). A parameter without
        a gradient on this rank counts as a zero gradient."""
        if not self.distributed:
            return
        parameters = list(parameters)
        flat = torch.cat(
            [
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                for p in parameters
            ]
        )
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for p in parameters:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).to(p.dtype).clone()
            offset += n

    def broadcast_module(self, module: nn.Module) -> None:
        """Give every rank rank 0's parameters and buffers of ``module``."""
        if not self.distributed:
            return
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)

    def same_everywhere(self, value: int) -> bool:
        """Whether every rank holds the same integer (a cheap consistency check)."""
        if not self.distributed:
            return True
        both = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        return int(both[0]) == value and int(-both[1]) == value
