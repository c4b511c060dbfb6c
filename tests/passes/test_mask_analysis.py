"""Mask classes come from how a mask is computed, not from the example's values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attnrewrite as ar


class MaskedSDPA(torch.nn.Module):
    def __init__(self, make_mask) -> None:
        super().__init__()
        self.make_mask = make_mask
        self.register_buffer("tril", torch.tril(torch.ones(32, 32, dtype=torch.bool)))

    def forward(self, x, extra):
        q = k = v = x.unsqueeze(1)  # (B, 1, N, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.make_mask(self, x, extra))


def pos(x):
    n = x.shape[1]
    return torch.arange(n)[:, None], torch.arange(n)[None, :]  # i (query), j (key)


MASKS = {
    # name: (mask builder (self, x, extra) -> bool keep mask, expected class)
    "key_padding": (lambda s, x, pad: pad[:, None, None, :], "key"),
    "causal_arange": (lambda s, x, pad: pos(x)[1] <= pos(x)[0], "causal"),
    "causal_strict_plus_one": (lambda s, x, pad: pos(x)[1] < pos(x)[0] + 1, "causal"),
    "causal_buffer": (lambda s, x, pad: s.tril[: x.shape[1], : x.shape[1]], "causal"),
    "causal_and_key": (
        lambda s, x, pad: (pos(x)[1] <= pos(x)[0]) & pad[:, None, None, :],
        "causal+key",
    ),
    # Look-alikes that must not be called causal or key-only:
    "anti_causal": (lambda s, x, pad: pos(x)[1] >= pos(x)[0], "general"),
    "causal_shifted": (lambda s, x, pad: pos(x)[1] <= pos(x)[0] + 1, "general"),
    "causal_or_key": (
        lambda s, x, pad: (pos(x)[1] <= pos(x)[0]) | pad[:, None, None, :],
        "general",
    ),
    "window": (lambda s, x, pad: (pos(x)[1] - pos(x)[0]).abs() <= 2, "general"),
    "query_padding": (lambda s, x, pad: pad[:, None, :, None], "general"),
    # A user-given (B, N, N) mask is general even if the example is all True.
    "dense_input": (lambda s, x, dense: dense[:, None], "general"),
    # Provably trivial masks.
    "always_true": (lambda s, x, pad: pos(x)[0] >= 0, "none"),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_mask_class(name: str) -> None:
    make_mask, expected = MASKS[name]
    x = torch.randn(2, 8, 4)
    if name == "dense_input":
        extra = torch.ones(2, 8, 8, dtype=torch.bool)
    else:
        extra = torch.ones(2, 8, dtype=torch.bool)
        extra[1, 5:] = False
    model = MaskedSDPA(make_mask)
    (site,) = ar.find_attention(model, args=(x, extra))
    assert str(site.mask) == expected
    rw = ar.rewrite(model, "softmax", args=(x, extra))
    assert torch.allclose(rw(x, extra), model(x, extra), atol=1e-6, equal_nan=True)
