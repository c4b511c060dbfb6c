"""More architectures, each with a spelling the main zoo lacks: in-place score ops (Falcon), logit
soft-capping (Gemma 2), sliding-window masks (Mistral), disentangled attention (DeBERTa-v2),
relative-position attention (MPNet)."""

from __future__ import annotations

import pytest
import torch

import attnrewrite as ar
from attnrewrite.rewriter.capture import capture

T = pytest.importorskip("transformers", reason="needs the dev extra")

V = 99
SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=V
)

MODELS = {
    # name: (config factory, extra kwargs, expected masks, kv heads, softmax-rewritable)
    "falcon": (
        lambda: T.FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=V
        ),
        {"use_cache": False},
        ["causal+key"] * 2,
        1,
        True,
    ),
    "gemma2": (
        lambda: T.Gemma2Config(num_key_value_heads=2, head_dim=8, **SMALL),
        {"use_cache": False},
        None,
        2,
        False,
    ),
    "mistral": (
        lambda: T.MistralConfig(num_key_value_heads=2, **SMALL),
        {"use_cache": False},
        ["general"] * 2,
        2,
        True,
    ),
    "deberta-v2": (lambda: T.DebertaV2Config(**SMALL), {}, ["general"] * 2, 4, True),
    "mpnet": (lambda: T.MPNetConfig(**SMALL), {}, ["general"] * 2, 4, True),
    "gpt_neox": (
        lambda: T.GPTNeoXConfig(**SMALL),
        {"use_cache": False},
        ["causal+key"] * 2,
        4,
        True,
    ),
}


def _inputs(batch: int, n: int, extra: dict) -> dict:
    g = torch.Generator().manual_seed(batch * 100 + n)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[-1, n - 3 :] = 0
    return {
        "input_ids": torch.randint(3, V, (batch, n), generator=g),
        "attention_mask": mask,
        **extra,
    }


@pytest.mark.parametrize("name", list(MODELS))
def test_more_models(name: str) -> None:
    make_config, extra, masks, kv_heads, rewritable = MODELS[name]
    torch.manual_seed(0)
    model = T.AutoModel.from_config(make_config(), attn_implementation="eager").eval()
    example = _inputs(2, 8, extra)
    # One capture for the finder and the rewrite (capturing is most of this test's time).
    program = capture(model, kwargs=example).program
    sites = ar.find_attention(program, kwargs=example)
    assert len(sites) == 2
    if masks is not None:
        assert [str(s.mask) for s in sites] == masks
    assert all(s.num_kv_heads == kv_heads for s in sites)
    rw = ar.rewrite(program, "softmax", kwargs=example, check=True)
    if not rewritable:
        assert all(r.status == "skipped" and "soft-capping" in r.reason for r in rw.report.sites)
    else:
        assert len(rw.report.rewritten) == 2
    other = _inputs(3, 11, extra)
    with torch.no_grad():
        ref, out = model(**other).last_hidden_state, rw(**other).last_hidden_state
    assert ((out - ref).abs().max() / ref.abs().max()).item() <= 1e-5
