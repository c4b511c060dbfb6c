"""Run an exported model with ONNX Runtime, called like the PyTorch model (:func:`onnx_session`).

Inputs are flattened and outputs rebuilt from the :class:`IOSignature` stored in the file. A file
is data: its output description may *name* a class (``transformers...BaseModelOutput``), but the
session never imports or constructs a class because a file names it. Outputs come back as
containers (tuple, list, dict, and :class:`OnnxOutputs`, a dict with attribute access, for named
records such as a Hugging Face ``ModelOutput``), and as a class of the model's own only when the
caller passes that class in ``output_classes``; the stored name then picks among those classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils import _pytree as pytree

from attnrewrite.backends.onnx.signature import (
    METADATA_KEY,
    IOSignature,
    OnnxSignatureError,
    _same_constant,
    _show_constant,
    qualified_name,
)
from attnrewrite.errors import BackendUnavailableError, InputMismatchError

if TYPE_CHECKING:
    from attnrewrite.backends.onnx.decode import OnnxDecodeSession

#: What ``output_classes`` takes: classes (matched by ``module.QualName``), or a mapping from the
#: name stored in the file to the class to build (for a class that has moved since the export).
OutputClasses = Iterable[type] | Mapping[str, type]

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
}


class OnnxOutputs(dict):
    """A named record of outputs rebuilt without their original class (a Hugging Face
    ``ModelOutput``, a namedtuple...): a dict that also answers attributes and integer positions,
    like a ``ModelOutput`` does. Pass the class in ``output_classes`` to get the class itself."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, int):
            return list(self.values())[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(self.values())


def _resolve_providers(providers: Any) -> list[Any]:
    import onnxruntime as ort

    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, (str, tuple)):
        providers = [providers]
    available = ort.get_available_providers()
    resolved: list[Any] = []
    for entry in providers:
        name, options = entry if isinstance(entry, tuple) else (entry, None)
        name = _PROVIDER_ALIASES.get(str(name).lower(), name)
        if name not in available:
            hint = (
                " (install onnxruntime-gpu built for your CUDA version, and use a machine with "
                "an NVIDIA GPU)"
                if name == "CUDAExecutionProvider"
                else ""
            )
            raise BackendUnavailableError(
                f"ONNX Runtime execution provider {name!r} is not available here{hint}; "
                f"available: {', '.join(available)}"
            )
        resolved.append((name, options) if options else name)
    names = [p[0] if isinstance(p, tuple) else p for p in resolved]
    if "CPUExecutionProvider" not in names:
        # Operators an accelerator provider does not implement fall back to the CPU.
        resolved.append("CPUExecutionProvider")
    return resolved


def _class_table(output_classes: OutputClasses | type | None) -> dict[str, type]:
    """Stored class name -> class, from what the caller passed as ``output_classes``."""
    if output_classes is None:
        return {}
    if isinstance(output_classes, type):
        output_classes = [output_classes]
    pairs = (
        output_classes.items()
        if isinstance(output_classes, Mapping)
        else ((qualified_name(c) if isinstance(c, type) else "", c) for c in output_classes)
    )
    table: dict[str, type] = {}
    for name, cls in pairs:
        if not isinstance(cls, type) or not isinstance(name, str):
            raise TypeError(
                "output_classes takes classes (e.g. [BaseModelOutput]) or a mapping from the "
                f"stored class name to a class; got {cls!r}"
            )
        table[name] = cls
    return table


class OnnxSession:
    """An ONNX Runtime session called like the exported model: torch tensors in and out.

    Inputs are flattened as at export (keyword arguments by name, in any order); arguments that
    were not tensors at export (``use_cache=False``...) were fixed there and must be passed with
    the same value. The output has the model's structure, in containers: tuples, lists and dicts as
    such, and a named record (a Hugging Face ``ModelOutput``, a namedtuple, a registered
    dataclass) as an :class:`OnnxOutputs` dict that also answers attributes and positions
    (``out.last_hidden_state``, ``out[0]``). It comes back as its own class only when that class is
    in ``output_classes``: the file stores the class's name, and loading a file never imports or
    constructs a class because the file names it. Outputs live on the device of the first input
    tensor.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        signature: the :class:`IOSignature` stored at export, or ``None`` for an ONNX file not
            written by :func:`~attnrewrite.backends.onnx.export.export_onnx` (then inputs are
            taken positionally or by ONNX input name and the outputs returned as a tuple).
            ``signature.class_names`` lists the output classes the file names.
        output_classes: stored class name -> the class outputs of that name are rebuilt as.
        providers: the execution providers in use.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Any = None,
        *,
        session_options: Any = None,
        output_classes: OutputClasses | type | None = None,
    ) -> None:
        import onnxruntime as ort

        self.output_classes = _class_table(output_classes)
        requested = _resolve_providers(providers)
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), sess_options=session_options, providers=requested
        )
        self.providers = self.session.get_providers()
        for entry in requested:
            name = entry[0] if isinstance(entry, tuple) else entry
            if name not in self.providers:
                # ORT falls back to the CPU quietly when a provider's libraries fail to load.
                raise BackendUnavailableError(
                    f"ONNX Runtime could not start execution provider {name!r} (it fell back to "
                    f"{', '.join(self.providers)}); check its CUDA/cuDNN libraries"
                )
        self._onnx_inputs = [i.name for i in self.session.get_inputs()]
        self._onnx_outputs = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.signature = self._read_signature(meta[METADATA_KEY]) if METADATA_KEY in meta else None

    def _read_signature(self, text: str) -> IOSignature:
        try:
            signature = IOSignature.from_json(text)
            missing = sorted(set(signature.output_names) - set(self._onnx_outputs))
            if missing:
                raise OnnxSignatureError(f"it names outputs the graph lacks: {', '.join(missing)}")
        except OnnxSignatureError as exc:
            raise OnnxSignatureError(
                f"the {METADATA_KEY!r} metadata of {self.path} is not what export_onnx writes: "
                f"{exc}. Export the model again, or remove that metadata_props entry to run the "
                "file with positional inputs and tuple outputs."
            ) from None
        return signature

    def __repr__(self) -> str:
        return f"OnnxSession({str(self.path)!r}, providers={self.providers})"

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        feeds, device = self._feeds(args, kwargs)
        arrays = self.session.run(self._onnx_outputs, feeds)
        tensors = {
            name: torch.from_numpy(a).to(device)
            for name, a in zip(self._onnx_outputs, arrays, strict=True)
        }
        if self.signature is None:
            return tuple(tensors.values())
        return _rebuild(self.signature.output, tensors, self.output_classes)

    def _feeds(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[dict[str, Any], torch.device]:
        if self.signature is None:
            named = dict(zip(self._onnx_inputs, args, strict=False))
            named.update(kwargs)
            tensors = [x for x in named.values() if isinstance(x, torch.Tensor)]
            device = tensors[0].device if tensors else torch.device("cpu")
            return {k: _numpy(v) for k, v in named.items() if k in self._onnx_inputs}, device
        signature = self.signature
        leaves, structure = pytree.tree_flatten((tuple(args), dict(sorted(kwargs.items()))))
        if repr(structure) != signature.input_structure or len(leaves) != len(signature.inputs):
            raise InputMismatchError(
                f"this ONNX model was exported for inputs {signature.describe_inputs()} "
                f"(structure {signature.input_structure}); it was called with structure "
                f"{structure!r}. Pass the same positional and keyword arguments as at export."
            )
        feeds: dict[str, Any] = {}
        device = None
        for leaf, value in zip(signature.inputs, leaves, strict=True):
            if "input" not in leaf:
                if isinstance(value, torch.Tensor) or not _same_constant(leaf, value):
                    raise InputMismatchError(
                        f"argument {leaf.get('name', '?')!r} is {value!r}, but the export fixed it "
                        f"to {_show_constant(leaf)}: non-tensor arguments are constants of an ONNX "
                        "model; pass the exported value, or export again with the value you need."
                    )
                continue
            name = leaf["input"]
            if not isinstance(value, torch.Tensor):
                raise InputMismatchError(
                    f"input {name!r} must be a tensor (rank {leaf['rank']}, {leaf['dtype']}), got "
                    f"{type(value).__name__}"
                )
            dtype = str(value.dtype).removeprefix("torch.")
            if dtype != leaf["dtype"] or value.dim() != leaf["rank"]:
                raise InputMismatchError(
                    f"input {name!r} was exported as rank {leaf['rank']} {leaf['dtype']}, got rank "
                    f"{value.dim()} {dtype}; convert it (e.g. .to(torch.{leaf['dtype']}))."
                )
            device = device or value.device
            if name in self._onnx_inputs:  # an input the graph does not read was dropped
                feeds[name] = _numpy(value)
        return feeds, device or torch.device("cpu")


def _numpy(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return value


def _rebuild(
    desc: dict[str, Any], tensors: dict[str, torch.Tensor], classes: Mapping[str, type]
) -> Any:
    """The output described by ``desc`` (checked by :meth:`IOSignature.from_json`).

    Only containers are built, and classes from ``classes`` (the caller's); the class name in
    ``desc`` is a key into that table, nothing more.
    """
    if "output" in desc:
        return tensors[desc["output"]]
    if "constant" in desc:
        return desc["constant"]
    if "constant_repr" in desc:
        return desc["constant_repr"]
    items = [_rebuild(d, tensors, classes) for d in desc["items"]]
    kind = desc["kind"]
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return items
    if kind == "dict":
        return dict(zip(desc["keys"], items, strict=True))
    keys = desc.get("keys")
    cls = classes.get(desc["class"])
    if cls is not None:
        return _construct(cls, desc, items)
    if keys is None:
        return tuple(items)
    return OnnxOutputs(zip(keys, items, strict=True))


def _construct(cls: type, desc: dict[str, Any], items: list[Any]) -> Any:
    """An instance of the caller's class ``cls`` from the rebuilt fields."""
    keys = desc.get("keys")
    try:
        if desc.get("namedtuple") or keys is None:
            return cls(*items)
        return cls(**dict(zip(keys, items, strict=True)))
    except Exception as exc:
        fields = ", ".join(keys) if keys is not None else f"{len(items)} positional values"
        raise OnnxSignatureError(
            f"output_classes maps {desc['class']!r} to {qualified_name(cls)}, which could not be "
            f"built from the exported fields ({fields}): {type(exc).__name__}: {exc}. Pass the "
            "class the model returned, or leave it out to get an OnnxOutputs record."
        ) from exc


def onnx_session(
    path: str | Path,
    providers: Any = None,
    *,
    session_options: Any = None,
    output_classes: OutputClasses | type | None = None,
) -> OnnxSession | OnnxDecodeSession:
    """An ONNX Runtime session for a file written by ``export_onnx``, called like the model.

    On a directory written by ``export_onnx(rw, dir, decode=True)``, an
    :class:`~attnrewrite.backends.onnx.decode.OnnxDecodeSession` instead, which generates:
    ``onnx_session(dir).generate(input_ids, attention_mask, max_new_tokens=...)``.

    Outputs come back in containers: a Hugging Face ``ModelOutput`` (or another named record) as
    an :class:`OnnxOutputs` dict, so ``out.last_hidden_state``, ``out["last_hidden_state"]`` and
    ``out[0]`` work. For the real class, pass it: ``onnx_session(path,
    output_classes=[BaseModelOutput])``. The file only stores the class's name
    (``session.signature.class_names``), which selects among the classes passed; nothing named in
    a file is ever imported or constructed.

    Args:
        path: the ``.onnx`` file, or a decode directory.
        providers: ``None`` for the CPU; ``"cuda"`` (or ``"CUDAExecutionProvider"``), a list of
            provider names, or ``(name, options)`` pairs. The CPU provider is appended as the
            fallback for operators an accelerator does not implement.
        session_options: an ``onnxruntime.SessionOptions`` (thread counts, profiling...).
        output_classes: classes outputs may be rebuilt as, matched by ``module.QualName`` against
            the name stored at export; or a mapping from the stored name to a class (for a class
            that has moved). Default: none, containers only.

    Raises:
        BackendUnavailableError: a requested provider is not installed or could not start.
        OnnxSignatureError: the file's attnrewrite metadata is malformed (at load), or a class
            from ``output_classes`` cannot be built from the exported fields (at call).
    """
    if Path(path).is_dir():
        # A directory written by export_onnx(..., decode=True): generation, not one call.
        from attnrewrite.backends.onnx.decode import OnnxDecodeSession

        if output_classes is not None:
            raise TypeError(
                "output_classes applies to one exported model; a decode directory returns token "
                "ids (onnx_session(dir).generate(...))"
            )
        return OnnxDecodeSession(path, providers, session_options=session_options)
    return OnnxSession(
        path, providers, session_options=session_options, output_classes=output_classes
    )
