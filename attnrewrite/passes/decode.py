"""Decode: a rewritten causal program becomes a prefill graph and a one-token step graph.

Reads: a rewritten graph module (sites lowered to variant modules, or canonical
``attnrewrite::attention`` calls, which decode as exact softmax with a key/value cache).
Builds two new graph modules sharing the model's parameters (the input graph is not changed):

- **prefill**: the model's flat inputs -> (model's flat outputs, every site's decode state): the
  prompt in parallel form, each site through its variant's ``prefill``;
- **step**: (model's flat inputs for one new token, ``offset``, state) -> (outputs, new state):
  each site through its variant's ``step``; every position source (an ``arange`` over the
  sequence outside the mask computation) is shifted by ``offset``, the number of positions
  already decoded. Positions the model reads from inputs (``position_ids``) are fed by the caller.

What is proven before anything is built, or :class:`~attnrewrite.errors.DecodeError` names the
site or node:

- every site's variant has a one-token step for that site (``AttentionVariant.decode_refusal``);
- nothing else mixes tokens: each node outside the sites and outside the mask computation is
  checked, from its input and output shapes, to act on every position alone (pointwise ops,
  products and norms over feature axes, views that keep each token's features together, ...).
  A reduction, product, convolution, pad, shift, gather or concatenation along the sequence axis
  (a time convolution, a cumsum that is not a position, an attention left unrewritten) is refused.

The mask computation (nodes whose values reach only the sites' masks) is exempt: the mask
analysis proved each site's mask causal with a key-only term, so the new token's row is the
stored keys' terms plus the new key's own, which the step graph computes from the new token.
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx, nn

from attnrewrite.errors import DecodeError
from attnrewrite.ops import is_attention, operands, site_of
from attnrewrite.passes import graph as G
from attnrewrite.passes import vocab
from attnrewrite.passes.lower import VARIANTS_ATTR, module_key
from attnrewrite.variants.base import AttentionVariant

#: Submodule of the decode graphs holding one adapter per site.
DECODE_ATTR = "attnrewrite_decode"

# -- what acts on each position alone ------------------------------------------------------------

#: Views and copies: they move data but keep each token's features together when the per-token
#: block (elements after the sequence axis) is unchanged, which :func:`_reshape_keeps_tokens`
#: checks for the ops that regroup axes.
_LAYOUT = (
    vocab.RESHAPES
    | vocab.BROADCASTS
    | vocab.AXIS_PERMUTES
    | vocab.COPIES
    | vocab.CASTS
    | vocab.DROPOUTS
    | {
        "movedim", "numpy_T", "native_dropout", "split", "split_with_sizes", "chunk", "unbind",
        "stack", "view_as", "reshape_as", "_assert_tensor_metadata",
        # new tensors: shaped like an input, values of their own
        "scalar_tensor", "zeros_like", "ones_like", "full_like", "empty_like", "new_zeros",
        "new_ones", "new_full", "new_empty", "zeros", "ones", "full", "empty", "empty_strided",
        "rand_like", "randn_like", "bernoulli",
    }
)  # fmt: skip
_REGROUPS = vocab.REGROUPS
#: Reductions and scans over ``dim`` (all axes when it is absent).
_REDUCTIONS = vocab.SOFTMAX_OPS | frozenset(
    {
        "sum",
        "mean",
        "amax",
        "amin",
        "prod",
        "var",
        "std",
        "var_mean",
        "std_mean",
        "logsumexp",
        "norm",
        "linalg_vector_norm",
        "any",
        "all",
        "argmax",
        "argmin",
        "cumsum",
        "cumprod",
        "cummax",
        "cummin",
        "logcumsumexp",
        "log_softmax",
        "_log_softmax",
        "sort",
        "argsort",
        "topk",
        "median",
        "nanmedian",
        "mode",
        "count_nonzero",
        "max",
        "min",
        "kthvalue",
        "nansum",
        "nanmean",
        "diff",
    }
)
#: Ops that pick, move or repeat elements along ``dim``.
_ALONG_DIM = frozenset(
    {
        "select",
        "index_select",
        "gather",
        "roll",
        "flip",
        "repeat_interleave",
        "unfold",
        "narrow",
        "scatter",
        "scatter_add",
        "scatter_reduce",
        "index_add",
        "index_copy",
        "index_fill",
        "cat",
        "concat",
        "concatenate",
        "tril",
        "triu",
    }
)
#: Elementwise ops ATen does not tag ``pointwise`` (the mask vocabulary's, and a few more).
_POINTWISE_EXTRA = (
    vocab.COMPARISONS
    | vocab.LOGICAL_BINARY
    | vocab.LOGICAL_NOT
    | vocab.ARITHMETIC
    | vocab.EXTREMA
    | vocab.UNARY_MATH
    | vocab.SELECTS
    | vocab.SCORE_CAPS
    | {"pow", "__xor__", "bitwise_xor"}
)


def _seq_dims(value: Any, seq: Any) -> list[int]:
    if not isinstance(value, torch.Tensor):
        return []
    return [i for i, size in enumerate(value.shape) if _has(size, seq)]


def _has(size: Any, seq: Any) -> bool:
    return isinstance(size, torch.SymInt) and seq in size.node.expr.free_symbols


def _tensor_inputs(node: fx.Node) -> list[Any]:
    return [G.val(n) for n in node.all_input_nodes if isinstance(G.val(n), torch.Tensor)]


def _dims(node: fx.Node, rank: int) -> list[int] | None:
    dim = G.arg(node, "dim", None)
    if dim is None:
        return None
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    return [G.normalize_dim(int(d), rank) for d in dims]


def _contracted(node: fx.Node, name: str) -> list[tuple[Any, int]]:
    """(operand value, axis) pairs a product sums over."""
    a = G.val(node.args[0]) if node.args else None
    b = G.val(node.args[1]) if len(node.args) > 1 else None
    if name == "addmm" or name == "baddbmm" or name == "addmv":
        a, b = G.val(node.args[1]), G.val(node.args[2])
    if name == "linear":
        return [(a, a.dim() - 1)]
    if name == "einsum":
        equation = node.args[0].replace(" ", "")
        inputs, _, output = equation.partition("->")
        tensors = [G.val(n) for n in node.args[1]]
        pairs = []
        for letters, t in zip(inputs.split(","), tensors):
            if "." in letters or not isinstance(t, torch.Tensor):
                return [(t, i) for i in range(t.dim())] if isinstance(t, torch.Tensor) else []
            pairs += [(t, i) for i, c in enumerate(letters) if c not in output]
        return pairs
    pairs = []
    if isinstance(a, torch.Tensor) and a.dim() >= 1:
        pairs.append((a, a.dim() - 1))
    if isinstance(b, torch.Tensor) and b.dim() >= 1:
        pairs.append((b, b.dim() - 2 if b.dim() >= 2 else 0))
    return pairs


_PRODUCTS = vocab.PRODUCT_OPS | {"addmm", "linear", "dot", "mv", "addmv"}
_NORMS = frozenset({"layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"})


def _reshape_keeps_tokens(before: torch.Tensor, after: torch.Tensor, seq: Any) -> bool:
    """A regrouping keeps each token's features together: the sequence axis is still one axis
    (possibly merged with axes before it) and the block of elements after it is unchanged."""
    (i,) = _seq_dims(before, seq) or (None,)
    found = _seq_dims(after, seq)
    if i is None:
        return not found
    if len(found) != 1:
        return False
    j = found[0]
    inner_before = _numel(before.shape[i + 1 :])
    inner_after = _numel(after.shape[j + 1 :])
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return bool(statically_known_true(inner_before == inner_after))


def _numel(sizes: Any) -> Any:
    total: Any = 1
    for s in sizes:
        total = total * s
    return total


@dataclasses.dataclass(frozen=True)
class _Call:
    """One ATen call as the mixing rules see it."""

    node: fx.Node
    name: str
    inputs: list[Any]  # tensor inputs' fake values
    outs: list[Any]  # output fake values
    seq: Any  # the sequence symbol

    def seq_axes(self, value: Any) -> list[int]:
        return _seq_dims(value, self.seq)


def _product(c: _Call) -> str | None:
    if any(_has(t.shape[axis], c.seq) for t, axis in _contracted(c.node, c.name)):
        return f"`{c.name}` sums over the sequence axis"
    return None


def _norm(c: _Call) -> str | None:
    shape = G.arg(c.node, "normalized_shape", None)
    x = c.inputs[0]
    count = len(shape) if shape is not None else 1
    if any(d >= x.dim() - count for d in c.seq_axes(x)):
        return f"`{c.name}` normalises over the sequence axis"
    return None


def _statistics_norm(c: _Call) -> str | None:
    batch_norm = c.name.startswith(("native_batch", "batch", "_native_batch"))
    if batch_norm and not G.arg(c.node, "training", False):
        return None  # running statistics: elementwise
    return f"`{c.name}` normalises over the sequence axis"


def _embedding(c: _Call) -> str | None:
    return "indexes the sequence axis" if c.seq_axes(G.val(c.node.args[0])) else None


def _convolution(c: _Call) -> str | None:
    x, w = G.val(c.node.args[0]), G.val(c.node.args[1])
    for d in c.seq_axes(x):
        if d >= 2 and w.shape[d] != 1:
            return f"`{c.name}` convolves over the sequence axis (kernel {w.shape[d]})"
    return None


def _pad(c: _Call) -> str | None:
    pads = list(G.arg(c.node, "pad", c.node.args[1]))
    x = c.inputs[0]
    for d in c.seq_axes(x):
        k = x.dim() - 1 - d
        if 2 * k + 1 < len(pads) and (pads[2 * k] != 0 or pads[2 * k + 1] != 0):
            return f"`{c.name}` pads the sequence axis"
    return None


def _slice(c: _Call) -> str | None:
    x = c.inputs[0]
    if G.normalize_dim(G.arg(c.node, "dim", 0), x.dim()) not in c.seq_axes(x):
        return None
    start, end = G.arg(c.node, "start", None), G.arg(c.node, "end", None)
    whole = end is None or (isinstance(end, int) and end >= 2**62)
    if start not in (None, 0) or not whole or G.arg(c.node, "step", 1) != 1:
        return "slices the sequence axis"
    return None


def _index(c: _Call) -> str | None:
    indices = c.node.args[1] if len(c.node.args) > 1 else []
    axes = c.seq_axes(c.inputs[0])
    if any(i is not None and d in axes for d, i in enumerate(indices)):
        return f"`{c.name}` indexes the sequence axis"
    return None


def _reduction(c: _Call) -> str | None:
    x = c.inputs[0]
    if c.name in {"max", "min"} and len(c.inputs) > 1:
        return None  # elementwise maximum/minimum of two tensors
    dims = _dims(c.node, x.dim())
    if dims is None or any(d in c.seq_axes(x) for d in dims):
        return f"`{c.name}` reduces or scans over the sequence axis"
    return None


def _shift(c: _Call) -> str | None:
    x = c.inputs[0]
    dims = G.arg(c.node, "dims", None) or []
    dims = [G.normalize_dim(int(d), x.dim()) for d in dims] or list(range(x.dim()))
    if any(d in c.seq_axes(x) for d in dims):
        return f"`{c.name}` moves positions along the sequence axis"
    return None


def _triangle(c: _Call) -> str | None:
    x = c.inputs[0]
    if any(d >= x.dim() - 2 for d in c.seq_axes(x)):
        return "tril/triu over the sequence axis"
    return None


def _along_dim(c: _Call) -> str | None:
    joined = c.name in _JOINS  # the output has the joined axis
    ref = c.outs[0] if joined else c.inputs[0]
    dim = G.normalize_dim(int(G.arg(c.node, "dim", 0)), ref.dim())
    return f"`{c.name}` along the sequence axis" if dim in c.seq_axes(ref) else None


def _repeat(c: _Call) -> str | None:
    x = c.inputs[0]
    reps = list(c.node.args[1])
    offset = len(reps) - x.dim()
    if any(reps[offset + d] != 1 for d in c.seq_axes(x)):
        return f"`{c.name}` repeats along the sequence axis"
    return None


def _regroup(c: _Call) -> str | None:
    if not _reshape_keeps_tokens(c.inputs[0], c.outs[0], c.seq):
        return f"`{c.name}` regroups the sequence axis with features"
    return None


def _never(c: _Call) -> str | None:
    return None


def _unrewritten(c: _Call) -> str | None:
    return "an attention that was not rewritten (its site was skipped)"


@dataclasses.dataclass(frozen=True)
class MixingRule:
    """How one family of ops can mix positions: ``check`` says why a call does (or ``None``)."""

    name: str
    ops: frozenset[str]
    check: Any  # Callable[[_Call], str | None]


_JOINS = frozenset({"cat", "concat", "concatenate"})

#: The decode analysis's vocabulary of ops that act on each position alone (or do not), checked in
#: order; an op no rule names is accepted only when ATen tags it ``pointwise`` or it is one of
#: :data:`_POINTWISE_EXTRA`. A new op family is one entry here plus a test.
MIXING_RULES: tuple[MixingRule, ...] = (
    MixingRule("products", _PRODUCTS, _product),
    MixingRule("layer norms", _NORMS, _norm),
    MixingRule(
        "statistics norms",
        frozenset(
            {
                "native_group_norm",
                "group_norm",
                "instance_norm",
                "native_batch_norm",
                "batch_norm",
                "_native_batch_norm_legit_no_training",
            }
        ),
        _statistics_norm,
    ),
    MixingRule("embeddings", frozenset({"embedding", "embedding_bag"}), _embedding),
    MixingRule(
        "convolutions",
        frozenset(
            {
                "convolution",
                "conv1d",
                "conv2d",
                "conv3d",
                "_convolution",
                "conv_transpose1d",
                "conv_transpose2d",
            }
        ),
        _convolution,
    ),
    MixingRule(
        "pads",
        frozenset({"constant_pad_nd", "pad", "reflection_pad1d", "replication_pad1d"}),
        _pad,
    ),
    MixingRule("slices", frozenset({"slice"}), _slice),
    MixingRule(
        "indexing", frozenset({"index", "_unsafe_index", "index_put", "_unsafe_index_put"}), _index
    ),
    MixingRule("reductions and scans", _REDUCTIONS, _reduction),
    MixingRule("triangles", frozenset({"tril", "triu"}), _triangle),
    MixingRule("shifts and flips", frozenset({"roll", "flip"}), _shift),
    MixingRule("moves along a dim", _ALONG_DIM - {"tril", "triu", "roll", "flip"}, _along_dim),
    MixingRule("repeats", frozenset({"repeat", "tile"}), _repeat),
    MixingRule("regroups", _REGROUPS, _regroup),
    MixingRule("layout and copies", _LAYOUT, _never),
    MixingRule(
        "fused attention",
        frozenset(
            {
                "scaled_dot_product_attention",
                "_scaled_dot_product_flash_attention",
                "_scaled_dot_product_efficient_attention",
            }
        ),
        _unrewritten,
    ),
)


def mixing_reason(node: fx.Node, seq: Any) -> str | None:
    """Why ``node`` mixes positions along the sequence symbol ``seq`` (``None``: it does not)."""
    if node.op in ("placeholder", "output", "get_attr"):
        return None
    if node.op == "call_module":
        return "a submodule call the decode analysis cannot see into"
    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        if target is operator.getitem or isinstance(target, torch._ops.HigherOrderOperator):
            return None  # a higher-order op's body is checked on its own (_check_subgraphs)
        if _tensor_inputs(node):
            return f"a Python call ({getattr(target, '__name__', target)}) on tensors"
        return None
    name = G.op_name(node)
    out = G.val(node)
    call = _Call(
        node,
        name,
        _tensor_inputs(node),
        list(out) if isinstance(out, (list, tuple)) else [out],
        seq,
    )
    if not any(_seq_dims(t, seq) for t in [*call.inputs, *call.outs]):
        return None  # nothing here has the sequence axis (weights, scalars, sizes)
    if name == "arange" or name.startswith("sym_"):
        return None
    if any(len(_seq_dims(t, seq)) > 1 for t in call.outs if isinstance(t, torch.Tensor)):
        return "builds a position × position tensor outside an attention site"
    if "pool" in name:
        return f"`{name}` pools over the sequence axis"
    for rule in MIXING_RULES:
        if name in rule.ops:
            return rule.check(call)
    if torch.Tag.pointwise in getattr(target, "tags", ()) or name in _POINTWISE_EXTRA:
        return None
    return f"`{name}` is not known to act on each position alone"


# -- the plan ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """The two graphs of decoding and how their inputs and outputs are laid out.

    ``prefill(*inputs)`` returns ``(*outputs, *state)``; ``step(*inputs, offset, *state)`` returns
    ``(*outputs, *state)``, with ``inputs`` the model's flat inputs (as ``graph_module`` takes
    them), ``outputs`` its flat outputs and ``state`` every site's state tensors in ``sites``
    order (names in ``state_names``).
    """

    prefill: fx.GraphModule
    step: fx.GraphModule
    num_inputs: int
    num_outputs: int
    sites: tuple[str, ...]
    state_names: tuple[tuple[str, ...], ...]
    positions: tuple[str, ...]

    @property
    def num_state(self) -> int:
        return sum(len(names) for names in self.state_names)


class _Site(nn.Module):
    """One site's prefill or step, returning a flat tuple (output, *state)."""

    def __init__(self, variant: AttentionVariant, mode: str) -> None:
        super().__init__()
        self.variant = variant
        self.mode = mode

    def forward(self, query, key, value, *state, mask=None, causal=False, scale=1.0):
        if self.mode == "prefill":
            out, new = self.variant.prefill(
                query, key, value, mask=mask, causal=causal, scale=scale
            )
        else:
            out, new = self.variant.step(query, key, value, tuple(state), mask=mask, scale=scale)
        # Contiguous state: the same strides at every step (a compiled step is not recompiled
        # because prefill returned a transposed view).
        return (out, *(t.contiguous() for t in new))


def _site_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, AttentionVariant]]:
    from attnrewrite.variants.softmax import SoftmaxAttention

    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and str(node.target).startswith(VARIANTS_ATTR + "."):
            module = gm.get_submodule(str(node.target))
            if isinstance(module, AttentionVariant):
                found.append((node, module))
        elif is_attention(node):
            found.append((node, SoftmaxAttention(site_of(node))))
    return found


def _site_call(node: fx.Node) -> tuple[list[Any], dict[str, Any]]:
    """(q, k, v) and (mask, causal, scale) of a site node, variant call or canonical op."""
    if is_attention(node):
        args = operands(node)
        return [args["query"], args["key"], args["value"]], {
            "mask": args["mask"],
            "causal": args["causal"],
            "scale": args["scale"],
        }
    return list(node.args[:3]), {k: node.kwargs.get(k) for k in ("mask", "causal", "scale")}


def _sequence_symbol(sites: list[tuple[fx.Node, AttentionVariant]]) -> Any:
    symbols = set()
    for node, variant in sites:
        (q, k, _), _ = _site_call(node)
        for operand, what in ((q, "queries"), (k, "keys")):
            size = G.shape(operand)[2] if G.shape(operand) else None
            expr = size.node.expr if isinstance(size, torch.SymInt) else None
            if expr is not None and not expr.is_Symbol:
                raise DecodeError(
                    f"site {variant.site.name}: the number of {what} is {size}, not a sequence "
                    "length itself: positions are regrouped before attention (token merging, "
                    "pooling), which has no one-token step"
                )
            if expr is None:
                raise DecodeError(
                    f"site {variant.site.name}: the number of {what} was fixed at capture "
                    f"({size}); decoding needs the sequence length dynamic. Capture with an "
                    "example of batch >= 2 and length >= 2 and check the report's notes for "
                    "what fixed it."
                )
            symbols.add(expr)
    if len(symbols) != 1:
        raise DecodeError(
            "the sites do not all attend over one sequence (lengths "
            f"{', '.join(sorted(map(str, symbols)))}): decoding handles one causal sequence"
        )
    return symbols.pop()


def _mask_cone(graph: fx.Graph, masks: set[fx.Node], sites: set[fx.Node]) -> set[fx.Node]:
    """Nodes whose every use ends in a site's mask argument."""
    cone: set[fx.Node] = set()
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output") or not node.users:
            continue
        only_mask = True
        for user in node.users:
            if user in cone:
                continue
            if user in sites and node in masks and not _used_besides_mask(user, node):
                continue
            only_mask = False
            break
        if only_mask:
            cone.add(node)
    return cone


def _used_besides_mask(site: fx.Node, node: fx.Node) -> bool:
    (q, k, v), extra = _site_call(site)
    return node in (q, k, v)


def _where(node: fx.Node) -> str:
    module = G.module_path(node)
    return f"`{node.name}`" + (f" in {module}" if module else "")


def _check_subgraphs(gm: fx.GraphModule, node: fx.Node, seq: Any, problems: list[str]) -> None:
    for arg in node.args:
        if isinstance(arg, fx.Node) and arg.op == "get_attr":
            sub = G.fetch_attr(gm, str(arg.target))
            if isinstance(sub, fx.GraphModule):
                for inner in sub.graph.nodes:
                    if G.op_name(inner) == "arange" and _seq_dims(G.val(inner), seq):
                        problems.append(
                            f"{_where(inner)}: a position computed inside a "
                            f"`{getattr(node.target, '__name__', node.target)}` region"
                        )
                        continue
                    reason = mixing_reason(inner, seq)
                    if reason:
                        problems.append(f"{_where(inner)}: {reason}")
                    if isinstance(inner.target, torch._ops.HigherOrderOperator):
                        _check_subgraphs(sub, inner, seq, problems)


def decodable_variants() -> list[str]:
    """Registered variants that declare a decode state (some refuse some options or sites)."""
    from attnrewrite.variants import get_variant, variant_names

    return [name for name in variant_names() if get_variant(name).state_names]


#: The placeholder of the padding mask (Hugging Face's name), which decoding feeds as ones.
MASK_INPUT = "attention_mask"

#: Mixing the mask computation may do: positions compared pairwise, masks indexed or sliced at
#: positions. What it may not do is sum or scan over positions (ALiBi from a cumulative count
#: of the mask is handled as a position, see ``_is_mask_count``).
_HARMLESS_IN_MASKS = (
    "builds a position × position tensor",
    "slices the sequence axis",
    "tril/triu",
    "`index",
    "`_unsafe_index",
    "`select`",
    "`index_select`",
    "`gather`",
)


def _is_mask_count(node: fx.Node, seq: Any, mask_input: fx.Node | None) -> bool:
    """A cumulative sum along the sequence of values computed from the padding mask alone, on a
    (batch, sequence) tensor: a position counted over real tokens (OPT's learned positions,
    BLOOM's ALiBi). The step adds the count so far, per sequence."""
    if mask_input is None or G.op_name(node) != "cumsum":
        return False
    value = G.val(node)
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or _seq_dims(value, seq) != [1]:
        return False
    if G.normalize_dim(G.arg(node, "dim", 0), 2) != 1:
        return False
    pending, seen = [node.args[0]], set()
    while pending:
        current = pending.pop()
        if not isinstance(current, fx.Node) or current in seen:
            continue
        seen.add(current)
        if current.op == "placeholder" and current is not mask_input:
            return False
        pending.extend(current.all_input_nodes)
    return mask_input in seen


def plan_decode(gm: fx.GraphModule) -> DecodePlan:
    """Build the prefill and step graphs of ``gm`` (not modified), or raise ``DecodeError``."""
    sites = _site_nodes(gm)
    if not sites:
        raise DecodeError(
            "the model has no rewritten attention site: there is nothing to decode as a "
            "recurrence (rewrite a causal decoder first)"
        )
    refusals = [
        f"{variant.site.name}: {why}" for _, variant in sites if (why := variant.decode_refusal())
    ]
    if refusals:
        raise DecodeError(
            "these sites cannot be decoded one token at a time:\n  "
            + "\n  ".join(refusals)
            + f"\nRewrite them with a decodable variant ({', '.join(decodable_variants())}) or "
            "leave them out with sites=..."
        )
    seq = _sequence_symbol(sites)
    site_set = {node for node, _ in sites}
    masks = {m for node, _ in sites if isinstance(m := _site_call(node)[1]["mask"], fx.Node)}
    cone = _mask_cone(gm.graph, masks, site_set)
    problems: list[str] = []
    positions: list[fx.Node] = []
    counts: list[fx.Node] = []
    mask_input = next(
        (n for n in gm.graph.nodes if n.op == "placeholder" and n.name == MASK_INPUT), None
    )
    for node in gm.graph.nodes:
        if node in site_set:
            continue
        if _is_mask_count(node, seq, mask_input):
            counts.append(node)
            continue
        if node in cone:
            reason = mixing_reason(node, seq)
            if reason and not reason.startswith(_HARMLESS_IN_MASKS):
                problems.append(f"{_where(node)} (in a mask): {reason}")
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        if G.op_name(node) == "arange" and _seq_dims(G.val(node), seq):
            positions.append(node)
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            _check_subgraphs(gm, node, seq, problems)
            continue
        reason = mixing_reason(node, seq)
        if reason:
            problems.append(f"{_where(node)}: {reason}")
    if problems:
        shown = problems[:8] + ([f"... and {len(problems) - 8} more"] if len(problems) > 8 else [])
        raise DecodeError(
            "decoding one token at a time would be wrong: outside the attention sites these "
            "nodes mix positions along the sequence:\n  " + "\n  ".join(shown)
        )
    names = tuple(variant.site.name for _, variant in sites)
    prefill = _build(gm, sites, "prefill", positions, counts)
    step = _build(gm, sites, "step", positions, counts)
    num_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    output = next(n for n in gm.graph.nodes if n.op == "output")
    flat_out = output.args[0]
    num_outputs = len(flat_out) if isinstance(flat_out, (list, tuple)) else 1
    return DecodePlan(
        prefill,
        step,
        num_inputs,
        num_outputs,
        names,
        tuple(tuple(variant.state_names) for _, variant in sites),
        tuple(n.name for n in [*positions, *counts]),
    )


def _build(
    gm: fx.GraphModule,
    sites: list[tuple[fx.Node, AttentionVariant]],
    mode: str,
    positions: list[fx.Node],
    counts: list[fx.Node],
) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    attrs: dict[str, Any] = {}
    variants = dict(sites)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        env[node] = graph.node_copy(node, env.__getitem__)
    offset = graph.placeholder("offset") if mode == "step" else None
    count_offset = graph.placeholder("mask_offset") if mode == "step" else None
    state_in: list[list[fx.Node]] = []
    if mode == "step":
        for _, variant in sites:
            key = module_key(variant.site.name)
            state_in.append(
                [graph.placeholder(f"state_{key}_{name}") for name in variant.state_names]
            )
    state_out: list[fx.Node] = []
    shifted, counted = set(positions), set(counts)
    site_index = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            flat = node.args[0]
            flat = list(flat) if isinstance(flat, (list, tuple)) else [flat]
            outs = [fx.map_arg(x, env.__getitem__) for x in flat]
            graph.output((*outs, *state_out))
            break
        if node in variants:
            variant = variants[node]
            key = module_key(variant.site.name)
            target = f"{DECODE_ATTR}.{key}"
            attrs[target] = _Site(variant, mode)
            (q, k, v), extra = _site_call(node)
            inputs = [env[q], env[k], env[v]]
            mask = env[extra["mask"]] if isinstance(extra["mask"], fx.Node) else None
            kwargs: dict[str, Any] = {"mask": mask, "scale": extra["scale"]}
            if mode == "prefill":
                kwargs["causal"] = extra["causal"]
            else:
                inputs += state_in[site_index]
            call = graph.call_module(target, tuple(inputs), kwargs)
            call.meta.update(node.meta)
            env[node] = graph.call_function(operator.getitem, (call, 0))
            env[node].meta.update(node.meta)
            for i in range(len(variant.state_names)):
                state_out.append(graph.call_function(operator.getitem, (call, i + 1)))
            site_index += 1
            continue
        for name in ("target",):
            if node.op in ("get_attr", "call_module"):
                attrs[str(getattr(node, name))] = G.fetch_attr(gm, str(node.target))
        copied = graph.node_copy(node, env.__getitem__)
        if node in shifted and offset is not None:
            copied = graph.call_function(torch.ops.aten.add.Tensor, (copied, offset))
        elif node in counted and count_offset is not None:
            copied = graph.call_function(torch.ops.aten.add.Tensor, (copied, count_offset))
        env[node] = copied
    root = _root(attrs)
    module = fx.GraphModule(root, graph, class_name=f"Decode{mode.capitalize()}")
    module.meta["attnrewrite_decode"] = mode
    return module


def _root(attrs: dict[str, Any]) -> nn.Module:
    """A module holding each ``qualified.name -> object`` at its path (shared, not copied)."""
    root = nn.Module()
    for path, obj in attrs.items():
        *parents, leaf = path.split(".")
        holder = root
        for part in parents:
            if not hasattr(holder, part):
                holder.add_module(part, nn.Module())
            holder = getattr(holder, part)
        G.set_attr(holder, leaf, obj)
    return root
