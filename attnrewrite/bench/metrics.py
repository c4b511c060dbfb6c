"""Summary statistics, output error and the crossover length."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree


def quantiles(samples: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); with fewer than 2 samples all three are equal."""
    if len(samples) < 2:
        value = float(samples[0]) if samples else math.nan
        return value, value, value
    q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
    return q1, median, q3


def main_output(output: Any) -> torch.Tensor | None:
    """The first floating-point tensor of a model's output (``last_hidden_state``, logits...)."""
    if isinstance(output, torch.Tensor):
        return output if output.is_floating_point() else None
    # Hugging Face ModelOutput is an ordered dict: its first field is the main output.
    if hasattr(output, "to_tuple"):
        output = output.to_tuple()
    for leaf in pytree.tree_leaves(output):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    return None


def output_error(
    output: torch.Tensor | None, reference: torch.Tensor | None
) -> tuple[float | None, float | None]:
    """(max relative error, cosine of pooled outputs) of ``output`` against ``reference``.

    The relative error is max|y - y_ref| / max|y_ref| — relative to the output's scale, because an
    elementwise ratio explodes where the reference crosses zero. The cosine compares the outputs
    mean-pooled over the sequence axis (axis 1, for outputs of rank >= 3), per example, averaged
    over the batch: what a mean-pooled classifier head would see.
    """
    if output is None or reference is None:
        return None, None
    output = torch.as_tensor(output).detach().float().cpu()
    reference = reference.detach().float().cpu()
    if output.shape != reference.shape:
        return None, None
    scale = reference.abs().max().item()
    diff = (output - reference).abs().max().item()
    rel = diff / scale if scale > 0 else diff
    pooled = output.mean(1) if output.dim() >= 3 else output
    pooled_ref = reference.mean(1) if reference.dim() >= 3 else reference
    if pooled.dim() == 0:
        pooled, pooled_ref = pooled.reshape(1, 1), pooled_ref.reshape(1, 1)
    elif pooled.dim() == 1:
        pooled, pooled_ref = pooled.unsqueeze(0), pooled_ref.unsqueeze(0)
    cosine = (
        torch.nn.functional.cosine_similarity(
            pooled.flatten(1), pooled_ref.flatten(1), dim=1, eps=1e-12
        )
        .mean()
        .item()
    )
    return rel, cosine


def crossover(lengths: Sequence[int], speedups: Sequence[float | None]) -> tuple[float | None, str]:
    """The first length at which a variant becomes faster than the original.

    ``speedups[i]`` is original time / variant time at ``lengths[i]`` (ascending). Between the last
    slower and the first faster measured length the crossing is interpolated linearly in
    log(length)-log(speedup) — the point where the two log-log time curves cross.

    Returns:
        (length or None, how): how is ``"interpolated"``, ``"at or below"`` (already faster at the
        shortest length), ``"not reached"`` (never faster) or ``"no data"``.
    """
    points = [
        (n, s)
        for n, s in zip(lengths, speedups, strict=True)
        if s is not None and s > 0 and not math.isnan(s)
    ]
    if not points:
        return None, "no data"
    previous: tuple[int, float] | None = None
    for n, s in points:
        if s > 1.0:
            if previous is None:
                return float(n), "at or below"
            n0, s0 = previous
            x0, x1, y0, y1 = math.log(n0), math.log(n), math.log(s0), math.log(s)
            x = x0 + (0.0 - y0) * (x1 - x0) / (y1 - y0) if y1 != y0 else x1
            return float(math.exp(x)), "interpolated"
        previous = (n, s)
    return None, "not reached"
