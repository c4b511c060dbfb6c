"""GPU parity and timing check (issue 5): Inductor/Triton on CUDA for every variant, ORT providers.

Run on a machine with a CUDA GPU::

    PYTHONPATH=. python benchmarks/gpu_check.py --out gpu_check.md

For tiny BERT (padding), Llama (causal + padding, grouped heads) and a hand-written einsum
attention: rewrite on the GPU, run eager and ``ar.compile(..., backend="inductor")`` at a sequence
length other than the capture example's, and report the max relative error compiled vs eager. Then
time BERT (hidden 256, 4 layers) at N=512 and 2048 before/after ``linear`` with Inductor.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import traceback

import torch

import attnrewrite as ar
from attnrewrite.variants import variant_names


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def models(device: str):
    sys.path.insert(0, ".")
    from tests.passes.spellings import CASES
    from tests.zoo.hf_models import ZOO

    out = []
    for name in ("bert", "llama"):
        zm = next(z for z in ZOO if z.name == name)
        model = zm.build("sdpa" if name == "llama" else "eager").to(device)

        def make(batch, length, seed=0, zm=zm):
            kw = zm.inputs(batch=batch, length=length, seed=seed)
            return (), {k: v.to(device) if torch.is_tensor(v) else v for k, v in kw.items()}

        out.append((name, model, make, zm.hidden))
    case = next(c for c in CASES if c.name == "einsum_bhqd")
    torch.manual_seed(0)
    model = case.build().eval().to(device)

    def make_einsum(batch, length, seed=0):
        torch.manual_seed(seed)
        return tuple(a.to(device) for a in case.inputs(batch, length)), {}

    out.append(("einsum", model, make_einsum, lambda o: o))
    return out


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--all-variants-on",
        default="einsum",
        help="model to run every variant on; the others run softmax and linear",
    )
    args = parser.parse_args()
    device = "cuda"
    lines = [f"device: {torch.cuda.get_device_name()} torch {torch.__version__}", ""]
    lines += [
        "| model | variant | rewritten/sites | inductor vs eager (rel) | eager vs original |",
        "|---|---|---|---|---|",
    ]
    for name, model, make, hidden in models(device):
        a, k = make(2, 16)
        other_a, other_k = make(3, 37, seed=1)
        with torch.no_grad():
            ref = hidden(model(*other_a, **other_k))
        chosen = variant_names() if name == args.all_variants_on else ["softmax", "linear"]
        for variant in chosen:
            if variant == "kernel":
                continue
            try:
                rw = ar.rewrite(model, variant, args=a, kwargs=k)
                counts = rw.report.counts()
                compiled = ar.compile(rw, backend="inductor")
                with torch.no_grad():
                    eager = hidden(rw(*other_a, **other_k))
                    comp = hidden(compiled(*other_a, **other_k))
                lines.append(
                    f"| {name} | {variant} | {counts.get('rewritten', 0)}/"
                    f"{len(rw.report.sites)} | {rel(comp, eager):.1e} | "
                    f"{rel(eager, ref):.1e} |"
                )
            except Exception as exc:  # noqa: BLE001 - report and go on
                lines.append(
                    f"| {name} | {variant} | error | {type(exc).__name__}: {str(exc)[:80]} | |"
                )
                traceback.print_exc()
            print(lines[-1], flush=True)

    import onnxruntime

    lines += [
        "",
        f"onnxruntime {onnxruntime.__version__} providers: {onnxruntime.get_available_providers()}",
        "",
    ]

    import transformers

    config = transformers.BertConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        vocab_size=1000,
        max_position_embeddings=4096,
    )
    bert = transformers.BertModel(config, add_pooling_layer=False).eval().to(device)
    lines += ["| N | original inductor ms | linear inductor ms | speed-up |", "|---|---|---|---|"]
    example = {
        "input_ids": torch.randint(0, 1000, (2, 64), device=device),
        "attention_mask": torch.ones(2, 64, dtype=torch.long, device=device),
    }
    rw = ar.rewrite(bert, "linear", kwargs=example)
    base = torch.compile(bert, dynamic=True)
    fast = ar.compile(rw, backend="inductor")
    for n in (512, 2048):
        kw = {
            "input_ids": torch.randint(0, 1000, (2, n), device=device),
            "attention_mask": torch.ones(2, n, dtype=torch.long, device=device),
        }
        with torch.no_grad():
            t0 = timed(lambda kw=kw: base(**kw))
            t1 = timed(lambda kw=kw: fast(**kw))
        lines.append(f"| {n} | {t0:.2f} | {t1:.2f} | {t0 / t1:.2f}x |")
        print(lines[-1], flush=True)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
