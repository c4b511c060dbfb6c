"""Each decodable variant's ``prefill`` + ``step`` equals its own parallel causal ``forward``.

At the variant level, on random canonical tensors with grouped KV heads and a left-padding key
mask, for prompts shorter and longer than the windows; the hybrids' far-part gains are random (not
their zero start), so every term of the step is exercised. Non-decodable variants say why.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnrewrite.site import AttentionSite, MaskClass
from attnrewrite.variants import get_variant

B, H, HKV, N, D = 2, 4, 2, 11, 8

DECODABLE = [
    ("softmax", {}),
    ("linear", {}),
    ("performer", {}),
    ("rfa", {}),
    ("t2r", {}),
    ("hedgehog", {}),
    ("kernel", {"feature_map": lambda x: F.elu(x) + 1}),
    ("local", {"window": 3}),
    ("longformer", {"window": 3, "global_tokens": 2}),
    ("longformer", {"window": 2, "global_tokens": 6}),
    ("longformer", {"window": 0, "global_tokens": 2}),
    ("t2r", {"window": 2}),
    ("hedgehog", {"window": 3}),
]


def _site(mask=MaskClass.CAUSAL_KEY, causal=True):
    return AttentionSite("s", "sdpa", H, HKV, D, D, D**-0.5, mask, causal)


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, HKV, N, D, generator=g)
    v = torch.randn(B, HKV, N, D, generator=g)
    keep = torch.ones(B, 1, 1, N, dtype=torch.bool)
    keep[0, ..., :3] = False
    return q, k, v, keep


@pytest.mark.parametrize("prompt", [1, 4, 8])
@pytest.mark.parametrize(
    ("name", "options"),
    DECODABLE,
    # Ids from option names and numbers only (a callable's repr differs between xdist workers).
    ids=[
        "-".join([n, *(f"{k}={v}" for k, v in o.items() if isinstance(v, int))]) or n
        for n, o in DECODABLE
    ],
)
def test_prefill_then_steps_equal_parallel_causal_forward(name, options, prompt):
    site = _site()
    variant = get_variant(name)(site, seed=0, **options).eval()
    assert variant.decode_refusal() is None
    with torch.no_grad():
        for gain in ("log_gain", "query_gate", "key_gate"):
            if hasattr(variant, gain):
                getattr(variant, gain).normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
        q, k, v, keep = _inputs()
        full = variant(q, k, v, mask=keep, causal=True, scale=site.scale)
        out, state = variant.prefill(
            q[:, :, :prompt],
            k[:, :, :prompt],
            v[:, :, :prompt],
            mask=keep[..., :prompt],
            causal=True,
            scale=site.scale,
        )
        real = slice(1, None) if prompt <= 3 else slice(None)  # fully padded rows: no reference
        torch.testing.assert_close(out[real], full[real, :, :prompt], rtol=1e-5, atol=1e-5)
        sizes = [tuple(s.shape) for s in state]
        for t in range(prompt, N):
            step_out, state = variant.step(
                q[:, :, t : t + 1],
                k[:, :, t : t + 1],
                v[:, :, t : t + 1],
                state,
                mask=keep[..., t : t + 1],
                scale=site.scale,
            )
            torch.testing.assert_close(step_out, full[:, :, t : t + 1], rtol=1e-5, atol=1e-5)
    assert len(state) == len(variant.state_names)
    if name != "softmax":  # everything but the key/value cache has a constant-size state
        assert [tuple(s.shape) for s in state] == sizes


@pytest.mark.parametrize(
    ("name", "options", "why"),
    [
        ("nystrom", {}, "one-token step"),
        ("bigbird", {}, "random blocks"),
        ("linformer", {}, "one-token step"),
        ("cosformer", {}, "full length"),
        ("rfa", {"gate": True}, "with these options"),
        ("hedgehog", {"window": 2, "global_tokens": 1}, "global_tokens"),
    ],
)
def test_what_cannot_decode_says_why(name, options, why):
    variant = get_variant(name)(_site(), seed=0, **options)
    assert why in (variant.decode_refusal() or "")


def test_non_causal_and_general_sites_are_refused():
    linear = get_variant("linear")
    assert "not causal" in linear(_site(MaskClass.KEY, causal=False)).decode_refusal()
    assert "not proven causal" in get_variant("softmax")(_site(MaskClass.GENERAL)).decode_refusal()
