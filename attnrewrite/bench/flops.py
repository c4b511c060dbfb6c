"""FLOP counts with ``torch.utils.flop_counter.FlopCounterMode``.

The counter follows torch's convention: a multiply-add is 2 FLOPs and only matrix products are
counted (``mm``, ``bmm``, ``addmm``, convolutions, fused attention); elementwise work (softmax, exp,
feature maps, normalisation) is not. Fused attention counts the full N x N products even when
causal (torch's formula does not halve them), so a causal original is counted as dense.

torch registers formulas for the CUDA fused attention kernels only; on CPU,
``scaled_dot_product_attention`` dispatches to ``_scaled_dot_product_flash_attention_for_cpu``,
which would count 0. We add that op with torch's own ``sdpa_flop_count``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

_aten = torch.ops.aten


def _cpu_sdpa(
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward(
    grad_out_shape: Any,
    query_shape: Any,
    key_shape: Any,
    value_shape: Any,
    *args: Any,
    out_shape: Any = None,
    **kwargs: Any,
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _custom_mapping() -> dict[Any, Callable[..., int]]:
    mapping: dict[Any, Callable[..., int]] = {}
    if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa
    if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward
    return mapping


def flop_counter() -> FlopCounterMode:
    """A silent ``FlopCounterMode`` that also counts CPU fused attention."""
    return FlopCounterMode(display=False, custom_mapping=_custom_mapping())


def count_flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run ``fn()`` once under the counter; return (total FLOPs, ``fn``'s result)."""
    with flop_counter() as counter:
        result = fn()
    return int(counter.get_total_flops()), result
