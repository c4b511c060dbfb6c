"""The library's promises about what it does *not* do, and about what survives serialisation.

- The original model is never modified: its parameters and buffers are bit-identical (values,
  dtypes, ``requires_grad``, the set of names) and its train/eval mode is unchanged after
  ``find_attention``, ``rewrite`` (also after training the rewritten copy), ``compile``,
  ``export_onnx`` and ``calibrate``.
- A rewritten model's ``state_dict()`` round-trips: saved, and loaded into a fresh rewrite of the
  same model with the same variant (but another seed), it gives the same outputs.
- A rewritten model can be exported again with ``torch.export``, saved, loaded and run.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from torch import nn

import attnrewrite as ar

D_MODEL, HEADS, MAX_LEN = 16, 2, 64


class Block(nn.Module):
    """A pre-norm causal self-attention block with key padding, parameters and buffers.

    It holds a frozen parameter, a persistent causal buffer and a non-persistent one, so every
    kind of state the rewriter copies is covered.
    """

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D_MODEL)
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.gain = nn.Parameter(torch.full((D_MODEL,), 0.5), requires_grad=False)
        self.register_buffer("tril", torch.tril(torch.ones(MAX_LEN, MAX_LEN)))
        self.register_buffer("positions", torch.arange(MAX_LEN), persistent=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.norm(x) + self.gain * self.positions[:n, None].float() / MAX_LEN
        q, k, v = self.qkv(h).view(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5)
        scores = scores.masked_fill(self.tril[:n, :n] == 0, float("-inf"))
        scores = scores.masked_fill(~pad[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D_MODEL)
        return x + self.out(out)


def _inputs(batch: int = 2, length: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[-1, length // 2 :] = False
    return torch.randn(batch, length, D_MODEL, generator=g), pad


def _model() -> Block:
    torch.manual_seed(0)
    return Block().eval()


def _state(model: nn.Module) -> dict[str, tuple[torch.Tensor, bool]]:
    """Every parameter and buffer (persistent or not), copied, with its ``requires_grad``."""
    state = {
        f"parameter {n}": (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()
    }
    state.update(
        {f"buffer {n}": (b.detach().clone(), b.requires_grad) for n, b in model.named_buffers()}
    )
    return state


def _assert_untouched(
    model: nn.Module, before: dict[str, tuple[torch.Tensor, bool]], training: bool = False
) -> None:
    after = _state(model)
    assert after.keys() == before.keys()
    for name, (value, requires_grad) in before.items():
        now, now_grad = after[name]
        assert now.dtype == value.dtype, name
        assert torch.equal(now, value), f"{name} changed"
        assert now_grad == requires_grad, f"{name}.requires_grad changed"
    assert model.training == training
    assert all(m.training == training for m in model.modules())


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


# -- the original model is never modified ----------------------------------------------------------


def test_find_attention_leaves_the_model_untouched() -> None:
    model = _model()
    before = _state(model)
    assert len(ar.find_attention(model, args=_inputs())) == 1
    _assert_untouched(model, before)


@pytest.mark.parametrize("variant", ["softmax", "linear", "performer", "t2r"])
def test_rewrite_and_training_the_rewrite_leave_the_model_untouched(variant: str) -> None:
    model = _model()
    before = _state(model)
    rw = ar.rewrite(model, variant, args=_inputs(), seed=0)
    assert rw.report.sites[0].status == "rewritten", str(rw.report)
    _assert_untouched(model, before)
    # Train the rewritten copy: all of its parameters, the copied model weights included.
    rw.train()
    params = [p for p in rw.parameters() if p.requires_grad]
    assert params
    optimiser = torch.optim.SGD(params, lr=0.1)
    rw(*_inputs()).square().mean().backward()
    optimiser.step()
    with torch.no_grad():
        for buffer in rw.buffers():
            if buffer.is_floating_point():
                buffer.add_(1.0)
    _assert_untouched(model, before)


def test_compile_leaves_the_model_untouched() -> None:
    model = _model()
    before = _state(model)
    rw = ar.rewrite(model, "linear", args=_inputs())
    compiled = ar.compile(rw, backend="eager")
    args = _inputs(batch=3, length=9, seed=1)
    with torch.no_grad():
        assert _rel(compiled(*args), rw(*args)) <= 1e-5
    _assert_untouched(model, before)


def test_compile_of_the_original_leaves_it_untouched() -> None:
    model = _model()
    before = _state(model)
    with torch.no_grad():
        ar.compile(model, backend="eager")(*_inputs())
    _assert_untouched(model, before)


@pytest.mark.parametrize("target", ["rewritten", "original"])
def test_export_onnx_leaves_the_model_untouched(tmp_path: Path, target: str) -> None:
    model = _model()
    before = _state(model)
    rw = ar.rewrite(model, "linear", args=_inputs())
    ar.export_onnx(rw if target == "rewritten" else model, tmp_path / "m.onnx", args=_inputs())
    assert (tmp_path / "m.onnx").exists()
    _assert_untouched(model, before)


@pytest.mark.parametrize("variant", ["t2r", "hedgehog"])
def test_calibrate_leaves_the_model_untouched(variant: str) -> None:
    model = _model()
    before = _state(model)
    rw = ar.rewrite(model, variant, args=_inputs(), seed=0)
    site_params = {n: p.detach().clone() for n, p in rw.named_parameters() if "variants" in n}
    assert site_params, f"'{variant}' has no trainable parameters to calibrate"
    batches = [(_inputs(seed=s), {}) for s in range(2)]
    ar.calibrate(rw, batches, steps=3, progress=False)
    _assert_untouched(model, before)
    # Calibration trained the variants (else this test would prove nothing).
    changed = [
        n
        for n, p in rw.named_parameters()
        if n in site_params and not torch.equal(p.detach(), site_params[n])
    ]
    assert changed


# -- state_dict round trip -------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["performer", "t2r", "hedgehog", "linear"])
def test_state_dict_round_trips_into_a_fresh_rewrite(variant: str) -> None:
    """Saved and loaded into a rewrite with another seed (other random features / initial
    weights), the state gives the same outputs: every variant parameter and buffer is in it."""
    model = _model()
    rw = ar.rewrite(model, variant, args=_inputs(), seed=0)
    with torch.no_grad():  # make the state differ from anything a constructor could produce
        for p in rw.parameters():
            p.add_(0.01 * torch.randn_like(p))
    buffer = io.BytesIO()
    torch.save(rw.state_dict(), buffer)
    fresh = ar.rewrite(model, variant, args=_inputs(), seed=1)
    buffer.seek(0)
    result = fresh.load_state_dict(torch.load(buffer, weights_only=True), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    args = _inputs(batch=3, length=9, seed=2)
    with torch.no_grad():
        assert torch.equal(fresh(*args), rw(*args))
    variant_keys = [k for k in rw.state_dict() if "attnrewrite_variants" in k]
    if any(True for m in rw.variant_modules.values() for _ in m.parameters()):
        assert variant_keys, "variant parameters are missing from state_dict()"


def test_state_dict_of_a_random_feature_variant_differs_by_seed() -> None:
    """The contrast case: without loading, two seeds give different performer outputs, so the
    round-trip above does carry the random features."""
    model = _model()
    a = ar.rewrite(model, "performer", args=_inputs(), seed=0)
    b = ar.rewrite(model, "performer", args=_inputs(), seed=1)
    with torch.no_grad():
        assert not torch.equal(a(*_inputs()), b(*_inputs()))


# -- torch.export of a rewritten model -------------------------------------------------------------


@pytest.mark.parametrize("variant", ["softmax", "linear", "performer"])
def test_reexported_rewritten_program_saves_loads_and_runs(tmp_path: Path, variant: str) -> None:
    model = _model()
    rw = ar.rewrite(model, variant, args=_inputs(), seed=0)
    args = _inputs()
    program = torch.export.export(rw, args, strict=False)
    path = tmp_path / f"{variant}.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    with torch.no_grad():
        expected = rw(*args)
        assert _rel(loaded.module()(*args), expected) <= 1e-6
        again = _inputs(seed=3)  # same shapes, other values
        assert _rel(loaded.module()(*again), rw(*again)) <= 1e-6


def test_reexported_rewritten_program_keeps_dynamic_lengths(tmp_path: Path) -> None:
    model = _model()
    rw = ar.rewrite(model, "linear", args=_inputs())
    auto = torch.export.Dim.AUTO
    dynamic = ({0: auto, 1: auto}, {0: auto, 1: auto})
    program = torch.export.export(rw, _inputs(), dynamic_shapes=(dynamic,), strict=False)
    path = tmp_path / "dynamic.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    other = _inputs(batch=3, length=17, seed=4)
    with torch.no_grad():
        assert _rel(loaded(*other), rw(*other)) <= 1e-6


# -- a forward that caches state lazily does not keep capture's fake tensors ---------------------


class LazyAlibi(nn.Module):
    """Causal attention with an ALiBi bias built and cached on first call, as x-transformers does:
    a non-persistent buffer registered in ``forward`` and a plain tensor attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.slopes = torch.tensor([0.5, 0.25]).view(HEADS, 1, 1)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        if getattr(self, "bias", None) is None or self.bias.shape[-1] < n:
            position = torch.arange(n)
            distance = (position[None, :] - position[:, None]).clamp(max=0).float()
            self.register_buffer("bias", distance * self.slopes, persistent=False)
            self.cached = torch.triu(torch.ones(n, n, dtype=torch.bool), 1)
        self.calls += 1
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + self.bias[:, :n, :n]
        scores = scores.masked_fill(self.cached[:n, :n], float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D_MODEL)


def _snapshot(model: nn.Module) -> list[tuple[nn.Module, dict, dict, dict, set]]:
    return [
        (
            m,
            dict(m.__dict__),
            dict(m._parameters),
            dict(m._buffers),
            set(m._non_persistent_buffers_set),
        )
        for m in model.modules()
    ]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "already-cached"])
def test_capture_restores_state_a_forward_caches_lazily(warm: bool) -> None:
    torch.manual_seed(0)
    model = LazyAlibi().eval()
    x = _inputs()[0]
    if warm:
        model(x)  # the cache exists before capture and must stay the very same tensors
    before = _snapshot(model)
    state = _state(model)
    assert len(ar.find_attention(model, args=(x,))) == 1
    rw = ar.rewrite(model, "softmax", args=(x,))
    for module, attrs, params, buffers, non_persistent in before:
        assert module.__dict__.keys() == attrs.keys()
        assert all(module.__dict__[k] is v for k, v in attrs.items())
        assert module._parameters.keys() == params.keys()
        assert all(module._parameters[k] is v for k, v in params.items())
        assert module._buffers.keys() == buffers.keys()
        assert all(module._buffers[k] is v for k, v in buffers.items())
        assert module._non_persistent_buffers_set == non_persistent
    _assert_untouched(model, state)
    assert ar.rewriter.capture.fake_tensors_in(model) == []
    with torch.no_grad():
        out = model(x)  # its next call works (no FakeTensor left behind)
        assert _rel(rw(x), out) <= 1e-5
