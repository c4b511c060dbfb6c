"""Forward time, throughput and peak memory of the kernel-attention family against SDPA (CPU).

For each sequence length N (batch 1, H heads of size d, float32, non-causal by default) and each
variant — ``F.scaled_dot_product_attention`` as the exact baseline, ``linear`` and the kernel
family, ``local`` (a sliding window of ``WINDOW``), and the *peers* a user would pick instead,
``performer-pytorch`` and lucidrains' ``local-attention``, set up to compute the same function
(our feature count; exact windows) — the script measures, eager and under ``torch.compile``
(Inductor, ``dynamic=False``, so one compilation per length):

- time: the median of ``--repeats`` forward passes after ``--warmup`` untimed ones (the first of
  which compiles), fewer repeats when one pass is slow (``--budget`` seconds per configuration);
  elapsed time by default, or with ``--clock cpu`` the worker's CPU time, which on a machine
  shared with other jobs leaves out their time slices (use it with ``--threads 1``);
- achieved GFLOP/s from an analytic count of the matrix products the algorithm performs
  (``flop_count``; for windows only the pairs of the pattern, 2w + 1 keys per query), and that as a
  fraction of this machine's float32 matmul rate, measured in the same run with the same threads
  (a large square ``torch.mm``);
- peak memory, from ``resource.getrusage(RUSAGE_SELF).ru_maxrss``. Every configuration runs in a
  fresh subprocess. After imports, inputs, compilation and warm-up, the worker releases freed heap
  memory (``malloc_trim``), resets the kernel's high-water mark of its resident set (writing 5 to
  ``/proc/self/clear_refs``, Linux ≥ 4.0, which ru_maxrss follows) and takes the resident set as
  the baseline; the figure is ru_maxrss after one more forward minus that baseline: the memory one
  forward needs beyond its inputs, the module and the compiled code (the output included). Where
  the reset is not possible the baseline is ru_maxrss after imports (then the figure includes
  inputs and, when compiled, the compiler's own memory); the table says which.

Workers run with glibc's allocator kept from returning memory to the system
(``MALLOC_MMAP_MAX_=0``, a large ``MALLOC_TRIM_THRESHOLD_``): otherwise every fresh multi-MiB
tensor is mmap'ed and page-faulted anew, which on small VMs costs more than the arithmetic and
drowns the comparison (caching allocators such as jemalloc behave like this setting).
``--system-malloc`` turns it off.

Usage::

    python benchmarks/kernel_variants.py                      # N = 1K..16K, all variants
    python benchmarks/kernel_variants.py --lengths 1024 4096 --variants linear performer sdpa
    python benchmarks/kernel_variants.py --json out.json --markdown table.md --threads 1 --clock cpu
    # the peer benchmark: ours against the libraries a user would pick (pip install -e '.[peers]')
    python benchmarks/kernel_variants.py --threads 1 --clock cpu --lengths 1024 4096 16384 \
        --variants sdpa linear performer performer-pytorch local local-attention [--causal]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KERNEL_VARIANTS = ("linear", "kernel", "performer", "rfa", "cosformer", "t2r", "hedgehog")
#: Sliding-window attention |i − j| <= WINDOW (ours; ``local-attention`` with exact windows).
WINDOW = 64
#: What a user would pick instead (``pip install performer-pytorch local-attention``), run with
#: the same definitions: Performer's FAVOR+ with our feature count, exact sliding windows.
PEERS = ("performer-pytorch", "local-attention")
ALL_VARIANTS = ("sdpa", *KERNEL_VARIANTS, "local", *PEERS)
#: ``autotune``: torch.compile(mode="max-autotune"), where Inductor also tries its C++ GEMM
#: templates (matrix products with the elementwise work around them fused in) against ATen's.
MODES = ("eager", "compile", "autotune")
DEFAULT_LENGTHS = (1024, 2048, 4096, 8192, 16384)
RESULT_TAG = "RESULT "
#: "wall": elapsed time. "cpu": CPU time of the worker process (all its threads) — on a machine
#: shared with other jobs it leaves out their time slices; single-threaded it is the uncontended
#: elapsed time, with more threads it also counts spin-waiting.
_CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


# -- FLOP model ---------------------------------------------------------------------------------


def feature_count(variant: str, dim: int) -> int:
    """Features m that reach the core (φ's output size) for head size ``dim``."""
    from attnrewrite.variants.base import default_num_features  # imports torch: workers only

    return {
        "linear": dim,
        "kernel": dim,
        "performer": default_num_features(dim),
        "performer-pytorch": default_num_features(dim),
        "rfa": 2 * default_num_features(dim),  # [sin, cos]
        "cosformer": 2 * dim,  # [relu·cos, relu·sin]
        "t2r": dim,
        "hedgehog": 2 * dim,  # softmax([Wx, -Wx])
    }[variant]


def flop_count(
    variant: str, length: int, heads: int, dim: int, causal: bool, chunk: int | None
) -> float:
    """Floating-point operations of the matrix products of one forward (2 per multiply-add).

    Elementwise work (exp, elu, sin/cos, normalisation) is not counted: the figure is how much of
    the machine's matmul rate the useful products reach.
    """
    if variant == "sdpa":
        return (2.0 if causal else 4.0) * heads * length * length * dim
    if variant in ("local", "local-attention"):
        # only the pairs of the pattern: 2w + 1 keys per query (w + 1 causal), edges excepted
        pairs = sum(
            min(length - 1, i + (0 if causal else WINDOW)) - max(0, i - WINDOW) + 1
            for i in range(length)
        )
        return 4.0 * heads * pairs * dim
    m = feature_count(variant, dim)
    projected = {
        "performer": m, "performer-pytorch": m, "rfa": m // 2, "t2r": m, "hedgehog": m // 2
    }.get(variant, 0)  # fmt: skip
    features = 2.0 * 2 * heads * length * dim * projected  # W·q and W·k
    if not causal or variant == "performer-pytorch":
        # φKᵀV, φQ·S, normaliser; performer-pytorch's causal form is a per-position prefix sum
        # of the m x d states, the same products
        core = 2.0 * heads * length * m * (2 * dim + 2)
    else:
        # chunked: scores and values inside each chunk, chunk states φKᵀV and their reading
        # φQ·S, the normaliser's key sums and their reading
        from attnrewrite.variants.kernel_core import default_chunk

        chunk = chunk or default_chunk(m)
        padded = max(math.ceil(length / chunk), 2) * chunk
        core = 2.0 * heads * padded * (chunk * (m + dim + 1) + 2 * m * dim + 2 * m)
    return features + core


# -- worker: one configuration in its own process -----------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> int | None:
    """Release free heap memory and reset the resident-set high-water mark; the new baseline (KiB).

    Returns None where the kernel does not allow the reset.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return None
    return _status_kib("VmRSS")


def _build(variant: str, heads: int, dim: int, causal: bool, seed: int):
    import torch.nn.functional as F

    from attnrewrite.site import AttentionSite, MaskClass
    from attnrewrite.variants import get_variant

    scale = dim**-0.5
    if variant == "sdpa":

        def attend(query, key, value):
            return F.scaled_dot_product_attention(query, key, value, is_causal=causal, scale=scale)

        return attend

    if variant in PEERS:
        return _build_peer(variant, dim, causal, seed)

    site = AttentionSite(
        name="bench",
        kind="sdpa",
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=dim,
        value_dim=dim,
        scale=scale,
        mask=MaskClass.CAUSAL if causal else MaskClass.NONE,
        causal=causal,
    )
    # The generic variant with a map that is not linear's elu + 1, so both are measured.
    options = {"feature_map": F.softplus} if variant == "kernel" else {}
    if variant == "local":
        options = {"window": WINDOW}
    module = get_variant(variant)(site, seed=seed, **options).eval()

    def attend(query, key, value):
        return module(query, key, value, causal=causal, scale=scale)

    return attend


def _build_peer(variant: str, dim: int, causal: bool, seed: int):
    """The library a user would pick instead, configured to compute what ours computes."""
    import importlib.util

    import torch

    package = {"performer-pytorch": "performer_pytorch", "local-attention": "local_attention"}
    if importlib.util.find_spec(package[variant]) is None:
        raise RuntimeError(f"{variant} is not installed: pip install -e '.[peers]'")
    torch.manual_seed(seed)
    if variant == "performer-pytorch":
        from performer_pytorch import FastAttention

        from attnrewrite.variants.base import default_num_features

        module = FastAttention(dim, nb_features=default_num_features(dim), causal=causal).eval()
        return lambda query, key, value: module(query, key, value)
    from local_attention import LocalAttention

    module = LocalAttention(
        window_size=WINDOW,
        causal=causal,
        look_backward=1,
        look_forward=0 if causal else 1,
        exact_windowsize=True,  # |i − j| <= w, as ours
        autopad=True,
        use_rotary_pos_emb=False,
        dim=dim,
    ).eval()
    return lambda query, key, value: module(query, key, value)


def run_worker(config: dict[str, Any]) -> dict[str, Any]:
    """Measure one (variant, length, mode) configuration; called in a fresh subprocess."""
    import torch

    import attnrewrite.variants  # noqa: F401  (imported before the baseline)

    after_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if config["threads"]:
        torch.set_num_threads(config["threads"])
    length, heads, dim, causal = config["length"], config["heads"], config["dim"], config["causal"]
    generator = torch.Generator().manual_seed(config["seed"])
    query, key, value = (torch.randn(1, heads, length, dim, generator=generator) for _ in range(3))
    attend = _build(config["variant"], heads, dim, causal, config["seed"])
    if config["mode"] in ("compile", "autotune"):
        mode = "max-autotune" if config["mode"] == "autotune" else None
        attend = torch.compile(attend, backend="inductor", dynamic=False, mode=mode)

    times: list[float] = []
    with torch.no_grad():
        start = time.perf_counter()
        attend(query, key, value)
        first_s = time.perf_counter() - start
        for _ in range(max(config["warmup"] - 1, 0)):
            attend(query, key, value)

        baseline = _reset_peak()
        attend(query, key, value)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_kib = peak - (baseline if baseline is not None else after_imports)

        clock = _CLOCKS[config["clock"]]
        start = clock()
        attend(query, key, value)
        one_s = clock() - start
        times.append(one_s)
        repeats = max(3, min(config["repeats"], int(config["budget"] / max(one_s, 1e-9))))
        for _ in range(repeats - 1):
            start = clock()
            attend(query, key, value)
            times.append(clock() - start)
    return {
        **config,
        "gflop": flop_count(config["variant"], length, heads, dim, causal, config["chunk"]) / 1e9,
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "repeats": len(times),
        "first_call_s": first_s,
        "peak_mib": peak_kib / 1024,
        "peak_baseline": "after warm-up" if baseline is not None else "after imports",
        "threads": torch.get_num_threads(),
    }


# -- driver ---------------------------------------------------------------------------------------


def measure_matmul_rate(config: dict[str, Any], repeats: int = 5) -> dict[str, Any]:
    """Median float32 GFLOP/s of an (n × n) @ (n × n) torch.mm (worker side)."""
    import torch

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    size = config["size"]
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    clock = _CLOCKS[config["clock"]]
    times = []
    for _ in range(repeats):
        start = clock()
        torch.mm(a, b)
        times.append(clock() - start)
    return {
        **config,
        "gflops": 2 * size**3 / statistics.median(times) / 1e9,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _worker_env(system_malloc: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if not system_malloc:
        env["MALLOC_MMAP_MAX_"] = "0"
        env["MALLOC_TRIM_THRESHOLD_"] = str(1 << 46)
    return env


def run_config(config: dict[str, Any], system_malloc: bool, timeout: float) -> dict[str, Any]:
    """Run one configuration in a subprocess; returns its result or an ``error`` entry."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)]
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_worker_env(system_malloc),
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {**config, "error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {**config, "error": f"exit {done.returncode}: {tail[0][:200]}"}


def annotate(results: list[dict[str, Any]], matmul_gflops: float) -> None:
    """Add GFLOP/s, the fraction of the matmul rate and the speed-up over SDPA (same N, mode)."""
    sdpa = {
        (r["length"], r["mode"]): r["median_ms"]
        for r in results
        if r["variant"] == "sdpa" and "error" not in r
    }
    for r in results:
        if "error" in r:
            continue
        r["gflops"] = r["gflop"] / (r["median_ms"] / 1e3)
        r["matmul_fraction"] = r["gflops"] / matmul_gflops
        baseline = sdpa.get((r["length"], r["mode"]))
        r["speedup_vs_sdpa"] = baseline / r["median_ms"] if baseline else None


def markdown(results: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Kernel-attention variants vs SDPA (CPU forward)",
        "",
        f"- machine: {meta['machine']}; torch {meta['torch']}; {meta['threads']} thread(s)",
        f"- float32 matmul rate (torch.mm {meta['matmul_size']}², same run): "
        f"**{meta['matmul_gflops']:.1f} GFLOP/s**",
        f"- batch 1, H = {meta['heads']}, d = {meta['dim']}, "
        f"{'causal' if meta['causal'] else 'non-causal'}, float32; time = median "
        f"{'process CPU time' if meta['clock'] == 'cpu' else 'elapsed time'} of the timed "
        "repeats after warm-up; torch.compile = Inductor, dynamic=False (compiled per length)",
        "- GFLOP/s counts the matrix products only (see `flop_count`); × SDPA = SDPA's time / "
        "this time, same length and mode",
        "- peak = ru_maxrss after one forward − resident set after warm-up (high-water mark "
        "reset), i.e. the forward's own memory incl. its output; allocator: "
        + ("system default" if meta["system_malloc"] else "glibc kept from unmapping (see script)"),
        f"- command: `{meta['command']}`",
        "",
        "| N | variant | mode | time (ms) | GFLOP/s | % of matmul | × SDPA | peak (MiB) |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        if "error" in r:
            row = f"| {r['length']} | {r['variant']} | {r['mode']} | {r['error']} | | | | |"
            lines.append(row)
            continue
        speedup = f"{r['speedup_vs_sdpa']:.1f}" if r.get("speedup_vs_sdpa") else "–"
        flag = "" if r["peak_baseline"] == "after warm-up" else " *"
        lines.append(
            f"| {r['length']} | {r['variant']} | {r['mode']} | {r['median_ms']:.1f} "
            f"| {r['gflops']:.1f} | {100 * r['matmul_fraction']:.0f}% | {speedup} "
            f"| {r['peak_mib']:.0f}{flag} |"
        )
    if any(r.get("peak_baseline") == "after imports" for r in results):
        lines.append("")
        lines.append("\\* peak measured against the resident set after imports (no reset).")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=list(DEFAULT_LENGTHS))
    parser.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS), choices=ALL_VARIANTS)
    parser.add_argument("--modes", nargs="+", default=["eager", "compile"], choices=MODES)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true", help="causal attention (default: not)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats (at most)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls (the first compiles)")
    parser.add_argument(
        "--budget", type=float, default=20.0, help="seconds of timed calls per configuration"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument(
        "--clock",
        choices=sorted(_CLOCKS),
        default="wall",
        help="what a time is: elapsed (wall) or process CPU time (cpu; for --threads 1 on a "
        "machine shared with other jobs)",
    )
    parser.add_argument(
        "--max-sdpa-length", type=int, default=None, help="skip SDPA above this length"
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="per configuration, seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--system-malloc", action="store_true", help="keep glibc's defaults")
    parser.add_argument("--json", type=Path, help="write all results and metadata as JSON here")
    parser.add_argument("--markdown", type=Path, help="also write the Markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        config = json.loads(args.worker)
        measure = measure_matmul_rate if config["variant"] == "matmul" else run_worker
        print(RESULT_TAG + json.dumps(measure(config)), flush=True)
        return

    # The driver never imports torch and measures everything in fresh subprocesses: on Linux
    # ru_maxrss also holds the peak of the image a process was exec'ed from, so a driver that had
    # grown large would set a floor under every worker's figure.
    matmul = run_config(
        {"variant": "matmul", "size": 4096, "threads": args.threads, "clock": args.clock},
        args.system_malloc,
        600,
    )
    if "error" in matmul:
        raise SystemExit(f"could not measure the matmul rate: {matmul['error']}")
    results = []
    for length in args.lengths:
        for variant in args.variants:
            if variant == "sdpa" and args.max_sdpa_length and length > args.max_sdpa_length:
                continue
            for mode in args.modes:
                config = {
                    "variant": variant,
                    "length": length,
                    "mode": mode,
                    "heads": args.heads,
                    "dim": args.dim,
                    "causal": args.causal,
                    "repeats": args.repeats,
                    "warmup": max(args.warmup, 1),
                    "budget": args.budget,
                    "threads": args.threads,
                    "seed": args.seed,
                    "clock": args.clock,
                    "chunk": None,  # the variants' default: kernel_core.default_chunk(m)
                }
                result = run_config(config, args.system_malloc, args.timeout)
                results.append(result)
                shown = result.get("error") or f"{result['median_ms']:.1f} ms"
                print(f"# {length:>6} {variant:<10} {mode:<8} {shown}", file=sys.stderr)
    annotate(results, matmul["gflops"])
    meta = {
        "machine": f"{_cpu_name()}, {os.cpu_count()} CPUs",
        "torch": matmul["torch"],
        "threads": matmul["threads"],
        "matmul_size": matmul["size"],
        "matmul_gflops": matmul["gflops"],
        "heads": args.heads,
        "dim": args.dim,
        "causal": args.causal,
        "system_malloc": args.system_malloc,
        "clock": args.clock,
        "command": " ".join(["python benchmarks/kernel_variants.py", *(argv or sys.argv[1:])]),
    }
    table = markdown(results, meta)
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
