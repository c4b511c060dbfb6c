"""Inputs at other batch sizes and sequence lengths, derived from one example.

The default ``make_inputs`` of :func:`attnrewrite.benchmark` resizes the example's sequence axis
(axis 1) and batch axis (axis 0):

- the example length L is axis 1 of the first integer tensor of rank >= 2 (token ids), else of the
  first floating tensor of rank 3 (embeddings ``(B, L, D)``);
- every tensor axis >= 1 of size L becomes the new length, axis 0 of the example batch size the new
  batch;
- token ids become random ids within the example's observed range; inputs whose name contains
  ``mask`` become "attend everywhere" (ones / True, or zeros for an additive float mask); names
  containing ``position`` become ``arange``; float tensors become Gaussian noise with the example's
  mean and standard deviation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree

from attnrewrite.errors import BenchmarkError

MakeInputs = Callable[[int, int], tuple[tuple[Any, ...], dict[str, Any]]]


def example_length(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """The example's sequence length (see the module docstring), or ``None`` if there is none."""
    leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
    for x in leaves:
        if x.dim() >= 2 and not x.is_floating_point() and x.dtype != torch.bool:
            return int(x.shape[1])
    for x in leaves:
        if x.dim() == 3 and x.is_floating_point():
            return int(x.shape[1])
    return None


def example_batch(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    for x in pytree.tree_leaves((args, kwargs)):
        if isinstance(x, torch.Tensor) and x.dim() >= 1:
            return int(x.shape[0])
    return 1


def resize_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], batch: int, length: int, *, seed: int = 0
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The example ``(args, kwargs)`` resized to ``batch`` x ``length`` (see module docstring)."""
    old_length = example_length(args, kwargs)
    if old_length is None:
        raise BenchmarkError(
            "cannot tell the sequence axis of the example inputs (no integer token tensor and no "
            "(batch, length, features) float tensor); pass make_inputs=f where f(batch, length) "
            "returns (args, kwargs)"
        )
    old_batch = example_batch(args, kwargs)
    g = torch.Generator().manual_seed(seed * 1_000_003 + length)

    def resize(name: str, x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return x
        shape = list(x.shape)
        if shape[0] == old_batch:
            shape[0] = batch
        for axis in range(1, len(shape)):
            if shape[axis] == old_length:
                shape[axis] = length
        if shape == list(x.shape):
            return x
        return _fill(name.lower(), x, tuple(shape), g)

    new_args = tuple(resize(f"arg{i}", a) for i, a in enumerate(args))
    new_kwargs = {k: resize(k, v) for k, v in kwargs.items()}
    return new_args, new_kwargs


def _fill(
    name: str, example: torch.Tensor, shape: tuple[int, ...], g: torch.Generator
) -> torch.Tensor:
    dtype = example.dtype
    if "mask" in name:
        if example.is_floating_point() and bool((example <= 0).all()):
            return torch.zeros(shape, dtype=dtype)  # additive mask: 0 = attend
        return torch.ones(shape, dtype=dtype)
    if "position" in name and not example.is_floating_point():
        positions = torch.arange(shape[1] if len(shape) > 1 else shape[0], dtype=dtype)
        return positions.expand(shape).contiguous()
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    if not example.is_floating_point():
        low, high = int(example.min()), int(example.max())
        return torch.randint(low, high + 1, shape, generator=g, dtype=dtype)
    mean, std = float(example.float().mean()), float(example.float().std())
    noise = torch.randn(shape, generator=g) * (std if std > 0 else 1.0) + mean
    return noise.to(dtype)


def default_make_inputs(
    args: tuple[Any, ...], kwargs: dict[str, Any], *, seed: int = 0
) -> MakeInputs:
    """A ``make_inputs(batch, length)`` that resizes the example (see the module docstring)."""
    if example_length(args, kwargs) is None:
        resize_inputs(args, kwargs, 1, 1)  # raises the explanatory BenchmarkError
    return lambda batch, length: resize_inputs(args, kwargs, batch, length, seed=seed)
