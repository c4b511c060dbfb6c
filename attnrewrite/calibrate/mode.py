"""Calibration mode: teacher forcing of variant modules, and freezing of everything else.

Both are context managers that change a rewritten model in place and put it back on exit, also when
the body raises:

- :func:`teacher_forcing` makes every chosen variant module compute the exact softmax output from
  its canonical inputs (the teacher, :func:`attnrewrite.ops.attention`), hand that
  output downstream, and report the inputs and the teacher output to a callback. The rest of the
  model therefore runs exactly as the original, so every site sees the inputs it would see in the
  original model, whatever the other sites' variants currently compute.
- :func:`train_only` sets ``requires_grad`` of every parameter outside a given set to ``False``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from attnrewrite.ops import attention


@dataclasses.dataclass(frozen=True)
class SiteCall:
    """One call of a site in canonical form, with its teacher output (all detached).

    Attributes:
        query: (B, H, Nq, d).
        key: (B, Hkv, Nk, d).
        value: (B, Hkv, Nk, dv).
        mask: the canonical mask given to the variant, or ``None``.
        causal: the causal flag given to the variant.
        scale: the factor on q·k.
        teacher: (B, H, Nq, dv), exact softmax attention of the above.
    """

    query: Tensor
    key: Tensor
    value: Tensor
    mask: Tensor | None
    causal: bool
    scale: float
    teacher: Tensor

    def nbytes(self) -> int:
        tensors = (self.query, self.key, self.value, self.mask, self.teacher)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


Record = Callable[[str, SiteCall], None]


def _detached(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


def _teacher_forward(name: str, record: Record) -> Callable[..., Tensor]:
    def forward(
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float = 1.0,
    ) -> Tensor:
        with torch.no_grad():
            teacher = attention(query, key, value, mask, causal, scale)
        record(
            name,
            SiteCall(
                query.detach(),
                key.detach(),
                value.detach(),
                _detached(mask),
                bool(causal),
                float(scale),
                teacher,
            ),
        )
        return teacher

    return forward


@contextlib.contextmanager
def teacher_forcing(modules: Mapping[str, nn.Module], record: Record) -> Iterator[None]:
    """Within the block, each module in ``modules`` returns the exact softmax output.

    Args:
        modules: site name -> variant module (as in ``RewrittenModel.variant_modules``).
        record: called as ``record(site_name, SiteCall)`` on every call of a forced module.

    The module's own ``forward`` is shadowed by an instance attribute (``nn.Module.__call__`` looks
    ``forward`` up on the instance first), so hooks, ``state_dict`` and the graph are untouched;
    the attribute is removed again on exit.
    """
    patched: list[tuple[nn.Module, object]] = []
    missing = object()
    try:
        for name, module in modules.items():
            patched.append((module, module.__dict__.get("forward", missing)))
            module.forward = _teacher_forward(name, record)
        yield
    finally:
        for module, previous in reversed(patched):
            if previous is missing:
                del module.forward
            else:
                module.forward = previous


@contextlib.contextmanager
def train_only(model: nn.Module, trainable: Iterable[nn.Parameter]) -> Iterator[None]:
    """Within the block, only ``trainable`` parameters of ``model`` require gradients."""
    keep = {id(p) for p in trainable}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(id(parameter) in keep)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
