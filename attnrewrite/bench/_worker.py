"""The memory worker: ``python -m attnrewrite.bench._worker JOB.json RESULT.json``.

One process measures one configuration (length, backend, variant), so peaks never mix (see
``attnrewrite.bench.memory`` for what is measured). The parent writes the job; the worker

1. gets the original model — either by rebuilding a TARGET string (``module:factory``, a Hugging
   Face model type or directory; see ``attnrewrite.bench.targets``), or by ``torch.load`` of the
   model the parent pickled with ``torch.save``. For classes defined in the parent's ``__main__``
   script, the worker loads that script as ``__mp_main__`` and aliases it as ``__main__`` first —
   the convention of ``multiprocessing``'s spawn start method, so scripts need the usual
   ``if __name__ == "__main__":`` guard;
2. rewrites it with the same variant, options, seed and example inputs as the parent (rewritten
   graph modules do not pickle, so they are rebuilt, not transferred); the ONNX Runtime backend
   instead opens the ``.onnx`` file the parent exported;
3. runs the warm-up, then the measured call, and writes ``{"peak_mb": ..., ...}`` or
   ``{"error": ...}`` to the result file.
"""

from __future__ import annotations

import json
import runpy
import sys
import traceback
import types
from pathlib import Path
from typing import Any


def _load_model(spec: dict[str, Any]) -> Any:
    import torch

    if spec["kind"] == "target":
        from attnrewrite.bench.targets import TargetOptions, load_target

        return load_target(spec["spec"], TargetOptions(**spec["options"])).model
    main_path = spec.get("main_path")
    if main_path and Path(main_path).is_file():
        # Classes the parent defined in its __main__ script are pickled as "__main__.<name>".
        namespace = runpy.run_path(main_path, run_name="__mp_main__")
        module = types.ModuleType("__mp_main__")
        module.__dict__.update(namespace)
        sys.modules["__mp_main__"] = sys.modules["__main__"] = module
    return torch.load(spec["path"], weights_only=False)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    from attnrewrite.bench import runners
    from attnrewrite.bench.memory import measure_peak

    torch.set_num_threads(int(job["threads"]))
    args, kwargs = torch.load(job["inputs"], weights_only=False)
    backend = job["backend"]
    if backend == "onnxruntime":
        runner = runners.onnx_runner(job["onnx_path"])
        # ONNX Runtime's arena keeps what it grew to: measure the first run, not a repeat.
        measurement, _ = measure_peak(lambda: runner.call(args, kwargs))
        return {
            "peak_mb": measurement.peak_mb,
            "baseline_mb": measurement.baseline_mb,
            "method": measurement.method + ", first run",
        }
    model = _load_model(job["model"]).eval()
    variant = job.get("variant")
    if variant is not None:
        import attnrewrite

        example_args, example_kwargs = torch.load(job["example"], weights_only=False)
        options = torch.load(variant["options"], weights_only=False)
        model = attnrewrite.rewrite(
            model,
            variant["name"],
            args=example_args,
            kwargs=example_kwargs,
            seed=job["seed"],
            **options,
        )
    runner = runners.prepare(backend, model, args, kwargs, onnx_path=Path(job["dir"]) / "x.onnx")
    for _ in range(max(1, int(job["warmup"]))):
        runner.call(args, kwargs)
    measurement, _ = measure_peak(lambda: runner.call(args, kwargs))
    return {
        "peak_mb": measurement.peak_mb,
        "baseline_mb": measurement.baseline_mb,
        "method": measurement.method,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_path, result_path = Path(argv[0]), Path(argv[1])
    job = json.loads(job_path.read_text())
    for entry in reversed(job.get("sys_path", [])):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    try:
        result = run_job(job)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which keeps going
        last = traceback.extract_tb(exc.__traceback__)[-1:]
        where = f" at {last[0].filename}:{last[0].lineno}" if last else ""
        result = {"error": f"{type(exc).__name__}: {str(exc)[:400]}{where}"}
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
