"""Capture a model as an ATen-level FX graph with ``torch.export`` (non-strict).

Every axis of every tensor input is exported as ``Dim.AUTO``: dynamic where the model allows
(batch, sequence length, image height and width...), specialised where it does not (a ``Linear``
fixes the feature width, a ``view(b, 8, ...)`` the length); ``torch.export`` decides. The capture
records each specialised input axis with the reason torch gives (the ShapeEnv's replacement and
where it was made) and every shape guard in terms of input axes, so that the rewritten model can
check its inputs against them and say which input and axis is wrong (``InputAxis``,
``ShapeGuards``). A size-0/1 example axis is always specialised by ``torch.export``.

Capture never changes the user's model: non-strict export runs ``forward`` with fake tensors, and
a forward that caches something on the module (``self.register_buffer("bias", ...)`` on first
call, ``self.cached = tensor``) would leave a fake tensor behind. Every submodule's parameters,
buffers and attributes are snapshotted before and restored after each export attempt. When the
forward did cache tensors while traced, ``torch.export`` records the registration as a buffer
mutation (unlifted onto the wrong placeholder), so the model is captured again from a copy whose
cache one real call on the example has built.

Hugging Face models default to ``use_cache=True`` and then return a ``DynamicCache``, which is not
an exportable output; when ``forward`` takes ``use_cache`` and the caller did not pass it, capture
sets it to ``False`` (see ``Captured.fixed_kwargs``) and says so in the notes.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import operator
import warnings
from collections.abc import Iterator
from typing import Any

import sympy
import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from attnrewrite.errors import CaptureError, InputMismatchError
from attnrewrite.passes import graph as G

KeyPath = tuple[Any, ...]


@dataclasses.dataclass(frozen=True)
class InputAxis:
    """One axis of one input tensor, as captured.

    Attributes:
        input: the input's name as the user passed it (``pixel_values``, ``x``, ``args[1]``...).
        path: the ``torch.utils._pytree`` key path of the tensor inside ``(args, kwargs)``.
        axis: the axis.
        size: its size in the example.
        reason: why ``torch.export`` specialised it (empty for a dynamic axis).
    """

    input: str
    path: KeyPath
    axis: int
    size: int
    reason: str = ""

    def describe(self) -> str:
        return f"input `{self.input}` axis {self.axis}"


@dataclasses.dataclass(frozen=True)
class ShapeGuards:
    """The shape facts a captured graph relies on, stated over input axes.

    Attributes:
        specialised: axes whose size is fixed to the example's.
        ranges: dynamic axes with the ``(low, high)`` sizes the graph accepts (``high`` ``None``
            when unbounded).
        relations: guards relating several sizes (``Eq(s0, s1)``, divisibility...) as sympy
            expressions over the symbols of ``symbols``.
        symbols: ``(symbol, input axis)`` for every dynamic input axis (one symbol may stand for
            several axes that the graph requires to be equal).
    """

    specialised: tuple[InputAxis, ...] = ()
    ranges: tuple[tuple[InputAxis, int, int | None], ...] = ()
    relations: tuple[sympy.Basic, ...] = ()
    symbols: tuple[tuple[sympy.Symbol, InputAxis], ...] = ()

    def violation(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], *, relations: bool = True
    ) -> str | None:
        """Why ``(args, kwargs)`` break a guard of the capture, or ``None`` when none is broken.

        ``relations=False`` checks only the fixed sizes (integer comparisons, cheap enough for
        every call); ranges and relations (sympy expressions) are for when the graph failed.
        """
        sizes = _sizes_by_path(args, kwargs)

        def size(axis: InputAxis) -> int | None:
            shape = sizes.get(axis.path)
            return shape[axis.axis] if shape is not None and axis.axis < len(shape) else None

        for axis in self.specialised:
            got = size(axis)
            if got is not None and got != axis.size:
                why = f" ({axis.reason})" if axis.reason else ""
                return (
                    f"{axis.describe()} has size {got}, but the graph was captured with it fixed "
                    f"to {axis.size}{why}"
                )
        if not relations:
            return None
        # Ranges are checked only once the graph failed: export's ranges start at 2 (0/1 are
        # specialised while tracing) but its graph still runs a batch of 1.
        for axis, low, high in self.ranges:
            got = size(axis)
            if got is not None and (got < low or (high is not None and got > high)):
                allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
                return f"{axis.describe()} has size {got}; the captured graph needs it {allowed}"
        values: dict[sympy.Symbol, tuple[int, InputAxis]] = {}
        for symbol, axis in self.symbols:
            got = size(axis)
            if got is None:
                continue
            if symbol in values and values[symbol][0] != got:
                first_size, first = values[symbol]
                return (
                    f"{first.describe()} (size {first_size}) and {axis.describe()} (size {got}) "
                    "must be equal: the captured graph uses one size for both"
                )
            values.setdefault(symbol, (got, axis))
        for relation in self.relations:
            free = relation.free_symbols
            if not free or not free <= values.keys():
                continue
            if relation.xreplace({s: sympy.Integer(values[s][0]) for s in free}) is sympy.false:
                named = relation.xreplace(
                    {
                        s: sympy.Symbol(f"{values[s][1].input}.shape[{values[s][1].axis}]")
                        for s in free
                    }
                )
                got = ", ".join(
                    f"{values[s][1].describe()} = {values[s][0]}"
                    for s in sorted(free, key=lambda s: s.name)
                )
                return f"the captured graph requires {named}, but {got}"
        return None


@dataclasses.dataclass
class Captured:
    """A captured graph module and how it was captured.

    ``kwargs`` are the keyword arguments the graph was captured with, including
    ``fixed_kwargs``: those capture chose because the caller had not passed them
    (``use_cache=False``); the graph only runs with those values.
    """

    graph_module: fx.GraphModule
    program: torch.export.ExportedProgram | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    dynamic: bool
    notes: list[str]
    fixed_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Inputs capture added and fills in when a call leaves them out (``position_ids``).
    default_kwargs: dict[str, str] = dataclasses.field(default_factory=dict)
    guards: ShapeGuards = dataclasses.field(default_factory=ShapeGuards)


# -- inputs -------------------------------------------------------------------------------------


def check_inputs(args: Any, kwargs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args is None and not kwargs:
        raise InputMismatchError(
            "example inputs are required to capture the model: pass args=(x,) and/or kwargs={...} "
            "with tensors shaped like real inputs (batch >= 2 keeps the batch size dynamic)"
        )
    if args is None:
        args = ()
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    return args, dict(kwargs or {})


def _is_tensor(x: Any) -> bool:
    return isinstance(x, torch.Tensor)


def _auto_dynamic(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``Dim.AUTO`` on the batch, sequence and spatial axes of every tensor input, keyed as
    ``torch.export`` binds them.

    ``torch.export`` keeps an axis dynamic unless the model forces its size (weights fix feature
    widths and channels), so batch, length and image height/width stay dynamic where they can.
    """
    auto = torch.export.Dim.AUTO

    def spec(x: Any) -> Any:
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        # Batch and sequence (axes 0, 1) everywhere; every axis of an image- or video-like
        # floating input (B, C, H, W[, ...]). The last axis of a (B, N, D) input is a feature
        # width its weights fix anyway: marking it costs export time for nothing (about +40%).
        axes = range(x.dim()) if x.is_floating_point() and x.dim() >= 4 else range(min(2, x.dim()))
        return dict.fromkeys(axes, auto)

    bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    return {name: pytree.tree_map(spec, value, is_leaf=_is_tensor) for name, value in bound.items()}


def _input_names(args: tuple[Any, ...], kwargs: dict[str, Any], forward: Any) -> dict[KeyPath, str]:
    """A readable name for every leaf of ``(args, kwargs)``: the parameter name it binds to."""
    try:
        params = list(inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]
    names = {}
    for path, _ in pytree.tree_flatten_with_path((args, kwargs))[0]:
        head, key, rest = path[0], path[1], path[2:]
        if head.idx == 0:
            index = key.idx
            base = positional[index] if index < len(positional) else f"args[{index}]"
        else:
            base = str(key.key)
        names[path] = base + pytree.keystr(rest)
    return names


def _sizes_by_path(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[KeyPath, tuple[int, ...]]:
    return {
        path: tuple(leaf.shape)
        for path, leaf in pytree.tree_flatten_with_path((args, kwargs))[0]
        if isinstance(leaf, torch.Tensor)
    }


# -- the user's model stays as it was ------------------------------------------------------------


class _ModuleState:
    """Every submodule's attributes, parameters and buffers, to put back after export.

    Non-strict export runs ``forward`` with fake tensors; a forward that caches a tensor on its
    module (x-transformers' ALiBi registers its bias buffer on first call) would leave a
    ``FakeTensor`` in the user's model and its next call would fail. Containers held in
    ``__dict__`` (``_parameters``, ``_buffers``, ``_modules``, plain lists and dicts) are restored
    in place, so references to them stay valid; tensors stay the same objects.
    """

    def __init__(self, model: nn.Module) -> None:
        self._saved = []
        for module in model.modules():
            attributes = dict(module.__dict__)
            contents = {name: _container_copy(value) for name, value in attributes.items()}
            contents = {name: saved for name, saved in contents.items() if saved is not None}
            self._saved.append((module, attributes, contents))
        self._versions = [
            (t, t._version)
            for t in (*model.parameters(), *model.buffers())
            if not isinstance(t, torch._subclasses.FakeTensor)
        ]

    def restore(self) -> list[str]:
        """Put everything back; returns the attributes the forward had set (empty if none)."""
        touched: list[str] = []
        for module, attributes, contents in self._saved:
            kind = type(module).__name__
            # Only tensors count as cached state; a call counter changing is harmless.
            for name in [n for n in module.__dict__ if n not in attributes]:
                if _holds_tensor(module.__dict__.pop(name)):
                    touched.append(f"{kind}.{name}")
            for name, value in attributes.items():
                now = module.__dict__.get(name, _MISSING)
                if now is not value:
                    module.__dict__[name] = value
                    if _holds_tensor(now):
                        touched.append(f"{kind}.{name}")
            for name, saved in contents.items():
                container = attributes[name]
                grown = _holds_tensor(container)
                if _restore_container(container, saved) and grown:
                    touched.append(f"{kind}.{name}")
        changed = [t for t, version in self._versions if t._version != version]
        if changed:
            # Non-strict export swaps parameters and buffers for fake tensors, so the real ones
            # are never written; a change means the model wrote them outside that mechanism.
            raise CaptureError(
                f"capturing the model wrote {len(changed)} of its parameters/buffers in place; "
                "attnrewrite never modifies the model, so it stops here. Capture a copy "
                "(copy.deepcopy(model)) if the forward must update its state."
            )
        return touched


_MISSING = object()


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple, set)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def _container_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return list(value.items())
    if isinstance(value, (list, set)):
        return list(value)
    return None


def _restore_container(container: Any, saved: list[Any]) -> bool:
    """Put ``saved`` back into ``container`` in place; whether it had changed."""
    if isinstance(container, dict):
        now = list(container.items())
        if len(now) == len(saved) and all(
            a[0] == b[0] and a[1] is b[1] for a, b in zip(now, saved)
        ):
            return False
        container.clear()
        container.update(saved)
        return True
    if isinstance(container, list):
        if len(container) == len(saved) and all(a is b for a, b in zip(container, saved)):
            return False
        container[:] = saved
        return True
    if isinstance(container, set) and container != set(saved):
        container.clear()
        container.update(saved)
        return True
    return False


def fake_tensors_in(model: nn.Module) -> list[str]:
    """Attributes of ``model`` (and its submodules, one container deep) holding fake tensors."""
    found = []
    for prefix, module in model.named_modules():
        for name, value in module.__dict__.items():
            leaves = (
                value.values()
                if isinstance(value, dict)
                else (value if isinstance(value, (list, tuple, set)) else [value])
            )
            if any(isinstance(v, torch._subclasses.FakeTensor) for v in leaves):
                found.append(f"{prefix}.{name}" if prefix else name)
    return found


# -- capture ------------------------------------------------------------------------------------


def _private_copy(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """The program's module with its own parameters and buffers (never the user's tensors), with
    grad-mode regions inlined (see :func:`inline_grad_mode_regions`)."""
    with warnings.catch_warnings():
        # torch's pytree specs warn about a deprecated isinstance check while being deep-copied.
        warnings.simplefilter("ignore", FutureWarning)
        gm = copy.deepcopy(program.module())
    inline_grad_mode_regions(gm)
    return gm


def inline_grad_mode_regions(gm: fx.GraphModule) -> int:
    """Inline ``wrap_with_set_grad_enabled`` regions (a ``with torch.no_grad():`` block inside the
    forward, which torch.export keeps as a higher-order op around a subgraph) into the graph,
    between ``torch._C._set_grad_enabled`` calls that set and then restore the grad mode.

    The computation and its grad mode are unchanged; what changes is that the passes see the ops
    inside (attention in a no-grad block, as in models that run recurrent cycles without
    gradient, is found and rewritten like any other). Returns how many regions were inlined.
    """
    hop = getattr(torch.ops.higher_order, "wrap_with_set_grad_enabled", None)
    graph, inlined = gm.graph, 0
    for node in list(graph.nodes):
        if hop is None or node.op != "call_function" or node.target is not hop:
            continue
        enabled, body, *operands = node.args
        sub = getattr(gm, str(body.target)) if body.op == "get_attr" else None
        if not isinstance(sub, fx.GraphModule) or not isinstance(enabled, bool):
            continue
        prefix = f"{body.target}_"
        env: dict[fx.Node, Any] = {}
        placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
        env.update(zip(placeholders, operands))
        with graph.inserting_before(node):
            before = graph.call_function(torch.is_grad_enabled)
            graph.call_function(torch._C._set_grad_enabled, (enabled,))
            outputs: Any = None
            for inner in sub.graph.nodes:
                if inner.op == "placeholder":
                    continue
                if inner.op == "output":
                    outputs = fx.map_arg(inner.args[0], env.__getitem__)
                    continue
                copied = graph.node_copy(inner, env.__getitem__)
                if inner.op in ("get_attr", "call_module"):
                    # the region's own attributes (nested regions, constants) move to the root
                    flat = prefix + str(inner.target).replace(".", "_")
                    G.set_attr(gm, flat, G.fetch_attr(sub, str(inner.target)))
                    copied.target = flat
                env[inner] = copied
            graph.call_function(torch._C._set_grad_enabled, (before,))
        for user in list(node.users):
            if user.op == "call_function" and user.target is operator.getitem:
                user.replace_all_uses_with(outputs[user.args[1]])
                graph.erase_node(user)
        if node.users:  # a single (non-tuple) result
            node.replace_all_uses_with(outputs)
        graph.erase_node(node)
        if not body.users:
            graph.erase_node(body)
        inlined += 1
    if inlined:
        graph.lint()
        gm.recompile()
    return inlined


def _takes(forward: Any, name: str) -> bool:
    try:
        return name in inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False


def _default_positions(
    model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """``{"position_ids": 0..n-1 per sequence}`` for a generating model (Hugging Face's
    ``can_generate()``: a causal LM head) that takes ``position_ids`` and was called with token ids
    and a padding mask but no positions."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    can_generate = getattr(model, "can_generate", None)
    if (
        not callable(can_generate)
        or not can_generate()
        or "position_ids" in kwargs
        or "attention_mask" not in kwargs
        or not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.is_floating_point()
        or not _takes(model.forward, "position_ids")
    ):
        return {}
    return {"position_ids": default_positions(ids)}


#: ``graph_module.meta`` key of a captured program: the inputs capture added (name -> kind).
DEFAULT_KWARGS_META = "attnrewrite_default_kwargs"


def default_positions(ids: torch.Tensor) -> torch.Tensor:
    """Positions 0..n-1 for each row of a (batch, n) input (what decoders use when not given)."""
    batch, length = ids.shape[0], ids.shape[1]
    return torch.arange(length, device=ids.device).unsqueeze(0).expand(batch, -1).contiguous()


def _cache_default(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether ``forward`` takes ``use_cache``, the caller left it unset and it may default on."""
    if "use_cache" in kwargs or not _takes(model.forward, "use_cache"):
        return False
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError:
        return False
    return "use_cache" not in bound


@contextlib.contextmanager
def _caches_off(model: nn.Module) -> Iterator[list[str]]:
    """Set ``use_cache = False`` on every submodule's config that has it on (each config object
    once); yields where, as module paths; restores every value on exit."""
    changed: dict[int, tuple[Any, str]] = {}
    for path, module in model.named_modules():
        config = getattr(module, "config", None)
        if getattr(config, "use_cache", None) is True and id(config) not in changed:
            changed[id(config)] = (config, path or "<model>")
            config.use_cache = False
    try:
        yield [f"{where}.config" for _, where in changed.values()]
    finally:
        for config, _ in changed.values():
            config.use_cache = True


def _takes_var_keyword(forward: Any) -> bool:
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _returns_unknown_type(exc: BaseException | None) -> bool:
    """An export failure because an output is not a registered pytree type (a ``DynamicCache``).

    torch raises a plain ``RuntimeError`` for it ("Found <class ...> in output, which is not a
    known type"), so its text is all there is to go on.
    """
    while exc is not None:
        text = str(exc)
        if "not a known type" in text and "pytree" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def capture(model: Any, args: Any = None, kwargs: Any = None, *, dynamic: bool = True) -> Captured:
    """Capture ``model`` (an ``nn.Module``, ``GraphModule`` or ``ExportedProgram``).

    The returned graph module owns copies of the parameters and buffers: editing or training it
    never touches ``model``, and capture leaves ``model`` exactly as it was (attributes and buffers
    its forward caches lazily included).
    """
    if isinstance(model, torch.export.ExportedProgram):
        gm = _private_copy(model)
        example = model.example_inputs or ((), {})
        a, k = (args, kwargs) if args is not None or kwargs else example
        a, k = check_inputs(a, k)
        # Constant keyword inputs the program was exported with but the caller left out
        # (``use_cache=False`` chosen by our own capture) are fixed, as for an nn.Module.
        fixed = {
            name: value
            for name, value in dict(example[1] or {}).items()
            if name not in k
            and not any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))
        }
        k = {**k, **fixed}
        notes = ["captured from an ExportedProgram"]
        if fixed:
            notes.append(
                "the program was exported with "
                + ", ".join(f"{n}={v!r}" for n, v in fixed.items())
                + "; the rewritten model fills these in and refuses other values"
            )
        # Inputs our own capture added (position_ids) are filled in again, as for the nn.Module.
        defaulted = dict(model.graph_module.meta.get(DEFAULT_KWARGS_META, {}))
        ids = k.get("input_ids")
        for name in defaulted:
            if name not in k and isinstance(ids, torch.Tensor):
                k[name] = default_positions(ids)
                notes.append(
                    f"{name} filled in as the capture that made the program did (0, 1, ..., n-1 "
                    "for every sequence when a call leaves it out)"
                )
        missing = [
            name
            for name, value in dict(example[1] or {}).items()
            if name not in k and any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))
        ]
        if missing:
            raise InputMismatchError(
                f"the ExportedProgram was exported with the tensor input(s) {missing}, which the "
                "example kwargs leave out: pass them (shaped as the program's example inputs)"
            )
        return Captured(
            gm,
            model,
            a,
            k,
            dynamic=True,
            notes=notes,
            fixed_kwargs=fixed,
            guards=_shape_guards(model, a, k, forward=None),
            default_kwargs={name: defaulted[name] for name in defaulted if name in k},
        )
    if not isinstance(model, nn.Module):
        raise CaptureError(
            "expected an nn.Module, torch.fx.GraphModule or ExportedProgram, "
            f"got {type(model).__name__}"
        )
    args, kwargs = check_inputs(args, kwargs)
    notes: list[str] = []
    fixed: dict[str, Any] = {}
    cache_default = _cache_default(model, args, kwargs)
    config_cache = bool(getattr(getattr(model, "config", None), "use_cache", False))
    if cache_default and config_cache:
        fixed["use_cache"] = False
    defaulted = _default_positions(model, args, kwargs) if cache_default else {}
    kwargs = {**kwargs, **defaulted}
    program, errors, last, touched = _export(model, args, {**kwargs, **fixed}, dynamic, notes)
    if program is None and defaulted:
        # The model does not take explicit positions after all: capture as called.
        kwargs = {k: v for k, v in kwargs.items() if k not in defaulted}
        defaulted = {}
        program, errors, last, touched = _export(model, args, {**kwargs, **fixed}, dynamic, notes)
    passes_cache_on = (
        "use_cache" not in kwargs and hasattr(model, "config") and _takes_var_keyword(model.forward)
    )
    if (
        program is None
        and (cache_default or passes_cache_on)
        and not fixed
        and _returns_unknown_type(last)
    ):
        # Hugging Face models without ``config.use_cache`` that still return a cache object, and
        # those whose forward passes ``use_cache`` on through ``**kwargs`` (vision-language
        # models: their text model takes it).
        if cache_default:
            fixed["use_cache"] = False
            program, errors, last, touched = _export(
                model, args, {**kwargs, **fixed}, dynamic, notes
            )
        else:
            # torch.export cannot take dynamic shapes for a forward whose inputs include
            # ``**kwargs`` entries, so the cache is turned off where the inner models read their
            # default: the ``use_cache`` of every submodule's config, restored right after.
            with _caches_off(model) as changed:
                program, errors, last, touched = _export(model, args, kwargs, dynamic, notes)
            if changed:
                notes.append(
                    "captured with use_cache=False set on the model's configs ("
                    + ", ".join(changed[:3])
                    + ", restored after capture): the forward returned a key/value cache object, "
                    "which is not a graph output; the rewritten model recomputes the whole "
                    "sequence on every call"
                )
    if program is not None and touched:
        # The forward cached state while traced (a buffer registered on first call). torch.export
        # turns such a registration into a buffer mutation that it unlifts onto the wrong
        # placeholder (a copy_ into a user input), so capture a copy whose cache is already
        # built by one real call on the example instead.
        warm = copy.deepcopy(model)
        with torch.no_grad():
            warm(*args, **{**kwargs, **fixed})
        program, errors, last, _ = _export(warm, args, {**kwargs, **fixed}, dynamic, notes)
        notes.append(
            f"the model's forward caches state on its first call ({', '.join(touched[:4])}); "
            "captured from a copy after one call on the example, so the cached values are "
            "constants of the graph (the model itself is left as it was)"
        )
    if program is None:
        hint = ""
        if _returns_unknown_type(last):
            hint = (
                " (an output is not a pytree type: for a Hugging Face cache pass use_cache=False"
                " in kwargs; otherwise register the type with torch.utils._pytree)"
            )
        raise CaptureError(
            f"torch.export could not capture {type(model).__name__}{hint}: {errors[-1][:600]}\n"
            "If the model has data-dependent Python control flow or graph breaks, rewrite it "
            "inside torch.compile instead: torch.compile(model, backend=attnrewrite.dynamo_backend("
            "'<variant>'))."
        ) from last
    if fixed:
        notes.append(
            "captured with use_cache=False: the model's forward takes use_cache (left unset, "
            "and on by default) and may then return a key/value cache object, which is not a "
            "graph output. The rewritten model "
            "recomputes the whole sequence on every call (use_cache=True raises "
            "InputMismatchError); to generate token by token with state, use rw.generate(...)."
        )
    if defaulted:
        notes.append(
            "captured with position_ids as an input (the model's default when left out: 0, 1, "
            "..., n-1 for every sequence, which calls without it still get) so that generation "
            "can give left-padded prompts the positions Hugging Face's generate gives them"
        )
    kwargs = {**kwargs, **fixed}
    # Recorded on the program, so that a rewrite of it (``ar.rewrite(captured.program, ...)``)
    # fills them in too.
    program.graph_module.meta[DEFAULT_KWARGS_META] = dict.fromkeys(defaulted, "positions")
    gm = _private_copy(program)
    guards = _shape_guards(program, args, kwargs, forward=model.forward)
    if dynamic and not any("static shapes" in note for note in notes):
        notes.extend(_specialisation_notes(guards))
    return Captured(
        gm,
        program,
        args,
        kwargs,
        dynamic=True,
        notes=notes,
        fixed_kwargs=fixed,
        guards=guards,
        default_kwargs=dict.fromkeys(defaulted, "positions"),
    )


def _export(
    model: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    dynamic: bool,
    notes: list[str],
) -> tuple[torch.export.ExportedProgram | None, list[str], BaseException | None, list[str]]:
    """Export with ``Dim.AUTO`` everywhere, else static; the model is restored after each try.

    Returns the program (or ``None``), the errors, the last exception and the module state the
    forward set while it was traced (lazily cached buffers and attributes).
    """
    errors: list[str] = []
    last: BaseException | None = None
    state = _ModuleState(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dyn in [True, False] if dynamic else [False]:
            touched: list[str] = []
            try:
                shapes = _auto_dynamic(model, args, kwargs) if dyn else None
                program = torch.export.export(
                    model, args, kwargs, dynamic_shapes=shapes, strict=False
                )
            except Exception as exc:  # noqa: BLE001 - re-raised by the caller with our message
                errors.append(f"{type(exc).__name__}: {exc}")
                last = exc
                continue
            finally:
                touched = state.restore()
            if not dyn and dynamic:
                notes.append(
                    f"captured with static shapes (dynamic capture failed: {errors[-1][:160]}); "
                    "every input must keep the example's shape"
                )
            return program, errors, last, touched
    return None, errors, last, []


# -- what the capture fixed ---------------------------------------------------------------------

# Where torch made a replacement (the function in ``replacements_slocs``, a torch shape rule) ->
# what the model did; matched by substring, first match wins.
_FORCED_BY = (
    ("reshape", "a view/reshape to a size fixed in the model's code"),
    ("view", "a view/reshape to a size fixed in the model's code"),
    ("infer_size", "a view/reshape to a size fixed in the model's code"),
    ("broadcast", "broadcasting against a tensor of fixed size (a parameter or buffer)"),
    ("conv", "a convolution with a weight of fixed size"),
    ("mm", "a matrix multiply with a weight of fixed size"),
    ("matmul", "a matrix multiply with a weight of fixed size"),
    ("linear", "a matrix multiply with a weight of fixed size"),
    ("cat", "a concatenation with a tensor of fixed size"),
)


def _why(sloc: Any) -> str:
    frame = getattr(sloc, "framework_loc", None)
    user = getattr(sloc, "maybe_user_loc", None)
    where = f" at {user}" if user else ""
    if frame is None:
        return "torch.export kept it static" + where
    name = getattr(frame, "name", None) or str(frame)
    what = next(
        (text for key, text in _FORCED_BY if key in name),
        f"an op whose shape rule is `{name}`",
    )
    return f"forced by {what}{where}"


def _shape_guards(
    program: torch.export.ExportedProgram,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    forward: Any,
) -> ShapeGuards:
    """Static axes, ranges and relations of ``program``'s inputs, stated per input axis."""
    leaves = pytree.tree_flatten_with_path((args, kwargs))[0]
    every = [n for n in program.graph.nodes if n.op == "placeholder"]
    specs = program.graph_signature.input_specs
    user = torch.export.graph_signature.InputKind.USER_INPUT
    placeholders = [n for n, spec in zip(every, specs) if spec.kind == user]
    if len(placeholders) != len(leaves):
        return ShapeGuards()
    names = _input_names(args, kwargs, forward) if forward is not None else {}
    shape_env = None
    for node in placeholders:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and getattr(val, "fake_mode", None) is not None:
            shape_env = val.fake_mode.shape_env
            break
    by_source = _symbols_by_source(shape_env)
    specialised, ranges, symbols = [], [], []
    for (path, leaf), node in zip(leaves, placeholders):
        val = node.meta.get("val")
        if not isinstance(leaf, torch.Tensor) or not isinstance(val, torch.Tensor):
            continue
        name = names.get(path) or node.name
        for axis, size in enumerate(val.shape):
            example = int(leaf.shape[axis])
            # A SymInt whose expression is a number was specialised by a replacement.
            if not isinstance(size, torch.SymInt) or size.node.expr.is_number:
                reason = _specialisation_reason(
                    shape_env, by_source.get((node.name, axis)), example
                )
                specialised.append(InputAxis(name, path, axis, example, reason))
                continue
            expr = size.node.expr
            entry = InputAxis(name, path, axis, example)
            if isinstance(expr, sympy.Symbol):
                symbols.append((expr, entry))
                bounds = program.range_constraints.get(expr)
                if bounds is not None:
                    low = int(bounds.lower) if isinstance(bounds.lower, sympy.Integer) else 0
                    high = int(bounds.upper) if isinstance(bounds.upper, sympy.Integer) else None
                    ranges.append((entry, low, high))
    relations = _relations(shape_env, {symbol for symbol, _ in symbols})
    return ShapeGuards(tuple(specialised), tuple(ranges), relations, tuple(symbols))


def _symbols_by_source(shape_env: Any) -> dict[tuple[str, int], sympy.Symbol]:
    """``(input placeholder name, axis) -> symbol`` from the ShapeEnv's sources."""
    out: dict[tuple[str, int], sympy.Symbol] = {}
    if shape_env is None:
        return out
    for symbol, sources in shape_env.var_to_sources.items():
        for source in sources:
            base = getattr(source, "base", None)
            idx = getattr(source, "idx", None)
            local = getattr(base, "local_name", None)
            if local is not None and isinstance(idx, int):
                out.setdefault((local, idx), symbol)
    return out


def _specialisation_reason(shape_env: Any, symbol: sympy.Symbol | None, size: int) -> str:
    if size in (0, 1):
        return (
            f"torch.export always specialises an example size of {size}; capture with an "
            "example of size 2 or more on this axis to keep it dynamic"
        )
    if shape_env is None or symbol is None:
        return "torch.export kept it static"
    sloc = shape_env.replacements_slocs.get(symbol)
    return _why(sloc) if sloc is not None else "torch.export kept it static"


def _relations(shape_env: Any, kept: set[sympy.Symbol]) -> tuple[sympy.Basic, ...]:
    """The ShapeEnv's guards that still relate dynamic input sizes once replacements are applied
    (``Eq(s0, s1)``, ``Ne(Mod(s0, 4), 0)``...); guards on fixed sizes are the specialised axes."""
    if shape_env is None:
        return ()
    out = []
    for guard in shape_env.guards:
        expr = shape_env.replace(guard.expr)
        if (
            expr.free_symbols
            and expr.free_symbols <= kept
            and expr not in (sympy.true, sympy.false)
        ):
            out.append(expr)
    return tuple(dict.fromkeys(out))


def _specialisation_notes(guards: ShapeGuards) -> list[str]:
    by_input: dict[str, list[InputAxis]] = {}
    widths = []
    for axis in guards.specialised:
        if "with a weight of fixed size" in axis.reason:
            # A feature or channel width set by the weights: expected, said in one short line.
            widths.append(f"`{axis.input}` axis {axis.axis} = {axis.size}")
            continue
        by_input.setdefault(axis.input, []).append(axis)
    notes = []
    if widths:
        notes.append(f"fixed by the model's weights (feature/channel widths): {', '.join(widths)}")
    for name, axes in by_input.items():
        parts = "; ".join(f"axis {a.axis} specialised to {a.size} ({a.reason})" for a in axes)
        notes.append(
            f"input `{name}`: {parts}. The rewritten model accepts only these sizes on these "
            "axes; to keep an axis dynamic, capture with an example of size >= 2 there and make "
            "the model compute that size from its input instead of a constant."
        )
    return notes
