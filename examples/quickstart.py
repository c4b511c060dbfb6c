"""Quickstart: rewrite a Hugging Face model's attention, check it, export it, compare before/after.

Builds a small BERT with random weights (offline; no downloads), rewrites every attention site into
Linear Transformer attention, prints the report, checks the exact ``softmax`` rewrite reproduces
the original, exports the rewritten model to ONNX and runs it with ONNX Runtime, and prints a
before/after table (latency and output difference) at a longer sequence length than captured.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch
import transformers

import attnrewrite as ar


def timed(fn, repeats: int = 5) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        vocab_size=1000,
        max_position_embeddings=4096,
    )
    model = transformers.BertModel(config, add_pooling_layer=False).eval()

    def inputs(batch: int, length: int) -> dict[str, torch.Tensor]:
        ids = torch.randint(0, 1000, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[-1, length // 2 :] = 0  # padding in the last sequence
        return {"input_ids": ids, "attention_mask": mask}

    example = inputs(2, 64)
    print(f"found {len(ar.find_attention(model, kwargs=example))} attention sites")

    exact = ar.rewrite(model, "softmax", kwargs=example)
    linear = ar.rewrite(model, "linear", kwargs=example)
    print(linear.report, end="\n\n")

    long = inputs(2, 2048)  # another length than captured: the rewrite is shape-dynamic
    with torch.inference_mode():
        ref = model(**long).last_hidden_state
        exact_err = ((exact(**long).last_hidden_state - ref).abs().max() / ref.abs().max()).item()
        lin = linear(**long).last_hidden_state
        cos = torch.nn.functional.cosine_similarity(lin.flatten(1), ref.flatten(1)).mean().item()
        before = timed(lambda: model(**long))
        after = timed(lambda: linear(**long))

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bert_linear.onnx")
        ar.export_onnx(linear, path, kwargs=example)
        session = ar.onnx_session(path)
        ort_out = session(**long)
        ort_out = ort_out.last_hidden_state if hasattr(ort_out, "last_hidden_state") else ort_out[0]
        ort_err = ((ort_out - lin).abs().max() / lin.abs().max()).item()
        ort_ms = timed(lambda: session(**long), repeats=3)

    print("sequence length 2048, batch 2 (median of 5, this machine):")
    print("| model | latency ms | vs original |")
    print("|---|---|---|")
    print(f"| original (eager, softmax) | {before:.1f} | 1.00x |")
    print(f"| rewritten linear (eager) | {after:.1f} | {before / after:.2f}x |")
    print(f"| rewritten linear (ONNX Runtime) | {ort_ms:.1f} | {before / ort_ms:.2f}x |")
    print()
    print(f"softmax rewrite vs original: max relative error {exact_err:.1e} (exact)")
    print(f"linear rewrite vs original: mean cosine {cos:.3f} (untrained; see calibrate)")
    print(f"ONNX Runtime vs eager linear: max relative error {ort_err:.1e}")


if __name__ == "__main__":
    main()
