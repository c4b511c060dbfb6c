"""Low-rank adapters on the attention projections of rewritten sites (the second stage of LoLCATs,
Zhang et al. 2024, arXiv:2410.10254).

After the attention transfer (per-site calibration), a linearised model still differs from the
original because the projections were trained for softmax. LoLCATs adds low-rank adapters
(LoRA, Hu et al. 2021, arXiv:2106.09685) to the query, key, value and output projections and
trains only them. Here the adapters are inserted into the rewritten graph itself, as a graph pass:

- for each rewritten site, the projections are found by dataflow: the nearest ``aten.linear``
  nodes upstream of the site's query, key and value (through reshapes, transposes and rotary
  embeddings) and the nearest one downstream of its output, each with a weight that is a
  parameter of the rewritten model. A fused QKV projection gets one adapter;
- each ``y = linear(x, W, b)`` becomes ``y + scale · B(A(x))``, with ``A`` (r × in) random and
  ``B`` (out × r) zero, so the model is unchanged until training moves ``B``;
- the adapters are submodules of the rewritten graph module (under ``attnrewrite_lora``), so they
  are part of ``rw.state_dict()``, run under ``torch.compile`` and export to ONNX like the rest;
- :func:`merge` folds them into the rewritten model's own projection weights (W + scale · B A),
  removing the extra matmuls. The rewritten model owns private copies of the original's
  parameters, so the original model is never touched.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor, fx, nn

from attnrewrite.passes.graph import set_attr

#: Attribute of the rewritten graph module that holds the adapters.
LORA_ATTR = "attnrewrite_lora"
#: How far (in graph nodes) the search for a projection walks from a site.
SEARCH_DEPTH = 24

_aten = torch.ops.aten
#: Projection ops: (index of the input, index of the weight, weight stored as (out, in)).
_PROJECTIONS = {
    _aten.linear.default: (0, 1, True),
    _aten.addmm.default: (1, 2, False),  # Conv1D (GPT-2): bias + x @ W with W (in, out)
    _aten.mm.default: (0, 1, False),
    _aten.matmul.default: (0, 1, False),
}
#: Ops a site's output may pass through before its output projection: layout only.
_LAYOUT = {
    _aten.view.default,
    _aten.reshape.default,
    _aten._unsafe_view.default,
    _aten.transpose.int,
    _aten.permute.default,
    _aten.contiguous.default,
    _aten.clone.default,
    _aten.flatten.using_ints,
    _aten.unflatten.int,
    _aten.dropout.default,
    _aten.alias.default,
    _aten.to.dtype,
    _aten.type_as.default,
}


class LoRAAdapter(nn.Module):
    """``scale · x Aᵀ Bᵀ`` for one projection ``linear(x, W)``.

    Attributes:
        target: the qualified name of the projection's weight in the rewritten model.
        role: ``"query"``, ``"key"``, ``"value"`` or ``"output"`` (or a combination, for a fused
            projection), for the report.
        site: the site the projection serves.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        *,
        target: str,
        role: str,
        site: str,
        generator: torch.Generator,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # Kaiming-uniform with a = √5, as nn.Linear
        a = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
        self.lora_a = nn.Parameter(a.to(dtype))
        self.lora_b = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype))
        self.scale = alpha / rank
        self.target = target
        self.role = role
        self.site = site
        self.enabled = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.enabled:
            return x.new_zeros((*x.shape[:-1], self.lora_b.shape[0]))
        return nn.functional.linear(nn.functional.linear(x, self.lora_a), self.lora_b) * self.scale

    def delta(self) -> Tensor:
        """The weight update ``scale · B A`` (out × in)."""
        return (self.lora_b @ self.lora_a) * self.scale

    def extra_repr(self) -> str:
        out, rank = self.lora_b.shape
        return f"{self.lora_a.shape[1]} -> {out}, rank={rank}, {self.role} of {self.site}"


def adapters(gm: fx.GraphModule) -> dict[str, LoRAAdapter]:
    """The adapters inserted into ``gm``, by submodule name."""
    holder = getattr(gm, LORA_ATTR, None)
    if holder is None:
        return {}
    return {name: m for name, m in holder.named_children() if isinstance(m, LoRAAdapter)}


@contextlib.contextmanager
def disabled(gm: fx.GraphModule) -> Iterator[None]:
    """Within the block the adapters add nothing (the projections as the original computes)."""
    made = list(adapters(gm).values())
    flags = [a.enabled for a in made]
    try:
        for adapter in made:
            adapter.enabled = False
        yield
    finally:
        for adapter, flag in zip(made, flags, strict=True):
            adapter.enabled = flag


def add_adapters(
    gm: fx.GraphModule, sites: list[str], rank: int, alpha: float | None, seed: int
) -> tuple[dict[str, LoRAAdapter], list[str]]:
    """Insert adapters on the projections of each named site (its ``call_module`` node under
    ``attnrewrite_variants``). Returns the new adapters and, per site without any projection
    found, a sentence saying so."""
    if adapters(gm):
        raise ValueError("the model already has LoRA adapters; merge or remove them first")
    alpha = float(2 * rank if alpha is None else alpha)
    generator = torch.Generator().manual_seed(seed)
    nodes = _site_nodes(gm, sites)
    found: dict[fx.Node, tuple[str, list[str]]] = {}
    missing = []
    for site, node in nodes.items():
        projections = _projections(gm, node)
        if not projections:
            missing.append(f"{site}: no projection (linear with a parameter weight) found")
        for role, linear in projections:
            owner, roles = found.setdefault(linear, (site, []))
            if role not in roles:
                roles.append(role)
    holder = nn.Module()
    gm.add_module(LORA_ATTR, holder)
    made: dict[str, LoRAAdapter] = {}
    for index, (linear, (site, roles)) in enumerate(found.items()):
        source, weight, out_in = _projection_of(gm, linear)
        tensor = _get(gm, weight.target)
        out_features, in_features = tensor.shape if out_in else tensor.shape[::-1]
        adapter = LoRAAdapter(
            in_features,
            out_features,
            rank,
            alpha,
            target=weight.target,
            role="+".join(roles),
            site=site,
            generator=generator,
            dtype=tensor.dtype,
        )
        name = f"adapter_{index}"
        holder.add_module(name, adapter)
        made[name] = adapter
        with gm.graph.inserting_after(linear):
            low_rank = gm.graph.call_module(f"{LORA_ATTR}.{name}", (source,))
        with gm.graph.inserting_after(low_rank):
            total = gm.graph.call_function(torch.ops.aten.add.Tensor, (linear, low_rank))
        linear.replace_all_uses_with(total, delete_user_cb=total.__ne__)
        _copy_meta(linear, low_rank, total)
    if not made:
        delattr(gm, LORA_ATTR)
        return made, missing
    gm.graph.lint()
    gm.recompile()
    return made, missing


def merge(gm: fx.GraphModule) -> int:
    """Fold every adapter into its projection weight (a new parameter in ``gm``; the old one is
    no longer referenced) and remove the adapters from the graph. Returns how many were merged."""
    return _take_out(gm, fold=True)


def remove(gm: fx.GraphModule) -> int:
    """Remove every adapter from the graph without folding it (the model as it was before)."""
    return _take_out(gm, fold=False)


def _take_out(gm: fx.GraphModule, fold: bool) -> int:
    made = adapters(gm)
    if not made:
        return 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not node.target.startswith(f"{LORA_ATTR}."):
            continue
        adapter = made[node.target.split(".", 1)[1]]
        (total,) = node.users
        linear = total.args[0]
        if fold:
            _, weight, out_in = _projection_of(gm, linear)
            current = _get(gm, weight.target).detach()
            delta = adapter.delta().detach().to(current.dtype)
            merged = current + (delta if out_in else delta.T)
            name = weight.target.replace(".", "_") + "_merged"
            set_attr(gm, name, nn.Parameter(merged, requires_grad=False))
            with gm.graph.inserting_before(linear):
                new_weight = gm.graph.get_attr(name)
            new_weight.meta.update(weight.meta)
            linear.replace_input_with(weight, new_weight)
            if not weight.users:
                gm.graph.erase_node(weight)
                _drop_unreferenced(gm, weight.target)
        total.replace_all_uses_with(linear)
        gm.graph.erase_node(total)
        gm.graph.erase_node(node)
    delattr(gm, LORA_ATTR)
    gm.graph.lint()
    gm.recompile()
    return len(made)


def _drop_unreferenced(gm: fx.GraphModule, target: str) -> None:
    """Delete the replaced weight from the rewritten model (its own copy) once no graph node reads
    it, so the merged model's ``state_dict`` holds each projection once."""
    if any(n.op == "get_attr" and n.target == target for n in gm.graph.nodes):
        return
    owner, _, attr = target.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, attr)


# -- finding the projections -------------------------------------------------------------------


def _site_nodes(gm: fx.GraphModule, sites: list[str]) -> dict[str, fx.Node]:
    wanted = {s.replace(".", "_"): s for s in sites}
    nodes = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target.startswith("attnrewrite_variants."):
            module = gm.get_submodule(node.target)
            name = getattr(getattr(module, "site", None), "name", None)
            if name in sites:
                nodes.setdefault(name, node)
            elif node.target.split(".", 1)[1] in wanted:
                nodes.setdefault(wanted[node.target.split(".", 1)[1]], node)
    return nodes


def _projection_of(gm: fx.GraphModule, node: fx.Node) -> tuple[fx.Node, fx.Node, bool] | None:
    """(input, weight node, weight is (out, in)) of a projection by a parameter matrix."""
    spec = _PROJECTIONS.get(node.target) if node.op == "call_function" else None
    if spec is None or len(node.args) <= max(spec[:2]):
        return None
    source, weight = node.args[spec[0]], node.args[spec[1]]
    if not (
        isinstance(weight, fx.Node) and weight.op == "get_attr" and isinstance(source, fx.Node)
    ):
        return None
    tensor = _get(gm, weight.target)
    if not (isinstance(tensor, nn.Parameter) and tensor.dim() == 2 and tensor.is_floating_point()):
        return None
    return source, weight, spec[2]


def _projections(gm: fx.GraphModule, site: fx.Node) -> list[tuple[str, fx.Node]]:
    found = []
    for role, start in zip(("query", "key", "value"), site.args[:3], strict=False):
        if isinstance(start, fx.Node):
            found += [(role, n) for n in _upstream(gm, start)]
    found += [("output", n) for n in _downstream(gm, site)]
    return found


def _upstream(gm: fx.GraphModule, start: fx.Node) -> list[fx.Node]:
    """The projections nearest to ``start`` along its inputs (through reshapes, splits and
    rotary embeddings), stopping at each."""
    seen, frontier, hits = {start}, [start], []
    for _ in range(SEARCH_DEPTH):
        following = []
        for node in frontier:
            if _projection_of(gm, node) is not None:
                hits.append(node)
                continue
            if node.op != "call_function":
                continue  # inputs, parameters, other sites and adapters: not a path to q, k, v
            for n in node.all_input_nodes:
                if n not in seen:
                    seen.add(n)
                    following.append(n)
        frontier = following
        if not frontier:
            break
    return list(dict.fromkeys(hits))


def _downstream(gm: fx.GraphModule, site: fx.Node) -> list[fx.Node]:
    """The projection that reads the site's output through layout changes only (merging the
    heads back), or nothing: anything else in between (a residual, a norm) means the output is
    not projected by a matrix of its own."""
    frontier, hits = [site], []
    for _ in range(SEARCH_DEPTH):
        following = []
        for node in frontier:
            for user in node.users:
                projection = _projection_of(gm, user)
                if projection is not None and projection[0] is node:
                    hits.append(user)
                elif user.op == "call_function" and user.target in _LAYOUT:
                    following.append(user)
        frontier = following
        if not frontier:
            break
    return list(dict.fromkeys(hits))


def _get(gm: fx.GraphModule, target: str) -> Tensor:
    owner, _, attr = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, attr)


def _copy_meta(linear: fx.Node, low_rank: fx.Node, total: fx.Node) -> None:
    value = linear.meta.get("val")
    if value is not None:
        low_rank.meta["val"] = value
        total.meta["val"] = value
    for key in ("stack_trace", "nn_module_stack"):
        if key in linear.meta:
            total.meta[key] = linear.meta[key]
