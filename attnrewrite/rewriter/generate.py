"""Generation with a rewritten decoder: prefill once, then one step per token.

:class:`Decoder` runs the two graphs of :func:`attnrewrite.passes.decode.plan_decode` (eagerly or
compiled) and feeds them what the model reads: token ids, the padding mask, and positions, as
Hugging Face's ``generate`` does (``position_ids`` from the mask's cumulative sum, so left-padded
prompts of different lengths get the positions they would have alone; ``cache_position`` as the
absolute index). Positions the graph computes itself (a sequence ``arange``) are shifted by the
step's ``offset``. Greedy and sampled decoding (temperature, top-k, top-p), end-of-sequence
tokens, and a streaming form.

The first call checks the recurrence against the parallel forward: after the first step, the
rewritten model itself is run on the prompt plus that token and the last position's logits must
agree (relative error ≤ 1e-3); otherwise :class:`~attnrewrite.errors.DecodeError` is raised
before anything is returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.fx import _pytree as fx_pytree
from torch.utils import _pytree as pytree

from attnrewrite.errors import DecodeError, InputMismatchError
from attnrewrite.passes.decode import DecodePlan, plan_decode

#: Relative error allowed between the step's logits and the parallel forward's (first call), for
#: float32 logits; half-precision models get :data:`HALF_CHECK_TOLERANCE` (their rounding alone
#: is ~1e-3). A position mixed in wrongly is off by far more than either.
CHECK_TOLERANCE = 1e-3
HALF_CHECK_TOLERANCE = 3e-2


def check_tolerance(dtype: torch.dtype) -> float:
    """The first-call check's tolerance for logits of ``dtype``."""
    return HALF_CHECK_TOLERANCE if dtype in (torch.float16, torch.bfloat16) else CHECK_TOLERANCE


class Generation:
    """``stream`` and ``generate`` over a prefill and a step (see :func:`decode_loop`); a runtime
    (eager or compiled graphs, ONNX Runtime) supplies :meth:`_runners`, ``takes_mask``,
    ``verified`` and :meth:`_verify`."""

    takes_mask: bool
    verified: bool

    def _runners(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(prefill, step) as :func:`decode_loop` calls them."""
        raise NotImplementedError(f"{type(self).__name__} must supply its prefill and step")

    def _verify(self, *args: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} must say how it checks a step")

    @torch.no_grad()
    def stream(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        *,
        check: bool = True,
        output_logits: bool = False,
        **options: Any,
    ) -> Iterator[Any]:
        """Yield the next token of every sequence, (B,), one step at a time (with
        ``output_logits`` the pair (token, the (B, V) logits it was chosen from)). Options as for
        :meth:`RewrittenModel.generate`; ``check`` compares the first step with the parallel
        form (first call only)."""
        ids, mask = _prompt(input_ids, attention_mask, self.takes_mask)
        prefill, step = self._runners()
        verify = self._verify if check and not self.verified else None
        for token, logits in decode_loop(prefill, step, ids, mask, verify=verify, **options):
            yield (token, logits) if output_logits else token

    def generate(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, **options
    ) -> Tensor:
        """The prompt followed by the new tokens, (B, N + new), as Hugging Face's ``generate``."""
        tokens = list(self.stream(input_ids, attention_mask, **options))
        if not tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(tokens, dim=1).to(input_ids.dtype)], dim=1)


class Decoder(Generation):
    """Prefill and step graphs of one rewritten model, and the generation loop over them.

    Args:
        model: a :class:`~attnrewrite.rewriter.rewrite.RewrittenModel` of a causal decoder.
        compiler: ``None`` (eager) or a function applied to both graph modules (``ar.compile``
            passes ``torch.compile`` with dynamic shapes: one compilation serves every step).
    """

    def __init__(
        self, model: Any, compiler: Callable[[Any], Callable[..., Any]] | None = None
    ) -> None:
        self.model = model
        self.plan: DecodePlan = plan_decode(model.graph_module)
        self.in_spec = getattr(model.graph_module, "_in_spec", None)
        self.out_spec = getattr(model.graph_module, "_out_spec", None)
        args, kwargs = model.example_inputs
        self._example_args = args
        self._example_kwargs = model.complete_kwargs(dict(kwargs))
        self._check_roles()
        prefill, step = self.plan.prefill, self.plan.step
        if compiler is not None:
            prefill, step = compiler(prefill), compiler(step)
        self._prefill: Callable[..., Any] = prefill
        self._step: Callable[..., Any] = step
        self.verified = False

    # -- what the graph reads -------------------------------------------------------------------
    def _check_roles(self) -> None:
        known = {"input_ids", "attention_mask", "position_ids", "cache_position"}
        for name, value in self._example_kwargs.items():
            if isinstance(value, torch.Tensor) and name not in known:
                raise DecodeError(
                    f"the model was captured with the tensor input '{name}', which decoding "
                    "cannot produce for each new token; capture with input_ids (and "
                    "attention_mask) only"
                )
        for i, value in enumerate(self._example_args):
            if isinstance(value, torch.Tensor) and (i > 0 or value.is_floating_point()):
                raise DecodeError(
                    f"positional input {i} ({tuple(value.shape)}, {value.dtype}) is not token ids; "
                    "decoding feeds token ids (first argument or input_ids=) and attention_mask="
                )
        self.takes_mask = "attention_mask" in self._example_kwargs

    def _flat(self, ids: Tensor, mask: Tensor, positions: Tensor, start: int) -> list[Any]:
        kwargs = dict(self._example_kwargs)
        ids, mask, positions = ids.contiguous(), mask.contiguous(), positions.contiguous()
        args = tuple(ids if isinstance(a, torch.Tensor) else a for a in self._example_args)
        if "input_ids" in kwargs:
            kwargs["input_ids"] = ids
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = mask
        if "position_ids" in kwargs:
            kwargs["position_ids"] = positions
        if "cache_position" in kwargs:
            kwargs["cache_position"] = torch.arange(start, start + ids.shape[1], device=ids.device)
        if self.in_spec is not None:
            return list(fx_pytree.tree_flatten_spec((args, kwargs), self.in_spec))
        return pytree.tree_leaves((args, kwargs))

    def _logits(self, flat_outputs: list[Any]) -> Tensor:
        if self.out_spec is not None:
            out = pytree.tree_unflatten(list(flat_outputs), self.out_spec)
        else:
            out = flat_outputs[0]
        logits = getattr(out, "logits", None)
        if logits is None:
            logits = out if isinstance(out, torch.Tensor) else out[0]
        return logits

    # -- generation -------------------------------------------------------------------------------
    def _runners(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        n = self.plan.num_outputs

        def run(fn: Callable[..., Any], flat: list[Any]) -> tuple[Tensor, list[Tensor]]:
            outs = list(fn(*flat))
            return self._logits(outs[:n])[:, -1], outs[n:]

        def prefill(*model_inputs: Any) -> tuple[Tensor, list[Tensor]]:
            return run(self._prefill, self._flat(*model_inputs))

        def step(state: list[Tensor], *model_inputs: Any, offset: Tensor, counted: Tensor):
            return run(self._step, [*self._flat(*model_inputs), offset, counted, *state])

        return prefill, step

    def _verify(
        self,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        token: Tensor,
        last: Tensor,
        step_logits: Tensor,
    ) -> None:
        """The step's logits must equal the parallel forward's on the prompt plus the token."""
        full_ids = torch.cat([ids, token[:, None]], dim=1)
        full_mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        full_pos = torch.cat([positions, last[:, None]], dim=1)
        outs = self.model.graph_module(*self._flat(full_ids, full_mask, full_pos, 0))
        flat = pytree.tree_leaves(outs) if not isinstance(outs, (list, tuple)) else list(outs)
        want = self._logits(flat)[:, -1]
        tolerance = check_tolerance(want.dtype)
        want, got = want.double(), step_logits.double()
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if not error <= tolerance:
            raise DecodeError(
                f"the one-token step does not reproduce the parallel forward (relative error "
                f"{error:.2e} on the first generated position): something in the model mixes "
                "positions in a way the decode analysis did not see. Please report it with the "
                "model; meanwhile call the rewritten model on the whole sequence."
            )
        self.verified = True


def decode_loop(
    prefill: Callable[..., tuple[Tensor, list[Tensor]]],
    step: Callable[..., tuple[Tensor, list[Tensor]]],
    ids: Tensor,
    mask: Tensor,
    *,
    max_new_tokens: int = 20,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | list[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | None = None,
    verify: Callable[..., None] | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The generation loop shared by every runtime (eager, Inductor, ONNX Runtime).

    ``prefill(ids, mask, positions, start)`` and ``step(state, ids, mask, positions, start,
    offset=, counted=)`` return (last-position logits (B, V), state). Positions are Hugging
    Face's: the count of real tokens before each one (left padding does not shift them).
    Yields (token (B,), the logits it was chosen from).
    """
    if max_new_tokens <= 0:
        return
    eos = _eos(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    generator = None
    if do_sample:
        generator = torch.Generator(device=ids.device)
        generator.manual_seed(0 if seed is None else seed)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits, state = prefill(ids, mask, positions, 0)
    offset = ids.shape[1]
    last = positions[:, -1]
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    ones = torch.ones(ids.shape[0], 1, dtype=mask.dtype, device=mask.device)
    for t in range(max_new_tokens):
        token = _select(logits, do_sample, temperature, top_k, top_p, generator)
        if eos:
            token = torch.where(finished, torch.full_like(token, pad), token)
            finished |= torch.isin(token, torch.tensor(eos, device=token.device))
        if t == max_new_tokens - 1 or (eos and bool(finished.all())):
            yield token, logits
            return
        last = last + 1
        # Real tokens before the new one: what a cumulative count of the mask has reached.
        counted = (mask.sum(-1, keepdim=True) + t).to(mask.dtype)
        step_logits, state = step(
            state,
            token[:, None],
            ones,
            last[:, None],
            offset,
            offset=torch.tensor(offset),
            counted=counted,
        )
        if verify is not None:
            verify(ids, mask, positions, token, last, step_logits)
            verify = None
        yield token, logits
        logits = step_logits
        offset += 1


def _prompt(input_ids: Tensor, attention_mask: Tensor | None, takes_mask: bool):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise InputMismatchError("input_ids must be a (batch, length) tensor of token ids")
    if input_ids.shape[1] < 1:
        raise InputMismatchError("the prompt is empty: give at least one token per sequence")
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    if mask.shape != input_ids.shape:
        raise InputMismatchError(
            f"attention_mask {tuple(mask.shape)} must have the shape of input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if not takes_mask and bool((mask == 0).any()):
        raise DecodeError(
            "the prompt has padding but the model was captured without attention_mask: rewrite "
            "it with attention_mask in the example kwargs to decode padded batches"
        )
    if bool((mask[:, -1] == 0).any()):
        raise InputMismatchError(
            "right padding: the last prompt token of some sequence is padding. Pad prompts on "
            "the left for generation (tokenizer.padding_side = 'left')"
        )
    return input_ids, mask


def _eos(eos_token_id: int | list[int] | None) -> list[int]:
    if eos_token_id is None:
        return []
    return [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)


def _select(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> Tensor:
    """The next token from (B, V) logits: argmax, or a sample after temperature/top-k/top-p."""
    logits = logits.float()
    if not do_sample:
        return logits.argmax(dim=-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits / temperature
    if top_k is not None and top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, index = logits.sort(dim=-1, descending=True)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        # Drop tokens once the mass before them reaches top_p (the first token always stays).
        drop = (cumulative - ordered.softmax(dim=-1)) >= top_p
        logits = logits.scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
