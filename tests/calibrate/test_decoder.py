"""Calibrating a decoder (issue 17): token streams in, next-token KL end to end, LoRA adapters on
the attention projections, checkpoint/resume, and two processes under torch.distributed (gloo).

The decoder is the tiny byte-level Llama of :mod:`attnrewrite.bench.byte_lm`, trained in seconds
on the standard library's source: a model that has learned something, so its attention is peaked
and the linear-time variants start visibly wrong."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import attnrewrite as ar
from attnrewrite.bench import byte_lm
from attnrewrite.calibrate import CalibrationResult
from attnrewrite.calibrate.calibrate import calibrate, output_divergence
from attnrewrite.errors import CalibrationError, CalibrationInputError

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 64
WINDOW = 16


@pytest.fixture(scope="module")
def decoder():
    return byte_lm.tiny_decoder()


@pytest.fixture(scope="module")
def streams():
    """Calibration and held-out token batches: windows of the training and held-out bytes."""
    train, heldout = byte_lm.corpus(max_bytes=2_000_000)
    generator = torch.Generator().manual_seed(0)

    def windows(data: torch.Tensor, count: int) -> list[torch.Tensor]:
        starts = torch.randint(0, len(data) - CONTEXT, (count, 2), generator=generator)
        return [torch.stack([data[s : s + CONTEXT] for s in pair]).long() for pair in starts]

    return windows(train, 24), windows(heldout, 6)


@pytest.fixture(scope="module")
def base(decoder, streams):
    """The decoder rewritten once; tests take fresh copies (a rewrite is seconds of capture)."""
    return ar.rewrite(
        decoder, "hedgehog", kwargs={"input_ids": streams[0][0]}, window=WINDOW, seed=0
    )


@pytest.fixture
def fresh(base):
    return lambda: copy.deepcopy(base)


def variant_state(rw) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone()
        for k, v in rw.graph_module.named_parameters()
        if k.startswith(("attnrewrite_variants", "attnrewrite_lora"))
    }


@pytest.fixture(scope="module")
def calibrated(decoder, streams, base):
    """One full run (per-site, end-to-end on next-token KL, LoRA), shared by several tests."""
    train, heldout = streams
    original = {k: v.clone() for k, v in decoder.state_dict().items()}
    rw = copy.deepcopy(base)
    held_before = output_divergence(rw, heldout)
    staged = copy.deepcopy(rw)
    result = calibrate(
        rw, train, steps=40, end_to_end=20, lora_rank=4, lora_steps=30, seed=0, progress=False
    )
    # The same calibration without the LoRA stage, to tell what LoRA adds on held-out data.
    without_lora = calibrate(staged, train, steps=40, end_to_end=20, seed=0, progress=False)
    return {
        "rw": rw,
        "result": result,
        "original": original,
        "held_before": held_before,
        "held_after": output_divergence(rw, heldout),
        "held_without_lora": output_divergence(staged, heldout),
        "without_lora": without_lora,
    }


def test_token_streams_calibrate_every_site_and_the_next_token_kl(calibrated) -> None:
    result = calibrated["result"]
    assert len(result.rows) == 2
    for row in result.rows:
        assert row.error_after < 0.8 * row.error_before, row
    assert result.end_to_end.loss == "kl"
    assert result.end_to_end.error_after < result.end_to_end.error_before
    # Held-out next-token KL(original ‖ rewritten), measured on text calibration never saw.
    assert calibrated["held_after"] < 0.7 * calibrated["held_before"], calibrated


def test_lora_stage_lowers_the_loss_further(calibrated) -> None:
    lora = calibrated["result"].lora
    assert lora is not None and not lora.reverted
    assert lora.error_after < lora.error_before
    # Eight adapters: query, key, value and output projections of both layers.
    roles = sorted(a.split(": ")[1] for a in lora.adapters)
    assert roles == sorted(["query", "key", "value", "output"] * 2)
    assert lora.parameters == sum(
        p.numel() for a in calibrated["rw"].lora_adapters.values() for p in a.parameters()
    )
    assert calibrated["held_after"] < calibrated["held_without_lora"]


def test_original_weights_bit_identical(decoder, calibrated) -> None:
    assert all(torch.equal(calibrated["original"][k], v) for k, v in decoder.state_dict().items())


def test_merged_adapters_compute_the_same_and_leave_the_original_alone(
    decoder, calibrated, streams
) -> None:
    rw = copy.deepcopy(calibrated["rw"])
    batch = streams[1][0]
    with torch.no_grad():
        unmerged = rw(input_ids=batch).logits
        assert rw.merge_lora() == 8
        merged = rw(input_ids=batch).logits
    assert not rw.lora_adapters
    assert not any("attnrewrite_lora" in str(n.target) for n in rw.graph_module.graph.nodes)
    # Each projection is held once: the merged weight replaces the rewritten model's own copy.
    names = list(rw.graph_module.state_dict())
    assert not any(k.endswith(("q_proj.weight", "o_proj.weight")) for k in names), names
    assert sum(k.endswith("_merged") for k in names) == 8
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(calibrated["original"][k], v) for k, v in decoder.state_dict().items())


def test_result_round_trips_through_json(calibrated, tmp_path) -> None:
    result = calibrated["result"]
    again = CalibrationResult.from_json(result.to_json())
    assert again == result
    assert result.save(tmp_path / "result.json")
    assert json.loads((tmp_path / "result.json").read_text())["lora"]["rank"] == 4
    assert "LoRA: 8 adapter(s) of rank 4" in str(result)


def test_deterministic_under_seed(fresh, streams) -> None:
    train, _ = streams
    states = []
    for _ in range(2):
        rw = fresh()
        calibrate(
            rw, train[:2], steps=5, end_to_end=2, lora_rank=2, lora_steps=3, seed=3, progress=False
        )
        states.append(variant_state(rw))
    assert states[0].keys() == states[1].keys() and len(states[0]) > 4
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(
    fresh, streams, tmp_path, monkeypatch
) -> None:
    train, _ = streams
    options = dict(steps=12, end_to_end=6, lora_rank=2, lora_steps=7, seed=0, progress=False)
    whole = fresh()
    expected = calibrate(whole, train[:4], **options)

    # Preempt the job in the middle of each stage in turn; every resume continues from the last
    # checkpoint (saved every 4 steps and at each stage's end).
    from attnrewrite.calibrate import calibrate as module

    real = module._learning_rate
    for stage_step in ((7, 12), (3, 6), (4, 7)):
        calls = {"n": 0}

        def preempt(base, step, total, elapsed, budget, _at=stage_step, _calls=calls):
            if (step, total) == _at and _calls["n"] == 0:
                _calls["n"] += 1
                raise KeyboardInterrupt("preempted")
            return real(base, step, total, elapsed, budget)

        monkeypatch.setattr(module, "_learning_rate", preempt)
        rw = fresh()
        with pytest.raises(KeyboardInterrupt):
            calibrate(rw, train[:4], checkpoint=tmp_path, checkpoint_every=4, **options)
        assert not rw.lora_adapters  # an interrupted call leaves the model as it found it
    monkeypatch.setattr(module, "_learning_rate", real)
    rw = fresh()
    resumed = calibrate(rw, train[:4], checkpoint=tmp_path, checkpoint_every=4, **options)
    assert resumed.resumed is not None
    got, want = variant_state(rw), variant_state(whole)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r.error_after for r in resumed.rows] == pytest.approx(
        [r.error_after for r in expected.rows], rel=1e-4
    )


def test_checkpoint_of_another_calibration_is_refused(fresh, streams, tmp_path) -> None:
    train, _ = streams
    rw = fresh()
    calibrate(rw, train[:2], steps=2, checkpoint=tmp_path, progress=False)
    other = fresh()
    with pytest.raises(CalibrationInputError, match="does not fit this calibration"):
        calibrate(other, train[:2], steps=2, lora_rank=2, checkpoint=tmp_path, progress=False)


#: The options of the two-process runs, and what each case adds.
DISTRIBUTED_OPTIONS = {"steps": 6, "end_to_end": 3, "lora_rank": 2, "lora_steps": 3}
DISTRIBUTED_CASES = {
    "replicated": {},
    "shard_frozen": {"shard_frozen": True, "checkpoint_every": 2},
}


def torchrun(decoder, batches, cases: dict[str, tuple[dict, Path]]) -> dict:
    """Calibrate on two gloo processes (``distributed_worker.py``), each case in turn in one
    launch: per case, the result, and per rank the parameters trained and what the worker saved
    afterwards."""
    shared = next(iter(cases.values()))[1]
    torch.save(decoder.state_dict(), shared / "weights.pt")
    torch.save(batches, shared / "batches.pt")
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(worker),
            str(shared / "weights.pt"),
            str(shared / "batches.pt"),
            json.dumps([(options, str(out)) for options, out in cases.values()]),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = {}
    for case, (_, out) in cases.items():
        assert (out / "result-0.json").exists() and not (out / "result-1.json").exists()
        runs[case] = {
            "result": CalibrationResult.from_json((out / "result-0.json").read_text()),
            "parameters": [
                torch.load(out / f"parameters-{r}.pt", weights_only=True) for r in (0, 1)
            ],
            "after": [torch.load(out / f"after-{r}.pt", weights_only=True) for r in (0, 1)],
            "out": out,
        }
    return runs


@pytest.fixture(scope="module")
def two_processes(decoder, streams, tmp_path_factory):
    """The same calibration on two processes, with the frozen weights replicated and sharded."""
    cases = {}
    for case, extra in DISTRIBUTED_CASES.items():
        out = tmp_path_factory.mktemp(case)
        if "checkpoint_every" in extra:  # checkpoints saved while sharded
            extra = {**extra, "checkpoint": str(out / "checkpoint")}
        cases[case] = ({**DISTRIBUTED_OPTIONS, **extra}, out)
    return torchrun(decoder, streams[0][:4], cases)


def frozen_numel(decoder) -> int:
    return sum(p.numel() for p in decoder.parameters())  # tied weights counted once


def test_two_processes_equal_one_process_with_the_same_global_batches(
    decoder, fresh, streams, two_processes
) -> None:
    batches = streams[0][:4]
    run = two_processes["replicated"]
    # Rank r keeps batches r, r + 2: a global batch is two of them, concatenated here.
    merged = [torch.cat(batches[k : k + 2]) for k in range(0, len(batches), 2)]
    rw = fresh()
    single = calibrate(rw, merged, progress=False, seed=0, **DISTRIBUTED_OPTIONS)
    want = variant_state(rw)
    for got in run["parameters"]:
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-4, atol=1e-5, msg=key)
    assert run["result"].world_size == 2 and run["result"].batches == 4
    assert [r.error_after for r in run["result"].rows] == pytest.approx(
        [r.error_after for r in single.rows], rel=1e-3
    )
    assert run["result"].sharding is None
    with torch.no_grad():
        logits = rw(input_ids=batches[0]).logits
    for after in run["after"]:
        torch.testing.assert_close(after["logits"], logits, rtol=1e-4, atol=1e-4)
        # The worker's hook saw the rewritten model hold all its frozen weights while calibrating.
        assert after["held_while_calibrating"] == frozen_numel(decoder)


def test_sharded_frozen_weights_train_the_same_bits_holding_half_each(
    decoder, two_processes
) -> None:
    replicated, sharded = two_processes["replicated"], two_processes["shard_frozen"]
    # The same computation from the same weights, gathered instead of held: the same bits.
    for got, want in zip(sharded["parameters"], replicated["parameters"], strict=True):
        assert got.keys() == want.keys() and len(got) > 4
        assert all(torch.equal(got[key], want[key]) for key in want)

    def errors(result):
        return [(r.error_before, r.error_after) for r in result.rows] + [
            (stage.error_before, stage.error_after) for stage in (result.end_to_end, result.lora)
        ]

    assert errors(sharded["result"]) == errors(replicated["result"])
    # While calibrating, the rewritten model's own full copies were released, and each rank held
    # about half of every frozen weight (FSDP2 shards each along its first axis).
    frozen = frozen_numel(decoder)
    sharding = sharded["result"].sharding
    assert sharding.stages == 2 and sharding.parameters == frozen
    assert sum(sharding.held) == frozen and max(sharding.held) <= frozen // 2 + 64 * 3
    assert sharding.shared == 256 * 64  # the tied embedding / output weight
    assert "of 115008 held per rank at most" in str(sharded["result"])
    assert (sharded["out"] / "checkpoint" / "LATEST").exists()
    # Afterwards each rank's rewritten model is whole again, in a process without a group: the
    # original weights bit for bit, the same logits, and LoRA merges.
    for after, unsharded in zip(sharded["after"], replicated["after"], strict=True):
        assert after["held_while_calibrating"] == 0
        state = after["state"]
        assert all(torch.equal(state[k], v) for k, v in decoder.state_dict().items())
        assert torch.equal(after["logits"], unsharded["logits"])
        assert after["merged"] == 8  # q, k, v and o of both layers
        torch.testing.assert_close(after["merged_logits"], after["logits"], rtol=1e-5, atol=1e-5)


def test_shard_frozen_in_one_process_changes_nothing(fresh, streams) -> None:
    train, _ = streams
    states = []
    for shard in (False, True):
        rw = fresh()
        result = calibrate(rw, train[:2], steps=3, seed=0, shard_frozen=shard, progress=False)
        assert result.sharding is None
        states.append(variant_state(rw))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_bad_decoder_options_give_clear_errors(fresh, streams) -> None:
    train, _ = streams
    rw = fresh()
    with pytest.raises(CalibrationInputError, match="lora_rank is not"):
        calibrate(rw, train[:1], lora_steps=3, progress=False)
    with pytest.raises(CalibrationInputError, match="unknown end_to_end_loss"):
        calibrate(rw, train[:1], end_to_end_loss="ce", progress=False)
    with pytest.raises(CalibrationInputError, match="lora_rank must be a positive int"):
        calibrate(rw, train[:1], lora_rank=0, progress=False)
    with pytest.raises(CalibrationInputError, match="token ids"):
        calibrate(rw, [train[0].float()], progress=False)
    assert not rw.lora_adapters


def test_kl_needs_logits(decoder, streams) -> None:
    train, _ = streams
    rw = ar.rewrite(decoder.model, "hedgehog", kwargs={"input_ids": train[0]}, seed=0)
    with pytest.raises(CalibrationInputError, match="no logits"):
        calibrate(rw, train[:1], steps=1, end_to_end=1, end_to_end_loss="kl", progress=False)


def test_lora_without_a_projection_says_so(streams) -> None:
    class Bare(torch.nn.Module):
        def forward(self, x):
            scores = x @ x.transpose(-1, -2) * x.shape[-1] ** -0.5
            return torch.softmax(scores, dim=-1) @ x

    x = torch.randn(2, 8, 16)
    rw = ar.rewrite(Bare(), "hedgehog", args=(x,), seed=0)
    with pytest.raises(CalibrationError, match="no projection"):
        calibrate(rw, [((x,), {})], steps=1, lora_rank=2, progress=False)
    assert not rw.lora_adapters


@pytest.mark.slow  # an ONNX export (~20 s); the adapters are plain matmuls to the exporter
def test_lora_around_a_parameterless_variant_runs_in_onnx_runtime(decoder, streams, tmp_path):
    """`local` has no parameters of its own: with lora_rank its sites are still selected (the
    adapters train around them), and the adapters export to ONNX as plain matmuls."""
    train, heldout = streams
    rw = ar.rewrite(decoder, "local", kwargs={"input_ids": train[0]}, window=WINDOW, seed=0)
    result = calibrate(rw, train[:6], steps=0, lora_rank=2, lora_steps=8, seed=0, progress=False)
    assert [row.steps for row in result.rows] == [0, 0]
    assert result.lora is not None and len(rw.lora_adapters) == 8
    exported = ar.export_onnx(rw, tmp_path / "lora.onnx")
    session = ar.onnx_session(exported.path)
    batch = heldout[0][:1]  # another batch size than captured
    with torch.no_grad():
        want = rw(input_ids=batch).logits
    torch.testing.assert_close(session(input_ids=batch).logits, want, rtol=1e-4, atol=1e-4)


def test_fused_conv1d_projections_get_one_adapter_each_and_merge_exactly() -> None:
    """GPT-2 spells its projections as Conv1D (``addmm`` with a (in, out) weight) and fuses q, k
    and v into one: one adapter on the fused projection, one on the output, per layer; merging
    folds the transposed update into the right weight."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_embd=32,
        n_layer=2,
        n_head=4,
        vocab_size=64,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 12))
    rw = ar.rewrite(model, "local", kwargs={"input_ids": ids}, window=4, seed=0)
    from attnrewrite.calibrate import lora

    made, missing = lora.add_adapters(rw.graph_module, list(rw.variant_modules), 2, None, 0)
    assert not missing and len(made) == 4
    roles = sorted((a.site, a.role) for a in rw.lora_adapters.values())
    assert roles == [
        (f"transformer.h.{i}.attn", role) for i in (0, 1) for role in ("output", "query+key+value")
    ]
    with torch.no_grad():
        for adapter in rw.lora_adapters.values():
            adapter.lora_b.normal_()  # a visible update, so a wrong fold would show
        unmerged = rw(input_ids=ids).logits
        rw.merge_lora()
        merged = rw(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
