"""Shared cases for the backend tests: models, example inputs, variants, and error measures.

Every case is exported/compiled at one example (batch 2, length 16) and checked at another
(batch 3, length 23), so a backend that specialised the sequence length fails the check.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from attnrewrite.variants import get_variant, variant_names
from tests.zoo.hf_models import ZOO

EXAMPLE = (2, 16)  # (batch, length) the model is captured and exported with
OTHER = (3, 23)  # (batch, length) the backends are checked at
TOLERANCE = 1e-4  # max relative error of a backend against eager, float32


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.elu(x) + 1.0


#: Options a variant cannot do without (the generic kernel variant needs its feature map).
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {"kernel": {"feature_map": elu_plus_one}}


class EinsumAttention(nn.Module):
    """Hand-written multi-head self-attention spelled with ``torch.einsum`` and a padding mask."""

    def __init__(self, d_model: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, d_model // heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.head_dim**-0.5
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
        out = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(dim=-1), v)
        return self.out(out.reshape(b, n, -1))


@dataclasses.dataclass(frozen=True)
class Case:
    """A model to rewrite, how to make its inputs, and which output tensor to compare."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int, int], tuple[tuple[Any, ...], dict[str, Any]]]
    main_output: Callable[[Any], torch.Tensor]


def _zoo_case(name: str) -> Case:
    zoo = {z.name: z for z in ZOO}[name]
    return Case(
        name,
        lambda: zoo.build("sdpa"),
        lambda batch, length, seed: ((), zoo.inputs(batch, length, seed)),
        lambda out: out.last_hidden_state,
    )


def _einsum_inputs(batch: int, length: int, seed: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    keep = torch.ones(batch, length, dtype=torch.bool)
    keep[-1, length // 2 :] = False  # real padding on the last example
    return (torch.randn(batch, length, 32, generator=g), keep), {}


def _einsum() -> nn.Module:
    torch.manual_seed(0)
    return EinsumAttention().eval()


CASES = {
    "bert": _zoo_case("bert"),
    "llama": _zoo_case("llama"),
    "einsum": Case("einsum", _einsum, _einsum_inputs, lambda out: out),
}


#: Variants Dynamo cannot trace yet, with why (none at present; linformer and synthesizer closed
#: their ``torch._check`` messages over ``self`` until they were fixed).
COMPILE_FAILURES: dict[str, str] = {}


def variant_params(
    fast: tuple[str, ...] = (), known_failures: dict[str, str] | None = None
) -> list[Any]:
    """Every registered variant as a pytest param; slow unless in ``fast``; skipped, with the
    import error as the reason, when its module does not import (variants are added in parallel);
    expected to fail (not strictly: a site the variant refuses passes) when in ``known_failures``.
    """
    params = []
    for name in variant_names(builtin_only=True):
        marks = [] if name in fast else [pytest.mark.slow]
        if known_failures and name in known_failures:
            marks.append(pytest.mark.xfail(reason=known_failures[name], strict=False))
        try:
            get_variant(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
            reason = f"variant {name!r} does not import: {type(exc).__name__}: {exc}"
            marks.append(pytest.mark.skip(reason=reason))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def matrix_params(cases: list[str], fast: set[tuple[str, str]]) -> list[Any]:
    """Every (variant, case) pair as a pytest param; slow unless the pair is in ``fast``."""
    params = []
    for variant_param in variant_params():
        (variant,) = variant_param.values
        for case in cases:
            fast_pair = (variant, case) in fast
            marks = [m for m in variant_param.marks if not (fast_pair and m.name == "slow")]
            params.append(pytest.param(variant, case, marks=marks, id=f"{variant}-{case}"))
    return params


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| (the measure every backend test holds to ``TOLERANCE``)."""
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def call(model: Callable[..., Any], inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
    args, kwargs = inputs
    with torch.no_grad():
        return model(*args, **kwargs)


@pytest.fixture(scope="session")
def built() -> Callable[[str], nn.Module]:
    """Build each case's model once per session (they are never modified)."""
    cache: dict[str, nn.Module] = {}

    def get(name: str) -> nn.Module:
        if name not in cache:
            cache[name] = CASES[name].build()
        return cache[name]

    return get


@pytest.fixture(scope="session")
def rewritten(built: Callable[[str], nn.Module]) -> Callable[[str, str], Any]:
    """``rewrite`` each (case, variant) once per session."""
    import attnrewrite as ar

    cache: dict[tuple[str, str], Any] = {}

    def get(case: str, variant: str) -> Any:
        if (case, variant) not in cache:
            args, kwargs = CASES[case].inputs(*EXAMPLE, 0)
            options = VARIANT_OPTIONS.get(variant, {})
            cache[(case, variant)] = ar.rewrite(
                built(case), variant, args=args, kwargs=kwargs, **options
            )
        return cache[(case, variant)]

    return get
