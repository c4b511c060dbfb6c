"""Time and peak memory of the structural variants against ``F.scaled_dot_product_attention``.

For each sequence length N (batch 1, H heads of dimension d, float32, inference mode, non-causal
self-attention: Linformer and Nyström are not causal) one fresh subprocess per (variant, N)
builds the inputs and the variant, runs a warm-up call at a short length, then measures

- peak memory: ``ru_maxrss`` after one forward call at N minus ``ru_maxrss`` just before it. The
  baseline already holds the interpreter, torch, the inputs, the parameters and the thread pools,
  so the difference is what the forward adds (its intermediates and its output). ``ru_maxrss`` is
  a high-water mark of resident memory (KiB on Linux): it counts what the allocator really touched,
  whatever tensors are views. Two Linux details make it usable: the child lowers the mark to the
  current resident size just before the call (``/proc/self/clear_refs``, Linux >= 4.0), otherwise
  importing torch leaves it above any small forward; and the parent never computes (it only starts
  children), because a child's ``ru_maxrss`` also starts at the parent's high-water mark (exec
  records the mark of the forked image), which would hide every forward below it;
- time: the median of ``--repeats`` forward calls after one warm-up call at N.

It then fits log(peak memory) against log(N) by least squares: the slope is ~1 for memory linear in
N (local, Longformer, BigBird, Linformer, Nyström, the hedgehog+window hybrid; fused SDPA on CPU
too) and ~1.5 for the Sparse Transformer patterns with stride/block l ≈ √N. The Synthesizer is left
out by default: its ``random`` logits alone are H·max_len² parameters (O(N²) by design).

Usage:
    python benchmarks/structural_variants.py   # N = 1K ... 16K, Markdown to stdout
    python benchmarks/structural_variants.py --lengths 1024 4096 --output results.md
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# Run from a checkout without installing the package (the memory children import it too).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = [
    "sdpa",
    "local",
    "sparse_strided",
    "sparse_fixed",
    "longformer",
    "bigbird",
    "linformer",
    "nystrom",
    "hedgehog+window",
    # Issue 16.
    "reformer",
    "routing",
    "sinkhorn",
    "set_transformer",
    "memory_compressed",
    "axial",
    "transformer_xl",
]
#: Configurations benchmarked under a label: label -> registered variant (options below).
LABELLED = {"hedgehog+window": "hedgehog"}
#: Expected memory slope per variant (log-log), for the summary table.
EXPECTED_SLOPE = {
    "sparse_strided": 1.5,
    "sparse_fixed": 1.5,
    "axial": 1.5,  # rows and columns of a ≈ √N-wide grid
    "memory_compressed": 2.0,  # N x N/k scores by design
}


def variant_options(name: str, length: int) -> dict:
    """The options benchmarked at length N (Child et al.'s l ≈ √N for the strided patterns)."""
    root = max(1, round(math.sqrt(length)))
    return {
        "local": {"window": 64},
        "sparse_strided": {"stride": root},
        "sparse_fixed": {"block": root, "num_summary": 1},
        "longformer": {"window": 64, "global_tokens": 16},
        "bigbird": {"window": 64, "global_tokens": 64, "num_random": 3, "block_size": 64},
        "linformer": {"k": 256, "max_len": length},
        "nystrom": {"num_landmarks": 64},
        # The LoLCATs hybrid: Longformer's exact window and global tokens, Hedgehog elsewhere.
        "hedgehog+window": {"window": 64, "global_tokens": 16},
        # Reformer: n_b ≈ N/64 buckets (the paper's choice, the site's length); routing: √N
        # clusters (Roy et al.); axial: a grid ⌈√N⌉ wide (the default from the site's length).
        "reformer": {"bucket_size": 64, "num_hashes": 2},
        "routing": {"chunk_size": 64},
        "sinkhorn": {"block_size": 64},
        "set_transformer": {"num_inducing": 64},
        "memory_compressed": {"stride": 8},
        "transformer_xl": {"segment": 64},
    }.get(name, {})


def make_attention(name: str, length: int, heads: int, head_dim: int) -> Callable:
    """A callable (query, key, value) -> output for ``name``, built for sequences of ``length``."""
    scale = head_dim**-0.5
    if name == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=scale)
    from attnrewrite.site import AttentionSite, MaskClass
    from attnrewrite.variants import get_variant

    site = AttentionSite(
        name="bench.attn",
        kind="sdpa",
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=head_dim,
        value_dim=head_dim,
        scale=scale,
        mask=MaskClass.NONE,
        causal=False,
        query_len=length,
        key_len=length,
    )
    variant = get_variant(LABELLED.get(name, name))
    module = variant(site, seed=0, **variant_options(name, length)).eval()
    return lambda q, k, v: module(q, k, v, scale=scale)


def make_inputs(batch: int, heads: int, length: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return tuple(torch.randn(batch, heads, length, head_dim, generator=gen) for _ in range(3))


def max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_max_rss() -> None:
    """Lower the high-water mark to the current resident size (Linux: write 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def resident_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def measure_child(args: argparse.Namespace) -> None:
    """In a fresh process: print the memory one forward call at N adds, then its median time."""
    torch.set_num_threads(args.threads)
    attention = make_attention(args.child, args.length, args.heads, args.head_dim)
    inputs = make_inputs(args.batch, args.heads, args.length, args.head_dim)
    warm = min(args.length, 256)
    with torch.inference_mode():
        attention(*(t[:, :, :warm] for t in inputs))
        reset_max_rss()
        baseline = max_rss_mib()
        if baseline > resident_mib() + 1:
            raise RuntimeError(
                f"ru_maxrss starts at {baseline:.0f} MiB, above the resident {resident_mib():.0f} "
                "MiB: it carries a parent's high-water mark; start this from a small process"
            )
        attention(*inputs)
        peak = max_rss_mib()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            attention(*inputs)
            times.append(time.perf_counter() - start)
    print(json.dumps({"peak_mib": peak - baseline, "seconds": statistics.median(times)}))


def measure(args: argparse.Namespace, name: str, length: int) -> tuple[float, float]:
    """(median seconds, peak MiB) of one cell, measured in a fresh subprocess."""
    command = [sys.executable, __file__, "--child", name, "--length", str(length)]
    for flag in ("heads", "head_dim", "batch", "threads", "repeats"):
        command += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    cell = json.loads(result.stdout.strip().splitlines()[-1])
    return cell["seconds"], cell["peak_mib"]


def log_log_slope(lengths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(N); NaN if fewer than two positive points."""
    points = [(math.log(n), math.log(v)) for n, v in zip(lengths, values, strict=True) if v > 0]
    if len(points) < 2:
        return float("nan")
    mean_x = statistics.fmean(x for x, _ in points)
    mean_y = statistics.fmean(y for _, y in points)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in points)
    return cov / sum((x - mean_x) ** 2 for x, _ in points)


def run(args: argparse.Namespace) -> str:
    rows: dict[str, dict[int, tuple[float, float]]] = {}
    for name in args.variants:
        rows[name] = {}
        for length in args.lengths:
            seconds, memory = measure(args, name, length)
            rows[name][length] = (seconds, memory)
            print(
                f"{name:15s} N={length:6d} {seconds * 1e3:10.1f} ms {memory:9.1f} MiB",
                file=sys.stderr,
            )
    return to_markdown(args, rows)


def to_markdown(args: argparse.Namespace, rows: dict[str, dict[int, tuple[float, float]]]) -> str:
    lengths = args.lengths
    lines = [
        "# Structural variants vs scaled_dot_product_attention",
        "",
        f"Batch {args.batch}, {args.heads} heads, head dim {args.head_dim}, float32, non-causal "
        f"self-attention, CPU ({args.threads} threads), torch {torch.__version__}. Time: median "
        f"of {args.repeats} calls after a warm-up. Memory: peak RSS one forward call adds "
        "(ru_maxrss after minus before, high-water mark reset just before; fresh subprocess per "
        "cell, after a short warm-up call).",
        "",
        "Options: "
        + "; ".join(
            f"{name} {variant_options(name, 4096)}" for name in args.variants if name != "sdpa"
        )
        + " (strided/fixed: l = round(√N), shown for N = 4096).",
        "",
        "| variant | " + " | ".join(f"N={n}" for n in lengths) + " |",
        "|---|" + "---|" * len(lengths),
    ]
    for name, cells in rows.items():
        shown = [f"{cells[n][0] * 1e3:.1f} ms / {cells[n][1]:.0f} MiB" for n in lengths]
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    lines += [
        "",
        "Log-log slopes over N (least squares): memory ~1 means linear in N, ~1.5 is N·√N, "
        "2 would be quadratic.",
        "",
        "| variant | memory slope | expected | time slope |",
        "|---|---|---|---|",
    ]
    for name, cells in rows.items():
        memory = log_log_slope(lengths, [cells[n][1] for n in lengths])
        seconds = log_log_slope(lengths, [cells[n][0] for n in lengths])
        expected = EXPECTED_SLOPE.get(name, 1.0)
        lines.append(f"| {name} | {memory:.2f} | {expected:g} | {seconds:.2f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--variants", nargs="+", default=VARIANTS)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    # Internal: measure one cell's memory in this (fresh) process.
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        measure_child(args)
        return
    report = run(args)
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)


if __name__ == "__main__":
    main()
