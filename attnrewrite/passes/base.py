"""What every pass returns, and the emitter all graph edits go through."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx

from attnrewrite.passes import graph as G

aten = torch.ops.aten


@dataclasses.dataclass(frozen=True)
class PassResult:
    """``torch.fx`` style pass result, plus statistics that end up in the report."""

    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = dataclasses.field(default_factory=dict)


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
    in-place ops on intermediates that nothing else reads (they count as side effects to FX)."""
    before = len(gm.graph.nodes)
    for node in list(gm.graph.nodes):
        if G.op_name(node) == "_assert_tensor_metadata":
            gm.graph.erase_node(node)

    def impure(node: fx.Node) -> bool:
        if G.is_inplace(node):
            written = node.args[0]
            private = (
                isinstance(written, fx.Node)
                and written.op == "call_function"
                and set(written.users) == {node}
            )
            return not private
        # Random ops (dropout, sdpa with its seeded dropout) are pure enough to drop when unused.
        return node.is_impure(impure_random=False)

    gm.graph.eliminate_dead_code(is_impure_node=impure)
    return before - len(gm.graph.nodes)
