"""Train (or load) the byte-level decoder language model that rewritten decoders are judged on
(issue 17).

No pretrained decoder can be downloaded here, so the project trains one: a Llama-shaped
``LlamaForCausalLM`` over the 256 byte values, on the Python standard library's source
(:mod:`attnrewrite.bench.byte_lm`). The run is cached outside the repository
(``~/.cache/attnrewrite/byte_lm/<size>-<hash>/``: ``model.pt`` and ``record.json``), and the
summary — parameters, context, bytes seen, time, train loss, held-out perplexity and bits per
byte at the full context, the command, CPU, versions, date — is printed and written to
``benchmarks/results/byte_lm.md`` (``byte_lm_<size>.md`` for other sizes).

``--minutes`` is the whole run's budget, training plus the held-out evaluation (whose cost is
measured first and kept back). On a machine shared with other jobs, ``--clock cpu`` makes the
budget count this process's CPU time instead of elapsed time, so it buys the same work.

Usage::

    python benchmarks/train_byte_lm.py --size small --minutes 20 --threads 1   # train, cache
    python benchmarks/train_byte_lm.py --size small --minutes 20 --reuse       # load the cache
    python benchmarks/train_byte_lm.py --size tiny                              # seconds
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attnrewrite.bench import byte_lm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def describe_phases(phases: list[dict[str, Any]]) -> str:
    """``256 bytes × 4 until 75%, then 1024 × 1`` from the recipe's phases."""
    parts = []
    start = 0.0
    for phase in phases:
        parts.append(
            f"{phase['context']} × {phase['batch_size']} windows per step "
            f"({start:.0%}–{phase['until']:.0%} of the budget)"
        )
        start = phase["until"]
    return "; ".join(parts)


def summary(record: dict[str, Any], command: str, trained: bool) -> list[str]:
    """The results file's lines."""
    config = record["config"]
    recipe = record["recipe"]
    budget = record["budget"]
    heads = f"{config['num_attention_heads']} heads / {config['num_key_value_heads']} KV heads"
    shape = (
        f"hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, {heads}, "
        f"MLP {config['intermediate_size']}, "
        f"{'tied' if config.get('tie_word_embeddings') else 'untied'} embeddings, vocabulary 256"
    )
    corpus = record["corpus"]
    if budget["minutes"] is not None:
        budget_text = (
            f"{budget['minutes']:g} minutes ({budget['clock']} clock) including evaluation"
        )
    else:
        budget_text = f"{budget['steps']} steps"
    load = record.get("load_average")
    threads = f"{record['threads']}"
    if record["threads"] == 1:
        threads += " (another job shares this 2-core machine, so the full run keeps to one)"
    if load:
        threads += f"; load average at the end {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}"
    rows = [
        ("parameters", f"{record['parameters'] / 1e6:.2f}M ({shape})"),
        (
            "context",
            f"{record['heldout_context']} (max positions {config['max_position_embeddings']}); "
            f"training curriculum: {describe_phases(recipe['phases'])}",
        ),
        (
            "corpus",
            f"{corpus['source']}: {corpus['train_bytes'] / 1e6:.2f} MB training, "
            f"{corpus['heldout_bytes'] / 1e6:.2f} MB held out (~5% of files, by path hash)",
        ),
        (
            "optimizer",
            f"AdamW, peak lr {recipe['lr']:g}, {recipe['warmup_steps']} warm-up steps, cosine "
            "to 1/10, weight decay 0.1, clip 1.0",
        ),
        ("budget", budget_text),
        ("steps", f"{record['steps']:,}"),
        ("tokens seen (bytes)", f"{record['tokens']:,} ({record['tokens'] / 1e6:.2f}M)"),
        (
            "training time",
            f"{record['train_seconds'] / 60:.1f} min wall, "
            f"{record['train_cpu_seconds'] / 60:.1f} min CPU "
            f"({record['tokens'] / record['train_seconds']:,.0f} bytes/s)",
        ),
        ("whole run", f"{record['total_seconds'] / 60:.1f} min (evaluation included)"),
        ("train loss", f"{record['train_loss']:.3f} nats/byte (mean of the last 20 steps)"),
        (
            f"held-out perplexity @{record['heldout_context']}",
            f"{record['heldout_perplexity']:.3f} ({record['heldout_windows']} windows of "
            f"{record['heldout_context']} bytes, seed {record['seed']}; uniform is 256)",
        ),
        ("held-out bits per byte", f"{math.log2(record['heldout_perplexity']):.3f}"),
        ("threads", threads),
        ("CPU", record["cpu"]),
        (
            "versions",
            f"torch {record['torch']}, transformers {record['transformers']}, "
            f"Python {record['python']}",
        ),
        ("date", record["date"]),
        ("cache", f"`{record['cache']}`"),
    ]
    origin = "trained by this command" if trained else "loaded from the cache (trained earlier)"
    lines = [
        f"# Byte-level decoder language model: `{record['size']}`",
        "",
        f"Command: `{command}` — model {origin}.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {name} | {value} |" for name, value in rows],
        "",
        "Load it with `attnrewrite.bench.byte_lm.load_or_train("
        f'"{record["size"]}"{_budget_kwargs(budget)}{_cache_kwarg(record)})` (the same '
        "arguments find the same cache).",
    ]
    return lines


def _cache_kwarg(record: dict[str, Any]) -> str:
    parent = Path(record["cache"]).parent
    return "" if parent == byte_lm.default_cache_dir() else f', cache_dir="{parent}"'


def _budget_kwargs(budget: dict[str, Any]) -> str:
    if budget["minutes"] is not None:
        text = f", minutes={budget['minutes']:g}"
        return text + (f', clock="{budget["clock"]}"' if budget["clock"] != "wall" else "")
    return f", steps={budget['steps']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(byte_lm.SIZES), default="small")
    parser.add_argument(
        "--minutes", type=float, help="whole-run budget (default: the size's, 20 for small)"
    )
    parser.add_argument("--steps", type=int, help="a step budget instead (default for tiny)")
    parser.add_argument("--clock", choices=sorted(byte_lm.CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-bytes", type=int, help="cap on each corpus split (quick runs)")
    parser.add_argument("--eval-windows", type=int, help="held-out windows (default: the size's)")
    parser.add_argument("--cache-dir", help="default: ~/.cache/attnrewrite/byte_lm")
    parser.add_argument("--reuse", action="store_true", help="load the cached model if present")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", help="results file (default: benchmarks/results/byte_lm.md)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    result = byte_lm.load_or_train(
        args.size,
        cache_dir=args.cache_dir,
        steps=args.steps,
        minutes=args.minutes,
        clock=args.clock,
        seed=args.seed,
        max_bytes=args.max_bytes,
        eval_windows=args.eval_windows,
        retrain=not args.reuse,
        progress=not args.no_progress,
    )
    command = "python benchmarks/train_byte_lm.py " + " ".join(sys.argv[1:])
    lines = summary(result.record, command, result.trained)
    name = "byte_lm.md" if args.size == "small" else f"byte_lm_{args.size}.md"
    out = Path(args.out) if args.out else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
