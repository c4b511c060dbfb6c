"""Latency of a small BERT before and after the ``linear`` rewrite, on each deployment backend.

The model is a randomly initialised BERT encoder (hidden 256, 4 layers, 4 heads, FFN 1024,
``attn_implementation="sdpa"``, float32, inference) with a padding mask (the second example's
last eighth is padding). "before" is the model itself, "after" is ``attnrewrite.rewrite(model,
"linear")``. Each is run, side by side in one process, on

- PyTorch eager;
- TorchInductor: ``attnrewrite.compile(model, backend="inductor")`` (dynamic shapes: one compiled
  graph serves every length);
- ONNX Runtime (CPU provider) on ``attnrewrite.export_onnx(model)``: standard ONNX operators;
- ONNX Runtime on the export with ``optimize_original=True``: onnxscript's ORT fusions (fused
  attention, LayerNorm, GELU into ``com.microsoft`` contrib operators), the fairest "before";
  applied to the rewritten model too, where it fuses everything but the rewritten attention.

Every model is captured/exported once at batch 2 and length 64 and then timed at each N: the
median of ``--repeats`` calls after two warm-up calls at that N. Both runtimes use the same number
of intra-op threads (``--threads``). The relative error of each backend against eager of the same
model is reported as a sanity check.

Usage:
    python benchmarks/backends_latency.py                         # N = 512 and 2048, batch 2
    python benchmarks/backends_latency.py --lengths 256 --repeats 3 --output out.md
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnrewrite as ar  # noqa: E402
from attnrewrite.backends.onnx import onnx_session  # noqa: E402

HIDDEN, LAYERS, HEADS, FFN, VOCAB = 256, 4, 4, 1024, 1000
EXAMPLE_LENGTH = 64
BACKENDS = ("eager", "inductor", "ort", "ort_fused")
BACKEND_TITLES = {
    "eager": "PyTorch eager",
    "inductor": "Inductor",
    "ort": "ORT",
    "ort_fused": "ORT + fusions",
}


def build_model(max_length: int) -> torch.nn.Module:
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=FFN,
        max_position_embeddings=max_length,
    )
    return transformers.AutoModel.from_config(config, attn_implementation="sdpa").eval()


def make_inputs(batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length - length // 8 :] = 0  # real padding on the last example
    return {"input_ids": ids, "attention_mask": mask}


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max()).item()


def runners(
    model: torch.nn.Module, folder: Path, tag: str, threads: int
) -> dict[str, Callable[..., Any]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    example = make_inputs(2, EXAMPLE_LENGTH)
    plain = ar.export_onnx(model, folder / f"{tag}.onnx", kwargs=example)
    fused = ar.export_onnx(
        model, folder / f"{tag}-fused.onnx", kwargs=example, optimize_original=True
    )
    return {
        "eager": model,
        "inductor": ar.compile(model, backend="inductor"),
        "ort": onnx_session(plain.path, session_options=options),
        "ort_fused": onnx_session(fused.path, session_options=options),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)

    model = build_model(max(args.lengths))
    example = make_inputs(2, EXAMPLE_LENGTH)
    rewritten = ar.rewrite(model, "linear", kwargs=example)
    assert len(rewritten.report.rewritten) == LAYERS, str(rewritten.report)
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        models = {
            "before (softmax, SDPA)": runners(model, Path(tmp), "before", args.threads),
            "after (linear)": runners(rewritten, Path(tmp), "after", args.threads),
        }
        for length in args.lengths:
            inputs = make_inputs(args.batch, length, seed=1)
            for label, run in models.items():
                reference = run["eager"](**inputs).last_hidden_state
                cells = {}
                for backend in BACKENDS:
                    ms = median_ms(lambda r=run[backend], x=inputs: r(**x), args.repeats)
                    error = relative_error(run[backend](**inputs).last_hidden_state, reference)
                    cells[backend] = (ms, error)
                    print(
                        f"N={length} {label} {backend}: {ms:.1f} ms (rel. err {error:.1e})",
                        file=sys.stderr,
                    )
                rows.append((length, label, cells))

    lines = [
        f"Tiny BERT (hidden {HIDDEN}, {LAYERS} layers, {HEADS} heads, FFN {FFN}, float32, "
        f"padding mask), batch {args.batch}; median of {args.repeats} calls, milliseconds; "
        f"{args.threads} intra-op threads for PyTorch and ONNX Runtime "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__}). In brackets: max relative error against eager of the same "
        "model.",
        "",
        "| N | model | " + " | ".join(BACKEND_TITLES[b] for b in BACKENDS) + " |",
        "|---|---|" + "---:|" * len(BACKENDS),
    ]
    for length, label, cells in rows:
        body = " | ".join(f"{ms:.1f} ({err:.0e})" for ms, err in (cells[b] for b in BACKENDS))
        lines.append(f"| {length} | {label} | {body} |")
    lines.append("")
    for length in args.lengths:
        before = next(c for n, label, c in rows if n == length and label.startswith("before"))
        after = next(c for n, label, c in rows if n == length and label.startswith("after"))
        ratios = ", ".join(
            f"{BACKEND_TITLES[b]} {before[b][0] / after[b][0]:.2f}×" for b in BACKENDS
        )
        lines.append(f"- N={length}: before/after speed-up: {ratios}.")
    table = "\n".join(lines)
    print(table)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(table + "\n")


if __name__ == "__main__":
    main()
