"""Clear errors: every misuse raises one of our exceptions, whose message says what to do.

Each case checks the exception *type* (a subclass of ``AttnRewriteError``, also the matching
builtin so ``except KeyError``/``TypeError``/``ValueError`` code keeps working) and the *message*;
an error from deep inside torch must be chained under ours, never surface alone.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import attnrewrite as ar
from attnrewrite.variants import variant_names

D_MODEL, HEADS = 16, 2


class PaddedAttention(nn.Module):
    """Self-attention with a key-padding mask: one site, class ``key``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        scores = scores.masked_fill(~pad[:, None, None, :], float("-inf"))
        return self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D_MODEL))


class DataDependent(PaddedAttention):
    """Python control flow on a tensor value: ``torch.export`` cannot capture it."""

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return super().forward(x, pad)
        return x


def _inputs(batch: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[-1, length // 2 :] = False
    return torch.randn(batch, length, D_MODEL), pad


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return PaddedAttention().eval()


@pytest.fixture(scope="module")
def rewritten(model: nn.Module) -> ar.RewrittenModel:
    return ar.rewrite(model, "linear", args=_inputs())


def _ours(exc: BaseException) -> None:
    """The error the user sees is ours (any torch error is chained under it)."""
    assert isinstance(exc, ar.AttnRewriteError)
    assert type(exc).__module__.startswith("attnrewrite"), type(exc)


# -- unknown variants ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["nope", {"*": "nope"}], ids=["name", "per-site dict"])
def test_unknown_variant_lists_the_registered_ones(model: nn.Module, spec) -> None:
    with pytest.raises(ar.UnknownVariantError) as info:
        ar.rewrite(model, spec, args=_inputs())
    _ours(info.value)
    assert isinstance(info.value, KeyError)
    message = str(info.value)
    assert "unknown attention variant 'nope'" in message
    for name in variant_names():
        assert name in message, f"{name} missing from: {message}"
    assert "register_variant" in message


def test_variant_that_is_not_a_name(model: nn.Module) -> None:
    with pytest.raises(ar.UnknownVariantError, match="registered variants: softmax") as info:
        ar.rewrite(model, 3, args=_inputs())  # type: ignore[arg-type]
    _ours(info.value)


def test_unknown_variant_is_refused_before_capture(model: nn.Module) -> None:
    """The name is checked first: no minutes of capture before a typo is reported."""
    with pytest.raises(ar.UnknownVariantError):
        ar.rewrite(DataDependent(), "nope", args=_inputs())


# -- example inputs --------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["find_attention", "rewrite"])
def test_missing_example_inputs(model: nn.Module, call: str) -> None:
    fn = ar.find_attention if call == "find_attention" else (lambda m: ar.rewrite(m, "linear"))
    with pytest.raises(ar.InputMismatchError) as info:
        fn(model)
    _ours(info.value)
    message = str(info.value)
    assert "example inputs are required" in message
    assert "args=" in message and "kwargs=" in message


def test_model_that_is_not_a_module() -> None:
    with pytest.raises(ar.CaptureError, match=r"expected an nn\.Module.*got int") as info:
        ar.find_attention(42, args=_inputs())
    _ours(info.value)


# -- capture failures ------------------------------------------------------------------------------


@pytest.mark.parametrize("call", ["find_attention", "rewrite"])
def test_uncapturable_model_names_the_dynamo_path(call: str) -> None:
    model = DataDependent().eval()
    with pytest.raises(ar.CaptureError) as info:
        if call == "find_attention":
            ar.find_attention(model, args=_inputs())
        else:
            ar.rewrite(model, "linear", args=_inputs())
    _ours(info.value)
    message = str(info.value)
    assert message.startswith("torch.export could not capture DataDependent")
    assert "dynamo_backend" in message
    assert "torch.compile(model, backend=attnrewrite.dynamo_backend(" in message
    assert info.value.__cause__ is not None  # torch's own error stays available, under ours


# -- variant options -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "options", "pattern"),
    [
        (
            "linear",
            {"chunk_size": "big"},
            r"option chunk_size='big' of variant 'linear' must be of type int \| None, not str",
        ),
        (
            "linear",
            {"chunk_size": True},
            r"option chunk_size=True of variant 'linear' must be of type int \| None, not bool",
        ),
        (
            "linear",
            {"chunk_size": 2.5},
            r"option chunk_size=2\.5 of variant 'linear' must be of type int \| None, not float",
        ),
        (
            "performer",
            {"num_features": "64"},
            r"option num_features='64' of variant 'performer' must be of type",
        ),
        ("linear", {"chunk_size": 0}, r"variant 'linear': chunk_size must be positive, got 0"),
    ],
    ids=["str-for-int", "bool-for-int", "float-for-int", "performer-str", "bad-value"],
)
def test_variant_option_of_the_wrong_type_or_value(
    model: nn.Module, variant: str, options: dict, pattern: str
) -> None:
    with pytest.raises(ar.VariantOptionError, match=pattern) as info:
        ar.rewrite(model, variant, args=_inputs(), **options)
    _ours(info.value)
    assert isinstance(info.value, TypeError)


def test_unknown_variant_option_lists_the_known_ones(model: nn.Module) -> None:
    with pytest.raises(ar.VariantOptionError) as info:
        ar.rewrite(model, "linear", args=_inputs(), num_features=8)
    _ours(info.value)
    message = str(info.value)
    assert "'num_features'" in message and "linear" in message
    assert "chunk_size" in message  # what linear does take


def test_option_of_another_variant_in_a_per_site_dict(model: nn.Module) -> None:
    """With several variants, an option is accepted if one of them declares it, else refused."""
    with pytest.raises(ar.VariantOptionError, match=r"'window'.*linear.*performer"):
        ar.rewrite(model, {"*": "linear", "x": "performer"}, args=_inputs(), window=4)


# -- calling a rewritten model ---------------------------------------------------------------------


def _call_error(rewritten: ar.RewrittenModel, *args, **kwargs) -> ar.InputMismatchError:
    with pytest.raises(ar.InputMismatchError) as info:
        rewritten(*args, **kwargs)
    _ours(info.value)
    assert isinstance(info.value, ValueError)
    return info.value


def test_call_with_another_rank(rewritten: ar.RewrittenModel) -> None:
    x, pad = _inputs()
    message = str(_call_error(rewritten, x[0], pad))
    assert "captured args=(Tensor(rank=3, float32), Tensor(rank=2, bool))" in message
    assert "got args=(Tensor(rank=2, float32), Tensor(rank=2, bool))" in message


def test_call_with_a_missing_argument(rewritten: ar.RewrittenModel) -> None:
    x, _ = _inputs()
    message = str(_call_error(rewritten, x))
    assert re.search(r"got args=\(Tensor\(rank=3, float32\)\)", message), message


def test_call_with_an_extra_argument(rewritten: ar.RewrittenModel) -> None:
    x, pad = _inputs()
    _call_error(rewritten, x, pad, x)


def test_call_with_an_unexpected_keyword(rewritten: ar.RewrittenModel) -> None:
    x, pad = _inputs()
    message = str(_call_error(rewritten, x, pad, attention_mask=pad))
    assert "attention_mask" in message


def test_call_with_a_specialised_dimension_changed(rewritten: ar.RewrittenModel) -> None:
    """The feature size is static in the captured graph: another one is an input mismatch."""
    x, pad = _inputs()
    message = str(_call_error(rewritten, torch.randn(2, 6, D_MODEL + 4), pad))
    assert "captured" in message or "specialised" in message


def test_call_with_the_captured_structure_works(rewritten: ar.RewrittenModel) -> None:
    """The contrast case: another batch size and length are not a mismatch."""
    out = rewritten(*_inputs(batch=3, length=11))
    assert out.shape == (3, 11, D_MODEL)
