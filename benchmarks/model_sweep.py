"""Sweep every Hugging Face model type (tiny, random weights), torch.nn and timm models.

For each model and attention implementation: capture, ``find_attention`` against an independent
runtime count, the exact ``softmax`` rewrite's parity at a new batch size and length, and the
``linear`` rewrite (see ``tests/zoo/sweep.py``). Each model runs in a forked child with a time
limit, so a hang or a crash is one row, not the end of the sweep. Rows are appended to a JSON-lines
file as they finish (``--resume`` continues an interrupted sweep); the Markdown table is written at
the end (``--report-only`` rewrites it from the JSON lines).

Usage::

    python benchmarks/model_sweep.py                        # every type, eager + sdpa
    python benchmarks/model_sweep.py --types bert gpt2 t5   # a few
    python benchmarks/model_sweep.py --resume --jobs 2      # continue, two children at a time
    python benchmarks/model_sweep.py --update --types pegasus_x --impls eager   # re-check one
    python benchmarks/model_sweep.py --report-only          # table from the JSON lines
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import multiprocessing as mp
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def _child(conn: Any, kind: str, name: str, impl: str, default_cache: bool) -> None:
    import torch

    from tests.zoo import sweep

    torch.set_num_threads(1)
    # torch.export prints whole graphs when a guard fails; the row keeps the first line
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        if kind == "hf":
            result = sweep.sweep_hf(name, impl, check_default_cache=default_cache)
        elif kind == "nn":
            result = sweep.check_model(sweep.build_torch_nn(name))
        else:
            result = sweep.check_model(sweep.build_timm(name))
    except BaseException as exc:  # noqa: BLE001 - reported as a crash row
        result = sweep.SweepResult(name, impl, "crash", sweep._first_line(exc))
    conn.send(dataclasses.asdict(result))
    conn.close()


def run_jobs(
    jobs: list[tuple[str, str, str]],
    out: Path,
    *,
    timeout: float,
    parallel: int,
    default_cache: bool,
) -> None:
    ctx = mp.get_context("fork")
    pending = list(jobs)
    active: list[tuple[Any, Any, tuple[str, str, str], float]] = []
    done = 0
    with out.open("a") as sink:
        while pending or active:
            while pending and len(active) < parallel:
                job = pending.pop(0)
                parent, child = ctx.Pipe(duplex=False)
                kind, name, impl = job
                proc = ctx.Process(
                    target=_child, args=(child, kind, name, impl, default_cache and impl == "eager")
                )
                proc.start()
                child.close()
                active.append((proc, parent, job, time.perf_counter()))
            time.sleep(0.2)
            for entry in list(active):
                proc, conn, (kind, name, impl), start = entry
                elapsed = time.perf_counter() - start
                row = None
                if conn.poll():
                    try:
                        row = conn.recv()
                    except EOFError:
                        row = None
                    proc.join(5)
                elif not proc.is_alive():
                    row = {"status": "crash", "reason": f"child exited with {proc.exitcode}"}
                elif elapsed > timeout:
                    proc.kill()
                    proc.join()
                    row = {"status": "timeout", "reason": f"no result within {timeout:.0f} s"}
                else:
                    continue
                if row is None:
                    row = {"status": "crash", "reason": f"child exited with {proc.exitcode}"}
                if proc.is_alive():
                    proc.kill()
                    proc.join()
                row.setdefault("name", name)
                row.setdefault("impl", impl)
                row["kind"] = kind
                row["seconds"] = round(elapsed, 1)
                sink.write(json.dumps(row) + "\n")
                sink.flush()
                active.remove(entry)
                done += 1
                print(
                    f"[{done}/{len(jobs)}] {kind}:{name} {impl}: {row['status']} "
                    f"{(row.get('reason') or '; '.join(row.get('failures') or []))[:120]} "
                    f"({elapsed:.0f} s)",
                    flush=True,
                )


# -- the report -------------------------------------------------------------------------------


def load_rows(path: Path) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str, str], dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[(row.get("kind", "hf"), row["name"], row["impl"])] = row
    return list(rows.values())


def _cell(text: str, width: int = 90) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= width else text[: width - 1] + "…"


def totals(rows: list[dict[str, Any]]) -> dict[str, int]:
    capturable = [r for r in rows if r["status"] in ("ok", "fail", "model output NaN")]
    return {
        "tried": len(rows),
        "buildable": sum(r["status"] != "not buildable" for r in rows),
        "capturable": len(capturable),
        # found, or refused with a reason, or dead code export removed (said in the notes)
        "sites = expected": sum(
            r.get("sites_found") is not None
            and not any(f.startswith("count") for f in r.get("failures") or [])
            for r in capturable
        ),
        "parity ok": sum(r.get("parity") is not None and r["parity"] <= 1e-4 for r in capturable),
        "linear ok": sum(bool(r.get("linear_ok")) for r in capturable),
        "all checks ok": sum(r["status"] == "ok" for r in rows),
        "model output NaN": sum(r["status"] == "model output NaN" for r in rows),
        "timeout/crash": sum(r["status"] in ("timeout", "crash") for r in rows),
    }


def render(rows: list[dict[str, Any]], command: str, wall: str, every_type: int = 0) -> str:
    order = {"hf": 0, "nn": 1, "timm": 2}
    rows = sorted(rows, key=lambda r: (order.get(r.get("kind", "hf"), 3), r["name"], r["impl"]))
    lines = [
        "# Model sweep: every transformers model type, torch.nn and timm",
        "",
        f"Command: `{command}`",
        "",
        f"{wall} Tiny random-weight models (widths 64, 4 heads, 2 layers), batch 2 captured; "
        "softmax parity at batch 3 and a longer length (relative error ≤ 1e-4); "
        "`expected` is the independent runtime count of tests/zoo/sweep.py's AttentionCounter.",
        "",
        "## Totals",
        "",
        *(
            [
                "Coverage: "
                + ", ".join(
                    f"{impl} {sum(r['impl'] == impl for r in rows)} of {every_type}"
                    for impl in ("eager", "sdpa")
                )
                + " transformers model types"
                + (
                    " (the rest not run yet: the sweep was stopped; continue it with `--resume`)."
                    if any(
                        sum(r["impl"] == i for r in rows) < every_type for i in ("eager", "sdpa")
                    )
                    else "."
                ),
                "",
            ]
            if every_type
            else []
        ),
        "| impl | " + " | ".join(totals([])) + " |",
        "|---|" + "---:|" * len(totals([])),
    ]
    impls = sorted({r["impl"] for r in rows})
    for impl in [*impls, "all"]:
        part = [r for r in rows if impl == "all" or r["impl"] == impl]
        lines.append(f"| {impl} | " + " | ".join(str(v) for v in totals(part).values()) + " |")
    lines += [
        "",
        "## Per model",
        "",
        "| model | impl | status | sites found / expected | softmax parity (shape) | linear "
        "| default use_cache (eager probe) | s | reason / failures |",
        "|---|---|---|---|---|---|---|---:|---|",
    ]
    for r in rows:
        found, expected = r.get("sites_found"), r.get("sites_expected")
        refused = f" (+{r['sites_refused']} refused)" if r.get("sites_refused") else ""
        sites = (
            "" if expected is None else f"{'-' if found is None else found}{refused} / {expected}"
        )
        parity = "" if r.get("parity") is None else f"{r['parity']:.1e} ({r.get('parity_shape')})"
        linear = {True: "ok", False: "FAIL", None: ""}[r.get("linear_ok")]
        why = (
            r.get("reason")
            or "; ".join(r.get("failures") or [])
            or "; ".join(n for n in r.get("notes") or [] if "dead code" in n or "refused with" in n)
        )
        lines.append(
            f"| {r['name']} | {r['impl']} | {r['status']} | {sites} | {parity} | {linear} "
            f"| {_cell(r.get('default_cache', ''), 40)} | {r.get('seconds', 0):.0f} "
            f"| {_cell(why)} |"
        )
    return "\n".join(lines) + "\n"


def _symptom(failure: str) -> str:
    check = failure.split(":", 1)[0]
    if check == "count":
        return "site count differs from the independent count"
    if check == "parity":
        return "softmax rewrite changes the output (parity > 1e-4)"
    if check == "linear":
        return "linear rewrite output not finite"
    text = failure.split(":", 1)[1].strip() if ":" in failure else failure
    return f"{check} raises {text.split(':', 1)[0]}"


def render_failures(rows: list[dict[str, Any]]) -> str:
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for r in rows:
        if r["status"] in ("timeout", "crash"):
            groups[f"sweep {r['status']}"].append(f"{r['name']} ({r['impl']}): {r.get('reason')}")
        for failure in r.get("failures") or []:
            groups[_symptom(failure)].append(f"{r['name']} ({r['impl']}): {_cell(failure, 300)}")
    lines = ["# Model sweep failures, grouped by symptom", ""]
    for symptom, items in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        lines += [f"## {symptom} ({len(items)})", ""]
        lines += [f"- {item}" for item in sorted(items)]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--types", nargs="*", help="model types (default: every one)")
    parser.add_argument("--impls", nargs="*", default=["eager", "sdpa"])
    parser.add_argument("--timeout", type=float, default=240.0, help="seconds per model")
    parser.add_argument("--jobs", type=int, default=1, help="children at a time")
    parser.add_argument("--jsonl", type=Path, default=RESULTS / "model_sweep.jsonl")
    parser.add_argument("--out", type=Path, default=RESULTS / "model_sweep.md")
    parser.add_argument("--failures", type=Path, default=Path("/tmp/sweep_failures.md"))
    parser.add_argument("--resume", action="store_true", help="skip rows already in --jsonl")
    parser.add_argument(
        "--update",
        action="store_true",
        help="run the jobs again and append to --jsonl: their new rows replace the old ones",
    )
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument(
        "--no-default-cache",
        action="store_true",
        help="skip the probe of the model's default use_cache",
    )
    args = parser.parse_args(argv)
    command = "python " + " ".join(["benchmarks/model_sweep.py", *sys.argv[1:]])
    if args.update:  # rows of the full sweep, some re-run
        command = (
            "python benchmarks/model_sweep.py --jobs 2 --timeout 240`, continued with "
            f"`--resume`; rows re-run with `{command}"
        )
    elif args.report_only:  # the table of an earlier sweep (rows from --jsonl)
        command = (
            "python benchmarks/model_sweep.py --jobs 2 --timeout 240`, continued with "
            f"`--resume`; this table: `{command}"
        )

    start = time.perf_counter()
    if not args.report_only:
        import torch

        torch.set_num_threads(1)
        import transformers  # noqa: F401 - imported once here, forked into every child

        import attnrewrite  # noqa: F401
        from tests.zoo import sweep

        types = args.types or sweep.hf_model_types()
        # the CI sample, then torch.nn and timm, then every other type (in a fixed shuffled order,
        # so that an interrupted sweep is a fair sample), eager before sdpa
        first = [t for t in types if t in sweep.CI_SAMPLE]
        rest = [t for t in types if t not in sweep.CI_SAMPLE]
        random.Random(0).shuffle(rest)
        jobs = [("hf", t, args.impls[0]) for t in first]
        if not args.types:
            jobs += [("nn", name, "torch") for name in sweep.TORCH_NN_MODELS]
            if sweep.timm_skip_reason() is None:
                jobs += [("timm", name, "timm") for name in sweep.TIMM_MODELS]
            else:
                print(f"timm skipped: {sweep.timm_skip_reason()}")
        jobs += [("hf", t, args.impls[0]) for t in rest]
        jobs += [("hf", t, impl) for impl in args.impls[1:] for t in first + rest]
        if args.resume:
            have = {(r.get("kind", "hf"), r["name"], r["impl"]) for r in load_rows(args.jsonl)}
            jobs = [j for j in jobs if j not in have]
        elif args.jsonl.exists() and not args.update:
            args.jsonl.unlink()
        args.jsonl.parent.mkdir(parents=True, exist_ok=True)
        run_jobs(
            jobs,
            args.jsonl,
            timeout=args.timeout,
            parallel=args.jobs,
            default_cache=not args.no_default_cache,
        )
    rows = load_rows(args.jsonl)
    try:
        from tests.zoo import sweep

        every_type = len(sweep.hf_model_types())
    except ImportError:
        every_type = 0
    wall = (
        f"This run: {time.perf_counter() - start:.0f} s wall on {os.cpu_count()} shared cores "
        "(1 thread per model)."
        if not args.report_only
        else ""
    ) + f" Sum of per-model wall times: {sum(r.get('seconds', 0) for r in rows):.0f} s."
    table = render(rows, command, wall, every_type)
    args.out.write_text(table)
    args.failures.write_text(render_failures(rows))
    print(table.split("## Per model")[0])
    print(f"wrote {args.out} and {args.failures}")


if __name__ == "__main__":
    main()
