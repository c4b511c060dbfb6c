"""The LoLCATs hybrid (``window`` option of ``t2r`` / ``hedgehog``): properties beyond the dense
reference checked in test_kernel_family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attnrewrite.variants import get_variant


@pytest.fixture(autouse=True)
def _fixed_seed() -> None:
    torch.manual_seed(0)


def _inputs(heads=4, kv_heads=2, length=19, dim=8):
    return (
        torch.randn(2, heads, length, dim),
        torch.randn(2, kv_heads, length, dim),
        torch.randn(2, kv_heads, length, dim),
    )


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", ["t2r", "hedgehog"])
def test_window_wider_than_the_sequence_is_softmax(name, causal, site_factory) -> None:
    q, k, v = _inputs()
    variant = get_variant(name)(site_factory(num_heads=4, num_kv_heads=2, head_dim=8), window=19)
    mask = torch.ones(2, 1, 1, 19, dtype=torch.bool)
    mask[1, ..., 12:] = False
    out = variant(q, k, v, mask=mask, causal=causal, scale=0.3)
    ref = F.scaled_dot_product_attention(
        q,
        k.repeat_interleave(2, 1),
        v.repeat_interleave(2, 1),
        attn_mask=mask & torch.ones(19, 19, dtype=torch.bool).tril() if causal else mask,
        scale=0.3,
    )
    assert torch.allclose(out, ref, atol=1e-6)


def test_far_keys_matter_and_the_gain_weighs_them(site_factory) -> None:
    q, k, v = _inputs(length=40)
    variant = get_variant("hedgehog")(
        site_factory(num_heads=4, num_kv_heads=2, head_dim=8), window=4
    )
    with torch.no_grad():
        variant.log_gain.fill_(-30.0)
    nearly_local = variant(q, k, v, scale=0.3)
    # With the far part switched off, the result is softmax over the 3-block band only.
    i = torch.arange(40)[:, None] // 4
    j = torch.arange(40)[None, :] // 4
    band = (j - i).abs() <= 1
    local = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=band, scale=0.3
    )
    assert torch.allclose(nearly_local, local, atol=1e-5)
    with torch.no_grad():
        variant.log_gain.zero_()
    assert not torch.allclose(variant(q, k, v, scale=0.3), local, atol=1e-3)


def test_additive_mask_shift_changes_nothing_and_the_gain_trains(site_factory) -> None:
    q, k, v = _inputs(length=30)
    variant = get_variant("t2r")(
        site_factory(num_heads=4, num_kv_heads=2, head_dim=8), window=4, global_tokens=1
    )
    bias = torch.randn(2, 1, 1, 30)
    out = variant(q, k, v, mask=bias, scale=0.3)
    assert torch.allclose(out, variant(q, k, v, mask=bias + 5.0, scale=0.3), atol=1e-5)
    out.square().sum().backward()
    for name in ("log_gain", "query_gate", "key_gate"):
        grad = getattr(variant, name).grad
        assert grad is not None and grad.abs().sum() > 0, name
    assert set(variant.state_dict()) == {"weight", "bias", "log_gain", "query_gate", "key_gate"}


def test_bert_with_the_hybrid_exports_to_onnx_without_an_n_by_n_value(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    import attnrewrite as ar
    from attnrewrite.backends.onnx import sequence_shapes

    config = transformers.BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=1,  # one site: the export of the band layout is what is tested
        num_attention_heads=4,
        intermediate_size=64,
    )
    model = transformers.BertModel._from_config(config, attn_implementation="eager").eval()

    def inputs(batch: int, length: int, padded: int) -> dict:
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[0, length - padded :] = 0
        return {"input_ids": torch.randint(0, 100, (batch, length)), "attention_mask": mask}

    rw = ar.rewrite(model, "hedgehog", kwargs=inputs(2, 40, 9), window=8, global_tokens=1)
    assert len(rw.report.rewritten) == 1
    with torch.no_grad():  # trained-looking gains, so that every parameter matters
        for name, param in rw.named_parameters():
            if name.endswith(("log_gain", "query_gate", "key_gate")):
                param.add_(0.2 * torch.randn_like(param))
    path = tmp_path / "hybrid.onnx"
    ar.export_onnx(rw, path)
    other = inputs(3, 77, 20)
    out = ar.onnx_session(path)(**other)
    ort = out["last_hidden_state"] if isinstance(out, dict) else out[0]
    eager = rw(**other).last_hidden_state
    assert torch.allclose(torch.as_tensor(ort), eager, atol=1e-5, rtol=1e-4)
    shapes = sequence_shapes(path)
    assert shapes.symbols and shapes.unknown == () and shapes.quadratic == ()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    ("length", "window", "global_tokens", "weights"),
    [
        (1, 4, 0, None),
        (19, 4, 1, "batch"),
        (40, 4, 3, "head"),
        (23, 7, 9, "kv_head"),  # global keys reaching past the first blocks' band
        (8, 16, 2, "batch"),  # one block, window wider than the sequence
    ],
)
def test_band_layout_equals_the_gathered_region(
    causal, length, window, global_tokens, weights
) -> None:
    """The dense band layout used for self-attention gives the gathered positions' result, values
    and gradients, for any length, window, global count, key-weight shape and grouped heads.

    In float64: the two layouts sum in different orders, and with random log-gains the float32
    rounding reaches a few 1e-5; in float64 they agree to ~1e-13."""
    from attnrewrite.variants.hybrid import window_kernel_attention

    torch.manual_seed(length * 10 + window)
    q, k, v = (x.double() for x in _inputs(heads=4, kv_heads=2, length=length, dim=8))
    phi_q, phi_k = (torch.rand(2, h, length, 6, dtype=torch.float64) for h in (4, 2))
    shapes = {"batch": (2, 1, length), "head": (2, 4, length), "kv_head": (2, 2, length)}
    key_weights = None
    if weights is not None:
        key_weights = torch.rand(shapes[weights], dtype=torch.float64)
        key_weights = key_weights * (torch.rand(shapes[weights]) > 0.2)
    gain_q, gain_k = (torch.randn(2, h, length, dtype=torch.float64) for h in (4, 2))
    results = []
    for band in (False, True):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, phi_q, phi_k, gain_k)]
        out = window_kernel_attention(
            *leaves[:5], window=window, global_tokens=global_tokens, query_log_gain=gain_q,
            key_log_gain=leaves[5], key_weights=key_weights, causal=causal, scale=0.3,
            self_attention=band,
        )  # fmt: skip
        out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
        results.append((out, [t.grad for t in leaves]))
    (gathered, grads_g), (banded, grads_b) = results
    assert torch.allclose(banded, gathered, atol=1e-10, rtol=1e-10)
    for a, b in zip(grads_b, grads_g, strict=True):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)
