"""Capture: dynamic shapes where the model allows, specialised axes reported with their reason,
structured input-mismatch errors, and Hugging Face's default ``use_cache=True``."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import attnrewrite as ar
from attnrewrite.errors import InputMismatchError
from attnrewrite.rewriter.capture import capture


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


class TinyViT(nn.Module):
    """Patch embedding (a strided conv) + one self-attention: any image size divisible by 4."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.patch = nn.Conv2d(3, dim, 4, 4)
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixel_values).flatten(2).transpose(1, 2)
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(b, n, d)


class FixedLength(nn.Module):
    """Self-attention whose reshape hard-codes the length (8): export must specialise it."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q, k, v = self.qkv(x).view(b, 8, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        w = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
        return (w @ v).transpose(1, 2).reshape(b, 8, -1)


class PairedLengths(nn.Module):
    """Attention with an additive (B, N) key bias: the bias length must equal the input length."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x: torch.Tensor, key_bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + key_bias[:, None, :]
        return scores.softmax(-1) @ v


def test_image_height_and_width_stay_dynamic() -> None:
    torch.manual_seed(0)
    model = TinyViT().eval()
    rw = ar.rewrite(model, "softmax", args=(torch.randn(2, 3, 32, 32),))
    assert len(rw.report.rewritten) == 1
    other = torch.randn(3, 3, 48, 40)  # another batch, height and width
    with torch.no_grad():
        assert _rel(rw(other), model(other)) <= 1e-5
    # Only the channel axis (fixed by the conv weight) is specialised, and the notes say so.
    notes = " ".join(rw.report.notes)
    assert (
        "fixed by the model's weights (feature/channel widths): `pixel_values` axis 1 = 3" in notes
    )
    assert "axis 2" not in notes and "axis 3" not in notes


def test_specialised_length_is_named_with_its_reason() -> None:
    torch.manual_seed(0)
    model = FixedLength().eval()
    rw = ar.rewrite(model, "softmax", args=(torch.randn(2, 8, 16),))
    notes = " ".join(rw.report.notes)
    assert "input `x`: axis 1 specialised to 8" in notes
    assert "view/reshape" in notes
    with torch.no_grad():  # the batch stays dynamic
        other = torch.randn(3, 8, 16)
        assert _rel(rw(other), model(other)) <= 1e-5
    with pytest.raises(InputMismatchError) as raised:
        rw(torch.randn(2, 10, 16))
    message = str(raised.value)
    assert "input `x` axis 1 has size 10" in message
    assert "fixed to 8" in message and "view/reshape" in message


def test_a_broken_relation_between_inputs_names_both_axes() -> None:
    torch.manual_seed(0)
    model = PairedLengths().eval()
    args = (torch.randn(2, 8, 16), torch.randn(2, 8))
    rw = ar.rewrite(model, "softmax", args=args)
    with torch.no_grad():
        other = (torch.randn(3, 11, 16), torch.randn(3, 11))
        assert _rel(rw(*other), model(*other)) <= 1e-5
    with pytest.raises(InputMismatchError) as raised:
        rw(torch.randn(2, 8, 16), torch.randn(2, 9))
    message = str(raised.value)
    assert "input `x` axis 1" in message and "input `key_bias` axis 1" in message


def test_guards_are_checked_from_the_capture_not_from_error_text() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    guards = capture(FixedLength().eval(), (x,)).guards
    assert [(a.input, a.axis, a.size) for a in guards.specialised] == [("x", 1, 8), ("x", 2, 16)]
    assert guards.violation((x,), {}) is None
    assert "axis 2" in guards.violation((torch.randn(2, 8, 12),), {})


# -- Hugging Face: use_cache defaults to True -----------------------------------------------------

HF_MODELS = ["llama", "gpt2", "qwen2"]


def _hf_model(name: str, impl: str) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common: dict[str, Any] = {"vocab_size": 64}
    if name == "gpt2":
        config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, n_positions=64, **common)
        cls = transformers.GPT2LMHeadModel
    else:
        config_cls, cls = {
            "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
            "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        }[name]
        config = config_cls(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation=impl).eval()


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("name", HF_MODELS)
def test_hugging_face_default_use_cache(name: str, impl: str) -> None:
    model = _hf_model(name, impl)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    rw = ar.rewrite(model, "softmax", kwargs={"input_ids": ids})
    assert len(rw.report.rewritten) == 1, str(rw.report)
    assert any("use_cache=False" in note for note in rw.report.notes)
    other = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=other).logits
        assert _rel(rw(input_ids=other).logits, ref) <= 1e-5
        assert _rel(rw(input_ids=other, use_cache=False).logits, ref) <= 1e-5
    with pytest.raises(InputMismatchError, match="use_cache=True is not supported.*cache"):
        rw(input_ids=other, use_cache=True)


def test_a_program_captured_with_use_cache_false_is_rewritten_without_it() -> None:
    model = _hf_model("llama", "sdpa")
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    program = capture(model, kwargs={"input_ids": ids}).program
    rw = ar.rewrite(program, "softmax", kwargs={"input_ids": ids})
    other = torch.randint(0, 64, (3, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert _rel(rw(input_ids=other).logits, model(input_ids=other).logits) <= 1e-5
    with pytest.raises(InputMismatchError, match="use_cache=True"):
        rw(input_ids=other, use_cache=True)


def test_a_program_captured_with_positions_added_is_rewritten_and_decodes_without_them() -> None:
    """Called with a padding mask, a generating model is captured with ``position_ids`` as an
    input; a rewrite of that program fills them in as the model's own rewrite does, decodes the
    same tokens, and a tensor input the program needs but the example leaves out is named."""
    model = _hf_model("llama", "eager")
    g = torch.Generator().manual_seed(0)
    ids, mask = torch.randint(1, 64, (2, 8), generator=g), torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    kwargs = {"input_ids": ids, "attention_mask": mask}
    captured = capture(model, kwargs=kwargs)
    assert captured.default_kwargs == {"position_ids": "positions"}
    rw = ar.rewrite(captured.program, "linear", kwargs=kwargs)
    assert any("position_ids filled in" in note for note in rw.report.notes)
    other = {
        "input_ids": torch.randint(1, 64, (3, 5), generator=torch.Generator().manual_seed(1)),
        "attention_mask": torch.ones(3, 5, dtype=torch.long),
    }
    direct = ar.rewrite(model, "linear", kwargs=kwargs)
    with torch.no_grad():
        assert _rel(rw(**other).logits, direct(**other).logits) <= 1e-6
    assert torch.equal(
        rw.generate(ids, mask, max_new_tokens=4), direct.generate(ids, mask, max_new_tokens=4)
    )
    positions = torch.arange(8).expand(2, 8)
    program = torch.export.export(
        model, (), {**kwargs, "position_ids": positions, "use_cache": False}
    )
    with pytest.raises(InputMismatchError, match=r"\['position_ids'\].*pass them"):
        ar.rewrite(program, "linear", kwargs=kwargs)


class CacheOutput:
    """Not a pytree type, like a ``DynamicCache``."""

    def __init__(self, state: torch.Tensor) -> None:
        self.state = state


class ReturnsCacheByDefault(nn.Module):
    """A forward that takes ``use_cache`` (default on) and has no ``config``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, use_cache: bool = True) -> Any:
        y = self.proj(x)
        return (y, CacheOutput(y)) if use_cache else (y, None)


def test_an_unexportable_cache_output_is_captured_with_use_cache_false() -> None:
    model = ReturnsCacheByDefault().eval()
    captured = capture(model, (torch.randn(2, 3, 8),))
    assert captured.fixed_kwargs == {"use_cache": False}
    assert any("use_cache=False" in note for note in captured.notes)


def test_no_grad_block_is_inlined_and_keeps_its_grad_mode():
    """Attention inside ``with torch.no_grad():`` is found (the region is inlined between grad-mode
    calls) and the rewritten model still computes that block without gradient."""

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.frozen = torch.nn.Linear(8, 8)
            self.trained = torch.nn.Linear(8, 8)

        def forward(self, x):
            with torch.no_grad():
                x = (self.frozen(x) @ x.transpose(1, 2)).softmax(-1) @ x
            return (self.trained(x) @ x.transpose(1, 2)).softmax(-1) @ x

    torch.manual_seed(0)
    model = Block().train()
    x = torch.randn(2, 5, 8)
    rw = ar.rewrite(model, "linear", (x,))
    assert rw.report.counts() == {"rewritten": 2}
    rw(torch.randn(3, 7, 8)).sum().backward()
    grads = {name: p.grad is not None for name, p in rw.named_parameters()}
    assert any(g for name, g in grads.items() if "trained" in name)
    assert not any(g for name, g in grads.items() if "frozen" in name), grads
    assert all(p.grad is None for p in model.parameters())


class _Cache:
    """An output object torch.export cannot return (not a pytree type), like HF's caches."""


class _PassesCacheOn(nn.Module):
    """A Hugging Face-style outer model whose forward takes ``use_cache`` only through
    ``**kwargs`` and returns a cache object unless told not to (vision-language models)."""

    def __init__(self) -> None:
        super().__init__()
        import types

        self.config = types.SimpleNamespace(use_cache=True)
        self.proj = nn.Linear(8, 8)

    def forward(self, x, **kwargs):
        out = (self.proj(x) @ x.transpose(1, 2)).softmax(-1) @ x
        use_cache = kwargs.get("use_cache", self.config.use_cache)
        return (out, _Cache()) if use_cache else out


def test_use_cache_passed_on_through_kwargs_is_turned_off_and_said():
    torch.manual_seed(0)
    model, x = _PassesCacheOn().eval(), torch.randn(2, 5, 8)
    rw = ar.rewrite(model, "softmax", (x,))
    assert rw.report.counts() == {"rewritten": 1}
    assert any("use_cache=False" in note for note in rw.report.notes), rw.report.notes
    assert model.config.use_cache is True  # restored
    other = torch.randn(3, 7, 8)  # another batch and length: the capture stayed dynamic
    torch.testing.assert_close(rw(other), model(other, use_cache=False), rtol=1e-5, atol=1e-6)


def test_encoder_decoder_rewrites_with_its_default_kwargs():
    """BART called as a user would (ids only, HF's default use_cache): captured with the cache off
    (said in the notes), its decoder self-attention causal, every site rewritten."""
    transformers = pytest.importorskip("transformers", reason="needs the dev extra")
    config = transformers.BartConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
    )
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration._from_config(
        config, attn_implementation="eager"
    ).eval()
    ids, dec = torch.randint(3, 100, (2, 9)), torch.randint(3, 100, (2, 5))
    rw = ar.rewrite(model, "linear", kwargs={"input_ids": ids, "decoder_input_ids": dec})
    assert rw.report.counts() == {"rewritten": 3}
    masks = {row.name: str(row.site.mask) for row in rw.report.sites}
    assert masks == {
        "model.encoder.layers.0.self_attn": "none",
        "model.decoder.layers.0.self_attn": "causal",
        "model.decoder.layers.0.encoder_attn": "none",
    }
    assert any("use_cache=False" in note for note in rw.report.notes)
    assert torch.isfinite(rw(input_ids=ids, decoder_input_ids=dec).logits).all()
