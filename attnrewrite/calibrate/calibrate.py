"""``calibrate``: train the rewritten sites' own parameters to imitate the softmax they replaced.

A trainable variant (``t2r``, ``hedgehog``, ``kernel`` with an ``nn.Module`` feature map,
``linformer``, ``synthesizer``) starts from an initialisation that only roughly resembles softmax.
Calibration fits it, site by site, to the exact softmax output computed from the same canonical
inputs (the teacher, :func:`attnrewrite.ops.attention`), on a small set of the
model's own inputs; the model's own weights stay frozen and unchanged.

How it runs:

1. **Record** (one forward pass per batch, no gradients): every rewritten site is put in teacher
   forcing (:func:`~attnrewrite.calibrate.mode.teacher_forcing`): it hands the exact softmax
   output downstream, so the model computes exactly what the original computes, and each
   selected site's canonical inputs and teacher output are kept in memory.
2. **Refinement without gradients** (variants that define ``refine(calls)``, e.g. routing's
   k-means of its centroids): each such site is refined once on all its recorded calls, and put
   back if that raised its error.
3. **Per-site training**: since downstream of every site runs on the teacher's output, the sites
   do not influence each other: all layers are trained in parallel, each on its own recorded
   inputs, and a step costs only the variants' forward and backward passes, not the model's.
   One step takes one recorded batch (shuffled each epoch under ``seed``) for every site.
4. **End-to-end** (optional): the model runs with its variants, and their parameters are tuned
   together to bring the model's outputs closer to the original model's (recorded in step 1).

Divergence raises :class:`~attnrewrite.errors.CalibrationDivergedError` (naming the site and the
step) after restoring every parameter, rather than returning a half-trained model with a status.

Defaults, chosen on the pretrained all-MiniLM-L6-v2 sentence encoder (6 layers, 12 heads of 32;
``examples/calibrate_minilm.py``, results in ``BENCHMARKS.md``):

- ``loss="mse"`` (relative): for ``t2r`` it gave better held-out embeddings than ``attn_kl``
  (mean cosine 0.978 against 0.972 for sentences, 0.93 against 0.91 for paragraphs, same steps);
  for ``hedgehog`` the two were within 0.003. It also works for every trainable variant.
- Adam, ``lr=3e-2`` with 5% warm-up and cosine decay to 0: the parameters are small per-head
  maps, and the relative loss is O(1) at every layer, so one rate fits all sites.
- ``steps=1000``: the per-site error falls fast for a few hundred steps and slowly after; on
  MiniLM the held-out embeddings gained more from giving the rest of a fixed time budget to the
  end-to-end step than from more per-site steps.
- End-to-end: ``lr / 10`` for 300 steps: it starts from calibrated sites; on MiniLM with the
  ``hedgehog`` hybrid (``window=32``) it halved the model-output error on the calibration set
  (relative MSE 0.0068 -> 0.0035) and raised the held-out paragraphs' mean cosine from 0.982 to
  0.985; for pure ``t2r``, 0.061 -> 0.014 and 0.898 -> 0.930.
- Neither step hands back something worse than it started from on its own objective: a site
  whose per-site error rose, or an end-to-end step that raised the model-output error, is put
  back (``reverted`` in the result).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from attnrewrite.calibrate.losses import (
    LOSSES,
    attention_kl,
    check_attn_kl,
    site_output,
    site_output_loss,
    squared_error,
)
from attnrewrite.calibrate.mode import SiteCall, teacher_forcing, train_only
from attnrewrite.calibrate.result import CalibrationResult, EndToEndCalibration, SiteCalibration
from attnrewrite.errors import CalibrationDivergedError, CalibrationError, CalibrationInputError
from attnrewrite.rewriter.rewrite import RewrittenModel

#: Default per-site steps when neither ``steps`` nor ``epochs`` is given.
DEFAULT_STEPS = 1000
#: Default Adam learning rate of the per-site step.
DEFAULT_LR = 3e-2
#: Default steps of the end-to-end step (``end_to_end=True``).
DEFAULT_END_TO_END_STEPS = 300
#: The end-to-end step's learning rate, as a fraction of the per-site one: it starts from
#: calibrated sites and only refines them.
END_TO_END_LR_FACTOR = 0.1
#: Share of ``max_seconds`` kept for the end-to-end step when it is asked for.
END_TO_END_TIME_SHARE = 0.25
#: Share of the steps spent warming the learning rate up linearly before the cosine decay.
WARMUP_SHARE = 0.05

Batch = tuple[tuple[Any, ...], dict[str, Any]]
SiteLoss = Callable[[nn.Module, SiteCall], Tensor]


@dataclasses.dataclass
class _Site:
    """A selected site: its module, trainable parameters and recorded calls per batch."""

    name: str
    variant: str
    module: nn.Module
    parameters: list[nn.Parameter]
    calls: list[list[SiteCall]] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0
    #: The variant has a no-gradient ``refine(calls)`` hook (e.g. routing's k-means).
    refinable: bool = False


def calibrate(
    model: RewrittenModel,
    inputs: Iterable[Any],
    *,
    steps: int | None = None,
    lr: float | None = None,
    loss: str = "mse",
    layers: str | Sequence[str] | None = None,
    epochs: int | None = None,
    seed: int = 0,
    end_to_end: bool | int = False,
    progress: bool = True,
    max_seconds: float | None = None,
) -> CalibrationResult:
    """Train the rewritten sites' own parameters so each site imitates exact softmax attention.

    Each selected site is fitted to the exact softmax output computed from the same canonical
    inputs (the teacher), with every layer trained in parallel on the inputs it receives in the
    original model: during calibration a variant hands the teacher's output downstream, and its
    own output only enters the loss. Only the variants' parameters train; every other parameter
    has ``requires_grad=False`` meanwhile (restored afterwards) and is bit-identical afterwards.

    Args:
        model: a :class:`~attnrewrite.RewrittenModel` (the result of ``attnrewrite.rewrite``).
        inputs: an iterable (a list, or a ``DataLoader``) of ``(args, kwargs)`` pairs, each one
            batch as for ``model(*args, **kwargs)``; it is iterated once. Every selected site's
            canonical q, k, v and softmax output of every batch are held in memory (about
            4·tokens·hidden floats per site: 2 GB for six layers of 384-wide MiniLM over 64k
            tokens), so a few dozen batches of typical inputs are the intended size.
        steps: optimiser steps per site (default 1000, or ``epochs`` passes over the batches).
            With both ``steps`` and ``epochs``, training stops at whichever comes first.
            ``steps=0`` with ``end_to_end`` runs only the end-to-end step (e.g. to continue an
            earlier calibration).
        lr: Adam learning rate (default 3e-2), warmed up over the first 5% of the steps and then
            decayed to 0 along a cosine.
        loss: ``"mse"``: relative squared error ‖y − t‖² / ‖t‖² of the site's output y against
            the teacher t; ``"attn_kl"``: KL divergence between the softmax attention weights and
            the normalised weights φ(q)·φ(k) a kernel variant implies (Hedgehog's attention
            distillation), computed densely, so only for kernel variants and short sequences.
        layers: which sites to calibrate: site names or glob patterns (``"encoder.layer.1*"``).
            By default every rewritten site whose variant has trainable parameters; naming a site
            without any is an error.
        epochs: passes over the recorded batches (see ``steps``).
        seed: seeds the batch order (and any other randomness) so that the same model, inputs and
            options give the same parameters. The caller's random state is left as it was.
        end_to_end: after the per-site step, tune all the calibrated parameters together on the
            model's outputs (relative MSE of every floating-point output against the original
            model's, recorded once up front) for ``DEFAULT_END_TO_END_STEPS`` steps, or as many
            as given if an int, at a tenth of ``lr``. If that leaves the model-output error on the
            calibration set higher than before the step, the parameters are put back as the
            per-site step left them (``result.end_to_end.reverted``). Cost: each step is a full
            forward and backward pass of the model (activations of every layer kept), some 3x a
            forward, where a per-site step costs only the variants; plus one more forward per
            batch to measure the model-output error before and after.
        progress: show a ``rich`` progress bar (on stderr).
        max_seconds: stop training after this many seconds since the call started (the
            learning-rate schedule then anneals by time); a quarter of it is kept for the
            end-to-end step. Recording and the final error measurement are not interrupted.

    Returns:
        A :class:`~attnrewrite.calibrate.result.CalibrationResult`: one row per site with the
        relative MSE of its output against softmax before and after, its steps and seconds.

    Raises:
        CalibrationError: ``model`` is not a rewritten model, has no rewritten site, no selected
            site has trainable parameters, or ``loss="attn_kl"`` with a non-kernel variant.
        CalibrationInputError: ``inputs`` are empty or not ``(args, kwargs)`` pairs, or an option
            is out of range.
        CalibrationDivergedError: a loss became NaN or infinite; the message names the site and
            step. Every parameter is restored to its value before the call, and the error's
            ``result`` holds the table so far. Lower ``lr``.
    """
    started = time.perf_counter()
    _check_options(steps, lr, loss, epochs, end_to_end, max_seconds)
    sites = _select_sites(model, layers, loss)
    batches = _as_batches(inputs)
    lr = DEFAULT_LR if lr is None else float(lr)
    site_loss: SiteLoss = attention_kl if loss == "attn_kl" else site_output_loss
    e2e_steps = (
        0
        if end_to_end is False
        else (DEFAULT_END_TO_END_STEPS if end_to_end is True else int(end_to_end))
    )
    total = _total_steps(steps, epochs, len(batches))
    deadline = None if max_seconds is None else started + max_seconds
    site_deadline = deadline
    if deadline is not None and e2e_steps:
        site_deadline = started + max_seconds * (1 - END_TO_END_TIME_SHARE)

    trainable = _unique(p for s in sites for p in s.parameters)
    snapshot = [p.detach().clone() for p in trainable]
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress_bar(progress))
        stack.enter_context(torch.random.fork_rng())
        torch.manual_seed(seed)
        references = _record(model, sites, batches, bar, keep_outputs=e2e_steps > 0)
        stack.enter_context(train_only(model, trainable))
        before = {s.name: _site_error(s) for s in sites}
        _refine_sites(sites, before)
        order = _batch_order(len(batches), total, seed) if trainable else []
        try:
            stopped = _train_sites(sites, trainable, site_loss, order, lr, site_deadline, bar)
            # Without per-site steps nothing changed: the errors are those measured before.
            changed = order or any(s.refinable for s in sites)
            after = {s.name: _site_error(s) for s in sites} if changed else dict(before)
            reverted = _revert_worse_sites(
                sites, before, after, dict(zip(map(id, trainable), snapshot))
            )
            e2e = None
            if e2e_steps and trainable:
                e2e_order = _batch_order(len(batches), e2e_steps, seed + 1)
                e2e, e2e_stopped = _train_end_to_end(
                    model,
                    trainable,
                    batches,
                    references,
                    e2e_order,
                    lr * END_TO_END_LR_FACTOR,
                    deadline,
                    bar,
                )
                stopped = "max_seconds" if "max_seconds" in (stopped, e2e_stopped) else "steps"
                after = {s.name: _site_error(s) for s in sites}
        except CalibrationDivergedError as diverged:
            rows = _rows(sites, before, after={})
            diverged.result = CalibrationResult(
                rows, loss, len(batches), time.perf_counter() - started, "divergence"
            )
            _restore(trainable, snapshot)
            raise
        except BaseException:
            _restore(trainable, snapshot)
            raise
    return CalibrationResult(
        _rows(sites, before, after, reverted),
        loss,
        len(batches),
        time.perf_counter() - started,
        stopped,
        e2e,
    )


def _revert_worse_sites(
    sites: list[_Site], before: dict[str, float], after: dict[str, float], start: dict[int, Tensor]
) -> set[str]:
    """Put back the parameters of every site whose per-site error rose (a step size too large
    for its parameters): calibration never hands back a site worse than it found it. ``after``
    is updated to the restored sites' errors."""
    reverted = set()
    for site in sites:
        if after[site.name] > before[site.name]:
            _restore(site.parameters, [start[id(p)] for p in site.parameters])
            after[site.name] = before[site.name]
            reverted.add(site.name)
    return reverted


# -- checking what was asked -----------------------------------------------------------------------


def _check_options(
    steps: int | None,
    lr: float | None,
    loss: str,
    epochs: int | None,
    end_to_end: bool | int,
    max_seconds: float | None,
) -> None:
    if loss not in LOSSES:
        raise CalibrationInputError(
            f"unknown calibration loss {loss!r}; choose one of {', '.join(map(repr, LOSSES))}"
        )
    for name, value, least in (("steps", steps, 0), ("epochs", epochs, 1)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            kind = "a non-negative" if least == 0 else "a positive"
            raise CalibrationInputError(f"{name} must be {kind} int or None, got {value!r}")
    if steps == 0 and end_to_end is False:
        raise CalibrationInputError(
            "steps=0 skips the per-site step, and end_to_end is off: nothing would be trained. "
            "Give steps > 0, or end_to_end=True (or a number of steps)"
        )
    if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise CalibrationInputError(f"lr must be a positive finite number, got {lr!r}")
    if max_seconds is not None and not (isinstance(max_seconds, (int, float)) and max_seconds > 0):
        raise CalibrationInputError(f"max_seconds must be a positive number, got {max_seconds!r}")
    if not isinstance(end_to_end, (bool, int)) or (
        not isinstance(end_to_end, bool) and end_to_end < 1
    ):
        raise CalibrationInputError(
            f"end_to_end must be True/False or a positive number of steps, got {end_to_end!r}"
        )


def _select_sites(model: Any, layers: str | Sequence[str] | None, loss: str) -> list[_Site]:
    if not isinstance(model, RewrittenModel):
        raise CalibrationError(
            f"calibrate expects the model returned by attnrewrite.rewrite(...), got "
            f"{type(model).__name__}; rewrite it first, e.g. rw = attnrewrite.rewrite(model, "
            "'hedgehog', args=...), then calibrate(rw, inputs)"
        )
    modules = model.variant_modules
    if not modules:
        raise CalibrationError(
            "the model has no rewritten attention site, so there is nothing to calibrate; see "
            "print(model.report) for why each site was skipped"
        )
    variant_of = {row.name: row.variant for row in model.report.rewritten}
    chosen = list(modules)
    if layers is not None:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        chosen = [n for n in modules if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise CalibrationError(
                f"layers={layers!r} matches no rewritten site; the rewritten sites are: "
                f"{', '.join(modules)}"
            )
    sites = []
    for name in chosen:
        module = modules[name]
        variant = variant_of.get(name) or getattr(module, "name", type(module).__name__)
        parameters = [p for p in module.parameters() if p.requires_grad]
        refinable = callable(getattr(module, "refine", None))
        if not parameters and not refinable:
            if layers is not None:
                raise CalibrationError(
                    f"site '{name}' is rewritten into '{variant}', which has no trainable "
                    "parameters: there is nothing to calibrate. Leave it out of layers=, or "
                    "rewrite it into a trainable variant (t2r, hedgehog, linformer, ...)"
                )
            continue
        if loss == "attn_kl":
            check_attn_kl(module, name, variant)
        sites.append(_Site(name, variant, module, parameters, refinable=refinable))
    if not sites:
        used = ", ".join(sorted({variant_of.get(n, "?") for n in chosen}))
        raise CalibrationError(
            f"no rewritten site has trainable parameters (variants used: {used}); calibration "
            "trains the parameters of variants such as t2r, hedgehog, kernel with an nn.Module "
            "feature map, linformer or synthesizer: rewrite into one of those"
        )
    return sites


def _as_batches(inputs: Iterable[Any]) -> list[Batch]:
    if isinstance(inputs, (str, bytes, Mapping)) or not isinstance(inputs, Iterable):
        raise CalibrationInputError(
            f"inputs must be an iterable of (args, kwargs) pairs, got {type(inputs).__name__}; "
            "e.g. [((input_ids,), {}), ((), {'input_ids': ids, 'attention_mask': mask})]"
        )
    batches = []
    for index, item in enumerate(inputs):
        if not (
            isinstance(item, (tuple, list))
            and len(item) == 2
            and isinstance(item[0], (tuple, list))
            and (item[1] is None or isinstance(item[1], Mapping))
        ):
            shape = (
                f"a {type(item).__name__} of length {len(item)}"
                if isinstance(item, (tuple, list))
                else f"a {type(item).__name__}"
            )
            raise CalibrationInputError(
                f"calibration input {index} is {shape}, not an (args, kwargs) pair with args a "
                "tuple and kwargs a dict. Give one pair per batch, e.g. [((x,), {})] — wrap a "
                "single pair in a list"
            )
        batches.append((tuple(item[0]), dict(item[1] or {})))
    if not batches:
        raise CalibrationInputError("inputs is empty: give at least one (args, kwargs) batch")
    return batches


def _total_steps(steps: int | None, epochs: int | None, batches: int) -> int:
    if steps is None and epochs is None:
        return DEFAULT_STEPS
    if epochs is None:
        return steps
    return epochs * batches if steps is None else min(steps, epochs * batches)


def _unique(parameters: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    # A module given as an option to every site (a `kernel` feature map) is shared between them.
    seen: dict[int, nn.Parameter] = {}
    for p in parameters:
        seen.setdefault(id(p), p)
    return list(seen.values())


def _restore(parameters: list[nn.Parameter], values: list[Tensor]) -> None:
    with torch.no_grad():
        for parameter, value in zip(parameters, values, strict=True):
            parameter.copy_(value)


# -- recording -------------------------------------------------------------------------------------


def _record(
    model: RewrittenModel, sites: list[_Site], batches: list[Batch], bar: _Bar, keep_outputs: bool
) -> list[Any]:
    """Run every batch with all sites teacher-forced; keep the selected sites' calls."""
    selected = {s.name: s for s in sites}
    current: dict[str, list[SiteCall]] = {}

    def record(name: str, call: SiteCall) -> None:
        if name in selected:
            current.setdefault(name, []).append(call)

    outputs = []
    task = bar.add_task("recording", total=len(batches))
    # Every rewritten site is forced, not only the selected ones: the recorded inputs and outputs
    # are then those of the original model.
    with teacher_forcing(model.variant_modules, record), torch.no_grad():
        for args, kwargs in batches:
            current.clear()
            output = model(*args, **kwargs)
            if keep_outputs:
                outputs.append(pytree.tree_map(_detach_tensor, output))
            for site in sites:
                site.calls.append(current.get(site.name, []))
            bar.advance(task)
    silent = [s.name for s in sites if not any(s.calls)]
    if silent:
        raise CalibrationInputError(
            f"site(s) {', '.join(silent)} were never called on the calibration inputs; give "
            "inputs that run through them"
        )
    return outputs


def _detach_tensor(x: Any) -> Any:
    return x.detach() if isinstance(x, Tensor) else x


def _batch_order(batches: int, steps: int, seed: int) -> list[int]:
    """Batch index of each step: a fresh permutation of the batches every epoch."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order += torch.randperm(batches, generator=generator).tolist()
    return order[:steps]


# -- per-site refinement without gradients ---------------------------------------------------------


def _refine_sites(sites: list[_Site], before: dict[str, float]) -> None:
    """Run each refinable site's ``refine(calls)`` hook (e.g. k-means of routing centroids) on its
    recorded calls, before any gradient step. A refinement that raises the site's error is undone
    (its buffers and parameters put back), so it never hands back a worse site."""
    for site in sites:
        if not site.refinable:
            continue
        saved = {k: v.detach().clone() for k, v in site.module.state_dict().items()}
        site.module.refine([call for calls in site.calls for call in calls])
        error = _site_error(site)
        if error > before[site.name]:
            site.module.load_state_dict(saved)


# -- per-site training -----------------------------------------------------------------------------


def _site_error(site: _Site) -> float:
    """Relative MSE of the site's output against the teacher over every recorded call."""
    error = norm = 0.0
    with torch.no_grad():
        for calls in site.calls:
            for call in calls:
                e, n = squared_error(site_output(site.module, call), call.teacher)
                error += float(e)
                norm += float(n)
    return error / max(norm, 1e-12)


def _learning_rate(
    base: float, step: int, total: int, elapsed: float, budget: float | None
) -> float:
    """Linear warm-up, then a cosine decay to 0 along the steps or the time, whichever is ahead."""
    warmup = max(1, round(WARMUP_SHARE * total))
    if step < warmup:
        return base * (step + 1) / warmup
    progress = step / total
    if budget is not None:
        progress = max(progress, elapsed / budget)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _train_sites(
    sites: list[_Site],
    trainable: list[nn.Parameter],
    site_loss: SiteLoss,
    order: list[int],
    lr: float,
    deadline: float | None,
    bar: _Bar,
) -> str:
    if not order:
        return "steps"
    optimizer = torch.optim.Adam(trainable, lr=lr)
    start = time.perf_counter()
    budget = None if deadline is None else deadline - start
    task = bar.add_task("calibrating sites", total=len(order))
    for step, batch in enumerate(order):
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            return "max_seconds"
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(lr, step, len(order), now - start, budget)
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for site in sites:
            if not site.parameters:  # refined without gradients only (see _refine_sites)
                continue
            tick = time.perf_counter()
            calls = site.calls[batch]
            for call in calls:
                value = site_loss(site.module, call) / len(calls)
                if not torch.isfinite(value):
                    raise CalibrationDivergedError(
                        f"calibration of site '{site.name}' ({site.variant}) stopped at step "
                        f"{step + 1}: the loss is {float(value.detach())}. Every parameter was "
                        f"restored; try a smaller lr (it was {lr:g})",
                        site=site.name,
                        step=step + 1,
                    )
                value.backward()
                losses.append(float(value.detach()))
            site.seconds += time.perf_counter() - tick
            site.steps += 1
        optimizer.step()
        bar.advance(task, loss=sum(losses) / max(len(losses), 1))
    return "steps"


def _rows(
    sites: list[_Site],
    before: dict[str, float],
    after: dict[str, float],
    reverted: set[str] = frozenset(),
) -> tuple[SiteCalibration, ...]:
    return tuple(
        SiteCalibration(
            s.name,
            s.variant,
            before[s.name],
            after.get(s.name, float("nan")),
            s.steps,
            s.seconds,
            s.name in reverted,
        )
        for s in sites
    )


# -- end to end ------------------------------------------------------------------------------------


def _output_error(output: Any, reference: Any) -> tuple[Tensor, Tensor]:
    """Σ (y − t)² and Σ t² over every floating-point tensor of a model output."""
    leaves = [
        (y, t)
        for y, t in zip(pytree.tree_leaves(output), pytree.tree_leaves(reference), strict=True)
        if isinstance(t, Tensor) and t.is_floating_point()
    ]
    if not leaves:
        raise CalibrationError(
            "end_to_end needs a model output with floating-point tensors to compare; this "
            "model returns none. Calibrate without end_to_end"
        )
    errors = [squared_error(y, t) for y, t in leaves]
    return sum(e for e, _ in errors), sum(n for _, n in errors)


def _model_error(model: RewrittenModel, batches: list[Batch], references: list[Any]) -> float:
    error = norm = 0.0
    with torch.no_grad():
        for (args, kwargs), reference in zip(batches, references, strict=True):
            e, n = _output_error(model(*args, **kwargs), reference)
            error += float(e)
            norm += float(n)
    return error / max(norm, 1e-12)


def _train_end_to_end(
    model: RewrittenModel,
    trainable: list[nn.Parameter],
    batches: list[Batch],
    references: list[Any],
    order: list[int],
    lr: float,
    deadline: float | None,
    bar: _Bar,
) -> tuple[EndToEndCalibration, str]:
    error_before = _model_error(model, batches, references)
    start_values = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.Adam(trainable, lr=lr)
    start = time.perf_counter()
    budget = None if deadline is None else deadline - start
    task = bar.add_task("end-to-end", total=len(order))
    done, stopped = 0, "steps"
    for step, batch in enumerate(order):
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            stopped = "max_seconds"
            break
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(lr, step, len(order), now - start, budget)
        optimizer.zero_grad(set_to_none=True)
        args, kwargs = batches[batch]
        error, norm = _output_error(model(*args, **kwargs), references[batch])
        value = error / norm.clamp_min(1e-12)
        if not torch.isfinite(value):
            raise CalibrationDivergedError(
                f"the end-to-end step stopped at step {step + 1}: the model-output loss is "
                f"{float(value.detach())}. Every parameter was restored; try a smaller lr (the "
                f"end-to-end step used {lr:g})",
                site="end-to-end",
                step=step + 1,
            )
        value.backward()
        optimizer.step()
        done += 1
        bar.advance(task, loss=float(value.detach()))
    seconds = time.perf_counter() - start
    error_after = _model_error(model, batches, references)
    if error_after > error_before:
        # Never hand back a model the step made worse on its own objective.
        _restore(trainable, start_values)
        return EndToEndCalibration(error_before, error_before, done, seconds, True), stopped
    return EndToEndCalibration(error_before, error_after, done, seconds), stopped


# -- progress --------------------------------------------------------------------------------------


class _Bar:
    """A ``rich`` progress display, or nothing."""

    def __init__(self, progress: Any | None) -> None:
        self.progress = progress

    def add_task(self, description: str, total: int) -> Any:
        if self.progress is None:
            return None
        return self.progress.add_task(description, total=total, loss=float("nan"))

    def advance(self, task: Any, loss: float | None = None) -> None:
        if self.progress is None:
            return
        fields = {} if loss is None else {"loss": loss}
        self.progress.update(task, advance=1, **fields)


@contextlib.contextmanager
def _progress_bar(enabled: bool) -> Iterator[_Bar]:
    if not enabled:
        yield _Bar(None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3g}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        yield _Bar(progress)
