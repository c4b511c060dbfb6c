"""The ``attnrewrite`` command: every verb on a tiny ``module:factory`` target, and bad TARGETs.

Verbs are called in-process through ``main([...])`` (fast); one test runs the real entry point in a
subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from attnrewrite.cli import main

TARGET = "tests.test_cli:tiny_target"


class TinyAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.qkv = nn.Linear(16, 48)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        batch, length, _ = x.shape
        query, key, value = self.qkv(x).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)
        scores = query @ key.transpose(-1, -2) * 8**-0.5
        return (scores.softmax(-1) @ value).transpose(1, 2).reshape(batch, length, 16)


def tiny_target():
    torch.manual_seed(0)
    return TinyAttention().eval(), (torch.randint(0, 64, (2, 16)),), {}


def not_a_model():
    return "hello"


def test_inspect_prints_the_sites_table(capsys):
    assert main(["inspect", TARGET, "--variant", "linear"]) == 0
    out = capsys.readouterr().out
    assert "1 attention site(s)" in out and "manual" in out
    assert "linear" in out and "rewritten" in out  # the rewrite report of --variant


def test_rewrite_saves_a_loadable_dynamic_program(tmp_path, capsys):
    path = tmp_path / "tiny_linear.pt2"
    assert main(["rewrite", TARGET, "--variant", "linear", "-o", str(path)]) == 0
    assert "dynamic" in capsys.readouterr().out
    program = torch.export.load(str(path))
    ids = torch.randint(0, 64, (3, 24))  # another batch size and length than the example's
    assert program.module()(ids).shape == (3, 24, 16)


def test_export_writes_onnx_or_names_the_missing_backend(tmp_path, capsys):
    path = tmp_path / "tiny.onnx"
    status = main(["export", TARGET, "--variant", "linear", "-o", str(path)])
    try:
        import attnrewrite.backends.onnx  # noqa: F401
    except ModuleNotFoundError:
        assert status == 2
        assert "ONNX backend is not available" in capsys.readouterr().err
        return
    assert status == 0 and path.stat().st_size > 0


def test_bench_writes_json_plot_and_markdown(tmp_path, capsys):
    out = tmp_path / "bench"
    status = main(
        [
            "bench",
            TARGET,
            "--variant",
            "softmax",
            "linear",
            "--seq-lens",
            "16",
            "64",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--no-memory",
            "--no-progress",
            "--json",
            str(out / "b.json"),
            "--plot",
            str(out / "b.png"),
            "--markdown",
            str(out / "b.md"),
        ]
    )
    assert status == 0
    data = json.loads((out / "b.json").read_text())
    assert {r["variant"] for r in data["rows"]} == {"original", "softmax", "linear"}
    assert all(r["median_ms"] > 0 for r in data["rows"])
    assert (out / "b.png").stat().st_size > 0 and "| eager |" in (out / "b.md").read_text()
    assert "crossover" in capsys.readouterr().out


def test_bench_rejects_an_option_no_variant_has(capsys):
    status = main(
        [
            "bench",
            TARGET,
            "--variant",
            "linear",
            "--seq-lens",
            "16",
            "--no-memory",
            "--option",
            "num_landmarks=8",
        ]
    )
    assert status == 2 and "num_landmarks" in capsys.readouterr().err


def test_inspect_a_tiny_hugging_face_model(capsys):
    pytest.importorskip("transformers")
    assert main(["inspect", "bert", "--seq-len", "8"]) == 0
    out = capsys.readouterr().out
    assert "2 attention site(s)" in out and "key" in out


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_such_model_type", "'module:factory'"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("tests.test_cli:missing", "has no callable 'missing'"),
        ("tests.test_cli:not_a_model", "must return (model, args, kwargs)"),
        ("missing_file.py:build", "no file"),
    ],
)
def test_bad_targets_list_the_forms(target, message, capsys):
    assert main(["inspect", target]) == 2
    err = capsys.readouterr().err
    assert message in err
    if target == "no_such_model_type":
        assert "local Hugging Face model directory" in err and "bert" in err


def test_a_directory_that_is_not_a_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a loadable Hugging Face model" in capsys.readouterr().err


def test_entry_point_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "attnrewrite.cli", "inspect", "nope"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown TARGET 'nope'" in done.stderr
