"""Generation in ONNX Runtime: ``export_onnx(rw, dir, decode=True)`` and ``onnx_session(dir)``.

A tiny random-init Llama (GQA, RoPE) rewritten with ``linear`` (constant-size state) and with
``softmax`` (a key/value cache), exported once per variant (module fixture) at batch 2, length 7,
and run at other batches and prompt lengths, left-padded:

- numerical: ONNX Runtime's greedy tokens equal PyTorch's ``rw.generate`` (and, for the exact
  ``softmax``, the original's Hugging Face ``generate``); every step's logits equal PyTorch's;
- structural: the roles in ``decode.json``, the constant ``use_cache`` baked in, state shapes in
  ``step.onnx`` (the kernel state's do not depend on the prompt length, the cache's key axis grows);
- negative: a crafted ``decode.json`` (a class named where a dtype goes, unknown roles or
  fields, missing roles) is refused with a clear error and nothing named in it is imported;
- end-to-end: ``attnrewrite generate`` on a tiny target prints the table and tokens agreeing.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import attnrewrite as ar
from attnrewrite.backends.onnx import DecodeExport, OnnxDecodeSession, OnnxSignatureError
from attnrewrite.errors import OnnxExportError

transformers = pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

EXPORT_SHAPE = (2, 7)  # (batch, length) the model is captured and exported with
VOCAB = 100
LOGITS_TOLERANCE = 1e-4  # max relative error of ONNX Runtime's logits against PyTorch's, fp32


def _tiny_llama() -> Any:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa").eval()


def _prompt(pads: tuple[int, ...], length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and a mask with ``pads[i]`` padding positions on the left of sequence i."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (len(pads), length), generator=g)
    mask = torch.ones_like(ids)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


@dataclasses.dataclass(frozen=True)
class Exported:
    variant: str
    model: Any  # the original
    rewritten: Any
    directory: Path
    record: DecodeExport
    session: OnnxDecodeSession


@pytest.fixture(scope="module")
def llama() -> Any:
    return _tiny_llama()


VARIANTS = ("linear", "softmax")


@pytest.fixture(scope="module")
def export(llama: Any, tmp_path_factory: Any) -> Callable[[str], Exported]:
    """Rewrite and export the tiny Llama once per variant (the slow part of this file)."""
    cache: dict[str, Exported] = {}

    def get(variant: str) -> Exported:
        if variant not in cache:
            ids, mask = _prompt((0, 3), EXPORT_SHAPE[1], seed=0)
            kwargs = {"input_ids": ids, "attention_mask": mask}
            rewritten = ar.rewrite(llama, variant, kwargs=kwargs)
            directory = tmp_path_factory.mktemp(f"decode_{variant}")
            record = ar.export_onnx(rewritten, directory, decode=True)
            session = ar.onnx_session(directory)
            cache[variant] = Exported(variant, llama, rewritten, directory, record, session)
        return cache[variant]

    return get


def _step_inputs(exported: Exported) -> dict[str, Any]:
    """The graph inputs of step.onnx by name: their dims as sizes or axis names."""
    proto = onnx.load(str(exported.directory / "step.onnx"), load_external_data=False)
    return {
        value.name: [
            d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value.type.tensor_type.shape.dim
        ]
        for value in proto.graph.input
    }


# -- numerical -------------------------------------------------------------------------------------

PROMPTS = {
    "batch2-longer-prompt": ((0, 4), 10),
    "batch3-shorter-prompt": ((2, 0, 1), 5),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("pads,length", PROMPTS.values(), ids=PROMPTS.keys())
def test_ort_greedy_tokens_equal_pytorch(
    export: Any, variant: str, pads: tuple[int, ...], length: int
) -> None:
    exported = export(variant)
    ids, mask = _prompt(pads, length, seed=1)
    ort_tokens = exported.session.generate(ids, mask, max_new_tokens=8)
    torch_tokens = exported.rewritten.generate(ids, mask, max_new_tokens=8)
    assert ort_tokens.shape == (len(pads), length + 8)
    assert torch.equal(ort_tokens, torch_tokens)
    if exported.variant == "softmax":  # exact: the original's own generate with its KV cache
        with torch.no_grad():
            reference = exported.model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert torch.equal(ort_tokens, reference)


@pytest.mark.parametrize("variant", VARIANTS)
def test_ort_step_logits_equal_pytorch(export: Any, variant: str) -> None:
    exported = export(variant)
    ids, mask = _prompt((3, 0), 9, seed=2)
    ort = list(exported.session.stream(ids, mask, max_new_tokens=6, output_logits=True))
    eager = list(exported.rewritten.stream(ids, mask, max_new_tokens=6, output_logits=True))
    assert len(ort) == len(eager) == 6
    for step, ((ort_token, ort_logits), (token, logits)) in enumerate(zip(ort, eager)):
        error = ((ort_logits - logits).abs().max() / logits.abs().max()).item()
        assert error <= LOGITS_TOLERANCE, f"step {step}: relative error {error:.2e}"
        assert torch.equal(ort_token, token)


# -- structural ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_signature_roles_and_baked_constant(export: Any, variant: str) -> None:
    exported = export(variant)
    signature = json.loads((exported.directory / "decode.json").read_text())
    num_state = 2 * (2 if exported.variant == "linear" else 3)  # 2 layers x (S, z) | (k, v, bias)
    assert signature["num_state"] == num_state and signature["num_outputs"] == 1
    assert [s["name"] for s in signature["sites"]] == [
        "model.layers.0.self_attn",
        "model.layers.1.self_attn",
    ]
    step_roles = [r["role"] for r in signature["step"]["inputs"]]
    assert {"input_ids", "attention_mask", "offset", "mask_offset"} <= set(step_roles)
    assert step_roles[-num_state:] == [f"state_{i}" for i in range(num_state)]
    # use_cache=False is a constant of both graphs, not an ONNX input.
    assert {"role": "constant", "value": False} in signature["prefill"]["inputs"]
    assert "use_cache" not in _step_inputs(exported)
    outputs = signature["step"]["outputs"]
    assert outputs[signature["logits"]]["name"] == "logits"
    assert [r["role"] for r in outputs[1:]] == [f"state_{i}" for i in range(num_state)]
    assert exported.record.step.path == exported.directory / "step.onnx"


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_shapes_in_step_graph(export: Any, variant: str) -> None:
    exported = export(variant)
    inputs = _step_inputs(exported)
    state = {name: dims for name, dims in inputs.items() if name.startswith("past.")}
    assert state and all(dims[0] == "batch" for dims in state.values())
    assert inputs["input_ids"] == ["batch", 1]
    if exported.variant == "linear":
        # Constant-size sums: nothing but the batch depends on the context.
        expected = {"S": ["batch", 2, 8, 8], "z": ["batch", 2, 8]}
        for name, dims in state.items():
            assert dims == expected[name.rsplit(".", 1)[1]], name
    else:
        # The key/value cache grows along its key axis.
        for name, dims in state.items():
            assert "past" in dims, name


# -- negative --------------------------------------------------------------------------------------

PAYLOAD = "attnrewrite_decode_payload"


def _edit_input(graph: str, role: str, changes: dict[str, Any]):
    def edit(data: dict[str, Any]) -> None:
        record = next(r for r in data[graph]["inputs"] if r["role"] == role)
        record.update(changes)

    return edit


def _drop_input(graph: str, role: str):
    def edit(data: dict[str, Any]) -> None:
        data[graph]["inputs"] = [r for r in data[graph]["inputs"] if r["role"] != role]

    return edit


def _set(key: str, value: Any):
    return lambda data: data.__setitem__(key, value)


CRAFTED = {
    "class-as-dtype": (
        _edit_input("step", "state_0", {"dtype": f"{PAYLOAD}.Evil"}),
        "unknown dtype",
    ),
    "callable-as-role": (
        _edit_input("prefill", "input_ids", {"role": f"{PAYLOAD}:build"}),
        "unknown role",
    ),
    "class-field": (_edit_input("step", "offset", {"class": f"{PAYLOAD}.Evil"}), "unknown field"),
    "state-role-repeated": (_edit_input("step", "state_1", {"role": "state_0"}), "more than once"),
    "state-role-out-of-range": (
        _edit_input("step", "state_1", {"role": "state_99"}),
        "unknown role",
    ),
    "state-dtype-changed": (_edit_input("step", "state_2", {"dtype": "float16"}), "dtypes differ"),
    "offset-missing": (_drop_input("step", "offset"), "offset"),
    "logits-not-an-output": (_set("logits", 1), "'logits'"),
    "another-format": (_set("format", 99), "format 99"),
    "renamed-input": (
        _edit_input("step", "input_ids", {"name": "something_else"}),
        "does not match",
    ),
}


@pytest.mark.parametrize("edit,message", CRAFTED.values(), ids=CRAFTED.keys())
def test_crafted_signature_is_refused_without_import(
    export: Any, tmp_path: Path, monkeypatch: Any, edit: Any, message: str
) -> None:
    # A module that would leave a trace if anything imported the name the file mentions.
    marker = tmp_path / "imported"
    (tmp_path / f"{PAYLOAD}.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\ndef build(): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    crafted = tmp_path / "crafted"
    shutil.copytree(export("linear").directory, crafted)
    data = json.loads((crafted / "decode.json").read_text())
    edit(data)
    (crafted / "decode.json").write_text(json.dumps(data))
    with pytest.raises(OnnxSignatureError, match=message):
        ar.onnx_session(crafted)
    assert not marker.exists() and PAYLOAD not in sys.modules


def test_malformed_or_missing_signature(tmp_path: Path) -> None:
    with pytest.raises(OnnxSignatureError, match="no decode.json"):
        ar.onnx_session(tmp_path)
    (tmp_path / "decode.json").write_text("{not json")
    with pytest.raises(OnnxSignatureError, match="not valid JSON"):
        ar.onnx_session(tmp_path)


def test_decode_export_needs_a_rewritten_model(tmp_path: Path) -> None:
    with pytest.raises(OnnxExportError, match="RewrittenModel"):
        ar.export_onnx(torch.nn.Linear(2, 2), tmp_path, decode=True)


# -- end-to-end ------------------------------------------------------------------------------------


def test_cli_generate_prints_the_table_and_agreement(capsys: Any) -> None:
    from attnrewrite.cli import main

    code = main(
        ["generate", "llama", "--variant", "softmax", "--prompt-len", "8", "--new-tokens", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "tokens/s" in out and "Hugging Face generate" in out and "rewritten (softmax)" in out
    assert "greedy tokens agree: yes" in out
