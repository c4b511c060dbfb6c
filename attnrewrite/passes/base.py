"""What every pass returns, and the emitter all graph edits go through."""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from attnrewrite.passes import graph as G

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class PassResult:
    """What every pass returns (``torch.fx`` style): the graph module, whether it changed,
    statistics that end up in the report, and per-node diagnostics (records with a stage and a
    reason, e.g. :class:`~attnrewrite.site.Rejected`) that are kept rather than printed."""

    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)
    diagnostics: tuple[Any, ...] = ()


class Emitter:
    """Creates nodes before an anchor and keeps ``meta["val"]`` consistent by running each new op
    on the fake tensors of its inputs (the invariant every pass keeps, see passes/README.md)."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node) -> None:
        self.graph = graph
        self.anchor = anchor
        anchor_val = anchor.meta.get("val")
        self.mode = torch._guards.detect_fake_mode(
            [anchor_val] if isinstance(anchor_val, torch.Tensor) else []
        )

    def call(self, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            node = self.graph.call_function(target, tuple(args), dict(kwargs))
        self._fake_run(node)
        return node

    def module(self, target: str, *args: Any, **kwargs: Any) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            return self.graph.call_module(target, tuple(args), dict(kwargs))

    def copy(self, node: fx.Node, new_input: fx.Node) -> fx.Node:
        """Re-apply ``node``'s op with its first argument replaced."""
        return self.call(node.target, new_input, *node.args[1:], **node.kwargs)

    # -- shape helpers --------------------------------------------------------------------------
    def permute(self, x: fx.Node, perm: Sequence[int]) -> fx.Node:
        if list(perm) == list(range(len(perm))):
            return x
        return self.call(aten.permute.default, x, list(perm))

    def unsqueeze(self, x: fx.Node, dim: int) -> fx.Node:
        return self.call(aten.unsqueeze.default, x, dim)

    def reshape(self, x: fx.Node, sizes: Sequence[Any]) -> fx.Node | None:
        """Reshape to ``sizes`` (ints or SymInts), naming symbolic sizes through ``x``'s own
        dimensions (``sym_size``) and at most one ``-1``; ``None`` when that is impossible."""
        cur = G.shape(x)
        if (
            cur is not None
            and len(cur) == len(sizes)
            and all(G.same_size(a, b) for a, b in zip(cur, sizes))
        ):
            return x
        spec: list[Any] = []
        unknown = 0
        used: set[int] = set()
        for s in sizes:
            fixed = s if isinstance(s, int) else G.as_int(s)
            if fixed is not None and isinstance(s, int):
                spec.append(fixed)
                continue
            match = next(
                (
                    i
                    for i, c in enumerate(cur or ())
                    if i not in used and not isinstance(c, int) and G.same_size(c, s)
                ),
                None,
            )
            if match is not None:
                used.add(match)
                spec.append(self.call(aten.sym_size.int, x, match))
                continue
            if fixed is not None:
                spec.append(fixed)
                continue
            unknown += 1
            spec.append(-1)
        if unknown > 1:
            return None
        return self.call(aten.reshape.default, x, spec)

    def _fake_run(self, node: fx.Node) -> None:
        def fake(a: Any) -> Any:
            return a.meta.get("val") if isinstance(a, fx.Node) else a

        args = fx.node.map_aggregate(node.args, fake)
        kwargs = fx.node.map_aggregate(node.kwargs, fake)
        vals = [
            v
            for v in fx.node.map_aggregate(list(args) + list(kwargs.values()), lambda a: a)
            if isinstance(v, torch.Tensor)
        ]
        mode = (torch._guards.detect_fake_mode(vals) if vals else None) or self.mode
        try:
            if mode is not None:
                # Guards raised while computing meta must not specialise the captured symbols.
                env = mode.shape_env
                guard = env.suppress_guards() if env is not None else contextlib.nullcontext()
                with mode, guard:
                    if node.target is aten.arange.default:
                        # Fake arange guards on its symbolic end; its meta is just a 1-D int64.
                        node.meta["val"] = torch.empty(
                            args[0], dtype=kwargs.get("dtype", torch.int64)
                        )
                    else:
                        node.meta["val"] = node.target(*args, **kwargs)
            elif vals and callable(node.target):
                node.meta["val"] = node.target(*args, **kwargs)
        except Exception:  # noqa: BLE001 - meta is best effort; the graph is still valid
            node.meta.pop("val", None)


def dead_code_elimination(gm: fx.GraphModule) -> int:
    """Remove unused nodes, including dtype assertions that only kept dead tensors alive and
    in-place writes that nothing observes.

    A node that writes a tensor in place (any schema argument marked ``(a!)``: ``self`` of
    ``add_``, ``out=`` of an out variant, ``index_put_``'s ``self``...) is kept whenever a live
    node after it reads any tensor that shares its storage (a view written in place, as in
    ``t[:, 1] = 1.0``, changes its base), or the storage belongs to an input, a parameter or a
    buffer. Aliasing comes from torch itself: the storages of the fake tensors in
    ``meta["val"]`` (as ``torch/fx/passes/reinplace.py`` uses them) and the ops' alias
    annotations; where neither is known the node is assumed to alias all its inputs.
    """
    graph = gm.graph
    before = len(graph.nodes)
    for node in list(graph.nodes):
        if G.op_name(node) == "_assert_tensor_metadata":
            graph.erase_node(node)
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    alias = AliasClasses(nodes)
    writes = {node: written_nodes(node) for node in nodes}
    writes = {node: written for node, written in writes.items() if written is not None}
    external = {alias.find(n) for n in nodes if n.op in ("placeholder", "get_attr")}

    def root(node: fx.Node) -> bool:
        if node in writes:
            return False  # kept below only if what it writes is read later
        if _opaque_side_effect(node):
            return True
        # Random ops (dropout, sdpa with its seeded dropout) are pure enough to drop when unused.
        return node.is_impure(impure_random=False)

    live: set[fx.Node] = set()
    pending = [n for n in nodes if root(n)]
    while True:
        while pending:
            node = pending.pop()
            if node in live:
                continue
            live.add(node)
            pending.extend(n for n in node.all_input_nodes if n not in live)
        # The last position at which a live node reads (or returns, or views) each storage.
        last_read: dict[fx.Node, int] = {}
        for node in live:
            for read in (node, *node.all_input_nodes):
                key = alias.find(read)
                last_read[key] = max(last_read.get(key, -1), position[node])
        pending = [
            node
            for node, written in writes.items()
            if node not in live
            and any(
                alias.find(w) in external or last_read.get(alias.find(w), -1) > position[node]
                for w in written
            )
        ]
        if not pending:
            break
    for node in reversed(nodes):
        if node not in live:
            graph.erase_node(node)
    return before - len(graph.nodes)


def _opaque_side_effect(node: fx.Node) -> bool:
    """A Python callable that is no ATen op and returns no tensor, called for its effect: vmap's
    level bookkeeping (``_vmap_increment_nesting``/``_vmap_decrement_nesting``, which Hugging
    Face's vmapped mask functions leave in the graph) must stay paired with the batched ops."""
    target = node.target
    if node.op != "call_function" or isinstance(
        target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)
    ):
        return False
    if getattr(target, "__module__", None) in ("_operator", "operator", "math", "builtins"):
        return False
    return not isinstance(node.meta.get("val"), torch.Tensor)


def written_nodes(node: fx.Node) -> list[fx.Node] | None:
    """The graph values ``node`` writes in place, or ``None`` when it writes nothing."""
    target = node.target
    if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
        written: list[fx.Node] = []
        for i, argument in enumerate(target._schema.arguments):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = node.args[i] if i < len(node.args) else node.kwargs.get(argument.name)
            fx.node.map_arg(value, written.append)
        return written or None
    mutating_method = (
        node.op == "call_method"
        and isinstance(target, str)
        and target.endswith("_")
        and not target.startswith("__")
    )
    # ``t[i] = v`` in a ``torch.fx.symbolic_trace`` graph is ``operator.setitem(t, i, v)``.
    if mutating_method or (node.op == "call_function" and target is operator.setitem):
        first = node.args[0] if node.args else None
        return [first] if isinstance(first, fx.Node) else None
    return None


class AliasClasses:
    """Union-find of graph values that may share storage.

    Two values are joined when their fake tensors share a storage, when an op's schema says its
    result aliases an argument (views, in-place ops returning ``self``), or, for a value torch
    says nothing about (no ``meta["val"]`` and no schema), with every input it was computed from.
    """

    def __init__(self, nodes: Sequence[fx.Node]) -> None:
        self._parent: dict[fx.Node, fx.Node] = {}
        owner: dict[Any, fx.Node] = {}
        for node in nodes:
            storages = _storages(node.meta.get("val"))
            for storage in storages:
                if storage in owner:
                    self._union(node, owner[storage])
                else:
                    owner[storage] = node
            target = node.target
            if node.op == "call_function" and isinstance(target, torch._ops.OpOverload):
                for argument in _aliased_arguments(target._schema):
                    index = [a.name for a in target._schema.arguments].index(argument)
                    value = (
                        node.args[index] if index < len(node.args) else node.kwargs.get(argument)
                    )
                    fx.node.map_arg(value, lambda a, node=node: self._union(node, a))
            elif not storages and node.op in ("call_function", "call_method", "call_module"):
                for source in node.all_input_nodes:
                    self._union(node, source)

    def find(self, node: fx.Node) -> fx.Node:
        parent = self._parent.setdefault(node, node)
        while parent is not node:
            grandparent = self._parent.setdefault(parent, parent)
            self._parent[node] = grandparent
            node, parent = parent, grandparent
        return node

    def _union(self, a: fx.Node, b: fx.Node) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is not rb:
            self._parent[ra] = rb


def _aliased_arguments(schema: Any) -> list[str]:
    """Names of the arguments a result of ``schema`` may alias (``Tensor(a) self -> Tensor(a)``)."""
    sets = set()
    for result in schema.returns:
        if result.alias_info is not None:
            sets |= set(result.alias_info.after_set) | set(result.alias_info.before_set)
    return [
        argument.name
        for argument in schema.arguments
        if argument.alias_info is not None
        and sets & (set(argument.alias_info.before_set) | set(argument.alias_info.after_set))
    ]


def _storages(val: Any) -> list[Any]:
    """``StorageWeakRef`` of every tensor in a node's ``meta["val"]``."""
    from torch.multiprocessing.reductions import StorageWeakRef

    out = []
    for leaf in torch.utils._pytree.tree_leaves(val):
        if isinstance(leaf, torch.Tensor):
            try:
                out.append(StorageWeakRef(leaf.untyped_storage()))
            except (RuntimeError, NotImplementedError):  # sparse/nested tensors have no storage
                continue
    return out
