"""Generation before and after rewriting: tokens/s and whether greedy tokens agree.

:func:`compare_generation` times the original model's own generation (Hugging Face's
``generate`` with its key/value cache when the model has one, else greedy decoding that re-runs
the whole sequence per token) against the rewritten model's prefill + step decoding
(:meth:`~attnrewrite.rewriter.rewrite.RewrittenModel.generate`), on the same prompt, greedy. Each
is run once untimed first (the rewritten model builds its decode graphs and checks one step
against its parallel forward then). The ``attnrewrite generate`` command prints the result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


@dataclasses.dataclass(frozen=True)
class GenerationRun:
    """One timed greedy generation.

    Attributes:
        label: what generated (``"original: Hugging Face generate (KV cache)"``...).
        tokens: the prompt followed by the new tokens, (B, N + new).
        seconds: wall time of the timed run.
        new_tokens: new tokens per sequence.
    """

    label: str
    tokens: Tensor
    seconds: float
    new_tokens: int

    @property
    def tokens_per_second(self) -> float:
        """New tokens over all sequences per second."""
        return self.tokens.shape[0] * self.new_tokens / max(self.seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class GenerationComparison:
    """The original's and the rewritten model's greedy generation on one prompt."""

    before: GenerationRun
    after: GenerationRun
    prompt_len: int

    def first_difference(self) -> tuple[int, int] | None:
        """(sequence, new-token index) of the first token that differs, or None if all agree.
        A run that stopped earlier (end-of-sequence) differs at its first missing token."""
        before = self.before.tokens[:, self.prompt_len :]
        after = self.after.tokens[:, self.prompt_len :]
        common = min(before.shape[1], after.shape[1])
        differs = before[:, :common] != after[:, :common]
        if bool(differs.any()):
            index = differs.int().argmax(dim=1)
            rows = differs.any(dim=1).nonzero().flatten()
            first = min(rows.tolist(), key=lambda r: int(index[r]))
            return first, int(index[first])
        if before.shape[1] != after.shape[1]:
            return 0, common
        return None

    @property
    def agree(self) -> bool:
        return self.first_difference() is None

    @property
    def speedup(self) -> float:
        return self.after.tokens_per_second / max(self.before.tokens_per_second, 1e-9)


def _logits(out: Any) -> Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out if isinstance(out, Tensor) else out[0]
    return logits


def _recompute_greedy(
    model: nn.Module, example: tuple[tuple[Any, ...], dict[str, Any]], max_new_tokens: int
) -> Callable[[Tensor, Tensor], Tensor]:
    """Greedy decoding that calls ``model`` on the whole sequence for every new token, with the
    inputs laid out as in ``example`` (token ids first or ``input_ids=``, ``attention_mask=``,
    and ``position_ids``/``cache_position`` as Hugging Face computes them)."""
    args, kwargs = example

    def run(ids: Tensor, mask: Tensor) -> Tensor:
        for _ in range(max_new_tokens):
            call_args = tuple(ids if i == 0 else a for i, a in enumerate(args))
            call_kwargs = dict(kwargs)
            for name, value in (("input_ids", ids), ("attention_mask", mask)):
                if name in call_kwargs:
                    call_kwargs[name] = value
            if "position_ids" in call_kwargs:
                positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
                call_kwargs["position_ids"] = positions
            if "cache_position" in call_kwargs:
                call_kwargs["cache_position"] = torch.arange(ids.shape[1], device=ids.device)
            token = _logits(model(*call_args, **call_kwargs))[:, -1].argmax(-1)
            ids = torch.cat([ids, token[:, None].to(ids.dtype)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        return ids

    return run


def _timed(
    label: str, generate: Callable[[int], Tensor], prompt_len: int, new: int
) -> GenerationRun:
    generate(min(2, new))  # warm-up: first-call set-up is not decode speed
    start = time.perf_counter()
    tokens = generate(new)
    seconds = time.perf_counter() - start
    return GenerationRun(label, tokens, seconds, tokens.shape[1] - prompt_len)


@torch.no_grad()
def compare_generation(
    model: nn.Module,
    rewritten: Any,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int = 16,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
) -> GenerationComparison:
    """Greedy generation with ``model`` and with its rewrite ``rewritten``, timed.

    Args:
        model: the original model (a Hugging Face causal LM uses its own ``generate``).
        rewritten: its :class:`~attnrewrite.rewriter.rewrite.RewrittenModel`.
        input_ids, attention_mask: the prompt, (B, N), padded on the left.
        max_new_tokens: new tokens per sequence.
        eos_token_id, pad_token_id: given to both (Hugging Face's ``generate`` otherwise takes
            its generation config's).

    Returns:
        A :class:`GenerationComparison` (tokens, times, ``agree``, ``speedup``).
    """
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    prompt_len = input_ids.shape[1]
    stops = {"eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
    if callable(getattr(model, "generate", None)) and hasattr(model, "generation_config"):
        label = "original: Hugging Face generate (KV cache)"

        def original(new: int) -> Tensor:
            return model.generate(
                input_ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **stops
            )
    else:
        label = "original: greedy, whole sequence per token"

        def original(new: int) -> Tensor:
            return _recompute_greedy(model, rewritten.example_inputs, new)(input_ids, mask)

    def after(new: int) -> Tensor:
        return rewritten.generate(input_ids, mask, max_new_tokens=new, **stops)

    variants = sorted({row.variant for row in rewritten.report.rewritten})
    after_label = f"rewritten ({', '.join(variants) or 'no site'}): prefill + one step per token"
    return GenerationComparison(
        _timed(label, original, prompt_len, max_new_tokens),
        _timed(after_label, after, prompt_len, max_new_tokens),
        prompt_len,
    )
