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


def hf_positions(x):
    """``position_ids`` as Hugging Face decoders compute them without a cache or a padding mask."""
    b, n = x.shape[:2]
    return torch.arange(n)[None, :].expand(b, -1)


def hf_indices(x):
    """``masking_utils._non_vmap_expansion_sdpa``: batch, head, query and key index tensors."""
    b, n = x.shape[:2]
    return (
        torch.arange(b)[:, None, None, None],
        torch.arange(1)[None, :, None, None],
        torch.arange(n)[None, None, :, None],
        torch.arange(n)[None, None, None, :],
    )


def hf_packed_sequence(positions):
    """``masking_utils.find_packed_sequence_indices``: a sequence id per token (all 0 unpacked)."""
    first = positions[:, :1] - 1
    return (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)


def hf_causal(x, positions, packed, padding=None):
    """HF's causal mask without an ``attention_mask`` (transformers 5): ``and_masks`` of
    ``causal_mask_function`` remapped through ``position_ids`` and the packed-sequence mask."""
    b, _, q, kv = hf_indices(x)
    keep = q.new_ones((), dtype=torch.bool)
    keep = keep & (positions[b, kv] <= positions[b, q]).to(torch.bool)
    keep = keep & (packed[b, q] == packed[b, kv]).to(torch.bool)
    if padding is not None:
        keep = keep & padding[b, kv]
    n = x.shape[1]
    return keep.expand(x.shape[0], -1, n, n)


def hf_eager(keep):
    """``masking_utils.eager_mask``: the boolean mask as 0 / finfo.min."""
    return torch.where(keep, torch.zeros(()), torch.finfo(torch.float32).min)


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
    # Hugging Face decoders called with token ids only (positions are an arange; issue 12 item 4).
    "hf_packed_causal": (
        lambda s, x, pad: hf_causal(x, hf_positions(x), hf_packed_sequence(hf_positions(x))),
        "causal",
    ),
    "hf_packed_causal_eager": (
        lambda s, x, pad: hf_eager(
            hf_causal(x, hf_positions(x), hf_packed_sequence(hf_positions(x)))
        ),
        "causal",
    ),
    "hf_causal_padding": (
        lambda s, x, pad: hf_causal(x, hf_positions(x), hf_packed_sequence(hf_positions(x)), pad),
        "causal+key",
    ),
    "positions_from_cumsum_of_ones": (
        lambda s, x, pad: hf_causal(
            x,
            torch.ones_like(pad, dtype=torch.long).cumsum(-1) - 1,
            torch.zeros_like(pad, dtype=torch.long),
        ),
        "causal",
    ),
    # Look-alikes: positions or sequence ids from data, or an index that wraps around.
    "positions_from_padding": (
        lambda s, x, pad: hf_causal(
            x, pad.long().cumsum(-1) - 1, hf_packed_sequence(pad.long().cumsum(-1) - 1)
        ),
        "general",
    ),
    "packed_ids_from_data": (
        lambda s, x, pad: hf_causal(x, hf_positions(x), pad.long().cumsum(-1)),
        "general",
    ),
    "gather_wraps_around": (
        lambda s, x, pad: (
            hf_positions(x)[hf_indices(x)[0], hf_indices(x)[3] - 1]
            <= hf_positions(x)[hf_indices(x)[0], hf_indices(x)[2]]
        ),
        "general",
    ),
    "packed_ids_not_from_a_diff_of_ones": (
        lambda s, x, pad: hf_causal(x, hf_positions(x), hf_packed_sequence(hf_positions(x) * 2)),
        "general",
    ),
    # Sliding-window causal masks: general for the variants, with the window named on the site.
    "sliding_window_arange": (
        lambda s, x, pad: (pos(x)[1] <= pos(x)[0]) & (pos(x)[1] > pos(x)[0] - 3),
        "general",
    ),
    "sliding_window_tril_triu": (
        lambda s, x, pad: (
            torch.tril(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool))
            & torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), diagonal=-2)
        ),
        "general",
    ),
    "sliding_window_and_key": (
        lambda s, x, pad: (
            (pos(x)[0] - pos(x)[1] < 3) & (pos(x)[1] <= pos(x)[0]) & pad[:, None, None, :]
        ),
        "general",
    ),
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


#: The sliding window each mask above proves (every other mask proves none).
WINDOWS = {"sliding_window_arange": 3, "sliding_window_tril_triu": 3, "sliding_window_and_key": 3}


@pytest.mark.parametrize("name", list(MASKS))
def test_sliding_window_is_proved_only_for_windowed_causal_masks(name: str) -> None:
    make_mask, _ = MASKS[name]
    x = torch.randn(2, 8, 4)
    extra = torch.ones(*((2, 8, 8) if name == "dense_input" else (2, 8)), dtype=torch.bool)
    (site,) = ar.find_attention(MaskedSDPA(make_mask), args=(x, extra))
    assert site.window == WINDOWS.get(name)


HF_DECODERS = {
    "llama": lambda T: T.LlamaConfig(num_key_value_heads=2, **HF_SMALL),
    "qwen2": lambda T: T.Qwen2Config(num_key_value_heads=2, **HF_SMALL),
    "gpt2": lambda T: T.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, vocab_size=99, bos_token_id=1, eos_token_id=2
    ),
    "gpt_neox": lambda T: T.GPTNeoXConfig(**HF_SMALL),
}
HF_SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99
)
FAST = {("llama", "eager"), ("gpt2", "sdpa")}


@pytest.mark.parametrize(
    ("family", "impl"),
    [
        pytest.param(f, i, marks=() if (f, i) in FAST else pytest.mark.slow, id=f"{f}-{i}")
        for f in HF_DECODERS
        for i in ("eager", "sdpa")
    ],
)
def test_hf_decoder_without_attention_mask_is_causal(family: str, impl: str) -> None:
    """Token ids only: HF builds its causal mask from ``position_ids`` (an arange) and a
    packed-sequence check on them; both are positions, so every site is causal."""
    T = pytest.importorskip("transformers", reason="needs the dev extra")
    from attnrewrite.rewriter.capture import capture

    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(
        HF_DECODERS[family](T), attn_implementation=impl
    ).eval()
    example = {"input_ids": torch.randint(3, 99, (2, 8)), "use_cache": False}
    program = capture(model, kwargs=example).program
    assert [str(s.mask) for s in ar.find_attention(program, kwargs=example)] == ["causal"] * 2
    linear = ar.rewrite(program, "linear", kwargs=example)
    assert [row.status for row in linear.report.sites] == ["rewritten"] * 2, str(linear.report)
    exact = ar.rewrite(program, "softmax", kwargs=example)
    other = {"input_ids": torch.randint(3, 99, (3, 11)), "use_cache": False}
    with torch.no_grad():
        ref, out = model(**other).logits, exact(**other).logits
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
