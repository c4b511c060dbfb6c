"""Convert a trained decoder to linear-time attention and measure what it costs in perplexity.

The decoder is the byte-level Llama of :mod:`attnrewrite.bench.byte_lm` (≈10M parameters,
context 1024, trained on the Python standard library's source by
``benchmarks/train_byte_lm.py``; no pretrained decoder can be downloaded here). For each variant
this prints the held-out perplexity at context 1024:

1. the original model;
2. rewritten, uncalibrated;
3. after ``attnrewrite.calibrate`` with the per-site step and the end-to-end step on the
   next-token KL, within ``--minutes``;
4. after the LoRA stage (adapters of ``--lora-rank`` on the attention projections), within
   ``--lora-minutes``.

Run (writes ``benchmarks/results/calibration_decoder.{md,json}``)::

    python examples/calibrate_decoder.py --variants t2r hedgehog hedgehog+window64 local

Calibration throughput with one and two processes (``torch.distributed``, gloo; tokens/s of each
stage, printed by rank 0)::

    torchrun --nproc_per_node 1 examples/calibrate_decoder.py --throughput
    torchrun --nproc_per_node 2 examples/calibrate_decoder.py --throughput
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

import attnrewrite as ar
from attnrewrite.bench import byte_lm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

#: Variant name in the table -> (registry name, options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "t2r": ("t2r", {}),
    "hedgehog": ("hedgehog", {"feature_dim": 64}),
    "hedgehog+window64": ("hedgehog", {"feature_dim": 64, "window": 64}),
    "local": ("local", {"window": 64}),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--minutes", type=float, default=5.0, help="per-site + end-to-end budget")
    parser.add_argument("--lora-minutes", type=float, default=2.0, help="LoRA stage budget")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--batches", type=int, default=8, help="calibration batches of 2 windows")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--eval-windows", type=int, default=32, help="held-out windows")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--train-minutes", type=float, default=20.0, help="as trained")
    parser.add_argument("--throughput", action="store_true", help="tokens/s of calibration")
    parser.add_argument("--throughput-steps", type=int, default=20)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args()


def windows(
    data: torch.Tensor, count: int, context: int, seed: int, per_batch: int = 2
) -> list[torch.Tensor]:
    """``count`` batches of ``per_batch`` random windows (capture needs a batch of 2 or more to
    keep the batch axis dynamic)."""
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - context, (count, per_batch), generator=generator)
    return [torch.stack([data[s : s + context] for s in row]).long() for row in starts.tolist()]


def trained_model(args: argparse.Namespace) -> Any:
    return byte_lm.load_or_train("small", minutes=args.train_minutes, progress=False)


def run_variant(
    name: str, model: Any, batches: list[torch.Tensor], heldout: torch.Tensor, args
) -> dict[str, Any]:
    variant, options = VARIANTS[name]

    def ppl(m: Any) -> float:
        return byte_lm.perplexity(m, heldout, context=args.context, windows=args.eval_windows)

    rw = ar.rewrite(model, variant, kwargs={"input_ids": batches[0]}, seed=0, **options)
    row: dict[str, Any] = {"variant": name, "options": options, "uncalibrated": ppl(rw)}
    trainable = any(p.requires_grad for m in rw.variant_modules.values() for p in m.parameters())
    progress = not args.no_progress
    if trainable:
        started = time.perf_counter()
        result = ar.calibrate(
            rw,
            batches,
            end_to_end=True,
            max_seconds=args.minutes * 60,
            progress=progress,
        )
        row["calibration_seconds"] = time.perf_counter() - started
        row["calibrated"] = ppl(rw)
        row["calibration"] = result.to_dict()
    started = time.perf_counter()
    result = ar.calibrate(
        rw,
        batches,
        steps=0,
        lora_rank=args.lora_rank,
        lora_steps=10_000,
        max_seconds=args.lora_minutes * 60,
        progress=progress,
    )
    row["lora_seconds"] = time.perf_counter() - started
    row["lora"] = ppl(rw)
    row["lora_result"] = result.to_dict()
    return row


def table(original: float, rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def cell(value: float | None) -> str:
        if value is None:
            return "–"
        return f"{value:.3f} ({100 * (value / original - 1):+.1f}%)"

    lines = [
        f"| variant | uncalibrated | per-site + end-to-end ({args.minutes:g} min) | "
        f"+ LoRA r={args.lora_rank} ({args.lora_minutes:g} min) |",
        "|---|---|---|---|",
        f"| original (softmax) | {original:.3f} | | |",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {cell(r['uncalibrated'])} | {cell(r.get('calibrated'))} | "
            f"{cell(r['lora'])} |"
        )
    return "\n".join(lines)


def perplexity_table(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    lm = trained_model(args)
    train, heldout = byte_lm.corpus()
    batches = windows(train, args.batches, args.context, seed=1)
    original = byte_lm.perplexity(
        lm.model, heldout, context=args.context, windows=args.eval_windows
    )
    print(f"original held-out perplexity at {args.context}: {original:.3f}", flush=True)
    rows = []
    for name in args.variants:
        rows.append(run_variant(name, lm.model, batches, heldout, args))
        print(table(original, rows, args), flush=True)
    command = "python examples/calibrate_decoder.py " + " ".join(sys.argv[1:])
    md = "\n".join(
        [
            "# Calibrating the byte-level decoder (issue 17)",
            "",
            f"Command: `{command}` ({platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), torch {torch.__version__}, "
            f"{datetime.datetime.now().isoformat(timespec='seconds')}).",
            "",
            f"Held-out perplexity (bytes) at context {args.context}, {args.eval_windows} windows "
            f"of held-out standard-library files; calibration on {args.batches} batches of 2 "
            f"windows of {args.context} training bytes. Model: {lm.record.get('parameters', '?')} "
            f"parameters, trained {lm.record.get('train_seconds', 0) / 60:.1f} min on "
            f"{lm.record.get('tokens', 0):,} bytes (held-out perplexity "
            f"{lm.record.get('heldout_perplexity', float('nan')):.3f} on its own 64 windows).",
            "",
            table(original, rows, args),
            "",
        ]
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "calibration_decoder.md").write_text(md)
    (RESULTS / "calibration_decoder.json").write_text(
        json.dumps({"original": original, "rows": rows, "argv": sys.argv[1:]}, indent=2) + "\n"
    )
    print(md)


def throughput(args: argparse.Namespace) -> None:
    """Tokens per second of each calibration stage, one process or several (torchrun)."""
    import torch.distributed as dist

    if "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.set_num_threads(args.threads)
    lm = trained_model(args)
    train, _ = byte_lm.corpus()
    # The same global batches whatever the number of processes: 4 windows per global batch.
    batches = windows(train, 4, args.context, seed=1)
    variant, options = VARIANTS["hedgehog+window64"]
    rw = ar.rewrite(lm.model, variant, kwargs={"input_ids": batches[0]}, seed=0, **options)
    per_global = [torch.cat(batches[k : k + 2]) for k in range(0, 4, 2)]
    mine = per_global if world == 1 else batches
    steps = args.throughput_steps
    result = ar.calibrate(rw, mine, steps=steps, end_to_end=steps, progress=False)
    tokens = steps * 4 * args.context
    site_seconds = sum(r.seconds for r in result.rows)
    if world == 1 or dist.get_rank() == 0:
        print(
            json.dumps(
                {
                    "processes": world,
                    "threads_per_process": args.threads,
                    "per_site_tokens_per_s": tokens / site_seconds,
                    "end_to_end_tokens_per_s": tokens / result.end_to_end.seconds,
                    "global_batch_tokens": 4 * args.context,
                    "steps": steps,
                }
            )
        )
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    arguments = parse_args()
    throughput(arguments) if arguments.throughput else perplexity_table(arguments)
