"""Long Range Arena efficiency benchmark (Tay et al. 2021, arXiv:2011.04006, Table 2), on CPU.

The model is LRA's byte-level text-classification Transformer: vocabulary 256 (bytes), 4 layers,
embedding 256, 4 heads, MLP 1024, learned position embeddings, pre-LayerNorm blocks, mean pooling
and a two-layer classifier (as in the LRA repository's text config). It is a plain ``nn.Module``
whose attention is ``F.scaled_dot_product_attention`` — the honest baseline: PyTorch's fused
kernel, not a hand-written matmul/softmax/matmul (``--baseline manual`` makes that spelling the
original; the ``softmax_manual`` row, a rewrite registered here, times it next to SDPA instead).
Every variant is obtained by ``attnrewrite.rewrite`` of that same model, with random weights.

Measured, for each N, in one run and side by side (``attnrewrite.benchmark``: round-robin timing):
forward-only inference steps per second (LRA's Table 2 counts training steps; forward+backward is
not measured here) and the peak memory one forward call adds, in a separate process per
configuration. Rows = variants, columns = lengths; softmax (SDPA) in absolute units, every other
variant relative to it, per backend (eager, Inductor, ONNX Runtime when available).

Usage (the full run; see BENCHMARKS.md for its duration)::

    python benchmarks/lra_efficiency.py --lengths 1024 2048 3072 4096 8192 \\
        --backends eager inductor onnxruntime --update-benchmarks-md

The survey variants of issue 16, in their own results files and BENCHMARKS.md block (``--name``)::

    python benchmarks/lra_efficiency.py --lengths 1024 2048 4096 \\
        --variants softmax_manual reformer routing sinkhorn set_transformer memory_compressed \\
        axial transformer_xl --backends eager inductor onnxruntime --threads 1 \\
        --name lra_efficiency_survey --heading "Survey variants (issue 16)" --update-benchmarks-md

A quick check::

    python benchmarks/lra_efficiency.py --lengths 1024 2048 --variants linear local \\
        --backends eager inductor --repeats 3
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import attnrewrite  # noqa: E402
from attnrewrite.site import ALL_MASK_CLASSES  # noqa: E402
from attnrewrite.variants.base import AttentionVariant, combine_mask, repeat_kv  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
#: The results stem of the main table; other runs (``--name``) get their own marked block.
MAIN_NAME = "lra_efficiency"
MAIN_HEADING = "## LRA efficiency (issue 6)"

#: LRA text config (lra_benchmarks/text_classification/configs/base_tc_config.py).
VOCAB, EMBED, HEADS, LAYERS, MLP, CLASSES = 256, 256, 4, 4, 1024, 2
MAX_LEN = 16384


class SelfAttention(nn.Module):
    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.qkv = nn.Linear(EMBED, 3 * EMBED)
        self.out = nn.Linear(EMBED, EMBED)
        self.manual = manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        query, key, value = (
            self.qkv(x).view(batch, length, 3, HEADS, EMBED // HEADS).permute(2, 0, 3, 1, 4)
        )
        if self.manual:
            scores = query @ key.transpose(-2, -1) / math.sqrt(EMBED // HEADS)
            context = scores.softmax(-1) @ value
        else:
            context = F.scaled_dot_product_attention(query, key, value)
        return self.out(context.transpose(1, 2).reshape(batch, length, EMBED))


class Block(nn.Module):
    def __init__(self, manual: bool) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(EMBED), nn.LayerNorm(EMBED)
        self.attention = SelfAttention(manual)
        self.mlp = nn.Sequential(nn.Linear(EMBED, MLP), nn.GELU(), nn.Linear(MLP, EMBED))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class LRATextClassifier(nn.Module):
    """LRA byte-level text classifier: embeddings, 4 pre-LN blocks, mean pool, MLP head."""

    def __init__(self, manual: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.position = nn.Parameter(torch.randn(MAX_LEN, EMBED) * 0.02)
        self.blocks = nn.ModuleList(Block(manual) for _ in range(LAYERS))
        self.norm = nn.LayerNorm(EMBED)
        self.head = nn.Sequential(nn.Linear(EMBED, MLP), nn.ReLU(), nn.Linear(MLP, CLASSES))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.position[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(1))


class ManualSoftmaxAttention(AttentionVariant):
    """Exact softmax attention spelled as matmul, softmax, matmul (Vaswani et al. 2017,
    arXiv:1706.03762): softmax(q·kᵀ·scale + m) v with the N x N scores materialised.

    The second baseline (``--baseline manual``'s spelling) as a rewrite of the SDPA model, so both
    baselines are timed round-robin in the same run as the variants. Every mask class, causal,
    cross-attention, grouped heads; no parameters. Cost: time and memory O(N²).
    """

    name = "softmax_manual"
    mask_classes = ALL_MASK_CLASSES
    exact = True

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        scale: float = 1.0,
    ) -> torch.Tensor:
        heads = query.shape[1]
        key, value = repeat_kv(key, heads), repeat_kv(value, heads)
        scores = query @ key.transpose(-2, -1) * scale
        attn_mask = combine_mask(mask, causal, query.shape[-2], key.shape[-2], query.device)
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        elif attn_mask is not None:
            scores = scores + attn_mask.to(scores.dtype)
        return scores.softmax(-1) @ value


def register_manual_softmax() -> None:
    """Register ``softmax_manual``. The factories call it too: a memory worker rebuilds the model
    from the TARGET string in a fresh process, then rewrites it by variant name."""
    attnrewrite.register_variant(ManualSoftmaxAttention)


def _example(batch: int = 2, length: int = 256) -> tuple[torch.Tensor]:
    return (torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(0)),)


def lra_text_model() -> tuple[nn.Module, tuple, dict]:
    """TARGET factory (SDPA baseline): ``benchmarks/lra_efficiency.py:lra_text_model``."""
    register_manual_softmax()
    torch.manual_seed(0)
    return LRATextClassifier(manual=False).eval(), _example(), {}


def lra_text_model_manual() -> tuple[nn.Module, tuple, dict]:
    """TARGET factory with hand-written matmul/softmax/matmul attention."""
    register_manual_softmax()
    torch.manual_seed(0)
    return LRATextClassifier(manual=True).eval(), _example(), {}


def variant_options(max_length: int) -> dict[str, dict]:
    """Options per variant, close to the LRA paper's efficiency settings where it gives them."""
    width = math.isqrt(max_length - 1) + 1  # ⌈√N⌉
    buckets = max(2, -(-max_length // 64))
    buckets += buckets % 2  # Reformer hashes with ±projections: an even count
    return {
        "softmax": {},
        "softmax_manual": {},  # the matmul/softmax/matmul baseline, registered by this script
        "local": {"window": 64},
        "sparse_strided": {},  # stride defaults to ~sqrt(N) (Child et al.)
        "sparse_fixed": {},
        "longformer": {"window": 64, "global_tokens": 16},
        "bigbird": {"window": 64, "global_tokens": 64, "num_random": 3, "block_size": 64},
        "linformer": {"k": 256, "max_len": max_length},
        "synthesizer": {"mode": "dense", "max_len": max_length},
        "nystrom": {"num_landmarks": 64},
        "linear": {},
        "performer": {"num_features": 256},
        "rfa": {"num_features": 256},
        "cosformer": {},
        # "kernel" needs a feature_map callable: it is the generic form of the rows above.
        "t2r": {},
        "hedgehog": {},
        # Issue 16, as in the structural table (benchmarks/structural_variants.py). The model is
        # rewritten once, at the example length (256), and reused at every N, so the options that
        # default to the site's length at capture are given here for the longest N: Reformer
        # n_b ≈ N/64 buckets, routing √N clusters (Roy et al.), axial a grid ⌈√N⌉ wide (the byte
        # sequence folded into rows; at shorter N it has fewer rows).
        "reformer": {"bucket_size": 64, "num_hashes": 2, "num_buckets": buckets},
        "routing": {"chunk_size": 64, "num_clusters": max(2, round(math.sqrt(max_length)))},
        "sinkhorn": {"block_size": 64},
        "set_transformer": {"num_inducing": 64},
        "memory_compressed": {"stride": 8},
        "axial": {"grid": (-(-max_length // width), width)},
        "transformer_xl": {"segment": 64},
    }


def table2(result, backend: str) -> str:
    """LRA Table 2 layout for one backend: steps/s and peak memory, relative to softmax (SDPA)."""
    lengths = result.lengths
    head = (
        ["variant"]
        + [
            f"speed {n // 1024 if n % 1024 == 0 else n}{'K' if n % 1024 == 0 else ''}"
            for n in lengths
        ]
        + [
            f"memory {n // 1024 if n % 1024 == 0 else n}{'K' if n % 1024 == 0 else ''}"
            for n in lengths
        ]
        + ["max rel err (max N)", "FLOP-bound (max N)", "achieved (max N)", "crossover N"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    crossover = {c.variant: c.describe() for c in result.crossovers if c.backend == backend}
    for variant in result.variants:
        rows = {r.length: r for r in result.rows if r.backend == backend and r.variant == variant}
        if not any(r.ok for r in rows.values()):
            status = next(iter(rows.values())).status if rows else "not run"
            lines.append(
                f"| {variant} | "
                + " | ".join(["-"] * (2 * len(lengths) + 3))
                + f" | {status[:90]} |"
            )
            continue
        speed, memory = [], []
        for n in lengths:
            r = rows.get(n)
            if r is None or not r.ok:
                speed.append("-")
                memory.append("-")
            elif variant == "original":
                speed.append(f"{1000.0 / r.median_ms:.3g}/s")
                memory.append(f"{r.peak_mb:.0f} MiB" if r.peak_mb else "-")
            else:
                speed.append(f"{r.speedup:.2f}x" if r.speedup else "-")
                memory.append(f"{r.memory_ratio:.2f}x" if r.memory_ratio else "-")
        last = rows.get(lengths[-1])
        error = f"{last.max_rel_error:.1e}" if last and last.max_rel_error is not None else "-"
        bound = f"{last.flop_bound_speedup:.2f}x" if last and last.flop_bound_speedup else "-"
        achieved = "-"
        if last and last.flop_bound_speedup and last.speedup and variant != "original":
            achieved = f"{100 * last.speedup / last.flop_bound_speedup:.0f}%"
        name = {
            "original": "Transformer (SDPA, original)",
            "softmax": "softmax (rewritten, exact)",
            "softmax_manual": "softmax (matmul/softmax/matmul, exact)",
        }.get(variant, variant)
        cells = [name, *speed, *memory, error, bound, achieved, crossover.get(variant, "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(
    result,
    command: str,
    plot: Path,
    json_path: Path,
    elapsed_s: float,
    load: tuple[float, float] | None = None,
    notes: list[str] | None = None,
) -> str:
    """The Markdown of a run: command, how it was measured, one Table 2 per backend, the plot.

    ``load``: the machine's 1-minute load average at the start and at the end of the run;
    ``notes``: the user's lines (``--note``), printed right after the command.
    """
    meta = result.meta
    loaded = f", load average {load[0]:.1f} at start / {load[1]:.1f} at end" if load else ""
    parts = [
        f"Command: `{command}` ({elapsed_s / 60:.0f} min on {meta['machine']}, "
        f"{meta['threads']} torch threads, torch {meta['torch']}, {meta['date']}{loaded}).",
        "",
        *[f"{note}\n" for note in notes or []],
        f"Forward-only inference, batch {meta['batch']}, float32; median of {meta['repeats']} "
        "round-robin timed calls after warm-up. Transformer row: steps/s and the peak memory one "
        "forward call adds (own process per configuration); other rows: speed (steps/s) and "
        "memory relative to it, same backend, same run. `max rel err`: max|y - y_orig| / "
        "max|y_orig| of the logits against the eager original at the longest N (random weights: "
        "this measures the approximation, not task accuracy); `FLOP-bound`: FLOPs of the "
        "original / FLOPs of the variant at the longest N (the speedup a FLOP-bound run would get; "
        "matrix products only, torch's FlopCounterMode); `achieved`: the speedup at the longest N "
        "as a share of that bound; `crossover N`: first length where "
        f"the variant is faster (log-log interpolated). Raw rows: "
        f"`{json_path.relative_to(ROOT)}`.",
    ]
    for backend in result.backends:
        parts += ["", f"**{backend}**", "", table2(result, backend)]
    notes = meta.get("notes") or []
    if notes:
        parts += ["", *[f"- {n}" for n in notes]]
    parts += ["", f"![LRA efficiency]({plot.relative_to(ROOT)})"]
    return "\n".join(parts)


def markers(name: str) -> tuple[str, str]:
    """The start and end markers of run ``name``'s block in BENCHMARKS.md.

    ``lra_efficiency`` -> ``<!-- lra-efficiency:start -->``; ``lra_efficiency_survey`` ->
    ``<!-- lra-efficiency-survey:start -->``: each results stem has its own block, so a run
    under another name never overwrites the main table.
    """
    tag = name.replace("_", "-")
    return f"<!-- {tag}:start -->", f"<!-- {tag}:end -->"


def update_benchmarks_md(body: str, name: str = MAIN_NAME, heading: str | None = None) -> None:
    """Replace run ``name``'s block of BENCHMARKS.md (between its markers) with ``body``.

    Without a block yet: the main run appends its section at the end; another run inserts a
    subsection ``### heading`` right after the main block (at the end if there is none).
    """
    text = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else "# Benchmarks\n"
    start, end = markers(name)
    block = f"{start}\n{body}\n{end}"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        after = rest.split(end, 1)[1]
        text = before + block + after
    elif name == MAIN_NAME:
        text = text.rstrip() + f"\n\n{MAIN_HEADING}\n\n" + block + "\n"
    else:
        section = f"### {heading or f'Run `{name}`'}\n\n{block}"
        main_end = markers(MAIN_NAME)[1]
        if main_end in text:
            before, after = text.split(main_end, 1)
            text = before + main_end + "\n\n" + section + after
        else:
            text = text.rstrip() + "\n\n" + section + "\n"
    BENCHMARKS_MD.write_text(text)


def _without_prose(argv: list[str]) -> list[str]:
    """The command-line arguments without ``--note`` and ``--heading`` (the report shows the
    note itself, and the heading is the subsection's title)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--note", "--heading"):
            skip = True
        elif not arg.startswith(("--note=", "--heading=")):
            kept.append(arg)
    return kept


def main(argv: list[str] | None = None) -> int:
    from attnrewrite.bench.plot import plot_result
    from attnrewrite.variants import variant_names

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 3072, 4096])
    parser.add_argument(
        "--variants", nargs="+", default=None, help="default: every variant of variant_options()"
    )
    parser.add_argument("--backends", nargs="+", default=["eager", "inductor"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--baseline", choices=("sdpa", "manual"), default="sdpa")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument(
        "--name",
        default=MAIN_NAME,
        help="results file stem, and the BENCHMARKS.md block this run rewrites "
        "(lra_efficiency_survey: benchmarks/results/lra_efficiency_survey.{json,md,png} and the "
        "block between <!-- lra-efficiency-survey:start/end -->)",
    )
    parser.add_argument(
        "--heading",
        default=None,
        help="heading of the subsection created for a new --name (default: the name)",
    )
    parser.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line printed after the command in the report (repeatable)",
    )
    parser.add_argument(
        "--update-benchmarks-md",
        action="store_true",
        help="rewrite this run's block of BENCHMARKS.md (see --name)",
    )
    ns = parser.parse_args(argv)

    max_length = max(ns.lengths)
    if max_length > MAX_LEN:
        parser.error(f"lengths above {MAX_LEN} need a longer position table (MAX_LEN)")
    options = variant_options(max_length)
    register_manual_softmax()
    # Names only: a variant that fails to import gets an error row instead of stopping the run.
    names = ns.variants or [n for n in options if n in variant_names()]
    factory = "lra_text_model" if ns.baseline == "sdpa" else "lra_text_model_manual"
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    result = attnrewrite.benchmark(
        f"{Path(__file__).resolve()}:{factory}",
        {n: options.get(n, {}) for n in names},
        seq_lens=ns.lengths,
        backends=ns.backends,
        repeats=ns.repeats,
        batch=ns.batch,
        memory=not ns.no_memory,
        num_threads=ns.threads,
    )
    elapsed = time.perf_counter() - start
    load = (load_start, os.getloadavg()[0])

    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = result.to_json(RESULTS / f"{ns.name}.json")
    plot = plot_result(
        result,
        RESULTS / f"{ns.name}.png",
        title=f"LRA text model, batch {ns.batch}, forward only ({', '.join(result.backends)})",
    )
    command = "python benchmarks/lra_efficiency.py " + shlex.join(
        _without_prose(sys.argv[1:] if argv is None else argv)
    )
    body = report(result, command.strip(), plot, json_path, elapsed, load, ns.note)
    (RESULTS / f"{ns.name}.md").write_text(body + "\n")
    print(body)
    if ns.update_benchmarks_md:
        update_benchmarks_md(body, ns.name, ns.heading)
        print(f"updated {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
