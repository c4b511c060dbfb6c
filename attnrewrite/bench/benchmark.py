"""Before/after benchmark: latency, peak memory, output error and FLOPs across lengths and backends.

How a run goes (per sequence length N, ascending):

1. inputs at N come from ``make_inputs(batch, N)`` (default: the example resized, see
   ``attnrewrite.bench.inputs``);
2. a reference pass runs the original and every rewritten model once in eager mode under
   ``FlopCounterMode``: FLOPs per call, and the outputs every backend's error is measured against;
3. per backend, every model is warmed up (untimed; Inductor compiles here, ONNX export and session
   creation happen before), then timed ``repeats`` times *round-robin* — one call of each model per
   round, starting from a different model each round — so drift on a shared machine hits all
   models alike and the ratios are measured side by side;
4. after all timings, peak memory is measured per (N, backend, model) in a fresh worker process
   (``attnrewrite.bench._worker``; how and why in ``attnrewrite.bench.memory``).

Each variant is rewritten once, from the example inputs (capture keeps the sequence axis dynamic),
and reused at every length. A variant that fails to import or to rewrite, or whose sites were all
refused, gets rows whose ``status`` says why; the run goes on.

Transfer to the memory workers: a model given as a TARGET string (``"module:factory"``, a Hugging
Face model type or directory) is rebuilt from that string in the worker; an ``nn.Module`` is
written with ``torch.save`` (pickled: its classes must be importable, or defined in the running
``__main__`` script).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

import attnrewrite
from attnrewrite.bench import flops as flop_counting
from attnrewrite.bench import metrics, runners
from attnrewrite.bench.inputs import MakeInputs, default_make_inputs, example_batch, example_length
from attnrewrite.bench.results import ORIGINAL, BenchmarkResult, BenchRow, Crossover
from attnrewrite.bench.targets import TargetOptions, load_target
from attnrewrite.errors import BenchmarkError

VariantsArg = str | Sequence[str] | Mapping[str, Mapping[str, Any]]


@dataclasses.dataclass(frozen=True)
class VariantChoice:
    """One benchmarked model: ``label`` in the rows, ``name`` in the registry, its options."""

    label: str
    name: str | None
    options: dict[str, Any]


@dataclasses.dataclass
class _Model:
    """A benchmarked model and what is known about it so far."""

    choice: VariantChoice
    module: nn.Module | None
    status: str = "ok"
    rewrite_s: float | None = None
    sites: tuple[int, int] | None = None
    runners: dict[str, runners.Runner | str] = dataclasses.field(default_factory=dict)


def parse_variants(variants: VariantsArg) -> list[VariantChoice]:
    """Normalise the ``variants`` argument (see :func:`benchmark`)."""
    if isinstance(variants, str):
        variants = [variants]
    if isinstance(variants, Mapping):
        choices = []
        for label, options in variants.items():
            options = dict(options or {})
            name = options.pop("variant", label)
            choices.append(VariantChoice(str(label), str(name), options))
    else:
        choices = [VariantChoice(str(v), str(v), {}) for v in variants]
    labels = [c.label for c in choices]
    if ORIGINAL in labels:
        raise BenchmarkError(
            f"'{ORIGINAL}' is the label of the unmodified model; name the "
            "variant differently (variants={'my_label': {'variant': ...}})"
        )
    if len(set(labels)) != len(labels):
        raise BenchmarkError(
            f"duplicate variant labels in {labels}; give each a distinct label "
            "with variants={'label': {'variant': name, **options}}"
        )
    return choices


def benchmark(
    model: nn.Module | str,
    variants: VariantsArg,
    args: Any = None,
    kwargs: Any = None,
    *,
    seq_lens: Sequence[int] | None = None,
    backends: Sequence[str] = ("eager",),
    repeats: int = 5,
    make_inputs: MakeInputs | None = None,
    batch: int | None = None,
    memory: bool = True,
    output_dir: str | Path | None = None,
    progress: bool = True,
    warmup: int = 1,
    seed: int = 0,
    memory_jobs: int = 1,
    memory_timeout_s: float = 900,
    num_threads: int | None = None,
    target_options: TargetOptions | None = None,
) -> BenchmarkResult:
    """Measure ``model`` before and after rewriting its attention into each of ``variants``.

    Args:
        model: an ``nn.Module``, or a TARGET string (``"module:factory"``, ``"file.py:factory"``,
            a Hugging Face model type such as ``"bert"``, or a local model directory; see
            ``attnrewrite.bench.targets``) whose example inputs are used unless given.
        variants: a variant name, a list of names, or ``{label: {**options}}`` (the label is the
            variant name unless the options hold ``"variant": name``), e.g.
            ``{"performer": {"num_features": 64}, "lin-elu": {"variant": "linear"}}``.
        args, kwargs: example inputs, as for ``rewrite``.
        seq_lens: sequence lengths N to measure; default: the example's length only.
        backends: any of ``"eager"``, ``"inductor"``, ``"onnxruntime"``.
        repeats: timed calls per configuration (after warm-up).
        make_inputs: ``make_inputs(batch, length) -> (args, kwargs)``; default: resize the example
            (token ids random within their observed range, masks all ones).
        batch: batch size of the measured inputs; default: the example's.
        memory: measure peak memory, one worker process per configuration (slower).
        output_dir: keep ONNX files there and write ``benchmark.json``, ``benchmark.md`` and
            ``benchmark.png``; default: a temporary directory, removed afterwards.
        progress: show a ``rich`` progress bar.
        warmup: untimed calls before timing, per configuration.
        seed: seed of random inputs and of random features in variants.
        memory_jobs: memory workers run at once (they do not time, so > 1 does not skew timings,
            but they run after all timings anyway).
        memory_timeout_s: time limit of one memory worker.
        num_threads: torch threads for timing and workers; default: ``torch.get_num_threads()``.
        target_options: how a TARGET string is built (example batch and length, Hugging Face
            attention implementation); default: from ``batch``, ``seq_lens`` and ``seed``.

    Returns:
        A :class:`~attnrewrite.bench.results.BenchmarkResult`: ``.rows``, ``.to_json(path)``,
        ``.to_markdown()``, ``.plot(path)``.
    """
    choices = parse_variants(variants)
    backend_names = _parse_backends(backends)
    if repeats < 1:
        raise BenchmarkError(f"repeats must be >= 1, got {repeats}")
    threads = int(num_threads or torch.get_num_threads())
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _benchmark(
            model,
            choices,
            args,
            kwargs,
            seq_lens,
            backend_names,
            repeats,
            make_inputs,
            batch,
            memory,
            output_dir,
            progress,
            warmup,
            seed,
            memory_jobs,
            memory_timeout_s,
            threads,
            target_options,
        )
    finally:
        torch.set_num_threads(previous_threads)


def _benchmark(
    model: nn.Module | str,
    choices: list[VariantChoice],
    args: Any,
    kwargs: Any,
    seq_lens: Sequence[int] | None,
    backend_names: list[str],
    repeats: int,
    make_inputs: MakeInputs | None,
    batch: int | None,
    memory: bool,
    output_dir: str | Path | None,
    progress: bool,
    warmup: int,
    seed: int,
    memory_jobs: int,
    memory_timeout_s: float,
    threads: int,
    target_options: TargetOptions | None,
) -> BenchmarkResult:

    transfer: dict[str, Any]
    if isinstance(model, str):
        hint = sorted(seq_lens) if seq_lens else []
        options = target_options or TargetOptions(
            batch=batch or 2,
            seq_len=hint[0] if hint else 32,
            max_length=hint[-1] if hint else 0,
            seed=seed,
        )
        target = load_target(model, options)
        module = target.model
        if args is None and not kwargs:
            args, kwargs = target.args, target.kwargs
        transfer = {"kind": "target", "spec": model, "options": dataclasses.asdict(options)}
    elif isinstance(model, nn.Module):
        module, transfer = model, {"kind": "pickle"}
    else:
        raise BenchmarkError(
            f"model must be an nn.Module or a TARGET string, got {type(model).__name__}"
        )
    module.eval()
    args, kwargs = _as_inputs(args, kwargs)
    if make_inputs is None:
        make_inputs = default_make_inputs(args, kwargs, seed=seed) if seq_lens else None
    lengths = sorted(int(n) for n in seq_lens) if seq_lens else [example_length(args, kwargs) or 0]
    batch = int(batch or example_batch(args, kwargs))

    with contextlib.ExitStack() as stack:
        if output_dir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="attnbench-")))
        else:
            workdir = Path(output_dir)
            workdir.mkdir(parents=True, exist_ok=True)
        bar = stack.enter_context(_progress(progress))
        run = _Run(
            module,
            choices,
            args,
            kwargs,
            backend_names,
            lengths,
            batch,
            repeats,
            warmup,
            seed,
            workdir,
            bar,
        )
        run.rewrite_all()
        for length in lengths:
            inputs = make_inputs(batch, length) if make_inputs else (args, kwargs)
            run.measure_length(length, _as_inputs(*inputs))
        if memory:
            run.measure_memory(transfer, threads, memory_jobs, memory_timeout_s)
        result = run.result(threads, memory)
        if output_dir is not None:
            result.to_json(workdir / "benchmark.json")
            (workdir / "benchmark.md").write_text(result.to_markdown() + "\n")
            result.plot(workdir / "benchmark.png")
    return result


def _parse_backends(backends: Sequence[str]) -> list[str]:
    if isinstance(backends, str):
        backends = [backends]
    out = []
    for name in backends:
        if name not in runners.BACKENDS:
            raise BenchmarkError(
                f"unknown backend '{name}'; choose from eager, inductor, onnxruntime"
            )
        if runners.BACKENDS[name] not in out:
            out.append(runners.BACKENDS[name])
    if not out:
        raise BenchmarkError("no backend given; choose from eager, inductor, onnxruntime")
    return out


def _as_inputs(args: Any, kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args is None:
        args = ()
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    if not args and not kwargs:
        raise BenchmarkError("example inputs are required: pass args=(x,) and/or kwargs={...}")
    return args, dict(kwargs or {})


class _NullProgress:
    def add_task(self, *a: Any, **k: Any) -> int:
        return 0

    def update(self, *a: Any, **k: Any) -> None:
        pass

    def advance(self, *a: Any, **k: Any) -> None:
        pass


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    if not enabled:
        yield _NullProgress()
        return
    from rich import progress as rp

    with rp.Progress(
        rp.TextColumn("[bold]{task.description}"),
        rp.BarColumn(),
        rp.MofNCompleteColumn(),
        rp.TimeElapsedColumn(),
        transient=False,
    ) as bar:
        yield bar


class _Run:
    """State of one benchmark run (kept off the public function for readability)."""

    def __init__(
        self,
        original: nn.Module,
        choices: list[VariantChoice],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        backends: list[str],
        lengths: list[int],
        batch: int,
        repeats: int,
        warmup: int,
        seed: int,
        workdir: Path,
        bar: Any,
    ) -> None:
        self.models = [_Model(VariantChoice(ORIGINAL, None, {}), original)]
        self.models += [_Model(c, None) for c in choices]
        self.args, self.kwargs = args, kwargs
        self.backends, self.lengths, self.batch = backends, lengths, batch
        self.repeats, self.warmup, self.seed = repeats, warmup, seed
        self.workdir, self.bar = workdir, bar
        self.rows: dict[tuple[int, str, str], dict[str, Any]] = {}
        self.inputs: dict[int, Path] = {}
        self.notes: list[str] = []
        per_length = len(self.models) * (1 + len(backends))
        self.task = bar.add_task("rewriting", total=len(choices) + per_length * len(lengths))

    # -- rewriting ---------------------------------------------------------------------------------
    def rewrite_all(self) -> None:
        for model in self.models[1:]:
            choice = model.choice
            self.bar.update(self.task, description=f"rewrite {choice.label}")
            start = time.perf_counter()
            try:
                rewritten = attnrewrite.rewrite(
                    self.models[0].module,
                    choice.name,
                    args=self.args,
                    kwargs=self.kwargs,
                    seed=self.seed,
                    **choice.options,
                )
            except Exception as exc:  # noqa: BLE001 - a broken variant must not stop the run
                model.status = f"error: rewrite failed: {type(exc).__name__}: {_short(exc)}"
                self.bar.advance(self.task)
                continue
            model.rewrite_s = time.perf_counter() - start
            report = rewritten.report
            done, total = len(report.rewritten), len(report.sites)
            model.sites = (done, total)
            if total == 0:
                model.status = "not applied: no attention site found"
            elif done == 0:
                reasons = sorted({r.reason for r in report.skipped})
                model.status = f"not applied: {'; '.join(reasons)[:300]}"
            else:
                model.module = rewritten
            self.bar.advance(self.task)

    # -- timing ------------------------------------------------------------------------------------
    def _row(self, length: int, backend: str, model: _Model) -> dict[str, Any]:
        key = (length, backend, model.choice.label)
        if key not in self.rows:
            self.rows[key] = {"status": model.status}
        return self.rows[key]

    def _runner(self, backend: str, model: _Model) -> runners.Runner | str:
        if backend not in model.runners:
            label = model.choice.label
            try:
                runner: runners.Runner | str = runners.prepare(
                    backend,
                    model.module,
                    self.args,
                    self.kwargs,
                    onnx_path=self.workdir / f"{_file_name(label)}.onnx",
                )
                for note in runner.notes:
                    if note not in self.notes:
                        self.notes.append(note)
            except runners.BackendUnavailable as exc:
                runner = f"unavailable: {_short(exc)}"
            model.runners[backend] = runner
        return model.runners[backend]

    def measure_length(self, length: int, inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> None:
        args, kwargs = inputs
        path = self.workdir / f"inputs_{length}.pt"
        torch.save((args, kwargs), path)
        self.inputs[length] = path
        # Reference pass: FLOPs and the eager outputs every backend is compared with.
        references: dict[str, torch.Tensor | None] = {}
        for model in self.models:
            if model.status != "ok":
                self.bar.advance(self.task)
                continue
            self.bar.update(self.task, description=f"N={length} flops {model.choice.label}")
            eager = runners.prepare("eager", model.module, args, kwargs, onnx_path=Path())
            try:
                start = time.perf_counter()
                flops, output = flop_counting.count_flops(lambda e=eager: e.call(args, kwargs))
                setup = time.perf_counter() - start
            except Exception as exc:  # noqa: BLE001
                for backend in self.backends:
                    self._row(length, backend, model)["status"] = (
                        f"error: eager call failed at N={length}: {type(exc).__name__}: "
                        f"{_short(exc)}"
                    )
                references[model.choice.label] = None
                self.bar.advance(self.task)
                continue
            references[model.choice.label] = metrics.main_output(output)
            for backend in self.backends:
                row = self._row(length, backend, model)
                row["flops"] = flops
                if backend == "eager":
                    row["setup_s"] = setup
            self.bar.advance(self.task)
        reference = references.get(ORIGINAL)

        for backend in self.backends:
            ready: list[tuple[_Model, runners.Runner]] = []
            for model in self.models:
                row = self._row(length, backend, model)
                self.bar.update(
                    self.task, description=f"N={length} {backend} warm-up {model.choice.label}"
                )
                self.bar.advance(self.task)
                if row["status"] != "ok":
                    continue
                runner = self._runner(backend, model)
                if isinstance(runner, str):
                    row["status"] = runner
                    continue
                # Eager was already warmed up by the reference pass.
                calls = max(0, self.warmup - 1) if backend == "eager" else max(1, self.warmup)
                try:
                    start = time.perf_counter()
                    output = references.get(model.choice.label)
                    for _ in range(calls):
                        output = metrics.main_output(runner.call(args, kwargs))
                    setup = time.perf_counter() - start
                except Exception as exc:  # noqa: BLE001
                    row["status"] = (
                        f"error: {backend} call failed: {type(exc).__name__}: {_short(exc)}"
                    )
                    continue
                if backend != "eager":
                    first = length == self.lengths[0]
                    row["setup_s"] = setup + (runner.setup_s if first else 0.0)
                else:
                    row["setup_s"] = row.get("setup_s", 0.0) + setup
                rel, cosine = metrics.output_error(output, reference)
                row["max_rel_error"], row["cosine"] = rel, cosine
                ready.append((model, runner))
            self._time_round_robin(length, backend, ready, args, kwargs)

    def _time_round_robin(
        self,
        length: int,
        backend: str,
        ready: list[tuple[_Model, runners.Runner]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        samples: dict[str, list[float]] = {m.choice.label: [] for m, _ in ready}
        for round_index in range(self.repeats):
            self.bar.update(
                self.task,
                description=f"N={length} {backend} timing {round_index + 1}/{self.repeats}",
            )
            shift = round_index % max(1, len(ready))
            for model, runner in ready[shift:] + ready[:shift]:
                start = time.perf_counter()
                runner.call(args, kwargs)
                samples[model.choice.label].append((time.perf_counter() - start) * 1e3)
        for model, _ in ready:
            times = samples[model.choice.label]
            q1, median, q3 = metrics.quantiles(times)
            self._row(length, backend, model).update(
                repeats=len(times),
                median_ms=median,
                q1_ms=q1,
                q3_ms=q3,
                min_ms=min(times),
                max_ms=max(times),
            )

    # -- memory ------------------------------------------------------------------------------------
    def measure_memory(
        self, transfer: dict[str, Any], threads: int, jobs: int, timeout_s: float
    ) -> None:
        transfer = dict(transfer)
        if transfer["kind"] == "pickle":
            problem = self._pickle_original(transfer)
            if problem:
                self.notes.append(f"memory not measured: {problem}")
                for row in self.rows.values():
                    row["memory_status"] = "not measured"
                return
        example = self.workdir / "example.pt"
        torch.save((self.args, self.kwargs), example)
        todo = [
            (length, backend, model)
            for length in self.lengths
            for backend in self.backends
            for model in self.models
            if self.rows.get((length, backend, model.choice.label), {}).get("status") == "ok"
        ]
        if not todo:
            return
        task = self.bar.add_task("memory", total=len(todo))

        def one(item: tuple[int, str, _Model]) -> None:
            length, backend, model = item
            label = model.choice.label
            variant = None
            if model.choice.name is not None:
                # Options may hold modules or tensors (a feature map): pickled, not JSON.
                options_path = self.workdir / f"options_{_file_name(label)}.pt"
                try:
                    torch.save(model.choice.options, options_path)
                except Exception as exc:  # noqa: BLE001
                    row = self.rows[(length, backend, label)]
                    row["memory_status"] = (
                        f"not measured: the variant options cannot be "
                        f"pickled for the worker ({_short(exc)})"
                    )
                    self.bar.advance(task)
                    return
                variant = {"name": model.choice.name, "options": str(options_path)}
            job = {
                "model": transfer,
                "example": str(example),
                "inputs": str(self.inputs[length]),
                "variant": variant,
                "seed": self.seed,
                "backend": backend,
                "threads": threads,
                "warmup": self.warmup,
                "onnx_path": str(self.workdir / f"{_file_name(label)}.onnx"),
                "dir": str(self.workdir),
                "sys_path": [p for p in sys.path if p],
            }
            stem = self.workdir / f"memory_{length}_{backend}_{_file_name(label)}"
            result = _run_worker(job, stem, timeout_s)
            row = self.rows[(length, backend, label)]
            if "peak_mb" in result:
                row["peak_mb"] = result["peak_mb"]
                row["memory_status"] = "ok"
            else:
                row["memory_status"] = f"error: {result.get('error', 'no result')}"
            self.bar.update(task, description=f"memory N={length} {backend} {label}")
            self.bar.advance(task)

        if jobs > 1:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                list(pool.map(one, todo))
        else:
            for item in todo:
                one(item)

    def _pickle_original(self, transfer: dict[str, Any]) -> str | None:
        original = self.models[0].module
        path = self.workdir / "original_model.pt"
        try:
            torch.save(original, path)
        except Exception as exc:  # noqa: BLE001
            return (
                f"the model cannot be pickled for the worker process ({type(exc).__name__}: "
                f"{_short(exc)}); pass a 'module:factory' TARGET string instead, or "
                "memory=False"
            )
        transfer["path"] = str(path)
        if any(type(m).__module__ == "__main__" for m in original.modules()):
            main_file = getattr(sys.modules["__main__"], "__file__", None)
            if not main_file:
                return (
                    "the model's classes are defined in an interactive session, which a "
                    "worker process cannot import; define them in a module or file, or pass "
                    "memory=False"
                )
            transfer["main_path"] = os.path.abspath(main_file)
        return None

    # -- result ------------------------------------------------------------------------------
    def result(self, threads: int, memory: bool) -> BenchmarkResult:
        rows: list[BenchRow] = []
        for length in self.lengths:
            for backend in self.backends:
                base = self.rows.get((length, backend, ORIGINAL), {})
                for model in self.models:
                    values = dict(self.rows.get((length, backend, model.choice.label), {}))
                    values.setdefault("status", model.status)
                    rows.append(_finish_row(values, base, model, backend, length, self.batch))
        crossovers = []
        for backend in self.backends:
            for model in self.models[1:]:
                label = model.choice.label
                speedups = [
                    next(
                        (
                            r.speedup
                            for r in rows
                            if (r.backend, r.variant, r.length) == (backend, label, n) and r.ok
                        ),
                        None,
                    )
                    for n in self.lengths
                ]
                length, how = metrics.crossover(self.lengths, speedups)
                crossovers.append(Crossover(backend, label, length, how))
        meta = {
            "lengths": self.lengths,
            "batch": self.batch,
            "repeats": self.repeats,
            "warmup": self.warmup,
            "backends": self.backends,
            "seed": self.seed,
            "variants": {
                m.choice.label: {"variant": m.choice.name, **m.choice.options}
                for m in self.models[1:]
            },
            "memory": "per-configuration worker process, VmHWM after clear_refs minus resident "
            "size before the measured call"
            if memory
            else "not measured",
            "timing": "round-robin over models, median and IQR of repeats, warm-up excluded",
            "threads": threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": _machine(),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "notes": self.notes,
        }
        return BenchmarkResult(rows, crossovers, meta)


def _finish_row(
    values: dict[str, Any],
    base: dict[str, Any],
    model: _Model,
    backend: str,
    length: int,
    batch: int,
) -> BenchRow:
    ok = values.get("status") == "ok"
    if not ok:
        keep = {k: values[k] for k in ("status", "flops", "memory_status") if k in values}
        values = keep
    median, base_median = values.get("median_ms"), base.get("median_ms")
    flops, base_flops = values.get("flops"), base.get("flops")
    speedup = base_median / median if ok and median and base_median else None
    bound = base_flops / flops if flops and base_flops else None
    peak, base_peak = values.get("peak_mb"), base.get("peak_mb")
    return BenchRow(
        backend=backend,
        variant=model.choice.label,
        variant_name=model.choice.name,
        length=length,
        batch=batch,
        sites_rewritten=model.sites[0] if model.sites else None,
        sites_total=model.sites[1] if model.sites else None,
        rewrite_s=model.rewrite_s,
        speedup=speedup,
        gflops_per_s=flops / (median * 1e6) if flops and median else None,
        flop_bound_speedup=bound,
        flop_bound_fraction=speedup / bound if speedup and bound else None,
        memory_ratio=peak / base_peak if peak and base_peak else None,
        **values,
    )


def _run_worker(job: dict[str, Any], stem: Path, timeout_s: float) -> dict[str, Any]:
    job_path, result_path = stem.with_suffix(".job.json"), stem.with_suffix(".result.json")
    job_path.write_text(json.dumps(job, default=str))
    env = dict(os.environ)
    package_root = str(Path(attnrewrite.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "attnrewrite.bench._worker", str(job_path), str(result_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout_s:.0f} s (raise memory_timeout_s)"}
    if result_path.exists():
        return json.loads(result_path.read_text())
    tail = (done.stderr or done.stdout or "").strip().splitlines()[-3:]
    return {"error": f"worker exited with {done.returncode}: {' | '.join(tail)[:400]}"}


def _short(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _file_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def _machine() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs visible"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible"


__all__ = [
    "BenchRow",
    "BenchmarkResult",
    "Crossover",
    "VariantChoice",
    "benchmark",
    "parse_variants",
]
