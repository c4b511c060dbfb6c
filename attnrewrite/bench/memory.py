"""Peak resident memory of one forward call, measured inside a dedicated worker process.

What is measured: the high-water mark of the process's resident set during the measured call
minus the resident set just before it — the memory the call adds on top of the loaded (and
compiled) model and its inputs: intermediates, workspace and outputs. Why this and not something
else:

- ``tracemalloc`` sees only Python-level allocations, not torch's C++ tensor storage; torch's CPU
  allocator keeps no statistics (``torch.cuda.max_memory_allocated`` has no CPU twin). The kernel's
  accounting of resident pages counts every allocator (torch, oneDNN, OpenMP, ONNX Runtime's
  arena) alike.
- The high-water mark is per process and cannot be lowered by ``getrusage``, so each
  configuration runs in a fresh process (one worker per (length, backend, variant)): one
  configuration's peak never hides another's.
- Before the measured call the worker runs a warm-up call (Inductor compiles there), then
  ``gc.collect()`` and glibc ``malloc_trim(0)`` so that memory freed by the warm-up is given back
  to the kernel instead of sitting in malloc's free lists (where the measured call would reuse it
  without raising the resident set, and read ~0). Then it resets the high-water mark to the current
  resident size (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and reads ``VmHWM`` after the
  call. ONNX Runtime keeps what its memory arena grew to, so for it the worker measures the first
  run after the session is created instead of a post-warm-up run.
- Without ``/proc`` (macOS), it falls back to ``ru_maxrss`` after the call minus the resident size
  before it, which over-reads when import-time peaks exceed the call's; the method is recorded.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import resource
import sys
from collections.abc import Callable
from typing import Any

_MIB = 1024.0 * 1024.0


@dataclasses.dataclass(frozen=True)
class MemoryMeasurement:
    """Peak memory of one call, in MiB: ``peak_mb`` = high-water mark - ``baseline_mb``."""

    peak_mb: float
    baseline_mb: float
    method: str


def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def resident_mb() -> float:
    """Current resident set size in MiB."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib / 1024.0
    # ru_maxrss is in bytes on macOS, KiB on Linux; without /proc this is the best available.
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / _MIB if sys.platform == "darwin" else maxrss / 1024.0


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def release_free_memory() -> None:
    """Collect garbage and hand malloc's free lists back to the kernel (glibc only)."""
    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return
    try:
        libc = ctypes.CDLL(libc_name)
        trim = getattr(libc, "malloc_trim", None)
        if trim is not None:
            trim(0)
    except OSError:
        pass


def measure_peak(call: Callable[[], Any]) -> tuple[MemoryMeasurement, Any]:
    """Run ``call()`` once and measure the resident memory it adds at its peak."""
    release_free_memory()
    baseline = resident_mb()
    if _reset_high_water_mark():
        result = call()
        high = (_status_kib("VmHWM") or 0.0) / 1024.0
        method = "VmHWM after clear_refs"
    else:
        result = call()
        high = resident_mb() if sys.platform != "linux" else 0.0
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        high = max(high, maxrss / _MIB if sys.platform == "darwin" else maxrss / 1024.0)
        method = "ru_maxrss"
    return MemoryMeasurement(max(0.0, high - baseline), baseline, method), result
