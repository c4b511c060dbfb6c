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
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from attnrewrite.calibrate import lora
from attnrewrite.calibrate.checkpoint import STAGES, Checkpoint, unpack_meta
from attnrewrite.calibrate.checkpoint import meta as checkpoint_meta
from attnrewrite.calibrate.distributed import Ranks
from attnrewrite.calibrate.lora import LoRAAdapter
from attnrewrite.calibrate.losses import (
    LOSSES,
    OUTPUT_LOSSES,
    SITE_LOSS_TERMS,
    check_attn_kl,
    logits_of,
    output_terms,
    site_output,
    squared_error,
)
from attnrewrite.calibrate.mode import SiteCall, teacher_forcing, train_only
from attnrewrite.calibrate.result import (
    CalibrationResult,
    EndToEndCalibration,
    LoRACalibration,
    SiteCalibration,
)
from attnrewrite.calibrate.sharding import sharded_frozen
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
#: Default steps of the LoRA stage (``lora_rank=``).
DEFAULT_LORA_STEPS = 300
#: Default Adam learning rate of the LoRA stage: the adapters start at zero (B = 0) and move the
#: projections, which are far more sensitive than the variants' per-head maps.
DEFAULT_LORA_LR = 1e-3
#: Default optimiser steps between two checkpoints (``checkpoint=``).
DEFAULT_CHECKPOINT_EVERY = 100
#: Share of the steps spent warming the learning rate up linearly before the cosine decay.
WARMUP_SHARE = 0.05

Batch = tuple[tuple[Any, ...], dict[str, Any]]
#: One optimiser step's loss: called with (step, batch index), it runs the backward pass and
#: returns the mean loss and, when a loss was not finite, (what, value) for the error message.
StepLoss = Callable[[int, int], tuple[float, tuple[str, float] | None]]


@dataclasses.dataclass
class _Site:
    """A selected site: its module, trainable parameters and recorded calls per batch."""

    name: str
    variant: str
    module: nn.Module
    parameters: list[nn.Parameter]
    calls: list[list[SiteCall]] = dataclasses.field(default_factory=list)
    #: Per batch, per call: the loss's denominator summed over ranks (‖teacher‖², query rows).
    norms: list[list[float]] = dataclasses.field(default_factory=list)
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
    end_to_end_loss: str = "auto",
    lora_rank: int | None = None,
    lora_steps: int | None = None,
    lora_lr: float | None = None,
    lora_alpha: float | None = None,
    progress: bool = True,
    max_seconds: float | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    shard_frozen: bool = False,
) -> CalibrationResult:
    """Train the rewritten sites' own parameters so each site imitates exact softmax attention.

    Each selected site is fitted to the exact softmax output computed from the same canonical
    inputs (the teacher), with every layer trained in parallel on the inputs it receives in the
    original model: during calibration a variant hands the teacher's output downstream, and its
    own output only enters the loss. Only the variants' parameters train; every other parameter
    has ``requires_grad=False`` meanwhile (restored afterwards) and is bit-identical afterwards.

    Decoders (causal language models) calibrate the same way from token streams: give batches of
    ``input_ids``; the end-to-end step then matches the original's next-token distributions
    (``end_to_end_loss="kl"``), and ``lora_rank`` adds LoLCATs' second stage.

    Args:
        model: a :class:`~attnrewrite.RewrittenModel` (the result of ``attnrewrite.rewrite``).
        inputs: an iterable (a list, or a ``DataLoader``) of batches: ``(args, kwargs)`` pairs
            as for ``model(*args, **kwargs)``, or integer tensors of token ids (B, N), passed
            the way the capture example passed its ids (with an all-ones ``attention_mask`` if
            the example had one). It is iterated once. Every selected site's canonical q, k, v
            and softmax output of every batch are held in memory (about 4·tokens·hidden floats
            per site: 2 GB for six layers of 384-wide MiniLM over 64k tokens), so a few dozen
            batches of typical inputs are the intended size. Under ``torch.distributed`` every
            rank is given the same batches and keeps its share (see below).
        steps: optimiser steps per site (default 1000, or ``epochs`` passes over the batches).
            With both ``steps`` and ``epochs``, training stops at whichever comes first.
            ``steps=0`` with ``end_to_end`` or ``lora_rank`` runs only those stages (e.g. to
            continue an earlier calibration).
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
        seed: seeds the batch order, the adapters' initialisation and any other randomness, so
            that the same model, inputs and options give the same parameters. The caller's
            random state is left as it was.
        end_to_end: after the per-site step, tune all the calibrated parameters together on the
            model's outputs against the original model's (recorded once up front) for
            ``DEFAULT_END_TO_END_STEPS`` steps, or as many as given if an int, at a tenth of
            ``lr``. If that leaves the loss on the calibration set higher than before the step,
            the parameters are put back as the per-site step left them
            (``result.end_to_end.reverted``). Cost: each step is a full forward and backward pass
            of the model (activations of every layer kept), some 3x a forward, where a per-site
            step costs only the variants; plus one more forward per batch to measure the loss
            before and after.
        end_to_end_loss: the loss of the end-to-end and LoRA stages: ``"mse"``, the relative MSE
            of every floating-point output; ``"kl"``, the mean over positions of
            KL(original ‖ rewritten) between next-token distributions (softmax of ``logits``;
            positions where the batch's ``attention_mask`` is 0 left out); ``"auto"`` (default):
            ``"kl"`` when the model's output has ``logits``, else ``"mse"``.
        lora_rank: after the earlier stages, add low-rank adapters of this rank to the query,
            key, value and output projections of every selected site (found in the graph, see
            :mod:`attnrewrite.calibrate.lora`) and train only them on the end-to-end loss, as in
            LoLCATs' second stage. The adapters live in the rewritten model
            (``rw.lora_adapters``; ``rw.merge_lora()`` folds them into its own projection
            weights); the original model's weights are untouched. A stage that raises the loss
            removes its adapters (``result.lora.reverted``).
        lora_steps: optimiser steps of the LoRA stage (default 300).
        lora_lr: its Adam learning rate (default 1e-3).
        lora_alpha: the adapters' scale numerator (update ``alpha / rank · B A``; default
            ``2 · lora_rank``).
        progress: show a ``rich`` progress bar per stage (on stderr; rank 0 only).
        max_seconds: stop training after this many seconds since the call started (the
            learning-rate schedule then anneals by time); a quarter of it is kept for each of the
            end-to-end and LoRA stages asked for. Recording and the final error measurement are
            not interrupted.
        checkpoint: a directory to save the calibration state in (every ``checkpoint_every``
            optimiser steps and after each stage, with ``torch.distributed.checkpoint``). If it
            already holds one, calibration resumes from it: after a preemption call again with
            the same model (a fresh ``rewrite`` with the same seed), inputs and options. Resuming
            reproduces an uninterrupted run when training is bounded by steps (not by
            ``max_seconds``). See :mod:`attnrewrite.calibrate.checkpoint`.
        checkpoint_every: optimiser steps between two saves (default 100).
        shard_frozen: under ``torch.distributed`` (W > 1 ranks), shard the rewritten model's
            frozen weights (its own copy of the original's) with FSDP2 while calibrating: the
            graph is split into one stage per layer, each rank holds 1/W of every frozen weight,
            and a layer's are all-gathered only while it runs; the variants' parameters and the
            adapters stay replicated. The parameters trained are the same as without it (the
            same computation from the same weights; bit for bit in the tests), and afterwards the
            rewritten model holds its full weights again, bit-identical, so ``rw(...)``,
            ``rw.state_dict()`` and ``rw.merge_lora()`` work as before. One layer's weights (plus
            tied embeddings) must fit on a rank, and each rank holds the whole model before and
            after the call; an exception other than
            :class:`~attnrewrite.errors.CalibrationDivergedError` leaves the model unusable
            (rewrite again). In a single process, or a group of one, it does nothing and the
            results are the same. See :mod:`attnrewrite.calibrate.sharding`.

    Under ``torch.distributed`` (a default process group of W > 1 ranks, e.g. ``torchrun`` with
    the gloo backend on CPU) the call is the same on every rank: data sharded by rank, gradients
    summed over ranks before each step, so the parameters equal those of one process
    calibrating on global batches of W batches concatenated; progress shows on rank 0 and only
    rank 0 writes ``result.save(path)``; ``shard_frozen=True`` shards the frozen weights too.
    See :mod:`attnrewrite.calibrate.distributed`.

    Returns:
        A :class:`~attnrewrite.calibrate.result.CalibrationResult`: one row per site with the
        relative MSE of its output against softmax before and after, its steps and seconds, and
        the end-to-end and LoRA figures. It serialises to JSON (``to_json``, ``save``).

    Raises:
        CalibrationError: ``model`` is not a rewritten model, has no rewritten site, no selected
            site has trainable parameters, or ``loss="attn_kl"`` with a non-kernel variant.
        CalibrationInputError: ``inputs`` are empty or neither ``(args, kwargs)`` pairs nor token
            ids, an option is out of range, or ``checkpoint`` holds another calibration.
        CalibrationDivergedError: a loss became NaN or infinite; the message names the site and
            step. Every parameter is restored to its value before the call, and the error's
            ``result`` holds the table so far. Lower ``lr``.
    """
    started = time.perf_counter()
    _check_options(steps, lr, loss, epochs, end_to_end, max_seconds, lora_rank, lora_steps)
    _check_lora_options(lora_lr, lora_alpha, end_to_end_loss)
    ranks = Ranks.current()
    sites = _select_sites(model, layers, loss, adapters=lora_rank is not None)
    batches, dropped = _shard(ranks, _as_batches(inputs, model))
    lr = DEFAULT_LR if lr is None else float(lr)
    lora_lr = DEFAULT_LORA_LR if lora_lr is None else float(lora_lr)
    e2e_steps = (
        0
        if end_to_end is False
        else (DEFAULT_END_TO_END_STEPS if end_to_end is True else int(end_to_end))
    )
    lora_total = 0 if lora_rank is None else (lora_steps or DEFAULT_LORA_STEPS)
    total = _total_steps(steps, epochs, len(batches))
    deadlines = _deadlines(started, max_seconds, e2e_steps > 0, lora_total > 0)
    store = None if checkpoint is None else Checkpoint(checkpoint, checkpoint_every, ranks)

    trainable = _unique(p for s in sites for p in s.parameters)
    snapshot = [p.detach().clone() for p in trainable]
    after: dict[str, float] = {}
    sharding = None
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(_progress_bar(progress and ranks.main))
        stack.enter_context(torch.random.fork_rng())
        torch.manual_seed(seed)
        # Frozen before recording (which runs without gradients anyway), so that the weights
        # shard_frozen shards are frozen from the start.
        stack.enter_context(train_only(model, trainable))
        run = _Run(model, sites, trainable, batches, ranks, bar)
        try:
            if lora_rank is not None:
                # With B = 0 the adapters change nothing until the LoRA stage trains them; they
                # are in the graph before it is split into stages (shard_frozen).
                run.add_adapters(lora_rank, lora_alpha, seed)
            if shard_frozen and ranks.distributed:
                sharding = stack.enter_context(sharded_frozen(model.graph_module, trainable, ranks))
            with lora.disabled(model.graph_module):
                run.references = _record(
                    model, sites, batches, bar, keep_outputs=bool(e2e_steps + lora_total)
                )
            run.output_loss = _output_loss(end_to_end_loss, run.references)
            _normalisers(sites, loss, ranks)
            before = {s.name: _site_error(s, ranks) for s in sites}
            resumed = run.resume(store)
            stopped, after, reverted = "steps", dict(before), set()
            if run.stage == "sites":
                if run.step == 0:
                    _refine_sites(sites, before, ranks)
                order = _batch_order(len(batches), total, seed) if trainable else []
                stopped = _train_sites(run, loss, order, lr, deadlines[0])
                # Without per-site steps nothing changed: the errors are those measured before.
                if order or any(s.refinable for s in sites):
                    after = {s.name: _site_error(s, ranks) for s in sites}
                reverted = _revert_worse_sites(
                    sites, before, after, dict(zip(map(id, trainable), snapshot))
                )
                run.end_sites(reverted)
            else:
                reverted = run.sites_outcome()
                after = {s.name: _site_error(s, ranks) for s in sites}
            e2e = None
            if e2e_steps and trainable:
                order = _batch_order(len(batches), e2e_steps, seed + 1)
                e2e, e2e_stopped = _train_end_to_end(
                    run, order, lr * END_TO_END_LR_FACTOR, deadlines[1]
                )
                stopped = _stopped(stopped, e2e_stopped)
                after = {s.name: _site_error(s, ranks) for s in sites}
            lora_result = None
            if lora_rank is not None:
                order = _batch_order(len(batches), lora_total, seed + 2)
                lora_result, lora_stopped = _train_lora(
                    run, lora_rank, order, lora_lr, deadlines[2]
                )
                stopped = _stopped(stopped, lora_stopped)
        except CalibrationDivergedError as diverged:
            diverged.result = CalibrationResult(
                _rows(sites, before, after={}),
                loss,
                len(batches) * ranks.world,
                time.perf_counter() - started,
                "divergence",
            )
            _restore(trainable, snapshot)
            run.remove_adapters()
            raise
        except BaseException:
            _restore(trainable, snapshot)
            run.remove_adapters()
            raise
    return CalibrationResult(
        _rows(sites, before, after, reverted),
        loss,
        len(batches) * ranks.world,
        time.perf_counter() - started,
        stopped,
        e2e,
        lora=lora_result,
        world_size=ranks.world,
        dropped_batches=dropped,
        resumed=resumed,
        sharding=sharding,
    )


def output_divergence(model: RewrittenModel, inputs: Iterable[Any], *, loss: str = "auto") -> float:
    """How far the rewritten model's outputs are from the original model's on ``inputs`` (e.g.
    held-out batches), in the end-to-end loss: ``"kl"`` the mean next-token
    KL(original ‖ rewritten) per position, ``"mse"`` the relative MSE of every floating-point
    output, ``"auto"`` the first when the output has ``logits``. The original's outputs are
    computed by the rewritten model itself with every site forced to exact softmax and its LoRA
    adapters off, so the original model is not needed. Sums over ranks under
    ``torch.distributed`` (each rank gives its own batches here)."""
    _check_lora_options(None, None, loss)
    if not isinstance(model, RewrittenModel):
        raise CalibrationError(
            f"output_divergence expects a model returned by attnrewrite.rewrite(...), got "
            f"{type(model).__name__}"
        )
    batches = _as_batches(inputs, model)
    error = norm = 0.0
    kind = None
    with torch.no_grad():
        for args, kwargs in batches:
            with teacher_forcing(model.variant_modules, lambda *_: None):
                with lora.disabled(model.graph_module):
                    reference = model(*args, **kwargs)
            kind = kind or _output_loss(loss, [reference])
            mask = kwargs.get("attention_mask")
            e, n = output_terms(
                model(*args, **kwargs), reference, kind, mask if isinstance(mask, Tensor) else None
            )
            error += float(e)
            norm += float(n)
    error, norm = Ranks.current().sum([error, norm]).tolist()
    return error / max(norm, 1e-12)


def _stopped(*reasons: str) -> str:
    return "max_seconds" if "max_seconds" in reasons else "steps"


def _deadlines(
    started: float, max_seconds: float | None, e2e: bool, lora: bool
) -> tuple[float | None, float | None, float | None]:
    """When the per-site, end-to-end and LoRA stages must stop: a quarter of ``max_seconds`` is
    kept for each later stage asked for."""
    if max_seconds is None:
        return None, None, None
    share = END_TO_END_TIME_SHARE * max_seconds
    end = started + max_seconds
    return end - share * (int(e2e) + int(lora)), end - share * int(lora), end


# -- the state every stage shares, and the checkpoint -------------------------------------------


class _Run:
    """What the stages share: the model, its sites, parameters and batches, the ranks, the progress
    bar, the adapters, and the checkpoint (what was loaded from it, and saving).

    The checkpoint always holds the same tensors, whatever the stage: every selected site's module
    state, every adapter's, Adam's moments for the variants' parameters (per-site and end-to-end
    stages) and for the adapters (LoRA stage), the variants' parameters at the start of the
    end-to-end stage (to revert to), and the figures the table needs (``outcome``)."""

    def __init__(
        self,
        model: RewrittenModel,
        sites: list[_Site],
        trainable: list[nn.Parameter],
        batches: list[Batch],
        ranks: Ranks,
        bar: _Bar,
    ) -> None:
        self.model = model
        self.sites = sites
        self.trainable = trainable
        self.batches = batches
        self.ranks = ranks
        self.bar = bar
        #: The original model's outputs per batch, and the end-to-end loss: set once recorded.
        self.references: list[Any] = []
        self.output_loss = "mse"
        self.adapters: dict[str, LoRAAdapter] = {}
        self.missing: list[str] = []
        self.store: Checkpoint | None = None
        self.stage, self.step, self.serial = "sites", 0, 0
        #: Per site: reverted by the per-site step, and its steps; then the end-to-end and LoRA
        #: figures (loss before, after, steps, seconds, reverted).
        self.outcome = {
            "reverted": torch.zeros(len(sites), dtype=torch.int64),
            "site_steps": torch.zeros(len(sites), dtype=torch.int64),
            "end_to_end": torch.zeros(5, dtype=torch.float64),
            "lora": torch.zeros(5, dtype=torch.float64),
        }
        self.starts = [torch.zeros_like(p) for p in trainable]
        self.moments: dict[str, Tensor] | None = None

    @property
    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for a in self.adapters.values() for p in a.parameters()]

    def state(self, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Tensor]:
        state = {"meta": checkpoint_meta(self.stage, self.step, self.serial), **self.outcome}
        for index, site in enumerate(self.sites):
            for key, value in site.module.state_dict().items():
                state[f"site.{index}.{key}"] = value
        for name, adapter in self.adapters.items():
            for key, value in adapter.state_dict().items():
                state[f"lora.{name}.{key}"] = value
        for index, value in enumerate(self.starts):
            state[f"start.{index}"] = value
        for group, parameters in (("sites", self.trainable), ("lora", self.adapter_parameters)):
            for index, parameter in enumerate(parameters):
                saved = optimizer.state.get(parameter, {}) if optimizer is not None else {}
                for key in ("exp_avg", "exp_avg_sq"):
                    state[f"adam.{group}.{index}.{key}"] = saved.get(
                        key, torch.zeros_like(parameter)
                    )
                state[f"adam.{group}.{index}.step"] = saved.get("step", torch.tensor(0.0))
        return state

    def save(self, stage: str, step: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        self.stage, self.step = stage, step
        if self.store is not None:
            self.serial += 1
            self.store.save(self.state(optimizer), self.serial)

    def resume(self, store: Checkpoint | None) -> str | None:
        """Load the checkpoint in ``store``, if it holds one: module states, adapters, the stage
        and step to continue from; the Adam moments wait for :meth:`optimizer`."""
        self.store = store
        if store is None:
            return None
        loaded = store.load(self.state())
        if loaded is None:
            return None
        self.stage, self.step, self.serial = unpack_meta(loaded["meta"])
        with torch.no_grad():
            for index, site in enumerate(self.sites):
                site.module.load_state_dict(_prefixed(loaded, f"site.{index}."))
            for name, adapter in self.adapters.items():
                adapter.load_state_dict(_prefixed(loaded, f"lora.{name}."))
            for start, index in zip(self.starts, range(len(self.starts)), strict=True):
                start.copy_(loaded[f"start.{index}"])
        self.outcome = {key: loaded[key].clone() for key in self.outcome}
        self.moments = {k: v for k, v in loaded.items() if k.startswith("adam.")}
        return f"{self.stage}@{self.step}"

    def optimizer(self, stage: str, parameters: list[nn.Parameter], lr: float) -> tuple[Any, int]:
        """Adam over ``parameters``, with the checkpoint's moments if it stopped inside
        ``stage``; and the step to start from."""
        optimizer = torch.optim.Adam(parameters, lr=lr)
        if self.moments is None or self.stage != stage or self.step == 0:
            return optimizer, 0
        group = "lora" if stage == "lora" else "sites"
        for index, parameter in enumerate(parameters):
            optimizer.state[parameter] = {
                key: self.moments[f"adam.{group}.{index}.{key}"].clone()
                for key in ("step", "exp_avg", "exp_avg_sq")
            }
        return optimizer, self.step

    def at(self, stage: str) -> bool:
        """Whether ``stage`` still has to run (or finish) after what the checkpoint holds."""
        return STAGES.index(self.stage) <= STAGES.index(stage)

    # -- outcomes ----------------------------------------------------------------------------
    def end_sites(self, reverted: set[str]) -> None:
        self.outcome["reverted"] = torch.tensor([s.name in reverted for s in self.sites])
        self.outcome["site_steps"] = torch.tensor([s.steps for s in self.sites])
        self.save("end_to_end", 0)

    def sites_outcome(self) -> set[str]:
        steps = self.outcome["site_steps"].tolist()
        flags = self.outcome["reverted"].tolist()
        for site, count in zip(self.sites, steps, strict=True):
            site.steps = int(count)
        return {s.name for s, flag in zip(self.sites, flags, strict=True) if flag}

    def record(self, stage: str, values: tuple[float, float, int, float, bool]) -> None:
        self.outcome[stage] = torch.tensor([float(v) for v in values], dtype=torch.float64)

    def recorded(self, stage: str) -> tuple[float, float, int, float, bool]:
        before, after, steps, seconds, reverted = self.outcome[stage].tolist()
        return before, after, int(steps), seconds, bool(reverted)

    # -- adapters ------------------------------------------------------------------------------
    def add_adapters(self, rank: int, alpha: float | None, seed: int) -> None:
        """Insert the LoRA adapters now (B = 0: the model is unchanged until the LoRA stage
        trains them), so that the checkpoint has the same tensors in every stage."""
        self.adapters, self.missing = lora.add_adapters(
            self.model.graph_module, [s.name for s in self.sites], rank, alpha, seed
        )
        if not self.adapters:
            raise CalibrationError(
                "lora_rank was given, but no projection (a linear layer with a parameter weight) "
                "was found next to any calibrated site: " + "; ".join(self.missing)
            )
        for parameter in self.adapter_parameters:
            parameter.requires_grad_(False)

    def remove_adapters(self) -> None:
        if self.adapters:
            lora.remove(self.model.graph_module)
            self.adapters = {}


def _prefixed(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _optimise(
    run: _Run,
    stage: str,
    parameters: list[nn.Parameter],
    order: list[int],
    lr: float,
    deadline: float | None,
    step_loss: StepLoss,
    label: str,
) -> tuple[int, str]:
    """The optimiser loop every stage shares: learning-rate schedule, gradients summed over
    ranks, a collective check that every loss is finite, checkpoints. Returns the steps taken
    (including those before a resume) and why it stopped."""
    optimizer, first = run.optimizer(stage, parameters, lr)
    start = time.perf_counter()
    budget = None if deadline is None else deadline - start
    task = run.bar.add_task(label, total=len(order), completed=first)
    for step in range(first, len(order)):
        now = time.perf_counter()
        if deadline is not None and now >= deadline:
            return step, "max_seconds"
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(lr, step, len(order), now - start, budget)
        optimizer.zero_grad(set_to_none=True)
        value, problem = step_loss(step, order[step])
        if run.ranks.distributed:  # every rank stops together, or none does
            bad = float(run.ranks.sum([float(problem is not None)])[0])
            if bad and problem is None:
                problem = ("a loss on another rank", float("nan"))
        if problem is not None:
            what, loss = problem
            raise CalibrationDivergedError(
                f"calibration of {what} stopped at step {step + 1}: the loss is {loss}. Every "
                f"parameter was restored; try a smaller lr (it was {lr:g})",
                site=what.split("'")[1] if "'" in what else "end-to-end",
                step=step + 1,
            )
        run.ranks.sum_gradients(parameters)
        optimizer.step()
        run.bar.advance(task, loss=value)
        if run.store is not None and (step + 1) % run.store.every == 0 and step + 1 < len(order):
            run.save(stage, step + 1, optimizer)
    return len(order), "steps"


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
    lora_rank: int | None,
    lora_steps: int | None,
) -> None:
    if loss not in LOSSES:
        raise CalibrationInputError(
            f"unknown calibration loss {loss!r}; choose one of {', '.join(map(repr, LOSSES))}"
        )
    for name, value, least in (
        ("steps", steps, 0),
        ("epochs", epochs, 1),
        ("lora_rank", lora_rank, 1),
        ("lora_steps", lora_steps, 1),
    ):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < least
        ):
            kind = "a non-negative" if least == 0 else "a positive"
            raise CalibrationInputError(f"{name} must be {kind} int or None, got {value!r}")
    if steps == 0 and end_to_end is False and lora_rank is None:
        raise CalibrationInputError(
            "steps=0 skips the per-site step, and end_to_end and lora_rank are off: nothing "
            "would be trained. Give steps > 0, or end_to_end=True (or a number of steps)"
        )
    if lora_steps is not None and lora_rank is None:
        raise CalibrationInputError("lora_steps is set but lora_rank is not: give lora_rank=8")
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


def _check_lora_options(lora_lr: Any, lora_alpha: Any, end_to_end_loss: Any) -> None:
    for name, value in (("lora_lr", lora_lr), ("lora_alpha", lora_alpha)):
        if value is not None and not (
            isinstance(value, (int, float)) and math.isfinite(value) and value > 0
        ):
            raise CalibrationInputError(f"{name} must be a positive finite number, got {value!r}")
    if end_to_end_loss not in OUTPUT_LOSSES:
        raise CalibrationInputError(
            f"unknown end_to_end_loss {end_to_end_loss!r}; choose one of "
            f"{', '.join(map(repr, OUTPUT_LOSSES))}"
        )


def _select_sites(
    model: Any, layers: str | Sequence[str] | None, loss: str, adapters: bool = False
) -> list[_Site]:
    """The sites to calibrate; with ``adapters`` (``lora_rank``) also those of variants without
    parameters (``local``, ``linear``): the LoRA stage trains adapters around them."""
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
        if not parameters and not refinable and not adapters:
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


def _as_batches(inputs: Iterable[Any], model: RewrittenModel) -> list[Batch]:
    if isinstance(inputs, (str, bytes, Mapping, Tensor)) or not isinstance(inputs, Iterable):
        raise CalibrationInputError(
            f"inputs must be an iterable of (args, kwargs) pairs or of token-id tensors, got "
            f"{type(inputs).__name__}; e.g. [((input_ids,), {{}}), ((), {{'input_ids': ids, "
            "'attention_mask': mask})], or [ids_0, ids_1] for a language model"
        )
    batches = []
    for index, item in enumerate(inputs):
        if isinstance(item, Tensor) and not item.is_floating_point() and item.dim() == 2:
            batches.append(_token_batch(model, item))
            continue
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
                + (f" {tuple(item.shape)} of {item.dtype}" if isinstance(item, Tensor) else "")
            )
            raise CalibrationInputError(
                f"calibration input {index} is {shape}, not an (args, kwargs) pair with args a "
                "tuple and kwargs a dict, nor a (batch, length) integer tensor of token ids. "
                "Give one pair per batch, e.g. [((x,), {})] — wrap a single pair in a list"
            )
        batches.append((tuple(item[0]), dict(item[1] or {})))
    if not batches:
        raise CalibrationInputError("inputs is empty: give at least one (args, kwargs) batch")
    return batches


def _token_batch(model: RewrittenModel, ids: Tensor) -> Batch:
    """Token ids passed as the capture example passed its ids: by keyword ``input_ids`` or as the
    first positional argument, with an all-ones ``attention_mask`` if the example had one."""
    args, kwargs = model.example_inputs
    extra = {}
    if isinstance(kwargs.get("attention_mask"), Tensor):
        extra["attention_mask"] = torch.ones_like(ids, dtype=kwargs["attention_mask"].dtype)
    if isinstance(kwargs.get("input_ids"), Tensor):
        return (), {"input_ids": ids, **extra}
    if len(args) == 1 and isinstance(args[0], Tensor) and not args[0].is_floating_point():
        return (ids,), extra
    raise CalibrationInputError(
        "a batch of token ids was given, but the model was captured without input_ids (by "
        "keyword, or as its only positional argument); give (args, kwargs) pairs instead"
    )


def _shard(ranks: Ranks, batches: list[Batch]) -> tuple[list[Batch], int]:
    """This rank's batches (all of them in a single process), and how many were left out."""
    mine, dropped = ranks.shard(batches)
    if not mine:
        raise CalibrationInputError(
            f"{len(batches)} calibration batch(es) for {ranks.world} processes: every rank needs "
            f"at least one; give at least {ranks.world} batches (the same list on every rank)"
        )
    if dropped:
        warnings.warn(
            f"{dropped} calibration batch(es) left out: with {ranks.world} processes a global "
            f"batch is {ranks.world} batches; give a multiple of {ranks.world}",
            stacklevel=3,
        )
    return mine, dropped


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


def _refine_sites(sites: list[_Site], before: dict[str, float], ranks: Ranks) -> None:
    """Run each refinable site's ``refine(calls)`` hook (e.g. k-means of routing centroids) on its
    recorded calls, before any gradient step. A refinement that raises the site's error is undone
    (its buffers and parameters put back), so it never hands back a worse site. Under
    ``torch.distributed`` each rank refines on its own calls and rank 0's result is kept."""
    for site in sites:
        if not site.refinable:
            continue
        saved = {k: v.detach().clone() for k, v in site.module.state_dict().items()}
        site.module.refine([call for calls in site.calls for call in calls])
        ranks.broadcast_module(site.module)
        error = _site_error(site, ranks)
        if error > before[site.name]:
            site.module.load_state_dict(saved)


# -- per-site training -----------------------------------------------------------------------------


def _normalisers(sites: list[_Site], loss: str, ranks: Ranks) -> None:
    """Each recorded call's loss denominator, summed over ranks (one all-reduce in all)."""
    terms = SITE_LOSS_TERMS[loss]
    local = []
    with torch.no_grad():
        for site in sites:
            for calls in site.calls:
                for call in calls:
                    if loss == "mse":
                        local.append(float(call.teacher.float().square().sum()))
                    else:
                        local.append(float(terms(site.module, call)[1]))
    if not ranks.same_everywhere(len(local)):
        raise CalibrationInputError(
            "the ranks recorded different numbers of site calls: give every rank batches of the "
            "same structure (same keyword arguments and sequence lengths per global batch)"
        )
    summed = iter(ranks.sum(local).tolist())
    for site in sites:
        site.norms = [[next(summed) for _ in calls] for calls in site.calls]


def _site_error(site: _Site, ranks: Ranks) -> float:
    """Relative MSE of the site's output against the teacher over every recorded call (of every
    rank)."""
    error = norm = 0.0
    with torch.no_grad():
        for calls in site.calls:
            for call in calls:
                e, n = squared_error(site_output(site.module, call), call.teacher)
                error += float(e)
                norm += float(n)
    error, norm = ranks.sum([error, norm]).tolist()
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


def _train_sites(run: _Run, loss: str, order: list[int], lr: float, deadline: float | None) -> str:
    if not order:
        return "steps"
    terms = SITE_LOSS_TERMS[loss]

    def step_loss(step: int, batch: int) -> tuple[float, tuple[str, float] | None]:
        losses, problem = [], None
        for site in run.sites:
            if not site.parameters:  # refined without gradients only (see _refine_sites)
                continue
            tick = time.perf_counter()
            calls = site.calls[batch]
            for call, norm in zip(calls, site.norms[batch], strict=True):
                value = terms(site.module, call)[0] / max(norm, 1e-12) / len(calls)
                if not torch.isfinite(value):
                    problem = problem or (
                        f"site '{site.name}' ({site.variant})",
                        float(value.detach()),
                    )
                    continue
                value.backward()
                losses.append(float(value.detach()))
            site.seconds += time.perf_counter() - tick
        return sum(losses) / max(len(losses), 1), problem

    done, stopped = _optimise(
        run, "sites", run.trainable, order, lr, deadline, step_loss, "calibrating sites"
    )
    for site in run.sites:
        if site.parameters:
            site.steps = done
    return stopped


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


# -- end to end and LoRA ---------------------------------------------------------------------------


def _output_loss(asked: str, references: list[Any]) -> str:
    if asked != "auto" or not references:
        if asked == "kl" and references and logits_of(references[0]) is None:
            raise CalibrationInputError(
                "end_to_end_loss='kl' compares next-token distributions, but the model's output "
                "has no logits; use end_to_end_loss='mse'"
            )
        return "mse" if asked == "auto" else asked
    return "kl" if logits_of(references[0]) is not None else "mse"


def _batch_terms(run: _Run, batch: int) -> tuple[Tensor, Tensor]:
    """(numerator, local denominator) of the end-to-end loss of one local batch."""
    args, kwargs = run.batches[batch]
    mask = kwargs.get("attention_mask")
    return output_terms(
        run.model(*args, **kwargs),
        run.references[batch],
        run.output_loss,
        mask if isinstance(mask, Tensor) else None,
    )


def _model_error(run: _Run) -> float:
    """The end-to-end loss over every calibration batch of every rank."""
    error = norm = 0.0
    with torch.no_grad():
        for batch in range(len(run.batches)):
            e, n = _batch_terms(run, batch)
            error += float(e)
            norm += float(n)
    error, norm = run.ranks.sum([error, norm]).tolist()
    return error / max(norm, 1e-12)


def _output_step_loss(run: _Run, what: str) -> StepLoss:
    def step_loss(step: int, batch: int) -> tuple[float, tuple[str, float] | None]:
        error, norm = _batch_terms(run, batch)
        value = error / max(float(run.ranks.sum([float(norm)])[0]), 1e-12)
        if not torch.isfinite(value):
            return float("nan"), (what, float(value.detach()))
        value.backward()
        return float(value.detach()), None

    return step_loss


def _train_end_to_end(
    run: _Run, order: list[int], lr: float, deadline: float | None
) -> tuple[EndToEndCalibration, str]:
    if not run.at("end_to_end"):
        return EndToEndCalibration(*run.recorded("end_to_end"), loss=run.output_loss), "steps"
    if run.stage != "end_to_end" or run.step == 0:
        error_before = _model_error(run)
        with torch.no_grad():
            for start, parameter in zip(run.starts, run.trainable, strict=True):
                start.copy_(parameter)
        run.record("end_to_end", (error_before, error_before, 0, 0.0, False))
    error_before = run.recorded("end_to_end")[0]
    start = time.perf_counter()
    done, stopped = _optimise(
        run,
        "end_to_end",
        run.trainable,
        order,
        lr,
        deadline,
        _output_step_loss(run, "the end-to-end step"),
        "end-to-end",
    )
    seconds = time.perf_counter() - start
    error_after = _model_error(run)
    reverted = error_after > error_before
    if reverted:
        # Never hand back a model the step made worse on its own objective.
        _restore(run.trainable, run.starts)
        error_after = error_before
    run.record("end_to_end", (error_before, error_after, done, seconds, reverted))
    run.save("lora", 0)
    return (
        EndToEndCalibration(error_before, error_after, done, seconds, reverted, run.output_loss),
        stopped,
    )


def _train_lora(
    run: _Run, rank: int, order: list[int], lr: float, deadline: float | None
) -> tuple[LoRACalibration, str]:
    parameters = run.adapter_parameters
    described = tuple(f"{a.site}: {a.role}" for a in run.adapters.values())
    count = sum(p.numel() for p in parameters)
    stopped = "steps"
    if run.at("lora"):
        if run.stage != "lora" or run.step == 0:
            error_before = _model_error(run)
            run.record("lora", (error_before, error_before, 0, 0.0, False))
        error_before = run.recorded("lora")[0]
        start = time.perf_counter()
        with train_only(run.model, parameters):
            done, stopped = _optimise(
                run,
                "lora",
                parameters,
                order,
                lr,
                deadline,
                _output_step_loss(run, "the LoRA stage"),
                "LoRA",
            )
        for parameter in parameters:
            parameter.requires_grad_(False)
        seconds = time.perf_counter() - start
        error_after = _model_error(run)
        reverted = error_after > error_before
        run.record("lora", (error_before, error_after, done, seconds, reverted))
        run.save("done", 0)
    before, after, done, seconds, reverted = run.recorded("lora")
    if reverted:
        run.remove_adapters()
        after = before
    result = LoRACalibration(
        rank,
        described,
        count,
        before,
        after,
        done,
        seconds,
        reverted,
        tuple(run.missing),
        run.output_loss,
    )
    return result, stopped


# -- progress --------------------------------------------------------------------------------------


class _Bar:
    """A ``rich`` progress display, or nothing."""

    def __init__(self, progress: Any | None) -> None:
        self.progress = progress

    def add_task(self, description: str, total: int, completed: int = 0) -> Any:
        if self.progress is None:
            return None
        return self.progress.add_task(
            description, total=total, completed=completed, loss=float("nan")
        )

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
