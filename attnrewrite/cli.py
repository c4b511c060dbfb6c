"""The ``attnrewrite`` command: ``inspect``, ``rewrite``, ``export``, ``bench``, ``generate``,
``variants``.

Every verb takes a TARGET, one of (see ``attnrewrite.bench.targets``):

- ``module:factory`` or ``path/to/file.py:factory``: a callable returning ``(model, args, kwargs)``
  or ``(model, inputs_dict)``;
- a local Hugging Face model directory (loaded with ``local_files_only=True``);
- a Hugging Face model type (``bert``, ``gpt2``, ``llama``, ...): a tiny random model (hidden 64,
  2 layers, 4 heads, MLP 128, vocab 1024; position tables as long as the longest length asked for).

Nothing is downloaded (``HF_HUB_OFFLINE=1``). Examples::

    attnrewrite inspect bert
    attnrewrite rewrite gpt2 --variant linear -o gpt2_linear.pt2
    attnrewrite export bert --variant performer --option num_features=64 -o bert.onnx
    attnrewrite bench my_models.py:build --variant linear performer --seq-lens 256 1024 4096 \\
        --backend eager inductor --json out.json --plot out.png
    attnrewrite generate llama --variant softmax --prompt-len 32 --new-tokens 16
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect as pyinspect
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from attnrewrite.errors import AttnRewriteError, VariantOptionError


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. num_features=64), got '{text}'")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word such as elu stays a string
    return key.strip(), value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attnrewrite",
        description="Find softmax attention in a PyTorch model and rewrite it into efficient "
        "variants.",
        epilog="TARGET: 'module:factory' or 'file.py:factory' (returns (model, args, kwargs) or "
        "(model, inputs_dict)), a local Hugging Face model directory, or a Hugging Face "
        "model type such as bert, gpt2, llama (tiny, random weights).",
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    def common(sub: argparse.ArgumentParser, *, lengths: bool = True) -> None:
        sub.add_argument("target", metavar="TARGET", help="model to load (see below)")
        sub.add_argument("--batch", type=int, default=2, help="example batch size (default 2)")
        if lengths:
            sub.add_argument(
                "--seq-len", type=int, default=32, help="example sequence length (default 32)"
            )
        sub.add_argument("--seed", type=int, default=0, help="seed of weights, inputs, features")
        sub.add_argument(
            "--hf-attn",
            default="sdpa",
            choices=("sdpa", "eager"),
            help="Hugging Face attention implementation of HF targets",
        )
        sub.add_argument(
            "--option",
            type=_parse_option,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="variant option, repeatable (e.g. --option num_features=64)",
        )

    sub = verbs.add_parser(
        "inspect",
        help="print the attention sites of TARGET",
        description="Print the attention sites of TARGET (and, with --variant, "
        "what rewriting them would do).",
    )
    common(sub)
    sub.add_argument("--variant", help="also print the rewrite report for this variant")
    sub.add_argument(
        "--debug",
        action="store_true",
        help="say why each softmax that is not attention was rejected",
    )

    sub = verbs.add_parser("rewrite", help="rewrite TARGET and save it with torch.export (.pt2)")
    common(sub)
    sub.add_argument("--variant", required=True)
    sub.add_argument("-o", "--output", required=True, type=Path, help="output .pt2 file")

    sub = verbs.add_parser("export", help="rewrite TARGET and export it to ONNX")
    common(sub)
    sub.add_argument("--variant", required=True)
    sub.add_argument("-o", "--output", required=True, type=Path, help="output .onnx file")
    sub.add_argument("--opset", type=int, default=None)

    sub = verbs.add_parser("bench", help="benchmark TARGET before/after rewriting")
    common(sub, lengths=False)
    sub.add_argument("--variant", nargs="+", required=True, metavar="V")
    sub.add_argument("--seq-lens", nargs="+", type=int, required=True, metavar="N")
    sub.add_argument(
        "--backend", nargs="+", default=["eager"], choices=("eager", "inductor", "onnxruntime")
    )
    sub.add_argument("--repeats", type=int, default=5)
    sub.add_argument("--warmup", type=int, default=1)
    sub.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    sub.add_argument("--no-memory", action="store_true", help="skip the memory worker processes")
    sub.add_argument("--no-progress", action="store_true")
    sub.add_argument("--json", type=Path, help="write the result as JSON")
    sub.add_argument("--plot", type=Path, help="write the time/memory plot (PNG, SVG, PDF)")
    sub.add_argument("--markdown", type=Path, help="write the Markdown tables")
    sub.add_argument("--output-dir", type=Path, help="keep ONNX files and worker files here")

    sub = verbs.add_parser(
        "generate",
        help="rewrite a causal LM TARGET and compare its generation before/after",
        description="Rewrite a causal language model, generate greedily with the original (Hugging "
        "Face generate with its KV cache, else the whole sequence per token) and with "
        "the rewritten model (prefill + one step per token), and print tokens/s and "
        "whether the tokens agree. Hugging Face TARGETs get their LM head; the last "
        "prompt of the batch is left-padded by a quarter.",
    )
    common(sub, lengths=False)
    sub.add_argument("--variant", required=True)
    sub.add_argument("--prompt-len", type=int, default=32, help="prompt length (default 32)")
    sub.add_argument(
        "--new-tokens", type=int, default=16, help="new tokens per sequence (default 16)"
    )
    sub.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")

    verbs.add_parser("variants", help="list the registered attention variants")
    return parser


# -- verbs ---------------------------------------------------------------------------------------


def _load(ns: argparse.Namespace, max_length: int = 0) -> Any:
    from attnrewrite.bench.targets import TargetOptions, load_target

    seq_len = getattr(ns, "seq_len", None) or 32
    options = TargetOptions(
        batch=ns.batch,
        seq_len=seq_len,
        max_length=max_length,
        seed=ns.seed,
        attn_implementation=ns.hf_attn,
    )
    with _status(f"loading {ns.target}"):
        return load_target(ns.target, options)


def _status(message: str) -> Any:
    from rich.console import Console

    return Console(stderr=True).status(message)


def _rewrite(ns: argparse.Namespace, target: Any) -> Any:
    import attnrewrite

    with _status(f"rewriting into {ns.variant}"):
        return attnrewrite.rewrite(
            target.model,
            ns.variant,
            args=target.args,
            kwargs=target.kwargs,
            seed=ns.seed,
            **dict(ns.option),
        )


def _cmd_inspect(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    import attnrewrite

    target = _load(ns)
    with _status("finding attention"):
        sites = attnrewrite.find_attention(target.model, target.args, target.kwargs, debug=ns.debug)
    table = Table(title=f"{len(sites)} attention site(s) in {target.description}")
    for column in (
        "site",
        "kind",
        "heads",
        "kv heads",
        "head dim",
        "Nq",
        "Nk",
        "mask",
        "causal",
        "cross",
        "scale",
        "weights escape",
    ):
        table.add_column(column)
    for s in sites:
        table.add_row(
            s.name,
            s.kind,
            str(s.num_heads),
            str(s.num_kv_heads),
            str(s.head_dim),
            str(s.query_len),
            str(s.key_len),
            str(s.mask),
            _yes(s.causal),
            _yes(s.is_cross),
            f"{s.scale:.4g}",
            _yes(s.weights_escape),
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    if ns.variant:
        print(_rewrite(ns, target).report)
    return 0


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _export_program(
    rewritten: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, str]:
    """``torch.export`` the rewritten model: batch and sequence axes dynamic, else static."""
    import torch
    from torch.utils import _pytree as pytree

    graph_module = rewritten.graph_module
    auto = torch.export.Dim.AUTO
    try:
        bound = pyinspect.signature(graph_module.forward).bind(*args, **kwargs).arguments
        shapes = {
            name: pytree.tree_map(
                lambda x: (
                    {d: auto for d in range(min(2, x.dim()))}
                    if isinstance(x, torch.Tensor) and x.dim() > 0
                    else None
                ),
                value,
            )
            for name, value in bound.items()
        }
        program = torch.export.export(
            graph_module, args, kwargs, dynamic_shapes=shapes, strict=False
        )
        return program, "batch and sequence axes dynamic where the model allows"
    except Exception as dynamic_error:  # noqa: BLE001 - fall back to the static export below
        try:
            program = torch.export.export(rewritten, args, kwargs, strict=False)
        except Exception as exc:  # noqa: BLE001
            raise AttnRewriteError(
                f"torch.export could not save the rewritten model: {type(exc).__name__}: "
                f"{str(exc)[:500]} (dynamic export failed first: {str(dynamic_error)[:200]}). "
                "The variant's forward must be export-traceable; try another variant or "
                "`attnrewrite export` for ONNX"
            ) from exc
        return program, (f"static shapes only (dynamic export failed: {str(dynamic_error)[:160]})")


def _cmd_rewrite(ns: argparse.Namespace) -> int:
    import torch

    target = _load(ns)
    rewritten = _rewrite(ns, target)
    print(rewritten.report)
    if not rewritten.report.rewritten:
        print(
            f"warning: no site was rewritten into {ns.variant}; saving the model unchanged",
            file=sys.stderr,
        )
    with _status("torch.export"):
        program, how = _export_program(rewritten, target.args, target.kwargs)
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(ns.output))
    print(f"saved {ns.output} ({how}); load it with torch.export.load('{ns.output}').module()")
    return 0


def _cmd_export(ns: argparse.Namespace) -> int:
    import attnrewrite

    target = _load(ns)
    rewritten = _rewrite(ns, target)
    print(rewritten.report)
    ns.output.parent.mkdir(parents=True, exist_ok=True)
    with _status("exporting to ONNX"):
        try:
            attnrewrite.export_onnx(
                rewritten, str(ns.output), args=target.args, kwargs=target.kwargs, opset=ns.opset
            )
        except ModuleNotFoundError as exc:
            raise AttnRewriteError(
                f"the ONNX backend is not available ({exc}); install attnrewrite with its "
                "backends (attnrewrite/backends/onnx/) and onnxscript"
            ) from exc
    print(f"saved {ns.output}; run it with attnrewrite.onnx_session('{ns.output}')")
    return 0


def _variant_options(variants: Sequence[str], options: dict[str, Any]) -> dict[str, dict]:
    """Give each variant the options it declares; unknown to all of them is an error."""
    from attnrewrite.variants import get_variant

    declared: dict[str, tuple[str, ...]] = {}
    for name in variants:
        try:
            declared[name] = get_variant(name).option_names()
        except Exception:  # noqa: BLE001 - the benchmark reports broken variants in its rows
            declared[name] = ()
    unknown = sorted(set(options) - {o for names in declared.values() for o in names})
    if unknown:
        raise VariantOptionError(
            f"option(s) {', '.join(unknown)} are options of none of {', '.join(variants)}; "
            "`attnrewrite variants` lists the variants, and each class docstring its options"
        )
    return {name: {k: v for k, v in options.items() if k in declared[name]} for name in variants}


def _cmd_bench(ns: argparse.Namespace) -> int:
    import attnrewrite
    from attnrewrite.bench.targets import TargetOptions

    lengths = sorted(ns.seq_lens)
    options = TargetOptions(
        batch=ns.batch,
        seq_len=lengths[0],
        max_length=lengths[-1],
        seed=ns.seed,
        attn_implementation=ns.hf_attn,
    )
    start = time.perf_counter()
    result = attnrewrite.benchmark(
        ns.target,
        _variant_options(ns.variant, dict(ns.option)),
        seq_lens=lengths,
        backends=ns.backend,
        repeats=ns.repeats,
        warmup=ns.warmup,
        batch=ns.batch,
        memory=not ns.no_memory,
        progress=not ns.no_progress,
        seed=ns.seed,
        num_threads=ns.threads,
        output_dir=ns.output_dir,
        target_options=options,
    )
    print(result.to_markdown())
    if ns.json:
        result.to_json(ns.json)
        print(f"wrote {ns.json}")
    if ns.markdown:
        ns.markdown.parent.mkdir(parents=True, exist_ok=True)
        ns.markdown.write_text(result.to_markdown() + "\n")
        print(f"wrote {ns.markdown}")
    if ns.plot:
        result.plot(ns.plot)
        print(f"wrote {ns.plot}")
    print(f"benchmark took {time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


def _cmd_generate(ns: argparse.Namespace) -> int:
    import torch
    from rich.console import Console
    from rich.table import Table

    from attnrewrite.bench.generation import compare_generation
    from attnrewrite.bench.targets import TargetOptions, load_target
    from attnrewrite.variants import get_variant

    if ns.prompt_len < 2 or ns.new_tokens < 1:
        raise AttnRewriteError("--prompt-len must be at least 2 and --new-tokens at least 1")
    if ns.threads:
        torch.set_num_threads(ns.threads)
    options = TargetOptions(
        batch=ns.batch,
        seq_len=ns.prompt_len,
        max_length=ns.prompt_len + ns.new_tokens,
        seed=ns.seed,
        attn_implementation=ns.hf_attn,
        causal_lm=True,
    )
    with _status(f"loading {ns.target}"):
        target = load_target(ns.target, options)
    ids = target.kwargs.get("input_ids", target.args[0] if target.args else None)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise AttnRewriteError(
            f"{ns.target}: generate needs token ids (B, N) as the first argument or input_ids="
        )
    mask = target.kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and ids.shape[0] > 1:
        # Left padding on the last prompt: the case generation most often gets wrong.
        mask = mask.clone()
        mask[-1, : ns.prompt_len // 4] = 0
        target = dataclasses.replace(target, kwargs={**target.kwargs, "attention_mask": mask})
    rewritten = _rewrite(ns, target)
    print(rewritten.report)
    config = getattr(target.model, "generation_config", None)
    with _status("generating"):
        result = compare_generation(
            target.model,
            rewritten,
            ids,
            mask,
            max_new_tokens=ns.new_tokens,
            eos_token_id=getattr(config, "eos_token_id", None),
            pad_token_id=getattr(config, "pad_token_id", None),
        )
    table = Table(
        title=f"greedy generation, batch {ids.shape[0]}, prompt {ns.prompt_len}, "
        f"{ns.new_tokens} new tokens: {target.description}"
    )
    for column in ("model", "new tokens", "seconds", "tokens/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for run in (result.before, result.after):
        table.add_row(
            run.label, str(run.new_tokens), f"{run.seconds:.3f}", f"{run.tokens_per_second:.1f}"
        )
    Console(width=max(120, Console().width)).print(table)
    print(f"speed-up: {result.speedup:.2f}x")
    difference = result.first_difference()
    if difference is None:
        print(f"greedy tokens agree: yes ({ids.shape[0]} x {result.after.new_tokens} tokens)")
        return 0
    sequence, index = difference
    print(f"greedy tokens agree: no (first difference: sequence {sequence}, new token {index})")
    if getattr(get_variant(ns.variant), "exact", False):
        print(
            f"error: {ns.variant} is exact, so its tokens must equal the original's",
            file=sys.stderr,
        )
        return 1
    return 0


def _cmd_variants(ns: argparse.Namespace) -> int:
    from attnrewrite.variants import get_variant, variant_names

    for name in variant_names():
        try:
            doc = (get_variant(name).__doc__ or "").strip().splitlines()[0]
        except Exception as exc:  # noqa: BLE001 - list the rest even if one fails to import
            doc = f"(fails to import: {type(exc).__name__}: {exc})"
        print(f"{name:16s} {doc}")
    return 0


_VERBS = {
    "inspect": _cmd_inspect,
    "rewrite": _cmd_rewrite,
    "export": _cmd_export,
    "bench": _cmd_bench,
    "generate": _cmd_generate,
    "variants": _cmd_variants,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``attnrewrite`` command; returns the exit status."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download: tiny configs or local dirs only
    ns = _parser().parse_args(argv)
    try:
        return _VERBS[ns.verb](ns)
    except AttnRewriteError as exc:
        print(f"attnrewrite {ns.verb}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
