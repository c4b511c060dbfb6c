"""End-to-end and unit tests of ``attnrewrite.benchmark`` on a tiny model (kept to a few seconds).

The expensive parts are shared: one module-scoped eager run answers the row, JSON, error, FLOP,
crossover and plot questions; memory workers and ONNX Runtime get one small run each.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnrewrite as ar
from attnrewrite.bench import BenchmarkResult, metrics
from attnrewrite.bench.inputs import example_length, resize_inputs
from attnrewrite.errors import BenchmarkError

LENGTHS = [64, 1024]


class TinyEncoder(nn.Module):
    """Embedding, one SDPA self-attention, projection: defined here, so workers unpickle it."""

    def __init__(self, width: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(256, width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        query, key, value = qkv.unbind(0)
        context = F.scaled_dot_product_attention(query, key, value)
        return self.out(context.transpose(1, 2).reshape(batch, length, width))


def tiny() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return TinyEncoder().eval(), (torch.randint(0, 256, (2, 32)),)


@pytest.fixture(scope="module")
def eager_result() -> BenchmarkResult:
    model, args = tiny()
    return ar.benchmark(
        model,
        ["softmax", "linear", "no_such_variant"],
        args=args,
        seq_lens=LENGTHS,
        repeats=3,
        memory=False,
        progress=False,
        num_threads=1,
    )


def _row(result, variant, length, backend="eager"):
    row = result.row(backend, variant, length)
    assert row is not None, f"no row for {backend}/{variant}/N={length}"
    return row


def test_rows_cover_every_configuration(eager_result):
    assert eager_result.lengths == LENGTHS
    assert eager_result.variants == ["original", "softmax", "linear", "no_such_variant"]
    assert len(eager_result.rows) == len(LENGTHS) * 4
    for length in LENGTHS:
        for variant in ("original", "softmax", "linear"):
            row = _row(eager_result, variant, length)
            assert row.ok, row.status
            assert row.repeats == 3
            assert 0 < row.min_ms <= row.q1_ms <= row.median_ms <= row.q3_ms <= row.max_ms
            assert row.setup_s is not None and row.setup_s >= 0
            assert row.gflops_per_s > 0


def test_a_broken_variant_is_reported_not_raised(eager_result):
    row = _row(eager_result, "no_such_variant", 64)
    assert row.status.startswith("error: rewrite failed") and "registered variants" in row.status
    assert row.median_ms is None


def test_exact_softmax_matches_the_original(eager_result):
    for length in LENGTHS:
        row = _row(eager_result, "softmax", length)
        assert row.max_rel_error <= 1e-5
        assert row.cosine == pytest.approx(1.0, abs=1e-6)
        assert row.sites_rewritten == row.sites_total == 1
    linear = _row(eager_result, "linear", 1024)
    assert 0 < linear.max_rel_error and -1.0 <= linear.cosine <= 1.0


def test_flops_are_counted_including_cpu_fused_attention(eager_result):
    small, large = _row(eager_result, "original", 64), _row(eager_result, "original", 1024)
    assert small.flops > 0
    # The fused CPU attention kernel is counted: FLOPs grow faster than linearly in N.
    assert large.flops / small.flops > 2 * (1024 / 64)
    assert _row(eager_result, "original", 1024).flop_bound_speedup == 1.0


def test_linear_attention_needs_fewer_flops_at_long_length(eager_result):
    linear = _row(eager_result, "linear", 1024)
    assert linear.flops < _row(eager_result, "original", 1024).flops
    assert linear.flop_bound_speedup > 1


def test_json_round_trip(eager_result, tmp_path):
    path = eager_result.to_json(tmp_path / "bench.json")
    data = json.loads(path.read_text())
    assert set(data) == {"meta", "rows", "crossovers"}
    assert data["meta"]["lengths"] == LENGTHS and data["meta"]["threads"] == 1
    fields = {
        "backend",
        "variant",
        "length",
        "median_ms",
        "q1_ms",
        "q3_ms",
        "speedup",
        "flops",
        "gflops_per_s",
        "flop_bound_speedup",
        "flop_bound_fraction",
        "peak_mb",
        "memory_ratio",
        "max_rel_error",
        "cosine",
        "setup_s",
        "status",
    }
    assert all(fields <= set(row) for row in data["rows"])
    again = BenchmarkResult.from_json(path)
    assert again.rows == eager_result.rows


def test_markdown_and_plot(eager_result, tmp_path):
    text = eager_result.to_markdown()
    assert "| eager | linear | 1024 |" in text and "crossover" in text
    plot = eager_result.plot(tmp_path / "bench.png")
    assert plot.exists() and plot.stat().st_size > 10_000


def test_crossover_for_every_variant(eager_result):
    assert {(c.backend, c.variant) for c in eager_result.crossovers} == {
        ("eager", "softmax"),
        ("eager", "linear"),
        ("eager", "no_such_variant"),
    }
    broken = next(c for c in eager_result.crossovers if c.variant == "no_such_variant")
    assert broken.length is None and broken.how == "no data"


def test_memory_is_measured_in_worker_processes():
    model, args = tiny()
    result = ar.benchmark(
        model,
        "linear",
        args=args,
        seq_lens=[512],
        repeats=1,
        progress=False,
        memory=True,
        memory_jobs=2,
        num_threads=1,
    )
    for variant in ("original", "linear"):
        row = _row(result, variant, 512)
        assert row.memory_status == "ok", row.memory_status
        assert row.peak_mb > 0
    assert _row(result, "linear", 512).memory_ratio > 0


def test_onnxruntime_backend_runs_or_says_why():
    model, args = tiny()
    result = ar.benchmark(
        model,
        "softmax",
        args=args,
        seq_lens=[64],
        repeats=1,
        progress=False,
        memory=False,
        backends=("onnxruntime",),
        num_threads=1,
    )
    for row in result.rows:
        assert row.ok or row.status.startswith("unavailable: "), row.status
        if row.ok:
            assert row.median_ms > 0 and row.max_rel_error < 1e-4


def test_make_inputs_is_called_with_batch_and_length():
    model, args = tiny()
    calls = []

    def make_inputs(batch, length):
        calls.append((batch, length))
        return (torch.randint(0, 256, (batch, length)),), {}

    result = ar.benchmark(
        model,
        {"lin": {"variant": "linear"}},
        args=args,
        seq_lens=[48],
        batch=3,
        make_inputs=make_inputs,
        repeats=1,
        memory=False,
        progress=False,
        num_threads=1,
    )
    assert calls == [(3, 48)]
    assert _row(result, "lin", 48).batch == 3 and _row(result, "lin", 48).variant_name == "linear"


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (dict(backends=("tpu",)), "unknown backend 'tpu'"),
        (dict(variants={"original": {}}), "'original' is the label"),
        (dict(repeats=0), "repeats must be >= 1"),
        (dict(args=(torch.randn(2, 3, 4, 4),), seq_lens=[8]), "make_inputs=f"),
    ],
)
def test_bad_arguments_say_what_to_do(call, message):
    model, args = tiny()
    options = {"variants": "linear", "args": args, "memory": False, "progress": False, **call}
    with pytest.raises(BenchmarkError, match=message):
        ar.benchmark(model, options.pop("variants"), **options)


# -- units ----------------------------------------------------------------------------------------


def test_default_inputs_resize_tokens_masks_and_positions():
    kwargs = {
        "input_ids": torch.randint(5, 50, (2, 16)),
        "attention_mask": torch.tensor([[1] * 16, [1] * 12 + [0] * 4]),
        "position_ids": torch.arange(16).expand(2, 16),
    }
    assert example_length((), kwargs) == 16
    _, new = resize_inputs((), kwargs, batch=3, length=40)
    assert new["input_ids"].shape == (3, 40)
    assert 5 <= int(new["input_ids"].min()) and int(new["input_ids"].max()) < 50
    assert bool((new["attention_mask"] == 1).all())
    assert torch.equal(new["position_ids"][1], torch.arange(40))


@pytest.mark.parametrize(
    ("speedups", "expected", "how"),
    [
        (
            [0.5, 0.8, 2.0],
            math.exp(math.log(512) + (-math.log(0.8)) * math.log(2) / math.log(2.5)),
            "interpolated",
        ),
        ([1.5, 2.0, 3.0], 256, "at or below"),
        ([0.5, 0.6, 0.9], None, "not reached"),
        ([None, None, None], None, "no data"),
    ],
)
def test_crossover_interpolates_log_log(speedups, expected, how):
    length, got = metrics.crossover([256, 512, 1024], speedups)
    assert got == how
    assert length == (None if expected is None else pytest.approx(expected))


def test_output_error_of_identical_and_scaled_outputs():
    y = torch.randn(2, 8, 4)
    assert metrics.output_error(y, y) == (0.0, pytest.approx(1.0))
    rel, cosine = metrics.output_error(2 * y, y)
    assert rel == pytest.approx(1.0) and cosine == pytest.approx(1.0)
