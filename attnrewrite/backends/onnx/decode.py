"""Generation in ONNX Runtime: a rewritten decoder's prefill and step graphs as ONNX models.

:func:`export_decode` (``export_onnx(rw, directory, decode=True)``) writes three files:

- ``prefill.onnx``: the prompt's inputs -> (the model's tensor outputs, every site's decode
  state). Batch and sequence axes are dynamic.
- ``step.onnx``: one new token's inputs, ``offset`` (0-d int64: positions already decoded),
  ``mask_offset`` ((B, 1): real tokens already counted) and the state -> (outputs, new state).
  Batch is dynamic, the token axis is 1. State axes are constant except the batch and those a
  step grows (the key axis of ``softmax``'s key/value cache); the kernel family's sums (S, z)
  keep one shape whatever the context length.
- ``decode.json``: the signature, plain data: each graph's inputs and outputs with their role
  (``input_ids``, ``attention_mask``, ``position_ids``, ``cache_position``, ``offset``,
  ``mask_offset``, ``state_<i>``, ``output``; ``constant`` for a non-tensor argument such as
  ``use_cache=False``, baked into the graphs), dtype and shape, the index of the logits among
  the outputs, and each site's state names.

Both graphs are the ones :class:`~attnrewrite.rewriter.generate.Decoder` runs, exported with the
flat-call wrapper and the capture/translate/save stages of :func:`export_onnx`; their example
inputs are recorded from the shared generation loop itself, so ONNX sees exactly what PyTorch
feeds. :class:`OnnxDecodeSession` (``onnx_session(directory)``) runs that same loop,
:func:`~attnrewrite.rewriter.generate.decode_loop`, over ONNX Runtime.

``decode.json`` is data: it is checked field by field against what :func:`export_decode` writes
(known roles, dtypes from a fixed table, no other fields), and nothing named in it is imported or
constructed. The ONNX file names are fixed, never read from it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from attnrewrite.backends.onnx.export import (
    OnnxExport,
    _export_record,
    _FlatCall,
    capture_program,
    save_checked,
    translate_program,
)
from attnrewrite.backends.onnx.signature import REPORT_KEY, OnnxSignatureError
from attnrewrite.errors import DecodeError, OnnxExportError
from attnrewrite.rewriter.generate import Decoder, Generation, check_tolerance, decode_loop

PREFILL_FILE = "prefill.onnx"
STEP_FILE = "step.onnx"
SIGNATURE_FILE = "decode.json"
#: The version of ``decode.json`` this module writes and reads.
DECODE_FORMAT = 1
_KIND = "attnrewrite.decode"

#: Roles of the model's own inputs, fed from the prompt and the tokens decoded so far.
MODEL_ROLES = ("input_ids", "attention_mask", "position_ids", "cache_position")
_STEP_ROLES = ("offset", "mask_offset")
_STATE_ROLE = re.compile(r"state_(0|[1-9][0-9]{0,5})")
#: The dtypes a signature may name, by name; a name outside this table is refused, not looked up.
_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
# A signature far larger than any export writes is not one of ours.
_MAX_SIGNATURE_BYTES = 4_000_000


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# -- the signature ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GraphSignature:
    """The inputs and outputs of one decode graph, as records of ``decode.json``.

    Attributes:
        inputs: the model's flat inputs, then (step) ``offset``, ``mask_offset`` and the state:
            ``{"role", "name", "dtype", "shape"}`` for a tensor (``shape``: sizes, names of
            dynamic axes, ``None`` for an input the ONNX graph does not read), ``{"role":
            "constant", "value"}`` for a non-tensor argument fixed at export.
        outputs: ``{"role": "output" | "state_<i>", "name", "dtype", "shape"}``, the ONNX outputs.
    """

    inputs: tuple[dict[str, Any], ...]
    outputs: tuple[dict[str, Any], ...]

    def input_name(self, role: str) -> str | None:
        return next((r["name"] for r in self.inputs if r["role"] == role), None)

    def state_outputs(self) -> list[str]:
        return _by_state_index(self.outputs)


def _by_state_index(records: tuple[dict[str, Any], ...], field: str = "name") -> list[Any]:
    found = {
        int(r["role"].removeprefix("state_")): r[field]
        for r in records
        if r["role"].startswith("state_")
    }
    return [found[i] for i in range(len(found))]


@dataclasses.dataclass(frozen=True)
class DecodeSignature:
    """``decode.json``: how the prefill and step ONNX graphs are fed and read.

    Attributes:
        prefill, step: each graph's :class:`GraphSignature`.
        logits: index of the logits among each graph's outputs.
        num_outputs: how many of the outputs are the model's (the state follows).
        sites: (site name, its state names) per site, in state order.
    """

    prefill: GraphSignature
    step: GraphSignature
    logits: int
    num_outputs: int
    sites: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def num_state(self) -> int:
        return sum(len(names) for _, names in self.sites)

    @property
    def takes_mask(self) -> bool:
        return self.prefill.input_name("attention_mask") is not None

    def to_json(self) -> str:
        def graph(g: GraphSignature) -> dict[str, Any]:
            return {"inputs": list(g.inputs), "outputs": list(g.outputs)}

        return json.dumps(
            {
                "format": DECODE_FORMAT,
                "kind": _KIND,
                "prefill": graph(self.prefill),
                "step": graph(self.step),
                "logits": self.logits,
                "num_outputs": self.num_outputs,
                "num_state": self.num_state,
                "sites": [{"name": name, "state": list(names)} for name, names in self.sites],
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str) -> DecodeSignature:
        """Parse and check ``decode.json`` as :func:`export_decode` writes it.

        Raises:
            OnnxSignatureError: anything else (malformed JSON, another format, an unknown field,
                role or dtype, a role missing or repeated, counts that disagree).
        """
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as exc:
            raise OnnxSignatureError(f"not valid JSON: {str(exc)[:200]}") from None
        _fields(
            data,
            "the signature",
            required={
                "format",
                "kind",
                "prefill",
                "step",
                "logits",
                "num_outputs",
                "num_state",
                "sites",
            },
        )
        if data["format"] != DECODE_FORMAT or data["kind"] != _KIND:
            raise OnnxSignatureError(
                f"format {data['format']!r} of kind {data['kind']!r} is not {DECODE_FORMAT} of "
                f"{_KIND!r}, the one this version of attnrewrite reads; export the model again "
                "with it"
            )
        sites = data["sites"]
        if not isinstance(sites, list):
            raise OnnxSignatureError("'sites' must be a list")
        parsed_sites = []
        for i, site in enumerate(sites):
            _fields(site, f"site {i}", required={"name", "state"})
            names = site["state"]
            if not isinstance(site["name"], str) or not (
                isinstance(names, list) and all(isinstance(n, str) for n in names)
            ):
                raise OnnxSignatureError(f"site {i}: a name and a list of state names (strings)")
            parsed_sites.append((site["name"], tuple(names)))
        num_state = sum(len(names) for _, names in parsed_sites)
        if type(data["num_state"]) is not int or data["num_state"] != num_state:
            raise OnnxSignatureError(
                f"'num_state' is {data['num_state']!r} but the sites name {num_state} states"
            )
        prefill = _graph(data["prefill"], "prefill", num_state)
        step = _graph(data["step"], "step", num_state)
        logits, num_outputs = data["logits"], data["num_outputs"]
        for name, g in (("prefill", prefill), ("step", step)):
            outputs = [r for r in g.outputs if r["role"] == "output"]
            if type(num_outputs) is not int or len(outputs) != num_outputs:
                raise OnnxSignatureError(
                    f"{name}: 'num_outputs' is {num_outputs!r} but {len(outputs)} outputs have "
                    "the role 'output'"
                )
            if (
                type(logits) is not int
                or not 0 <= logits < len(g.outputs)
                or (g.outputs[logits]["role"] != "output")
            ):
                raise OnnxSignatureError(
                    f"{name}: 'logits' ({logits!r}) must be the index of an output with the role "
                    "'output'"
                )
        dtypes = [
            _by_state_index(prefill.outputs, "dtype"),
            _by_state_index(step.inputs, "dtype"),
            _by_state_index(step.outputs, "dtype"),
        ]
        if not dtypes[0] == dtypes[1] == dtypes[2]:
            raise OnnxSignatureError(
                "the state's dtypes differ between the prefill outputs, the step inputs and the "
                "step outputs"
            )
        return cls(prefill, step, logits, num_outputs, tuple(parsed_sites))


def _fields(data: Any, where: str, required: set[str]) -> None:
    """``data`` is an object with exactly the fields ``required``."""
    if not isinstance(data, dict):
        raise OnnxSignatureError(f"{where}: expected an object, got {type(data).__name__}")
    missing = sorted(required - set(data))
    unknown = sorted(set(data) - required)
    if missing or unknown:
        said = [f"missing {', '.join(map(repr, missing))}"] if missing else []
        said += [f"unknown field(s) {', '.join(map(repr, unknown))}"] if unknown else []
        raise OnnxSignatureError(
            f"{where}: {'; '.join(said)} (a decode signature holds only the fields "
            "export_onnx(..., decode=True) writes)"
        )


def _graph(data: Any, which: str, num_state: int) -> GraphSignature:
    _fields(data, which, required={"inputs", "outputs"})
    inputs, outputs = data["inputs"], data["outputs"]
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise OnnxSignatureError(f"{which}: 'inputs' and 'outputs' must be lists")
    input_roles = set(MODEL_ROLES) | {"constant"}
    if which == "step":
        input_roles |= set(_STEP_ROLES)
    for i, record in enumerate(inputs):
        _record(record, f"{which} input {i}", input_roles, num_state if which == "step" else 0)
    for i, record in enumerate(outputs):
        _record(record, f"{which} output {i}", {"output"}, num_state)
    roles = [r["role"] for r in inputs if r["role"] != "constant"]
    repeated = sorted({r for r in roles if roles.count(r) > 1})
    if repeated:
        raise OnnxSignatureError(f"{which}: role(s) {', '.join(repeated)} given more than once")
    needed = ["input_ids"] + (list(_STEP_ROLES) if which == "step" else [])
    states = [f"state_{i}" for i in range(num_state)]
    for where, present, wanted in (
        ("inputs", roles, needed + (states if which == "step" else [])),
        ("outputs", [r["role"] for r in outputs], states),
    ):
        missing = [r for r in wanted if r not in present]
        if missing:
            raise OnnxSignatureError(f"{which} {where}: none has the role(s) {', '.join(missing)}")
    out_roles = [r["role"] for r in outputs if r["role"] != "output"]
    names = [r["name"] for r in [*inputs, *outputs] if "name" in r]
    if len(out_roles) != len(set(out_roles)) or len(names) != len(set(names)):
        raise OnnxSignatureError(f"{which}: a state role or a name is used more than once")
    return GraphSignature(tuple(inputs), tuple(outputs))


def _record(record: Any, where: str, roles: set[str], num_state: int) -> None:
    if isinstance(record, dict) and record.get("role") == "constant":
        _fields(record, where, required={"role", "value"})
        if not isinstance(record["value"], (type(None), bool, int, float, str)):
            raise OnnxSignatureError(f"{where}: a constant's 'value' must be a JSON scalar")
        return
    _fields(record, where, required={"role", "name", "dtype", "shape"})
    role = record["role"]
    state = isinstance(role, str) and _STATE_ROLE.fullmatch(role)
    if not isinstance(role, str) or not (role in roles or (state and int(role[6:]) < num_state)):
        allowed = sorted(roles) + ([f"state_0 ... state_{num_state - 1}"] if num_state else [])
        raise OnnxSignatureError(
            f"{where}: unknown role {role!r}; the roles here are {', '.join(allowed)}"
        )
    if not isinstance(record["name"], str) or not record["name"]:
        raise OnnxSignatureError(f"{where}: 'name' must be the ONNX value's name")
    if not isinstance(record["dtype"], str) or record["dtype"] not in _DTYPES:
        raise OnnxSignatureError(
            f"{where}: unknown dtype {record['dtype']!r}; a decode signature names one of "
            f"{', '.join(_DTYPES)}"
        )
    shape = record["shape"]
    if shape is not None and not (
        isinstance(shape, list)
        and all(isinstance(d, str) or (type(d) is int and d >= 0) for d in shape)
    ):
        raise OnnxSignatureError(f"{where}: 'shape' must be a list of sizes and axis names")


# -- export ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodeExport:
    """What :func:`export_decode` wrote.

    Attributes:
        directory: the folder holding the three files.
        prefill, step: the :class:`OnnxExport` record of each graph.
        signature: the :class:`DecodeSignature` written as ``decode.json``.
        notes: what the caller should know (inputs the graphs do not read...).
    """

    directory: Path
    prefill: OnnxExport
    step: OnnxExport
    signature: DecodeSignature
    notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Example:
    """One call of a decode graph, recorded from the generation loop."""

    flat: list[Any]  # the graph's flat inputs (model inputs, then offset, mask_offset, state)
    roles: list[str]  # one per flat input
    outputs: list[Any]  # the graph's flat outputs (model outputs, then state)


def _example_prompt(model: Any) -> tuple[Tensor, Tensor]:
    """Token ids and mask shaped like the captured example, with a batch of at least 2 that
    differs from the length (so neither axis is specialised nor taken for the other)."""
    args, kwargs = model.example_inputs
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        raise OnnxExportError("decode export needs the captured example's token ids (B, N)")
    mask = kwargs.get("attention_mask")
    mask = torch.ones_like(ids) if not isinstance(mask, Tensor) else mask
    batch = max(2, ids.shape[0])
    if batch == ids.shape[1]:
        batch += 1
    rows = torch.arange(batch) % ids.shape[0]
    return ids[rows], mask[rows]


def _model_roles(flat: list[Any], ids: Tensor, mask: Tensor, positions: Tensor) -> list[str]:
    """The role of each of the model's flat inputs, by identity with what the loop passed.

    ``Decoder._flat`` places the token ids, the mask and the positions it is given, and builds
    only ``cache_position`` itself (the model's other tensor inputs are refused by the decoder).
    """
    roles = []
    for leaf in flat:
        if not isinstance(leaf, Tensor):
            roles.append("constant")
        elif leaf is ids:
            roles.append("input_ids")
        elif leaf is mask:
            roles.append("attention_mask")
        elif leaf is positions:
            roles.append("position_ids")
        else:
            roles.append("cache_position")
    taken = [r for r in roles if r != "constant"]
    if len(taken) != len(set(taken)) or "input_ids" not in taken:
        raise OnnxExportError(
            f"cannot tell the decoder's inputs apart (roles {roles}); decode export needs the "
            "token ids once, and attention_mask, position_ids, cache_position at most once"
        )
    return roles


def _record_examples(decoder: Decoder, ids: Tensor, mask: Tensor) -> dict[str, _Example]:
    """Run the shared generation loop for two tokens, recording each graph's call."""
    plan = decoder.plan
    n = plan.num_outputs
    seen: dict[str, _Example] = {}

    def prefill(ids: Tensor, mask: Tensor, positions: Tensor, start: int):
        flat = decoder._flat(ids, mask, positions, start)
        outs = list(plan.prefill(*flat))
        seen["prefill"] = _Example(flat, _model_roles(flat, ids, mask, positions), outs)
        return decoder._logits(outs[:n])[:, -1], outs[n:]

    def step(state, ids, mask, positions, start, *, offset, counted):
        model_flat = decoder._flat(ids, mask, positions, start)
        flat = [*model_flat, offset, counted, *state]
        roles = [*_model_roles(model_flat, ids, mask, positions), *_STEP_ROLES]
        roles += [f"state_{i}" for i in range(len(state))]
        outs = list(plan.step(*flat))
        seen["step"] = _Example(flat, roles, outs)
        return decoder._logits(outs[:n])[:, -1], outs[n:]

    with torch.no_grad():
        for _ in decode_loop(prefill, step, ids, mask, max_new_tokens=2):
            pass
    return seen


def _logits_index(decoder: Decoder, outputs: list[Any]) -> int:
    """Index of the logits among the tensor outputs (found by identity)."""
    logits = decoder._logits(outputs)
    tensors = [x for x in outputs if isinstance(x, Tensor)]
    for i, x in enumerate(tensors):
        if x is logits:
            return i
    raise OnnxExportError("the decoder's logits are not one of the model's output tensors")


def _axis_names(example: _Example, batch: int, prefill: bool) -> list[dict[int, str]]:
    """What each dynamic axis of a decode graph's tensor inputs is, one dict per tensor.

    ``batch`` for every batch axis; in the prefill graph ``sequence`` for the prompt's axis; in
    the step graph the token axis stays 1 and, of the state, the axes a step grows (compared
    between the state a step takes and the one it returns) are ``past``.
    """
    num_state = sum(r.startswith("state_") for r in example.roles)
    new_state = example.outputs[len(example.outputs) - num_state :]
    names: list[dict[int, str]] = []
    for leaf, role in zip(example.flat, example.roles, strict=True):
        if not isinstance(leaf, Tensor):
            continue
        axes: dict[int, str] = {}
        if role == "cache_position":
            if prefill:
                axes[0] = "sequence"
        elif leaf.dim() >= 1 and leaf.shape[0] == batch:
            axes[0] = "batch"
        if prefill and role in MODEL_ROLES and role != "cache_position" and leaf.dim() >= 2:
            axes[1] = "sequence"
        if role.startswith("state_"):
            after = new_state[int(role[6:])]
            axes.update({d: "past" for d in range(leaf.dim()) if leaf.shape[d] != after.shape[d]})
        names.append(axes)
    return names


def _dynamic_shapes(axis_names: list[dict[int, str]]) -> tuple[Any, ...]:
    # Dim.AUTO rather than named Dims: a named Dim makes torch.export prove every guard it
    # meets for all sizes, and some it cannot (a min() of strides on the key/value cache's
    # length), while the sizes decoding feeds are all valid. The names are put back on the ONNX
    # axes afterwards (_name_axes).
    auto = torch.export.Dim.AUTO
    return (tuple({d: auto for d in axes} or None for axes in axis_names),)


def _name_axes(model: Any, axis_names: list[dict[int, str]]) -> None:
    """Rename the exporter's size symbols (``s26``) after what the axes are (``batch``), on the
    graph's inputs and on every value whose shape mentions them (``s21 + 1`` -> ``past + 1``).

    A symbol that stands for two kinds of axes keeps its name.
    """
    from onnxscript import ir

    mapping: dict[str, str] = {}
    ambiguous: set[str] = set()
    for value, axes in zip(model.graph.inputs, axis_names, strict=True):
        for axis, name in axes.items():
            dim = value.shape[axis] if value.shape is not None else None
            if isinstance(dim, ir.SymbolicDim) and isinstance(dim.value, str):
                if mapping.setdefault(dim.value, name) != name:
                    ambiguous.add(dim.value)
    for symbol in ambiguous:
        del mapping[symbol]
    if not mapping:
        return
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, mapping)) + r")\b")

    def renamed(value: Any) -> None:
        if value is None or value.shape is None:
            return
        dims = [
            ir.SymbolicDim(pattern.sub(lambda m: mapping[m.group(1)], d.value))
            if isinstance(d, ir.SymbolicDim) and isinstance(d.value, str)
            else d
            for d in value.shape
        ]
        value.shape = ir.Shape(dims)

    for value in model.graph.inputs:
        renamed(value)
    for node in model.graph:
        for value in node.outputs:
            renamed(value)


def _json_scalar(value: Any) -> Any:
    """A constant argument as JSON: itself when JSON has it, else its ``repr`` (never read back
    as anything but text)."""
    return value if isinstance(value, (type(None), bool, int, float, str)) else repr(value)


def _shape_of(value: Any) -> list[int | str]:
    dims = value.type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def _export_graph(
    gm: nn.Module,
    example: _Example,
    names: list[str],
    output_names: list[str],
    num_model_outputs: int,
    axis_names: list[dict[int, str]],
    path: Path,
    opset: int | None,
    report: str,
) -> tuple[OnnxExport, GraphSignature]:
    """Export one decode graph; returns its record and its part of the signature."""
    structure = pytree.tree_structure((tuple(example.flat), {}))
    tensors = tuple(x for x in example.flat if isinstance(x, Tensor))
    flat = _FlatCall(gm, list(example.flat), structure).eval()
    what = f"the decode {path.stem} graph"
    program = capture_program(
        flat,
        tensors,
        _dynamic_shapes(axis_names),
        what,
        hint="The eager decoder runs this graph (rw.generate); report the model and variant.",
    )
    onnx_program = translate_program(program, tensors, names, output_names, opset, what)
    _name_axes(onnx_program.model, axis_names)
    onnx_program.model.metadata_props[REPORT_KEY] = report
    proto, external = save_checked(onnx_program, program, path, what)
    graph_inputs = {v.name: v for v in proto.graph.input}
    graph_outputs = {v.name: v for v in proto.graph.output}
    inputs: list[dict[str, Any]] = []
    supply = iter(names)
    for leaf, role in zip(example.flat, example.roles, strict=True):
        if not isinstance(leaf, Tensor):
            inputs.append({"role": "constant", "value": _json_scalar(leaf)})
            continue
        name = next(supply)
        value = graph_inputs.get(name)
        inputs.append(
            {
                "role": role,
                "name": name,
                "dtype": _dtype_name(leaf.dtype),
                "shape": _shape_of(value) if value is not None else None,
            }
        )
    out_tensors = [x for x in example.outputs if isinstance(x, Tensor)]
    outputs = []
    for i, (name, x) in enumerate(zip(output_names, out_tensors, strict=True)):
        outputs.append(
            {
                "role": "output" if i < num_model_outputs else f"state_{i - num_model_outputs}",
                "name": name,
                "dtype": _dtype_name(x.dtype),
                "shape": _shape_of(graph_outputs[name]),
            }
        )
    record = _export_record(path, proto, output_names, None, external)
    return record, GraphSignature(tuple(inputs), tuple(outputs))


def export_decode(model: Any, directory: str | Path, *, opset: int | None = None) -> DecodeExport:
    """Export a rewritten causal decoder for generation in ONNX Runtime (see the module doc).

    Args:
        model: a :class:`~attnrewrite.rewriter.rewrite.RewrittenModel` of a causal decoder,
            captured with ``input_ids`` (and ``attention_mask``).
        directory: the folder to write ``prefill.onnx``, ``step.onnx`` and ``decode.json`` to.
        opset: the ONNX opset; default: the exporter's.

    Returns:
        A :class:`DecodeExport` record.

    Raises:
        DecodeError: the model cannot be decoded one token at a time (names the site or node).
        OnnxExportError: ``torch.export`` or the ONNX translation of a graph failed.
    """
    from attnrewrite.rewriter.rewrite import RewrittenModel

    if not isinstance(model, RewrittenModel):
        raise OnnxExportError(
            f"decode=True exports a RewrittenModel of a causal decoder (attnrewrite.rewrite(...)), "
            f"got {type(model).__name__}"
        )
    decoder = model.decoder()
    plan = decoder.plan
    ids, mask = _example_prompt(model)
    examples = _record_examples(decoder, ids, mask)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    model_outputs = examples["prefill"].outputs[: plan.num_outputs]
    logits = _logits_index(decoder, model_outputs)
    num_tensor_outputs = sum(isinstance(x, Tensor) for x in model_outputs)
    output_names = ["logits" if i == logits else f"output_{i}" for i in range(num_tensor_outputs)]
    state_keys = [
        f"{site}.{name}"
        for site, names in zip(plan.sites, plan.state_names, strict=True)
        for name in names
    ]
    report = str(model.report)
    exported: dict[str, OnnxExport] = {}
    graphs: dict[str, GraphSignature] = {}
    for which, gm, file in (
        ("prefill", plan.prefill, PREFILL_FILE),
        ("step", plan.step, STEP_FILE),
    ):
        example = examples[which]
        names = [
            f"past.{state_keys[int(role[6:])]}" if role.startswith("state_") else role
            for leaf, role in zip(example.flat, example.roles, strict=True)
            if isinstance(leaf, Tensor)
        ]
        outs = output_names + [f"present.{key}" for key in state_keys]
        axis_names = _axis_names(example, ids.shape[0], prefill=which == "prefill")
        exported[which], graphs[which] = _export_graph(
            gm,
            example,
            names,
            outs,
            num_tensor_outputs,
            axis_names,
            directory / file,
            opset,
            report,
        )
    signature = DecodeSignature(
        graphs["prefill"],
        graphs["step"],
        logits,
        num_tensor_outputs,
        tuple(zip(plan.sites, plan.state_names, strict=True)),
    )
    # What is written is checked the way a session reads it.
    signature = DecodeSignature.from_json(signature.to_json())
    (directory / SIGNATURE_FILE).write_text(signature.to_json() + "\n")
    notes = tuple(
        f"{which}: the graph does not read its input {r['name']!r}; a session feeds it no value"
        for which, graph in graphs.items()
        for r in graph.inputs
        if r["role"] != "constant" and r["shape"] is None
    )
    return DecodeExport(directory, exported["prefill"], exported["step"], signature, notes)


# -- the session -----------------------------------------------------------------------------------


class OnnxDecodeSession(Generation):
    """Generation over the ONNX files :func:`export_decode` wrote: prefill and step run in ONNX
    Runtime, the loop (greedy or sampled, end-of-sequence tokens) is the PyTorch decoder's own.
    Token ids and logits are torch tensors; they cross to NumPy at each graph call.

    Args:
        directory: the folder with ``prefill.onnx``, ``step.onnx`` and ``decode.json``.
        providers, session_options: as for :func:`~attnrewrite.backends.onnx.onnx_session`.

    Attributes:
        signature: the :class:`DecodeSignature` read from ``decode.json``.
        prefill_session, step_session: the two ``onnxruntime.InferenceSession`` objects.

    Raises:
        OnnxSignatureError: ``decode.json`` is missing, malformed, or disagrees with the graphs.
        BackendUnavailableError: a requested provider is not installed or could not start.
    """

    def __init__(
        self, directory: str | Path, providers: Any = None, *, session_options: Any = None
    ) -> None:
        from attnrewrite.backends.onnx.session import OnnxSession

        self.directory = Path(directory)
        self.signature = _read_signature(self.directory / SIGNATURE_FILE)
        sessions = {
            which: OnnxSession(
                self.directory / file, providers, session_options=session_options
            ).session
            for which, file in (("prefill", PREFILL_FILE), ("step", STEP_FILE))
        }
        self.prefill_session, self.step_session = sessions["prefill"], sessions["step"]
        self._graphs: dict[str, tuple[Any, GraphSignature, set[str]]] = {}
        for which, session in sessions.items():
            graph = getattr(self.signature, which)
            _check_graph(self.directory / f"{which}.onnx", session, graph)
            # Inputs the exporter found unused are not graph inputs; they are not fed.
            read = {i.name for i in session.get_inputs()}
            self._graphs[which] = (session, graph, read)
        self.providers = self.prefill_session.get_providers()
        self.verified = False

    def __repr__(self) -> str:
        return f"OnnxDecodeSession({str(self.directory)!r}, providers={self.providers})"

    # -- one graph call ----------------------------------------------------------------------------
    def _run(self, which: str, values: dict[str, Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Feed ``values`` (by role) to the prefill or step graph; return (last-position logits,
        state)."""
        session, graph, read = self._graphs[which]
        feeds = {
            r["name"]: values[r["role"]].to(_DTYPES[r["dtype"]]).detach().cpu().numpy()
            for r in graph.inputs
            if r["role"] != "constant" and r["name"] in read
        }
        names = [r["name"] for r in graph.outputs]
        arrays = dict(zip(names, session.run(names, feeds), strict=True))
        device = values["input_ids"].device
        logits = torch.from_numpy(arrays[names[self.signature.logits]]).to(device)
        state = [torch.from_numpy(arrays[n]).to(device) for n in graph.state_outputs()]
        return logits[:, -1], state

    @staticmethod
    def _model_values(
        ids: Tensor, mask: Tensor, positions: Tensor, start: int
    ) -> dict[str, Tensor]:
        cache_position = torch.arange(start, start + ids.shape[1], device=ids.device)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "cache_position": cache_position,
        }

    def _prefill(
        self, ids: Tensor, mask: Tensor, positions: Tensor, start: int
    ) -> tuple[Tensor, list[Tensor]]:
        values = self._model_values(ids, mask, positions, start)
        return self._run("prefill", values)

    def _step(
        self,
        state: list[Tensor],
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        start: int,
        *,
        offset: Tensor,
        counted: Tensor,
    ) -> tuple[Tensor, list[Tensor]]:
        values = self._model_values(ids, mask, positions, start)
        values.update(offset=offset, mask_offset=counted)
        values.update({f"state_{i}": x for i, x in enumerate(state)})
        return self._run("step", values)

    def _verify(
        self,
        ids: Tensor,
        mask: Tensor,
        positions: Tensor,
        token: Tensor,
        last: Tensor,
        step_logits: Tensor,
    ) -> None:
        """The step graph's logits must equal the prefill graph's on the prompt plus the token."""
        want, _ = self._prefill(
            torch.cat([ids, token[:, None]], dim=1),
            torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1),
            torch.cat([positions, last[:, None]], dim=1),
            0,
        )
        tolerance = check_tolerance(want.dtype)
        want, got = want.double(), step_logits.double()
        error = ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
        if not error <= tolerance:
            raise DecodeError(
                f"in ONNX Runtime, the step graph does not reproduce the prefill graph (relative "
                f"error {error:.2e} on the first generated position) for {self.directory}: export "
                "again with the same attnrewrite version, and report it if it persists"
            )
        self.verified = True

    # -- generation --------------------------------------------------------------------------------
    @property
    def takes_mask(self) -> bool:  # type: ignore[override]
        return self.signature.takes_mask

    def _runners(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        return self._prefill, self._step


def _read_signature(path: Path) -> DecodeSignature:
    try:
        if not path.is_file():
            raise OnnxSignatureError(f"there is no {SIGNATURE_FILE} in {path.parent}")
        if path.stat().st_size > _MAX_SIGNATURE_BYTES:
            raise OnnxSignatureError(f"it is over {_MAX_SIGNATURE_BYTES} bytes")
        return DecodeSignature.from_json(path.read_text())
    except OnnxSignatureError as exc:
        raise OnnxSignatureError(
            f"{path} is not a decode signature written by export_onnx(..., decode=True): {exc}. "
            "Export the model again."
        ) from None


def _check_graph(path: Path, session: Any, graph: GraphSignature) -> None:
    """The ONNX graph takes only inputs the signature names and returns what it lists."""
    named = {r["name"] for r in graph.inputs if r["role"] != "constant"}
    extra = sorted(i.name for i in session.get_inputs() if i.name not in named)
    outputs = {o.name for o in session.get_outputs()}
    missing = sorted(r["name"] for r in graph.outputs if r["name"] not in outputs)
    if extra or missing:
        raise OnnxSignatureError(
            f"{path} does not match {SIGNATURE_FILE}: "
            + "; ".join(
                ([f"inputs not in the signature: {', '.join(extra)}"] if extra else [])
                + ([f"outputs the graph lacks: {', '.join(missing)}"] if missing else [])
            )
            + ". Export the model again."
        )
