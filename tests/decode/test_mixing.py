"""The decode analysis refuses every op that mixes positions, and accepts per-position ones.

Each case inserts one operation into a small decoder (token embedding, learned positions, one
hand-written causal attention block) between the embedding and the attention; the rewritten model
either generates (its tokens checked against full recomputation) or ``generate`` raises
``DecodeError`` naming the operation — whatever the op, never a wrong token.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrewrite as ar
from attnrewrite.errors import DecodeError
from tests.decode.models import Block

Op = Callable[[torch.Tensor], torch.Tensor]


class Mixer(nn.Module):
    def __init__(self, op: Op, vocab: int = 32, dim: int = 16) -> None:
        super().__init__()
        self.op = op
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(64, dim)
        self.block = Block(dim, 2, 64)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        return self.head(self.block(self.op(x)))


MIXING: dict[str, tuple[Op, str]] = {
    "mean over time": (lambda x: x - x.mean(dim=1, keepdim=True), "mean"),
    "cumsum over time": (lambda x: x.cumsum(dim=1) / 4, "cumsum"),
    "shift by one": (lambda x: torch.roll(x, 1, dims=1), "roll"),
    "reverse time": (lambda x: x.flip(1), "flip"),
    "token shift by pad": (lambda x: x + F.pad(x, (0, 0, 1, 0))[:, :-1], "pads the sequence"),
    "prepended memory": (lambda x: torch.cat([x[:, :1], x], 1)[:, 1:], "along the sequence"),
    "token merge": (
        lambda x: x.reshape(x.shape[0], -1, 2 * x.shape[2]).repeat_interleave(2, 1)[..., :16],
        "regrouped",
    ),
    "time mixing matmul": (lambda x: torch.tril(torch.ones(x.shape[1], x.shape[1])) @ x, "tril"),
}

PER_POSITION: dict[str, Op] = {
    "layer norm": lambda x: F.layer_norm(x, x.shape[-1:]),
    "feature softmax": lambda x: x.softmax(dim=-1),
    "feature mean": lambda x: x - x.mean(dim=-1, keepdim=True),
    "split heads and merge": lambda x: x.view(x.shape[0], x.shape[1], 4, 4).flatten(2),
    "gelu and scale": lambda x: F.gelu(x) * 0.5,
}


def _rewrite(op: Op):
    torch.manual_seed(0)
    model = Mixer(op).eval()
    ids = torch.randint(0, 32, (2, 8))
    return model, ar.rewrite(model, "softmax", args=(ids,)), ids


@pytest.mark.parametrize("case", list(MIXING))
def test_mixing_op_is_refused_with_its_name(case):
    op, expected = MIXING[case]
    _, rw, ids = _rewrite(op)
    assert rw.report.counts() == {"rewritten": 1}
    with pytest.raises(DecodeError, match=expected):
        rw.generate(ids, max_new_tokens=2)


@pytest.mark.parametrize("case", list(PER_POSITION))
def test_per_position_op_decodes_exactly(case):
    model, rw, ids = _rewrite(PER_POSITION[case])
    want = ids
    with torch.no_grad():
        for _ in range(4):
            want = torch.cat([want, model(want)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(rw.generate(ids, max_new_tokens=4), want)
