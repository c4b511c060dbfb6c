"""Calibration (issue 7): numerical (errors fall, weights frozen, deterministic), negative (clear
errors), and an end-to-end run on the pretrained all-MiniLM-L6-v2 (slow)."""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar

import pytest
import torch
from torch import Tensor, nn

import attnrewrite as ar
from attnrewrite.calibrate.calibrate import calibrate
from attnrewrite.calibrate.losses import (
    attention_kl,
    check_attn_kl,
    implied_log_weights,
    site_output,
)
from attnrewrite.calibrate.mode import teacher_forcing
from attnrewrite.errors import (
    CalibrationDivergedError,
    CalibrationError,
    CalibrationInputError,
)
from attnrewrite.variants.base import repeat_kv
from attnrewrite.variants.linear import LinearAttention
from tests.zoo.hf_models import ZOO

BERT = next(z for z in ZOO if z.name == "bert")
#: Random-init BERT attends almost uniformly (q·k ≈ 0), which every variant imitates well; scaling
#: the query and key weights makes the attention peaked, as in a trained model.
QK_GAIN = 6.0


class LearnedTemperature(ar.AttentionVariant):
    """Test variant: softmax(e^{t_h} · s · q·k) v with a trainable log-temperature t_h per head.

    Starts at t_h = log(1/2) (too flat); calibration should bring t_h to 0, i.e. exact softmax.
    """

    name: ClassVar[str] = "_test_temperature"

    def __init__(self, site: ar.AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        self.log_temperature = nn.Parameter(torch.full((site.num_heads, 1, 1), math.log(0.5)))

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float = 1.0,
    ) -> Tensor:
        heads = query.shape[1]
        scores = query @ repeat_kv(key, heads).transpose(-1, -2) * scale
        scores = scores * self.log_temperature.exp()
        if mask is not None:
            scores = (
                scores.masked_fill(~mask, float("-inf"))
                if mask.dtype == torch.bool
                else scores + mask
            )
        return torch.softmax(scores, dim=-1) @ repeat_kv(value, heads)


ar.register_variant(LearnedTemperature)


class GainedLinear(LinearAttention):
    """Test variant: ``linear`` with φ(x) = elu(e^g · x) + 1 and a trainable gain g.

    At g = 0 it is ``linear`` exactly; raising g sharpens the weights φ(q)·φ(k) imply, as
    ``attn_kl`` against a peaked softmax asks.
    """

    name: ClassVar[str] = "_test_gained_linear"

    def __init__(self, site: ar.AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        self.log_gain = nn.Parameter(torch.zeros(()))

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        gain = self.log_gain.exp()
        return super().feature_maps(query * gain, key * gain, weights)


ar.register_variant(GainedLinear)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def peaked_bert() -> nn.Module:
    model = BERT.build("eager")
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.attention.self.query.weight.mul_(QK_GAIN)
            layer.attention.self.key.weight.mul_(QK_GAIN)
    return model


def batches(count: int = 3) -> list[tuple[tuple, dict]]:
    return [((), BERT.inputs(batch=3, length=10, seed=seed)) for seed in range(count)]


_REWRITTEN: dict[tuple, ar.RewrittenModel] = {}


def rewritten(model: nn.Module, variant: Any, **options: Any) -> ar.RewrittenModel:
    """A fresh copy of ``model`` rewritten into ``variant`` (each export done once per module)."""
    key = (id(model), repr(variant), tuple(sorted(options.items())))
    if key not in _REWRITTEN:
        _REWRITTEN[key] = ar.rewrite(model, variant, kwargs=BERT.inputs(), **options)
    return copy.deepcopy(_REWRITTEN[key])


def variant_state(rw: ar.RewrittenModel) -> dict[str, Tensor]:
    return {
        f"{site}.{name}": value.clone()
        for site, module in rw.variant_modules.items()
        for name, value in module.state_dict().items()
    }


def frozen_state(rw: ar.RewrittenModel) -> dict[str, Tensor]:
    return {
        name: value.clone()
        for name, value in rw.graph_module.state_dict().items()
        if not name.startswith("attnrewrite_variants.")
    }


# -- numerical -------------------------------------------------------------------------------------

CASES = [
    pytest.param("t2r", "mse", {}, id="t2r-mse"),
    pytest.param("hedgehog", "mse", {}, id="hedgehog-mse"),
    pytest.param("hedgehog", "attn_kl", {}, id="hedgehog-attn_kl"),
    pytest.param("t2r", "attn_kl", {"feature_dim": 16}, id="t2r-attn_kl"),
    pytest.param("linformer", "mse", {"k": 4, "max_len": 10}, id="linformer-mse"),
    pytest.param("synthesizer", "mse", {"max_len": 10}, id="synthesizer-mse"),
    pytest.param("_test_temperature", "mse", {}, id="user-variant-mse"),
]


@pytest.mark.parametrize(("variant", "loss", "options"), CASES)
def test_every_site_error_falls(peaked_bert, variant, loss, options) -> None:
    rw = rewritten(peaked_bert, variant, **options)
    result = calibrate(rw, batches(), steps=40, loss=loss, progress=False)
    assert [r.site for r in result.rows] == list(rw.variant_modules)
    for row in result.rows:
        assert row.variant == variant and row.steps == 40 and row.seconds > 0
        assert row.error_after < 0.8 * row.error_before, row


def test_attn_kl_reads_the_weights_linear_computes_with(peaked_bert) -> None:
    """``linear`` is a kernel variant: ``attn_kl`` accepts it, and the weights the loss compares
    with softmax's are the ones its output is made of."""
    rw = rewritten(peaked_bert, "linear")
    calls: dict[str, list] = {}
    with (
        torch.no_grad(),
        teacher_forcing(
            rw.variant_modules, lambda name, call: calls.setdefault(name, []).append(call)
        ),
    ):
        rw(**BERT.inputs(batch=2, length=10))
    assert list(calls) == list(rw.variant_modules)
    for name, module in rw.variant_modules.items():
        check_attn_kl(module, name, "linear")
        (call,) = calls[name]
        loss = attention_kl(module, call)
        assert torch.isfinite(loss) and loss > 0
        weights = implied_log_weights(module, call).exp()
        values = repeat_kv(call.value.float(), weights.shape[1])
        assert torch.allclose(weights @ values, site_output(module, call), atol=1e-5)


def test_linear_family_calibrates_with_attn_kl(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "_test_gained_linear")
    result = calibrate(rw, batches(1), steps=8, loss="attn_kl", progress=False)
    assert [r.site for r in result.rows] == list(rw.variant_modules)
    for row in result.rows:
        assert row.variant == "_test_gained_linear" and row.steps == 8
        assert row.error_after < row.error_before, row
    assert all(m.log_gain.item() > 0 for m in rw.variant_modules.values())


def test_learned_temperature_converges_to_softmax(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "_test_temperature")
    result = calibrate(rw, batches(), steps=150, lr=0.05, progress=False)
    for row in result.rows:
        assert row.error_after < 1e-3 * row.error_before
    for module in rw.variant_modules.values():
        assert module.log_temperature.detach().abs().max() < 0.05


def test_frozen_weights_bit_identical_and_flags_restored(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "t2r")
    before = frozen_state(rw)
    flags = {name: p.requires_grad for name, p in rw.named_parameters()}
    variants = variant_state(rw)
    calibrate(rw, batches(), steps=10, progress=False, end_to_end=3)
    after = frozen_state(rw)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {name: p.requires_grad for name, p in rw.named_parameters()}
    changed = variant_state(rw)
    assert any(not torch.equal(variants[k], changed[k]) for k in variants)


def test_teacher_forcing_reproduces_the_original_and_is_undone(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "hedgehog")
    inputs = BERT.inputs()
    calls = []
    with torch.no_grad():
        original = peaked_bert(**inputs).last_hidden_state
        rewritten_out = rw(**inputs).last_hidden_state
        with teacher_forcing(rw.variant_modules, lambda name, call: calls.append(name)):
            forced = rw(**inputs).last_hidden_state
        assert torch.allclose(forced, original, atol=1e-5)
        assert calls == list(rw.variant_modules)
        with pytest.raises(RuntimeError, match="boom"):
            with teacher_forcing(rw.variant_modules, lambda name, call: None):
                raise RuntimeError("boom")
        assert all("forward" not in m.__dict__ for m in rw.variant_modules.values())
        assert torch.equal(rw(**inputs).last_hidden_state, rewritten_out)


def test_deterministic_under_seed(peaked_bert) -> None:
    runs = {}
    for label, seed in (("a", 3), ("b", 3), ("c", 4)):
        rw = rewritten(peaked_bert, "t2r")
        calibrate(rw, batches(), steps=7, seed=seed, progress=False)
        runs[label] = variant_state(rw)
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    # Another seed shuffles the batches differently, so it ends elsewhere.
    assert any(not torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_layers_selects_sites_by_glob(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "t2r")
    untouched = rw.variant_modules["encoder.layer.1.attention.self"].state_dict()
    untouched = {k: v.clone() for k, v in untouched.items()}
    result = calibrate(rw, batches(), steps=5, layers="encoder.layer.0*", progress=False)
    assert [r.site for r in result.rows] == ["encoder.layer.0.attention.self"]
    still = rw.variant_modules["encoder.layer.1.attention.self"].state_dict()
    assert all(torch.equal(untouched[k], still[k]) for k in untouched)


def test_end_to_end_and_table(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "hedgehog")
    result = calibrate(rw, batches(), steps=20, end_to_end=10, progress=False)
    e2e = result.end_to_end
    assert e2e is not None and e2e.steps == 10
    assert math.isfinite(e2e.error_before) and e2e.error_after <= e2e.error_before
    text, markdown = str(result), result.to_markdown()
    for needle in (
        "error before",
        "error after",
        "relative MSE",
        "end-to-end",
        "encoder.layer.1.attention.self",
    ):
        assert needle in text and needle in markdown


def test_end_to_end_only_continues_a_calibration(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "t2r")
    first = calibrate(rw, batches(), steps=20, progress=False)
    second = calibrate(rw, batches(), steps=0, end_to_end=5, progress=False)
    assert all(r.steps == 0 for r in second.rows) and second.end_to_end.steps == 5
    # The second call starts where the first ended.
    for a, b in zip(first.rows, second.rows, strict=True):
        assert b.error_before == pytest.approx(a.error_after, rel=1e-5)


def test_end_to_end_that_makes_things_worse_is_reverted(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "hedgehog")
    calibrate(rw, batches(), steps=20, progress=False)
    start = {name: p.detach().clone() for name, p in rw.named_parameters() if p.requires_grad}
    # A step size far too large for the end-to-end step (lr / 10 = 50) overshoots.
    result = calibrate(rw, batches(), steps=0, end_to_end=5, lr=500.0, progress=False)
    e2e = result.end_to_end
    assert e2e.reverted and e2e.error_after == e2e.error_before
    assert "reverted" in str(result)
    for name, param in rw.named_parameters():
        if name in start:
            assert torch.equal(param, start[name]), name


def test_a_site_the_per_site_step_made_worse_is_reverted(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "hedgehog")
    start = {name: p.detach().clone() for name, p in rw.named_parameters() if p.requires_grad}
    # A wild step size saturates Hedgehog's softmax features (T2R's ReLU map is scale-free).
    result = calibrate(rw, batches(), steps=3, lr=1e3, progress=False)
    reverted = [r for r in result.rows if r.reverted]
    assert reverted, str(result)
    assert "reverted" in str(result)
    for row in reverted:
        assert row.error_after == pytest.approx(row.error_before, rel=1e-6)
        for name, param in rw.named_parameters():
            if name.startswith(_variant_prefix(rw, row.site)):
                assert torch.equal(param, start[name]), name


def _variant_prefix(rw, site: str) -> str:
    """The parameter-name prefix of the variant module that replaced ``site``."""
    for name, module in rw.named_modules():
        if getattr(getattr(module, "site", None), "name", None) == site:
            return name + "."
    raise AssertionError(f"no variant for {site}")


def test_max_seconds_and_epochs_and_dataloader(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "t2r")
    loader = torch.utils.data.DataLoader(batches(), batch_size=1, collate_fn=lambda items: items[0])
    result = calibrate(rw, loader, epochs=2, progress=False)
    assert result.batches == 3 and all(r.steps == 6 for r in result.rows)
    result = calibrate(rw, batches(), steps=100_000, max_seconds=0.5, progress=False)
    assert result.stopped == "max_seconds" and all(r.steps < 100_000 for r in result.rows)


def test_progress_bar_runs(peaked_bert, capsys) -> None:
    rw = rewritten(peaked_bert, "t2r")
    calibrate(rw, batches(1), steps=2, progress=True)
    assert "calibrating sites" in capsys.readouterr().err


def test_public_name_stays_callable_after_importing_the_package(peaked_bert) -> None:
    import attnrewrite.calibrate.calibrate  # noqa: F401  (binds the package on attnrewrite)

    rw = rewritten(peaked_bert, "t2r")
    assert ar.calibrate(rw, batches(1), steps=1, progress=False).rows


# -- divergence ------------------------------------------------------------------------------------


def test_nan_parameter_stops_with_site_and_step(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "t2r")
    with torch.no_grad():
        rw.variant_modules["encoder.layer.1.attention.self"].bias[0, 0] = float("nan")
    state = variant_state(rw)
    with pytest.raises(
        CalibrationDivergedError,
        match=r"encoder\.layer\.1\.attention\.self.*"
        r"step 1",
    ) as caught:
        calibrate(rw, batches(), steps=5, progress=False)
    assert caught.value.site == "encoder.layer.1.attention.self" and caught.value.step == 1
    assert caught.value.result is not None and len(caught.value.result.rows) == 2
    restored = variant_state(rw)
    assert all(torch.equal(state[k], restored[k]) or bool(state[k].isnan().any()) for k in state)
    assert all("forward" not in m.__dict__ for m in rw.variant_modules.values())


def test_huge_learning_rate_diverges_cleanly_and_restores(peaked_bert) -> None:
    rw = rewritten(peaked_bert, "_test_temperature")
    state = variant_state(rw)
    with pytest.raises(CalibrationDivergedError, match="smaller lr"):
        calibrate(rw, batches(), steps=20, lr=1e6, progress=False)
    restored = variant_state(rw)
    assert all(torch.equal(state[k], restored[k]) for k in state)


# -- negative --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Bad:
    variant: Any
    inputs: Any
    options: dict
    error: type[Exception]
    match: str


BAD = {
    "variant-without-parameters": Bad(
        "linear", batches(1), {}, CalibrationError, "no rewritten site has trainable parameters"
    ),
    "no-rewritten-site": Bad(
        {"nothing.*": "t2r"}, batches(1), {}, CalibrationError, "no rewritten attention site"
    ),
    "single-pair-not-in-a-list": Bad(
        "t2r", batches(1)[0], {}, CalibrationInputError, "wrap a single pair in a list"
    ),
    "tensor-instead-of-pairs": Bad(
        "t2r", [torch.zeros(2, 3)], {}, CalibrationInputError, r"not an \(args, kwargs\) pair"
    ),
    "dict-instead-of-pairs": Bad("t2r", BERT.inputs(), {}, CalibrationInputError, "iterable of"),
    "empty-inputs": Bad("t2r", [], {}, CalibrationInputError, "inputs is empty"),
    "attn_kl-without-kernel": Bad(
        "linformer", batches(1), {"loss": "attn_kl"}, CalibrationError, "needs a kernel variant"
    ),
    "unknown-loss": Bad(
        "t2r", batches(1), {"loss": "l1"}, CalibrationInputError, "unknown calibration loss"
    ),
    "zero-steps-and-no-end-to-end": Bad(
        "t2r", batches(1), {"steps": 0}, CalibrationInputError, "nothing would be trained"
    ),
    "negative-steps": Bad(
        "t2r", batches(1), {"steps": -1}, CalibrationInputError, "non-negative int"
    ),
    "zero-epochs": Bad("t2r", batches(1), {"epochs": 0}, CalibrationInputError, "positive int"),
    "layers-match-nothing": Bad(
        "t2r", batches(1), {"layers": "decoder.*"}, CalibrationError, "matches no rewritten site"
    ),
    "layers-name-parameterless-site": Bad(
        {"encoder.layer.0.*": "linear", "*": "t2r"},
        batches(1),
        {"layers": "encoder.layer.0*"},
        CalibrationError,
        "no trainable parameters",
    ),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_calls_give_clear_errors(peaked_bert, case: Bad) -> None:
    rw = rewritten(peaked_bert, case.variant)
    with pytest.raises(case.error, match=case.match):
        calibrate(rw, case.inputs, progress=False, **{"steps": 2, **case.options})


def test_not_a_rewritten_model(peaked_bert) -> None:
    with pytest.raises(CalibrationError, match=r"attnrewrite\.rewrite"):
        calibrate(peaked_bert, batches(1), progress=False)


def test_mixed_rewrite_skips_parameterless_sites(peaked_bert) -> None:
    rw = rewritten(peaked_bert, {"encoder.layer.0.*": "linear", "*": "t2r"})
    result = calibrate(rw, batches(1), steps=2, progress=False)
    assert [r.site for r in result.rows] == ["encoder.layer.1.attention.self"]


# -- end to end: the pretrained sentence encoder ---------------------------------------------------


@pytest.mark.slow
def test_minilm_calibration_raises_mean_cosine() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    import calibrate_minilm as example

    encoder, tokenizer = example.load_encoder()
    text = example.stdlib_text(tokenizer)
    calibration = example.batches(
        tokenizer, example._spread(text["calibration"]["sentences"], 64), 16
    )
    held_out = example.batches(tokenizer, example._spread(text["held_out"]["sentences"], 64), 64)
    reference = example.embed(encoder, held_out)
    rw = ar.rewrite(encoder, "hedgehog", kwargs=calibration[0])
    before = example.compare(reference, example.embed(rw, held_out))
    calibrate(rw, [((), kwargs) for kwargs in calibration], max_seconds=60, progress=False)
    after = example.compare(reference, example.embed(rw, held_out))
    assert after["mean"] > before["mean"] + 0.1
    assert after["spearman"] > before["spearman"]
