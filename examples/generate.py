"""Rewrite a causal language model and generate with it: before/after decode speed and tokens.

A Llama-shaped decoder with random weights (built offline from a config) is rewritten with the
exact ``softmax`` variant (it must generate exactly what the original generates, key/value cache
included) and with ``linear`` attention (decoded as an RNN: constant state per sequence). Both
generate from a left-padded batch; the table gives tokens/s per prompt length and whether the
greedy tokens agree with Hugging Face's own ``generate``.

    python examples/generate.py [--prompt-lens 64 512] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers

import attnrewrite as ar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[64, 512])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=344,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=None,
    )
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()

    def prompt(length: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(1, config.vocab_size, (args.batch, length))
        mask = torch.ones_like(ids)
        mask[0, : length // 4] = 0  # the first prompt is a quarter shorter (left padding)
        return ids.masked_fill(mask == 0, 0), mask

    example = prompt(16)
    rewritten = {
        name: ar.rewrite(
            model, name, kwargs={"input_ids": example[0], "attention_mask": example[1]}
        )
        for name in ("softmax", "linear")
    }
    print(rewritten["linear"].report)
    print()
    header = f"{'prompt':>7} {'model':<22} {'tokens/s':>9} {'same tokens as HF':>18}"
    print(header)
    print("-" * len(header))
    warm = prompt(8)
    for rw in rewritten.values():  # build the decode graphs and check one step, untimed
        rw.generate(*warm, max_new_tokens=2)
    model.generate(input_ids=warm[0], attention_mask=warm[1], max_new_tokens=2, do_sample=False)
    for length in args.prompt_lens:
        ids, mask = prompt(length)
        start = time.perf_counter()
        reference = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=args.new_tokens
        )
        seconds = time.perf_counter() - start
        rate = args.batch * args.new_tokens / seconds
        print(f"{length:>7} {'original (KV cache)':<22} {rate:>9.1f} {'-':>18}")
        for name, rw in rewritten.items():
            start = time.perf_counter()
            tokens = rw.generate(ids, mask, max_new_tokens=args.new_tokens)
            seconds = time.perf_counter() - start
            same = "yes" if torch.equal(tokens, reference) else "no"
            if name != "softmax":
                same += " (approximation)"
            rate = args.batch * args.new_tokens / seconds
            print(f"{length:>7} {'rewritten ' + name:<22} {rate:>9.1f} {same:>18}")


if __name__ == "__main__":
    main()
