"""A small byte-level decoder language model, trained here, because none can be downloaded.

Rewritten decoders should be judged on a model that has learned something: random weights give
near-uniform attention, which every variant approximates well. This module trains one, offline
and reproducibly (issue 17):

- :func:`corpus`: the Python standard library's own source files as bytes (available wherever
  Python is), split by file into training and held-out bytes;
- :func:`build_model`: a Llama-shaped ``LlamaForCausalLM`` over the 256 byte values (no
  tokenizer), in two named sizes (:data:`SIZES`): ``"small"`` (≈10M parameters, context 1024)
  and ``"tiny"`` (2 layers, width 64, GQA, context 128; trains in seconds, for tests);
- :func:`train`: AdamW with warm-up and cosine decay on random windows, deterministic under its
  seed, with an optional curriculum of context lengths (:class:`Phase`);
- :func:`perplexity`: held-out perplexity over a fixed, seeded set of windows, for any callable
  that maps ``input_ids`` to logits (the original model or a rewritten one);
- :func:`load_or_train`: trains once and caches the weights and a JSON record under
  ``~/.cache/attnrewrite/byte_lm/<size>-<hash>/``; :func:`tiny_decoder`: the tiny model in
  seconds, no cache, for tests.

``benchmarks/train_byte_lm.py`` is the command line around :func:`load_or_train`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnrewrite.errors import BenchmarkError

VOCAB_SIZE = 256
"""One token per byte value."""

HELDOUT_PERCENT = 5
"""About this share of the corpus files (chosen by a hash of their path) is held out."""

SKIPPED_DIRS = frozenset({"test", "tests", "idlelib", "site-packages"})
"""Standard-library directories left out of the corpus (test data, GUI code, third-party)."""

CACHE_FORMAT = 1
"""Bumped when the cached files change meaning, so old caches are not mistaken for new ones."""


# --- corpus -----------------------------------------------------------------------------------


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _is_heldout(relative: str) -> bool:
    # A stable hash (Python's own ``hash`` is salted per process) of the path relative to the
    # standard library, so the split does not depend on where Python is installed.
    digest = hashlib.sha256(relative.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


@functools.lru_cache(maxsize=4)
def _read_corpus(root: str) -> tuple[bytes, bytes, int]:
    """(training bytes, held-out bytes, files read) of the ``.py`` files under ``root``."""
    base = Path(root)
    train_parts: list[bytes] = []
    heldout_parts: list[bytes] = []
    files = 0
    for path in sorted(base.rglob("*.py")):
        relative = path.relative_to(base)
        if SKIPPED_DIRS.intersection(relative.parts[:-1]):
            continue
        try:
            data = path.read_bytes()
            data.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue  # unreadable or not UTF-8: left out, as documented
        if not data:
            continue
        files += 1
        (heldout_parts if _is_heldout(relative.as_posix()) else train_parts).append(data)
    return b"".join(train_parts), b"".join(heldout_parts), files


def corpus(
    *, max_bytes: int | None = None, root: str | os.PathLike[str] | None = None
) -> tuple[Tensor, Tensor]:
    """The Python standard library's source as bytes, split by file into training and held out.

    The ``.py`` files under ``root`` (default: ``sysconfig.get_paths()["stdlib"]``), in sorted
    path order, leaving out the ``test``, ``tests``, ``idlelib`` and ``site-packages``
    directories and any file that is not UTF-8. A file is held out when a hash of its path
    relative to ``root`` falls in the first :data:`HELDOUT_PERCENT` of 100 buckets, so the split
    is deterministic and does not depend on the install location. The bytes of one Python
    version's library are the same everywhere; other versions give another (similar) corpus.

    Args:
        max_bytes: keep at most this many bytes of each split (their beginnings), for speed.
        root: another directory of ``.py`` files to use instead of the standard library.

    Returns:
        ``(train, heldout)``: 1-D ``torch.uint8`` tensors (fresh copies; yours to change).

    Raises:
        BenchmarkError: no file was readable, one split came out empty, or ``max_bytes`` < 1.
    """
    if max_bytes is not None and max_bytes < 1:
        raise BenchmarkError(f"corpus: max_bytes must be at least 1, not {max_bytes}.")
    directory = Path(root) if root is not None else _stdlib_root()
    train, heldout, files = _read_corpus(str(directory.resolve()))
    if not files:
        raise BenchmarkError(
            f"corpus: no readable UTF-8 .py file under {directory}; pass root= a directory of "
            "Python sources."
        )
    if not train or not heldout:
        raise BenchmarkError(
            f"corpus: {files} file(s) under {directory} give an empty "
            f"{'training' if not train else 'held-out'} split ({HELDOUT_PERCENT}% of files are "
            "held out, chosen by path); use a directory with more files."
        )
    if max_bytes is not None:
        train, heldout = train[:max_bytes], heldout[:max_bytes]
    return _as_tensor(train), _as_tensor(heldout)


def _as_tensor(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# --- model ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Phase:
    """One stage of a training curriculum: a context length and batch size until a point.

    Attributes:
        until: the fraction of the budget (steps or seconds) at which this phase ends, in (0, 1].
        context: bytes per training window (the model sees ``context`` and predicts the next).
        batch_size: windows per step.
    """

    until: float
    context: int
    batch_size: int


@dataclasses.dataclass(frozen=True)
class ModelSize:
    """A named model shape and the recipe that trains it.

    Attributes:
        name: ``"small"`` or ``"tiny"``.
        hidden_size, num_layers, num_heads, num_kv_heads, intermediate_size: the Llama shape.
        max_position_embeddings: the longest context the model is meant for.
        tie_embeddings: whether the output projection shares the byte embedding.
        phases: the context curriculum; the last phase's context is the evaluation context.
        lr: peak learning rate; warmup_steps: linear warm-up length in steps.
        steps: default step budget (tiny); minutes: default wall-clock budget (small).
        eval_windows: held-out windows for the recorded perplexity.
    """

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_position_embeddings: int
    tie_embeddings: bool
    phases: tuple[Phase, ...]
    lr: float
    warmup_steps: int
    steps: int | None
    minutes: float | None
    eval_windows: int

    @property
    def context(self) -> int:
        """The final training context, at which held-out perplexity is measured."""
        return self.phases[-1].context


SIZES: dict[str, ModelSize] = {
    # ≈10M parameters. One CPU thread trains only ~450 bytes/s at this size (~350 at context
    # 1024), so 20 minutes see ~0.5M bytes, a few hundred steps: small steps (1024 bytes) for
    # more updates, most of the budget at context 256 (cheaper attention, more windows per
    # step), the last quarter at 1024, so that positions up to 1024 are trained before the
    # evaluation there.
    "small": ModelSize(
        name="small",
        hidden_size=384,
        num_layers=6,
        num_heads=6,
        num_kv_heads=2,
        intermediate_size=1152,
        max_position_embeddings=1024,
        tie_embeddings=True,
        phases=(Phase(0.75, 256, 4), Phase(1.0, 1024, 1)),
        lr=2e-3,
        warmup_steps=30,
        steps=None,
        minutes=20.0,
        eval_windows=64,
    ),
    "tiny": ModelSize(
        name="tiny",
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=192,
        max_position_embeddings=128,
        tie_embeddings=True,
        phases=(Phase(1.0, 128, 8),),
        lr=1e-2,
        warmup_steps=20,
        steps=200,
        minutes=None,
        eval_windows=64,
    ),
}
"""The named sizes. ``small`` is the benchmark model; ``tiny`` is for tests."""


def _size(size: str | ModelSize) -> ModelSize:
    if isinstance(size, ModelSize):
        return size
    try:
        return SIZES[size]
    except KeyError:
        raise BenchmarkError(
            f"byte_lm: unknown size {size!r}; choose one of {sorted(SIZES)}."
        ) from None


def model_config(size: str | ModelSize = "small") -> Any:
    """The ``transformers.LlamaConfig`` of a named size, over the 256 byte values.

    Token 0 (the NUL byte, absent from source text) is the padding id; there are no
    beginning/end-of-sequence tokens.
    """
    import transformers

    spec = _size(size)
    return transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_embeddings,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )


def build_model(
    size: str | ModelSize | Any = "small", *, seed: int = 0, attn_implementation: str = "eager"
) -> nn.Module:
    """A freshly initialised byte-level ``LlamaForCausalLM``.

    Args:
        size: a name in :data:`SIZES`, a :class:`ModelSize`, or a ``LlamaConfig``.
        seed: the initialisation seed (the caller's random state is left unchanged).
        attn_implementation: ``"eager"`` (explicit softmax attention, what the rewriter finds
            most easily) or ``"sdpa"`` (faster to train; same weights, same function).
    """
    import transformers

    if attn_implementation not in ("eager", "sdpa"):
        raise BenchmarkError(
            f"byte_lm: attn_implementation must be 'eager' or 'sdpa', not {attn_implementation!r}."
        )
    config = size if isinstance(size, transformers.PretrainedConfig) else model_config(size)
    with _forked_rng(seed):
        return transformers.LlamaForCausalLM._from_config(
            config, attn_implementation=attn_implementation
        )


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters (a tied embedding counted once)."""
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _forked_rng(seed: int) -> Iterator[None]:
    # fork_rng restores the caller's CPU (and, with devices, accelerator) generator on exit.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# --- training ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainRecord:
    """What one :func:`train` call did.

    Attributes:
        steps: optimizer steps taken.
        tokens: bytes predicted (windows × context, summed over steps).
        seconds: wall time of the training loop.
        cpu_seconds: the process's CPU time in the loop (all its threads).
        train_loss: mean cross-entropy (nats per byte) over the last ``min(20, steps)`` steps.
    """

    steps: int
    tokens: int
    seconds: float
    cpu_seconds: float
    train_loss: float


def _windows(data: Tensor, length: int, count: int, generator: torch.Generator) -> Tensor:
    """``count`` windows of ``length`` consecutive bytes at random starts, as int64 (count, len)."""
    starts = torch.randint(0, data.numel() - length + 1, (count,), generator=generator)
    return data[starts[:, None] + torch.arange(length)].long()


def _check_data(data: Tensor, length: int, what: str) -> None:
    if data.dim() != 1:
        raise BenchmarkError(
            f"{what}: data must be a 1-D byte tensor, not shape {tuple(data.shape)}."
        )
    if data.numel() < length:
        raise BenchmarkError(
            f"{what}: {data.numel()} bytes of data cannot fill one window of {length}; pass more "
            "data or a shorter context."
        )


def _check_context(model: Any, context: int, what: str) -> None:
    if context < 1:
        raise BenchmarkError(f"{what}: context must be at least 1, not {context}.")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(limit, int) and context > limit:
        raise BenchmarkError(
            f"{what}: context {context} is longer than the model's max_position_embeddings "
            f"{limit}; use a context of at most {limit}."
        )


def _logits(output: Any) -> Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor):
        raise BenchmarkError(
            f"byte_lm: the model returned {type(output).__name__}, neither a tensor nor an "
            "object with .logits."
        )
    return logits


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""What a time budget counts: elapsed time, or this process's CPU time (on a machine shared
with other jobs, CPU time leaves out their time slices, so a budget buys the same work)."""


def _clock(name: str) -> Callable[[], float]:
    try:
        return CLOCKS[name]
    except KeyError:
        raise BenchmarkError(
            f"byte_lm: clock must be one of {sorted(CLOCKS)}, not {name!r}."
        ) from None


def _lr_factor(step: int, progress: float, warmup_steps: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warmup_steps`` steps, then cosine decay to ``min_ratio`` over the
    budget (``progress`` in [0, 1])."""
    warmup = min(1.0, (step + 1) / max(1, warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return warmup * (min_ratio + (1.0 - min_ratio) * cosine)


def _phases(context: int, batch_size: int, phases: Sequence[Phase] | None) -> tuple[Phase, ...]:
    if phases is None:
        return (Phase(1.0, context, batch_size),)
    result = tuple(phases)
    if not result:
        raise BenchmarkError("train: phases is empty; pass None for one phase at `context`.")
    ends = [p.until for p in result]
    if any(not 0 < u <= 1 for u in ends) or ends != sorted(ends) or ends[-1] != 1.0:
        raise BenchmarkError(
            f"train: phase ends {ends} must increase within (0, 1] and the last must be 1.0."
        )
    if result[-1].context != context or result[-1].batch_size != batch_size:
        raise BenchmarkError(
            f"train: the last phase ({result[-1].context} bytes × {result[-1].batch_size}) "
            f"must match context={context}, batch_size={batch_size}."
        )
    return result


def train(
    model: nn.Module,
    data: Tensor,
    *,
    context: int,
    batch_size: int,
    steps: int | None = None,
    max_seconds: float | None = None,
    lr: float,
    seed: int,
    progress: bool = True,
    warmup_steps: int = 30,
    weight_decay: float = 0.1,
    clip_norm: float = 1.0,
    phases: Sequence[Phase] | None = None,
    clock: str = "wall",
) -> TrainRecord:
    """Train a causal language model on random windows of ``data`` (next-byte cross-entropy).

    AdamW (betas 0.9/0.95, weight decay on matrices only), a linear warm-up over
    ``warmup_steps`` steps then cosine decay to a tenth of ``lr`` over the budget, gradient
    norm clipped to ``clip_norm``. Each step draws ``batch_size`` windows of ``context + 1``
    bytes at random starts. The budget is ``steps``, ``max_seconds`` or both (whichever ends
    first); the schedule follows the budget's fraction used, in steps or in seconds. With a
    step budget the result depends only on ``seed`` (and the torch build and thread count);
    a time budget makes the number of steps depend on the machine.

    The caller's random state is left unchanged (the window draws use their own generator,
    seeded by ``seed``, inside ``torch.random.fork_rng``). The model is left in eval mode.

    Args:
        model: called as ``model(input_ids=ids)``; returns logits (B, N, 256) or an object with
            ``.logits``.
        data: 1-D ``uint8`` tensor of training bytes.
        context: bytes each window feeds the model (of the last phase, if ``phases``).
        batch_size: windows per step (of the last phase, if ``phases``).
        steps: optimizer steps to take.
        max_seconds: time budget of the loop, on ``clock``.
        lr: peak learning rate.
        seed: seeds the window draws.
        progress: show a ``rich`` progress bar with the loss (plain log lines every minute when
            the output is not a terminal).
        warmup_steps: linear warm-up length.
        weight_decay: AdamW weight decay of 2-D parameters.
        clip_norm: gradient norm clipping threshold.
        phases: a context curriculum, e.g. ``(Phase(0.75, 256, 8), Phase(1.0, 1024, 2))``: most
            of the budget on short windows, the end at the full context. Its last phase must be
            ``(1.0, context, batch_size)``.
        clock: what ``max_seconds`` counts, ``"wall"`` or ``"cpu"`` (see :data:`CLOCKS`).

    Returns:
        A :class:`TrainRecord`.

    Raises:
        BenchmarkError: no budget, a context beyond the model's positions, too little data.
    """
    if steps is None and max_seconds is None:
        raise BenchmarkError("train: give a budget, steps= or max_seconds= (or both).")
    if (steps is not None and steps < 1) or (max_seconds is not None and max_seconds <= 0):
        raise BenchmarkError(
            f"train: the budget must be positive (steps={steps}, max_seconds={max_seconds})."
        )
    timer = _clock(clock)
    plan = _phases(context, batch_size, phases)
    for phase in plan:
        _check_context(model, phase.context, "train")
        _check_data(data, phase.context + 1, "train")

    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=lr,
        betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(seed)
    recent: list[float] = []
    tokens = 0
    step = 0
    model.train()
    start, cpu_start, budget_start = time.perf_counter(), time.process_time(), timer()
    with _forked_rng(seed), _Progress(progress) as bar:
        while True:
            elapsed = timer() - budget_start
            used = max(
                step / steps if steps is not None else 0.0,
                elapsed / max_seconds if max_seconds is not None else 0.0,
            )
            if used >= 1.0:
                break
            phase = next(p for p in plan if used < p.until)
            for group in optimizer.param_groups:
                group["lr"] = lr * _lr_factor(step, used, warmup_steps)
            batch = _windows(data, phase.context + 1, phase.batch_size, generator)
            logits = _logits(model(input_ids=batch[:, :-1]))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            if not torch.isfinite(loss):
                raise BenchmarkError(
                    f"train: the loss became {loss.item()} at step {step + 1}; lower lr "
                    f"(now {lr}) or raise warmup_steps."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
            optimizer.step()
            step += 1
            tokens += phase.batch_size * phase.context
            recent = (recent + [loss.item()])[-20:]
            bar.update(used, step, phase.context, sum(recent) / len(recent), tokens, elapsed)
    model.eval()
    return TrainRecord(
        steps=step,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu_start,
        train_loss=sum(recent) / max(1, len(recent)),
    )


class _Progress:
    """A ``rich`` progress bar over the budget's fraction used, showing step, context, loss and
    tokens/s; on a non-terminal (a log file) one plain line a minute instead."""

    def __init__(self, enabled: bool, log_every: float = 60.0) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self._bar: Any = None
        self._last_log = 0.0

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("training"),
                BarColumn(),
                TextColumn("{task.percentage:>3.0f}%"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"),
            )
            self._task = self._bar.add_task("train", total=1.0, status="")
            self._bar.start()
        return self

    def update(
        self, used: float, step: int, context: int, loss: float, tokens: int, elapsed: float
    ) -> None:
        if self._bar is None:
            return
        status = (
            f"step {step}  context {context}  loss {loss:.3f}  "
            f"{tokens / max(elapsed, 1e-9):,.0f} tok/s"
        )
        self._bar.update(self._task, completed=min(used, 1.0), status=status)
        if not self._bar.console.is_terminal and elapsed - self._last_log >= self.log_every:
            self._last_log = elapsed
            self._bar.console.print(f"[{elapsed / 60:5.1f} min] {status}", highlight=False)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            if exc[0] is None:  # the budget is spent: show it full
                self._bar.update(self._task, completed=1.0)
            self._bar.stop()


# --- evaluation -------------------------------------------------------------------------------


def perplexity(
    model: Callable[..., Any],
    data: Tensor,
    *,
    context: int,
    windows: int,
    seed: int = 0,
    batch_size: int = 8,
) -> float:
    """Perplexity on ``windows`` fixed windows of ``data``: exp of the mean next-byte
    cross-entropy.

    Each window is ``context + 1`` consecutive bytes at a start drawn with ``seed`` (the same
    windows for every model, the caller's random state unchanged); the model reads the first
    ``context`` and is scored on predicting each next byte, every position counting once.
    Computed under ``torch.no_grad()``; an ``nn.Module`` is evaluated in eval mode and put back
    in its previous mode.

    Args:
        model: any callable taking ``input_ids=`` (B, context) int64 and returning logits
            (B, context, 256) or an object with ``.logits`` — the original model or a rewritten
            one.
        data: 1-D ``uint8`` held-out bytes.
        context: bytes the model reads per window.
        windows: how many windows.
        seed: chooses the windows.
        batch_size: windows per forward call.

    Returns:
        The perplexity (256 for a uniform prediction; ``log2`` of it is bits per byte).

    Raises:
        BenchmarkError: a context beyond the model's positions, too little data, bad shapes.
    """
    if windows < 1:
        raise BenchmarkError(f"perplexity: windows must be at least 1, not {windows}.")
    _check_context(model, context, "perplexity")
    _check_data(data, context + 1, "perplexity")
    generator = torch.Generator().manual_seed(seed)
    batch = _windows(data, context + 1, windows, generator)
    was_training = model.training if isinstance(model, nn.Module) else None
    if isinstance(model, nn.Module):
        model.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for chunk in batch.split(batch_size):
                logits = _logits(model(input_ids=chunk[:, :-1]))
                if logits.shape[:2] != chunk[:, 1:].shape:
                    raise BenchmarkError(
                        f"perplexity: logits of shape {tuple(logits.shape)} for inputs of "
                        f"shape {tuple(chunk[:, :-1].shape)}; expected (B, N, vocab)."
                    )
                total += F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    chunk[:, 1:].reshape(-1),
                    reduction="sum",
                ).item()
    finally:
        if was_training is not None:
            model.train(was_training)
    return math.exp(total / (windows * context))


# --- cache ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainedByteLM:
    """A trained byte-level model and what is known about its training.

    Attributes:
        model: the ``LlamaForCausalLM`` in eval mode.
        record: the JSON record (config, budget, steps, tokens, seconds, train loss, held-out
            perplexity, versions, date); also ``record.json`` in the cache directory.
        path: the cache directory, or None when nothing was cached.
        trained: True when this call trained the model, False when it was loaded.
    """

    model: nn.Module
    record: dict[str, Any]
    path: Path | None
    trained: bool


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/attnrewrite/byte_lm`` (``~/.cache/attnrewrite/byte_lm``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "attnrewrite" / "byte_lm"


def _options(
    spec: ModelSize,
    *,
    steps: int | None,
    minutes: float | None,
    clock: str,
    seed: int,
    max_bytes: int | None,
    eval_windows: int,
) -> dict[str, Any]:
    """Everything that decides the trained weights and the record: hashed into the cache name."""
    return {
        "format": CACHE_FORMAT,
        "size": dataclasses.asdict(spec),
        "steps": steps,
        "minutes": minutes,
        "clock": clock if minutes is not None else None,
        "seed": seed,
        "max_bytes": max_bytes,
        "eval_windows": eval_windows,
        # The corpus is this Python's standard library.
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def cache_path(
    size: str | ModelSize = "small",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    clock: str = "wall",
    seed: int = 0,
    max_bytes: int | None = None,
    eval_windows: int | None = None,
) -> Path:
    """The directory :func:`load_or_train` uses for these arguments (same defaults)."""
    spec = _size(size)
    steps, minutes = _budget(spec, steps, minutes)
    options = _options(
        spec,
        steps=steps,
        minutes=minutes,
        clock=clock,
        seed=seed,
        max_bytes=max_bytes,
        eval_windows=eval_windows or spec.eval_windows,
    )
    digest = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:10]
    return Path(cache_dir or default_cache_dir()) / f"{spec.name}-{digest}"


def _budget(
    spec: ModelSize, steps: int | None, minutes: float | None
) -> tuple[int | None, float | None]:
    if steps is None and minutes is None:
        steps, minutes = spec.steps, spec.minutes
    if (steps is not None and steps < 1) or (minutes is not None and minutes <= 0):
        raise BenchmarkError(
            f"byte_lm: the budget must be positive (steps={steps}, minutes={minutes})."
        )
    # Normalised types, so that ``minutes=20`` and ``minutes=20.0`` hash to the same cache.
    return (
        int(steps) if steps is not None else None,
        float(minutes) if minutes is not None else None,
    )


def load_or_train(
    size: str | ModelSize = "small",
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    steps: int | None = None,
    minutes: float | None = None,
    clock: str = "wall",
    seed: int = 0,
    max_bytes: int | None = None,
    eval_windows: int | None = None,
    attn_implementation: str = "eager",
    retrain: bool = False,
    progress: bool = True,
) -> TrainedByteLM:
    """The trained model of a named size: loaded from the cache, or trained once and cached.

    The cache directory is ``<cache_dir>/<size>-<hash>/`` (``cache_dir`` defaulting to
    :func:`default_cache_dir`, outside the repository), the hash covering the shape, the
    recipe, the budget, the seed, the corpus options and the Python version (whose standard
    library is the corpus). It holds ``model.pt`` (the state dict) and ``record.json``, written
    last, so a half-written cache is retrained.

    Training uses the ``sdpa`` attention (faster; the same function) and the size's curriculum;
    the held-out perplexity is measured after training at the final context on
    ``eval_windows`` windows. With a time budget, ``minutes`` covers training *and* that
    evaluation: the evaluation's cost is measured on one batch first and kept back.

    Args:
        size: ``"small"``, ``"tiny"`` or a :class:`ModelSize`.
        cache_dir: where caches live.
        steps: a step budget instead of the size's default.
        minutes: a time budget (training plus evaluation) instead of the default.
        clock: what ``minutes`` counts: ``"wall"`` time or this process's ``"cpu"`` time.
        seed: initialisation and window seed.
        max_bytes: cap on each corpus split (for quick runs).
        eval_windows: held-out windows (default: the size's).
        attn_implementation: of the returned model, ``"eager"`` or ``"sdpa"``.
        retrain: train even if a cache exists (and replace it).
        progress: show training progress.

    Returns:
        A :class:`TrainedByteLM` (``trained`` says whether this call trained).
    """
    spec = _size(size)
    path = cache_path(
        spec,
        cache_dir=cache_dir,
        steps=steps,
        minutes=minutes,
        clock=clock,
        seed=seed,
        max_bytes=max_bytes,
        eval_windows=eval_windows,
    )
    record_file, weights_file = path / "record.json", path / "model.pt"
    if not retrain and record_file.is_file() and weights_file.is_file():
        model = build_model(spec, seed=seed, attn_implementation=attn_implementation)
        model.load_state_dict(torch.load(weights_file, map_location="cpu", weights_only=True))
        return TrainedByteLM(model.eval(), json.loads(record_file.read_text()), path, trained=False)

    model, record = _train_and_evaluate(
        spec,
        steps=steps,
        minutes=minutes,
        clock=clock,
        seed=seed,
        max_bytes=max_bytes,
        eval_windows=eval_windows,
        progress=progress,
    )
    path.mkdir(parents=True, exist_ok=True)
    record_file.unlink(missing_ok=True)
    partial = path / "model.pt.partial"
    torch.save(model.state_dict(), partial)
    partial.replace(weights_file)
    record["cache"] = str(path)
    record_file.write_text(json.dumps(record, indent=2) + "\n")
    result = build_model(spec, seed=seed, attn_implementation=attn_implementation)
    result.load_state_dict(model.state_dict())
    return TrainedByteLM(result.eval(), record, path, trained=True)


def _train_and_evaluate(
    spec: ModelSize,
    *,
    steps: int | None,
    minutes: float | None,
    clock: str,
    seed: int,
    max_bytes: int | None,
    eval_windows: int | None,
    progress: bool,
) -> tuple[nn.Module, dict[str, Any]]:
    import transformers

    timer = _clock(clock)
    wall_start, budget_start = time.perf_counter(), timer()
    steps, minutes = _budget(spec, steps, minutes)
    windows = eval_windows or spec.eval_windows
    train_bytes, heldout_bytes = corpus(max_bytes=max_bytes)
    model = build_model(spec, seed=seed, attn_implementation="sdpa")
    max_seconds = None
    eval_estimate = 0.0
    if minutes is not None:
        eval_estimate = _estimate_eval_seconds(model, heldout_bytes, spec.context, windows, timer)
        max_seconds = minutes * 60 - eval_estimate - (timer() - budget_start)
        if max_seconds <= 0:
            raise BenchmarkError(
                f"load_or_train: {minutes} minutes leave no time to train once the held-out "
                f"evaluation (~{eval_estimate:.0f} s) is kept back; give more minutes."
            )
    last = spec.phases[-1]
    run = train(
        model,
        train_bytes,
        context=last.context,
        batch_size=last.batch_size,
        steps=steps,
        max_seconds=max_seconds,
        lr=spec.lr,
        seed=seed,
        progress=progress,
        warmup_steps=spec.warmup_steps,
        phases=spec.phases,
        clock=clock,
    )
    eval_start = time.perf_counter()
    heldout = perplexity(model, heldout_bytes, context=spec.context, windows=windows, seed=seed)
    record: dict[str, Any] = {
        "size": spec.name,
        "parameters": parameter_count(model),
        "config": model.config.to_dict(),
        "recipe": dataclasses.asdict(spec),
        "budget": {
            "steps": steps,
            "minutes": minutes,
            "clock": clock,
            "train_seconds": max_seconds,
            "eval_seconds_estimate": eval_estimate,
        },
        "seed": seed,
        "steps": run.steps,
        "tokens": run.tokens,
        "train_seconds": run.seconds,
        "train_cpu_seconds": run.cpu_seconds,
        "train_loss": run.train_loss,
        "heldout_perplexity": heldout,
        "heldout_bits_per_byte": math.log2(heldout),
        "heldout_context": spec.context,
        "heldout_windows": windows,
        "eval_seconds": time.perf_counter() - eval_start,
        "total_seconds": time.perf_counter() - wall_start,
        "corpus": {
            "source": f"Python {platform.python_version()} standard library (.py files)",
            "train_bytes": train_bytes.numel(),
            "heldout_bytes": heldout_bytes.numel(),
            "max_bytes": max_bytes,
        },
        "threads": torch.get_num_threads(),
        # Training time buys tokens only as far as the CPU is free: the load says how busy the
        # machine was (other jobs share it).
        "load_average": _load_average(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": _cpu_name(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    return model, record


def _estimate_eval_seconds(
    model: nn.Module, data: Tensor, context: int, windows: int, timer: Callable[[], float]
) -> float:
    """Time one evaluation batch of the untrained model (same cost as trained) and scale up."""
    batch = min(8, windows)
    start = timer()
    perplexity(model, data, context=context, windows=batch, seed=0, batch_size=batch)
    return (timer() - start) * math.ceil(windows / batch) * 1.1


def _load_average() -> list[float] | None:
    try:
        return [round(load, 2) for load in os.getloadavg()]
    except OSError:  # not available on this platform
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.lru_cache(maxsize=8)
def _tiny_state(seed: int) -> dict[str, Tensor]:
    spec = SIZES["tiny"]
    model = build_model(spec, seed=seed, attn_implementation="sdpa")
    train_bytes, _ = corpus()
    last = spec.phases[-1]
    train(
        model,
        train_bytes,
        context=last.context,
        batch_size=last.batch_size,
        steps=spec.steps,
        lr=spec.lr,
        seed=seed,
        progress=False,
        warmup_steps=spec.warmup_steps,
        phases=spec.phases,
    )
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def tiny_decoder(seed: int = 0, *, attn_implementation: str = "eager") -> nn.Module:
    """The ``"tiny"`` byte-level decoder, trained in seconds (no cache), for tests.

    Deterministic under ``seed`` (a fixed step budget); the weights are memoised per process,
    and every call returns a fresh model in eval mode. Its held-out perplexity at context 128
    is far below the uniform 256.
    """
    model = build_model("tiny", seed=seed, attn_implementation=attn_implementation)
    model.load_state_dict(_tiny_state(seed))
    return model.eval()


__all__ = [
    "CLOCKS",
    "SIZES",
    "ModelSize",
    "Phase",
    "TrainRecord",
    "TrainedByteLM",
    "build_model",
    "cache_path",
    "corpus",
    "default_cache_dir",
    "load_or_train",
    "model_config",
    "parameter_count",
    "perplexity",
    "tiny_decoder",
    "train",
]
