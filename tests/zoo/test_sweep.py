"""The model sweep (issue 12): attention found = an independent runtime count, the exact softmax
rewrite reproduces the model at a new batch size and length, the linear rewrite is finite.

A fixed CI sample of transformers model types runs by default (eager attention); ``-m slow`` runs
every model type with eager and sdpa attention. The machinery, its limits and the generic builder
are in ``tests/zoo/sweep.py``; ``benchmarks/model_sweep.py`` writes the table of every type.
Types the generic builder cannot make, or that ``torch.export`` cannot capture, are skipped with
the reason: they are facts about the sweep or the model, not attnrewrite failures.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnrewrite.site import Rejected
from tests.zoo import sweep

#: one model may not take longer than this (a hang fails its own test, not the whole run)
TIMEOUT_S = 600


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise TimeoutError(f"no result within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _assert_sweep_ok(result: sweep.SweepResult) -> None:
    if result.status == sweep.MODEL_NAN:
        assert not result.failures and result.sites_match
    if result.status in ("not buildable", "not capturable", sweep.MODEL_NAN):
        pytest.skip(f"{result.name} ({result.impl}) {result.status}: {result.reason}")
    assert not result.failures, f"{result.name} ({result.impl}): " + "; ".join(result.failures)
    assert result.sites_match
    assert result.parity is not None and result.parity <= sweep.PARITY_TOL
    assert result.linear_ok


def _sweep_hf(model_type: str, impl: str) -> sweep.SweepResult:
    pytest.importorskip("transformers", reason="the model sweep needs the dev extra")
    torch.set_num_threads(1)
    with _time_limit(TIMEOUT_S):
        return sweep.sweep_hf(model_type, impl)


@pytest.mark.parametrize("model_type", sweep.CI_SAMPLE)
def test_sweep_ci_sample(model_type: str) -> None:
    _assert_sweep_ok(_sweep_hf(model_type, "eager"))


def _every_type() -> list[str]:
    try:
        return sweep.hf_model_types()
    except ImportError:
        return []


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("model_type", _every_type())
def test_sweep_every_type(model_type: str, impl: str) -> None:
    _assert_sweep_ok(_sweep_hf(model_type, impl))


@pytest.mark.parametrize("name", list(sweep.TORCH_NN_MODELS))
def test_sweep_torch_nn(name: str) -> None:
    torch.set_num_threads(1)
    with _time_limit(TIMEOUT_S):
        _assert_sweep_ok(sweep.check_model(sweep.build_torch_nn(name)))


@pytest.mark.parametrize("name", sweep.TIMM_MODELS)
def test_sweep_timm(name: str) -> None:
    reason = sweep.timm_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    with _time_limit(TIMEOUT_S):
        _assert_sweep_ok(sweep.check_model(sweep.build_timm(name)))


# -- the independent counter itself (negative and positive cases) ------------------------------


class _Attention(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = x @ x.transpose(-1, -2) / 4.0
        probs = F.dropout(scores.softmax(-1), 0.1, training=False)
        return probs.to(torch.float32).transpose(-1, -2).transpose(-1, -2) @ x


class _Router(nn.Module):
    """Softmax over experts, then top-k and an elementwise mix: not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(16, 4)
        self.experts = nn.Linear(16, 16 * 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, chosen = self.gate(x).softmax(-1).topk(2, dim=-1)
        outputs = self.experts(x).unflatten(-1, (4, 16))
        picked = outputs.gather(-2, chosen.unsqueeze(-1).expand(*chosen.shape, 16))
        return (weights.unsqueeze(-1) * picked).sum(-2)


class _ProbabilitiesIntoLinear(nn.Module):
    """Class probabilities fed to a learned projection: a product with a parameter only."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.softmax(-1))


class _DynamicConvolution(nn.Module):
    """ConvBERT's span-based dynamic convolution: softmax weights from a linear layer mix
    unfolded activations in a matrix product. Not q·kᵀ attention."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.kernel(x).softmax(-1).unsqueeze(-1)  # (B, N, 3, 1)
        windows = x.unfold(1, 3, 1)  # (B, N - 2, 16, 3)
        return windows @ weights[:, : windows.shape[1]]


class _HardAssignment(nn.Module):
    """GroupViT's straight-through hard assignment: y_hard − y_soft.detach() + y_soft is a
    one-hot argmax in the forward pass, not softmax probabilities."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = (x @ x.transpose(1, 2)).softmax(-1)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
        return (hard - soft.detach() + soft) @ x


class _LearnedQueries(nn.Module):
    """Attention pooling: learned queries (a parameter, the left factor) over activation keys and
    values. Attention; a linear layer ``x @ Wᵀ`` has its parameter on the right."""

    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(3, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.queries.expand(x.shape[0], -1, -1) @ x.transpose(1, 2)
        return scores.softmax(-1) @ x


class _ProjectedMixture(nn.Module):
    """Mixture weights from a linear layer (parameter on the right) applied to activations by a
    matrix product: a router-like mix, not attention."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(x).softmax(-1) @ x


class _Sdpa(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.unflatten(-1, (2, 8)).transpose(1, 2)
        mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
        return F.scaled_dot_product_attention(q, q, q, attn_mask=mask).sum()


@pytest.mark.parametrize(
    ("module", "sites"),
    [
        (_Attention(), 1),
        (_Router(), 0),
        (_ProbabilitiesIntoLinear(), 0),
        (_DynamicConvolution(), 0),
        (_HardAssignment(), 0),
        (_LearnedQueries(), 1),
        (_ProjectedMixture(), 0),
        (_Sdpa(), 1),  # its math fallback's own softmax is not counted again
        (nn.MultiheadAttention(16, 2, batch_first=True), 1),
    ],
    ids=[
        "softmax-bmm",
        "router",
        "softmax-linear",
        "dynamic-convolution",
        "hard-assignment",
        "learned-queries",
        "projected-mixture",
        "sdpa",
        "nn.MultiheadAttention",
    ],
)
def test_independent_counter(module: nn.Module, sites: int) -> None:
    x = torch.randn(2, 5, 16)
    inputs = {"query": x, "key": x, "value": x} if isinstance(module, nn.MultiheadAttention) else {}
    counter = sweep.count_attention(module.eval(), inputs or {"x": x})
    assert counter.sites == sites
    assert counter.site_modules == [""] * sites  # the root module ran every counted call


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = _Attention(), _LearnedQueries()
        self.router = _Router()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x)) + self.router(x).mean()


def test_counter_names_the_module_of_each_site_and_refusals_account_only_there() -> None:
    counter = sweep.count_attention(_TwoBlocks().eval(), {"x": torch.randn(2, 5, 16)})
    assert counter.site_modules == ["first", "second"]
    rejected = [
        Rejected("softmax_2", "router", "not attention"),  # elsewhere: stands in for nothing
        Rejected("softmax_1", "second", "refused for a reason"),
    ]
    refused = sweep.refused_sites(counter.site_modules, ["first"], rejected)
    assert [r.module for r in refused] == ["second"]
    assert sweep.refused_sites(counter.site_modules, ["first", "second"], rejected) == []
