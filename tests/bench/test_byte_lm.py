"""The byte-level decoder language model (``attnrewrite.bench.byte_lm``): it learns, it is
reproducible, its corpus split is sound, its cache round-trips.

The tiny size is trained once per process (``tiny_decoder`` memoises its weights, ~15 s on one
thread); the other training runs take a few dozen steps.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnrewrite.bench import byte_lm
from attnrewrite.errors import BenchmarkError

TINY = byte_lm.SIZES["tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def split() -> tuple[torch.Tensor, torch.Tensor]:
    return byte_lm.corpus()


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return byte_lm.tiny_decoder(seed=0)


def short_run(data: torch.Tensor, seed: int, steps: int = 8) -> dict[str, torch.Tensor]:
    model = byte_lm.build_model("tiny", seed=0, attn_implementation="sdpa")
    byte_lm.train(
        model, data, context=32, batch_size=4, steps=steps, lr=1e-2, seed=seed, progress=False
    )
    return model.state_dict()


# --- the model learns -------------------------------------------------------------------------


def test_tiny_decoder_shape(tiny: torch.nn.Module) -> None:
    config = tiny.config
    assert (config.vocab_size, config.num_hidden_layers, config.hidden_size) == (256, 2, 64)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)  # GQA
    assert config._attn_implementation == "eager"
    assert not tiny.training


def test_tiny_decoder_learns(tiny: torch.nn.Module, split: tuple) -> None:
    _, heldout = split
    untrained = byte_lm.build_model("tiny", seed=0)
    before = byte_lm.perplexity(untrained, heldout, context=TINY.context, windows=32)
    after = byte_lm.perplexity(tiny, heldout, context=TINY.context, windows=32)
    assert before > 100  # near the uniform 256
    assert after < 30
    assert before / after > 5


def test_perplexity_takes_any_callable(tiny: torch.nn.Module, split: tuple) -> None:
    """A plain function returning a logits tensor (as a rewritten model may) scores the same,
    on the same fixed windows, and the caller's random state is untouched."""
    _, heldout = split
    state = torch.get_rng_state()
    module = byte_lm.perplexity(tiny, heldout, context=64, windows=8, seed=3)
    function = byte_lm.perplexity(
        lambda input_ids: tiny(input_ids=input_ids).logits,
        heldout,
        context=64,
        windows=8,
        seed=3,
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert function == pytest.approx(module, rel=1e-6)


# --- reproducibility --------------------------------------------------------------------------


def test_training_is_deterministic_and_keeps_the_callers_rng(split: tuple) -> None:
    train, _ = split
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    first = short_run(train, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    second = short_run(train, seed=5)
    other = short_run(train, seed=6)
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_build_model_is_seeded() -> None:
    state = torch.get_rng_state()
    first = byte_lm.build_model("tiny", seed=1).state_dict()
    second = byte_lm.build_model("tiny", seed=1).state_dict()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(first[name], second[name]) for name in first)


# --- corpus -----------------------------------------------------------------------------------


def test_stdlib_corpus_is_deterministic(split: tuple) -> None:
    train, heldout = split
    assert train.dtype == heldout.dtype == torch.uint8
    assert train.numel() > 1_000_000
    assert 0.01 < heldout.numel() / (train.numel() + heldout.numel()) < 0.15
    again_train, again_heldout = byte_lm.corpus()
    assert torch.equal(train, again_train) and torch.equal(heldout, again_heldout)
    capped_train, capped_heldout = byte_lm.corpus(max_bytes=1000)
    assert torch.equal(capped_train, train[:1000]) and torch.equal(capped_heldout, heldout[:1000])


def write_sources(root, count: int = 200) -> dict[str, bytes]:
    """``count`` Python files with distinct contents, plus files the corpus must leave out."""
    files = {}
    for index in range(count):
        path = root / f"pkg{index % 7}" / f"module_{index}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        files[path.relative_to(root).as_posix()] = f"# file {index:04d}\nx = {index}\n".encode()
        path.write_bytes(files[path.relative_to(root).as_posix()])
    for skipped in ("test", "tests", "idlelib", "site-packages"):
        (root / skipped).mkdir()
        (root / skipped / "skipped.py").write_bytes(b"# SKIPPED\n")
    (root / "latin1.py").write_bytes(b"# caf\xe9 SKIPPED\n")  # not UTF-8
    return files


def split_of(train: torch.Tensor, heldout: torch.Tensor, content: bytes) -> str:
    in_train = content in bytes(train.tolist())
    in_heldout = content in bytes(heldout.tolist())
    assert in_train != in_heldout, content  # every file in exactly one split
    return "train" if in_train else "heldout"


def test_corpus_split_is_disjoint_by_file_and_location_independent(tmp_path) -> None:
    files = write_sources(tmp_path / "a")
    train, heldout = byte_lm.corpus(root=tmp_path / "a")
    assert b"SKIPPED" not in bytes(train.tolist()) + bytes(heldout.tolist())
    sides = {name: split_of(train, heldout, content) for name, content in files.items()}
    assert 0 < list(sides.values()).count("heldout") < 0.15 * len(files)
    # The same files elsewhere split the same way (the hash is of the relative path).
    write_sources(tmp_path / "b")
    moved_train, moved_heldout = byte_lm.corpus(root=tmp_path / "b")
    assert torch.equal(train, moved_train) and torch.equal(heldout, moved_heldout)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_bytes": 0}, "max_bytes"),
        ({"root": "EMPTY"}, "no readable"),
    ],
    ids=["max-bytes", "empty-root"],
)
def test_corpus_errors(tmp_path, kwargs: dict, message: str) -> None:
    if kwargs.get("root") == "EMPTY":
        kwargs = {"root": tmp_path}
    with pytest.raises(BenchmarkError, match=message):
        byte_lm.corpus(**kwargs)


# --- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, d: byte_lm.perplexity(m, d, context=129, windows=1), "max_position_embeddings"),
        (lambda m, d: byte_lm.perplexity(m, d[:10], context=64, windows=1), "cannot fill"),
        (lambda m, d: byte_lm.train(m, d, context=32, batch_size=2, lr=1e-3, seed=0), "budget"),
        (
            lambda m, d: byte_lm.train(
                m, d, context=256, batch_size=2, steps=1, lr=1e-3, seed=0, progress=False
            ),
            "max_position_embeddings",
        ),
        (
            lambda m, d: byte_lm.train(
                m,
                d,
                context=32,
                batch_size=2,
                steps=1,
                lr=1e-3,
                seed=0,
                phases=[byte_lm.Phase(0.5, 16, 2)],
            ),
            "last must be 1.0",
        ),
        (lambda m, d: byte_lm.build_model("huge"), "unknown size"),
    ],
    ids=["eval-context", "eval-data", "no-budget", "train-context", "phases", "size"],
)
def test_errors_say_what_to_do(tiny: torch.nn.Module, split: tuple, call, message: str) -> None:
    with pytest.raises(BenchmarkError, match=message):
        call(tiny, split[1])


# --- cache ------------------------------------------------------------------------------------


def test_cache_round_trip(tmp_path, monkeypatch) -> None:
    options = {"cache_dir": tmp_path, "steps": 6, "eval_windows": 4, "progress": False}
    first = byte_lm.load_or_train("tiny", **options)
    assert first.trained and first.path is not None
    assert first.path.parent == tmp_path and first.path.name.startswith("tiny-")
    record = json.loads((first.path / "record.json").read_text())
    assert record["steps"] == 6 and record["tokens"] == 6 * TINY.phases[-1].batch_size * 128
    assert record["heldout_perplexity"] == pytest.approx(2 ** record["heldout_bits_per_byte"])
    assert math.isfinite(record["train_loss"]) and record["torch"] == torch.__version__

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was retrained")

    monkeypatch.setattr(byte_lm, "train", no_training)
    second = byte_lm.load_or_train("tiny", **options)
    assert not second.trained and second.path == first.path and second.record == record
    weights = first.model.state_dict()
    assert all(torch.equal(weights[k], v) for k, v in second.model.state_dict().items())
    # Another budget is another cache entry; the same budget spelled otherwise is not.
    assert byte_lm.cache_path("tiny", cache_dir=tmp_path, steps=7) != first.path
    assert byte_lm.cache_path("small", minutes=20) == byte_lm.cache_path("small", minutes=20.0)
    assert byte_lm.cache_path("small") == byte_lm.cache_path("small", minutes=20)
