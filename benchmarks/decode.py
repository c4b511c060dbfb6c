"""Per-token decode latency against the context length: the original with its own key/value cache
versus rewritten decoders that decode as recurrences (issue 14).

A Llama-shaped model with random weights (d 512, 8 layers, 8 heads, 2 KV heads, ~50M parameters).
For each context C and batch B, one decode step is timed (median of ``--reps`` after warm-up)
with the state of a C-token context:

- ``original``: Hugging Face's own step with a ``DynamicCache`` holding C positions (filled with
  random keys/values: a step's cost does not depend on their values; the cache is cropped back
  to C after every step, so each timed step sees the same context);
- ``softmax``: the rewritten exact model's step graph, its key/value cache state holding C keys;
- ``linear``, ``hedgehog``: the rewritten step graphs with their constant-size state (a prefill
  on a short prompt gives the state; its size does not depend on C, which the table checks).

Each row also has the state (or cache) bytes per sequence and the bytes-read bound of a step:
weights read once plus the cache/state read once, per generated token. Prefill tokens/s is
measured at ``--prefill-len``. Backends: eager, Inductor (``--inductor``: the rewritten step
graphs compiled once with dynamic shapes) and ONNX Runtime (``--ort``, when the decode export is
available).

Usage::

    python benchmarks/decode.py                                    # the full table
    python benchmarks/decode.py --contexts 256 1024 --batches 1 --reps 5   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attnrewrite as ar  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def build_model(layers: int, dim: int, heads: int, kv_heads: int, vocab: int) -> Any:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=int(dim * 2.6875),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1 << 16,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def median_time(fn: Any, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def original_step(model: Any, batch: int, context: int, reps: int) -> tuple[float, int]:
    from transformers import DynamicCache

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    g = torch.Generator().manual_seed(0)
    for layer in range(cfg.num_hidden_layers):
        shape = (batch, cfg.num_key_value_heads, context, head_dim)
        cache.update(torch.randn(shape, generator=g), torch.randn(shape, generator=g), layer)
    token = torch.randint(1, cfg.vocab_size, (batch, 1), generator=g)
    mask = torch.ones(batch, context + 1, dtype=torch.long)
    position = torch.full((batch, 1), context)

    @torch.no_grad()
    def step() -> None:
        model(
            input_ids=token,
            attention_mask=mask,
            position_ids=position,
            past_key_values=cache,
            use_cache=True,
            cache_position=torch.tensor([context]),
        )
        cache.crop(-1)  # back to C positions

    seconds = median_time(step, reps)
    bytes_per_seq = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * context * head_dim * 4
    return seconds, bytes_per_seq


def cache_of(state: list[torch.Tensor], context: int) -> list[torch.Tensor]:
    """A key/value-cache state (keys, values (B, H, n, d); key biases (B, H, n)) of the exact
    model, standing for ``context`` positions (random keys and values, zero biases)."""
    return [
        torch.randn(*s.shape[:-2], context, s.shape[-1])
        if s.dim() == 4
        else torch.zeros(*s.shape[:-1], context)
        for s in state
    ]


def rewritten_step(
    decoder: Any, batch: int, context: int, reps: int, grow: bool
) -> tuple[float, int]:
    """Time one step with a state standing for ``context`` positions."""
    plan = decoder.plan
    ids = torch.randint(1, 100, (batch, 8))
    mask = torch.ones_like(ids)
    positions = torch.arange(8).expand(batch, -1)
    flat = decoder._flat(ids, mask, positions, 0)
    state = list(plan.prefill(*flat))[plan.num_outputs :]
    if grow:
        state = cache_of(state, context)
    token = torch.randint(1, 100, (batch, 1))
    step_flat = decoder._flat(
        token, torch.ones_like(token), torch.full((batch, 1), context), context
    )
    offset = torch.tensor(context)
    counted = torch.full((batch, 1), context)

    @torch.no_grad()
    def step() -> None:
        decoder._step(*step_flat, offset, counted, *state)

    seconds = median_time(step, reps)
    bytes_per_seq = sum(s[0].numel() * s.element_size() for s in state)
    return seconds, bytes_per_seq


def ort_step(session: Any, batch: int, context: int, reps: int, grow: bool) -> tuple[float, int]:
    """One ONNX Runtime step with a state standing for ``context`` positions."""
    ids = torch.randint(1, 100, (batch, 8))
    mask = torch.ones_like(ids)
    _, state = session._prefill(ids, mask, torch.arange(8).expand(batch, -1), 0)
    if grow:
        state = cache_of(state, context)
    token = torch.randint(1, 100, (batch, 1))
    position = torch.full((batch, 1), context)

    def step() -> None:
        session._step(
            state,
            token,
            torch.ones_like(token),
            position,
            context,
            offset=torch.tensor(context),
            counted=position.clone(),
        )

    seconds = median_time(step, reps)
    return seconds, sum(s[0].numel() * s.element_size() for s in state)


def prefill_rate(fn: Any, batch: int, length: int, reps: int) -> float:
    return batch * length / median_time(fn, reps, warmup=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["softmax", "linear", "hedgehog", "hedgehog:window=64"],
        help="variant names, with integer options after a colon (hedgehog:window=64)",
    )
    parser.add_argument("--prefill-len", type=int, default=1024)
    parser.add_argument("--inductor", action="store_true")
    parser.add_argument("--ort", action="store_true", help="ONNX Runtime (decode export)")
    parser.add_argument("--out", default=str(RESULTS / "decode"))
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    model = build_model(args.layers, args.dim, args.heads, args.kv_heads, args.vocab)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {torch.get_num_threads()} threads")
    example = torch.randint(1, args.vocab, (2, 16))
    kwargs = {"input_ids": example, "attention_mask": torch.ones_like(example)}
    decoders: dict[str, Any] = {}
    sessions: dict[str, Any] = {}
    for spec in args.variants:
        # "name" or "name:option=int,...", e.g. hedgehog:window=64 (the LoLCATs hybrid)
        variant, _, opts = spec.partition(":")
        options = {k: int(v) for k, v in (o.split("=") for o in opts.split(",") if o)}
        rw = ar.rewrite(model, variant, kwargs=kwargs, **options)
        variant = spec
        decoders[f"{variant} eager"] = (rw, rw.decoder())
        if args.inductor and variant != "softmax":
            compiled = ar.compile(rw)
            decoders[f"{variant} inductor"] = (rw, compiled._decoder())
        if args.ort:
            import tempfile

            directory = tempfile.mkdtemp(prefix="decode_")
            ar.export_onnx(rw, directory, decode=True)
            sessions[f"{variant} onnxruntime"] = ar.onnx_session(directory)

    rows: list[dict[str, Any]] = []
    for batch in args.batches:
        for context in args.contexts:
            seconds, state = original_step(model, batch, context, args.reps)
            rows.append(
                {
                    "model": "original (HF KV cache)",
                    "batch": batch,
                    "context": context,
                    "ms_per_token": 1e3 * seconds,
                    "state_bytes": state,
                }
            )
            print(rows[-1], flush=True)
            for label, (_, decoder) in decoders.items():
                grow = label.startswith("softmax")
                seconds, state = rewritten_step(decoder, batch, context, args.reps, grow)
                rows.append(
                    {
                        "model": label,
                        "batch": batch,
                        "context": context,
                        "ms_per_token": 1e3 * seconds,
                        "state_bytes": state,
                    }
                )
                print(rows[-1], flush=True)
            for label, session in sessions.items():
                grow = label.startswith("softmax")
                seconds, state = ort_step(session, batch, context, args.reps, grow)
                rows.append(
                    {
                        "model": label,
                        "batch": batch,
                        "context": context,
                        "ms_per_token": 1e3 * seconds,
                        "state_bytes": state,
                    }
                )
                print(rows[-1], flush=True)

    prefill = {}
    ids = torch.randint(1, args.vocab, (1, args.prefill_len))
    prefill["original"] = prefill_rate(
        lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False),
        1,
        args.prefill_len,
        3,
    )
    for label, (_, decoder) in decoders.items():
        mask = torch.ones_like(ids)
        flat = decoder._flat(ids, mask, torch.arange(args.prefill_len)[None], 0)
        prefill[label] = prefill_rate(
            lambda d=decoder, f=flat: d._prefill(*f), 1, args.prefill_len, 3
        )
    write(rows, prefill, args, params, weight_bytes)


def write(
    rows: list[dict[str, Any]], prefill: dict[str, float], args: Any, params: int, weight_bytes: int
) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    command = "python benchmarks/decode.py " + " ".join(sys.argv[1:])
    lines = [
        f"Command: `{command}` — {params / 1e6:.1f}M parameters, "
        f"{torch.get_num_threads()} CPU threads, fp32, median of {args.reps} steps.",
        "",
        "| model | batch | "
        + " | ".join(f"ms/token @{c}" for c in args.contexts)
        + f" | {args.contexts[-1]}/{args.contexts[0]} | state/cache bytes per seq @"
        f"{args.contexts[-1]} | bound ms ratio vs original @{args.contexts[-1]} |",
        "|---|---|" + "---|" * len(args.contexts) + "---|---|---|",
    ]
    by_key: dict[tuple[str, int], dict[int, dict[str, Any]]] = {}
    for row in rows:
        by_key.setdefault((row["model"], row["batch"]), {})[row["context"]] = row
    for (label, batch), per in by_key.items():
        times = [per[c]["ms_per_token"] for c in args.contexts]
        last = per[args.contexts[-1]]
        original = by_key[("original (HF KV cache)", batch)][args.contexts[-1]]
        bound = (weight_bytes + batch * last["state_bytes"]) / (
            weight_bytes + batch * original["state_bytes"]
        )
        lines.append(
            f"| {label} | {batch} | "
            + " | ".join(f"{t:.2f}" for t in times)
            + f" | {times[-1] / times[0]:.2f} | {last['state_bytes'] / 1e6:.3f} MB | "
            f"{bound:.2f} |"
        )
    lines += [
        "",
        "Prefill (batch 1, "
        f"{args.prefill_len} tokens): "
        + ", ".join(f"{k} {v:.0f} tok/s" for k, v in prefill.items()),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
