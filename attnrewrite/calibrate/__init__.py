"""Calibration (issue 7): fit trainable variants to the softmax attention they replaced.

``attnrewrite.calibrate(rw, inputs)`` trains only the rewritten sites' own parameters (feature maps,
projections) so each site's output matches exact softmax attention on the same inputs; see
:func:`attnrewrite.calibrate.calibrate.calibrate`.

Issue 17 extended it to decoders and to several processes:

- token-id batches, and an end-to-end step on the next-token KL to the original
  (``end_to_end_loss``); :func:`output_divergence` measures it on held-out batches;
- LoRA adapters on the attention projections (``lora_rank``; :mod:`.lora`);
- data-parallel calibration under ``torchrun`` (:mod:`.distributed`), with the frozen weights
  optionally sharded per layer with FSDP2 (``shard_frozen``; :mod:`.sharding`), and
  checkpoint/resume with ``torch.distributed.checkpoint`` (:mod:`.checkpoint`);
- results that serialise to JSON (:class:`CalibrationResult`).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from attnrewrite.calibrate.result import (
    CalibrationResult,
    EndToEndCalibration,
    FrozenSharding,
    LoRACalibration,
    SiteCalibration,
)

__all__ = [
    "CalibrationResult",
    "EndToEndCalibration",
    "FrozenSharding",
    "LoRACalibration",
    "SiteCalibration",
    "output_divergence",
]


def output_divergence(model: Any, inputs: Any, **options: Any) -> float:
    """See :func:`attnrewrite.calibrate.calibrate.output_divergence`."""
    from attnrewrite.calibrate.calibrate import output_divergence as divergence

    return divergence(model, inputs, **options)


class _CallableModule(types.ModuleType):
    """This package, callable as the ``attnrewrite.calibrate`` function it shares a name with.

    Importing a submodule binds it on its parent package: once anything imports
    ``attnrewrite.calibrate.<x>``, the name ``attnrewrite.calibrate`` refers to this package
    instead of the public function. Calling the package does what the function does, so
    ``attnrewrite.calibrate(rw, inputs)`` works either way.
    """

    def __call__(self, model: Any, inputs: Any, **options: Any) -> CalibrationResult:
        from attnrewrite.calibrate.calibrate import calibrate

        return calibrate(model, inputs, **options)


sys.modules[__name__].__class__ = _CallableModule
