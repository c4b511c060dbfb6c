"""Canonicalise: every accepted site becomes one ``attention`` node on (B, H, N, d) tensors.

Reads: the :class:`~attnrewrite.passes.find_attention.SiteMatch` records of the sites to rewrite.
Changes: for each, inserts the canonical q, k, v (scale and grouped-KV repeats stripped, axes moved
to (batch, heads, seq, feature)), the canonical mask, and one call of the canonical op
``torch.ops.attnrewrite.attention`` (:mod:`attnrewrite.ops`) carrying the site (JSON argument, and
``meta["attnrewrite_site"]``); the site's output node is replaced by the canonical output moved
back to the model's layout. After this pass the graph no longer depends on how the model spelled
attention; lowering the ``attention`` node to ``scaled_dot_product_attention`` is exact.

Masks: ``general`` sites get the full additive (or boolean keep) mask; ``key`` and ``causal+key``
sites get only the key term, shaped (B|1, H|1, 1, Nk), computed by pushing a "last query row" slice
up the mask's own computation so the dense O(N²) mask is no longer needed (and disappears in the
dead-code pass). The last row is the key term for both classes: for ``causal+key`` the causal
condition j <= Nq−1 only drops keys that every row drops anyway.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Mapping
from typing import Any, ClassVar

import sympy
import torch
from torch import fx
from torch.utils._sympy.functions import FloorDiv, PythonMod
from torch.utils._sympy.functions import Max as SymMax
from torch.utils._sympy.functions import Min as SymMin
from torch.utils._sympy.functions import Mod as SymMod

from attnrewrite.ops import ATTENTION, SITE_META, encode_site
from attnrewrite.passes import graph as G
from attnrewrite.passes.base import Emitter, PassResult, aten
from attnrewrite.passes.find_attention import MaskTerm, Operand, SiteMatch
from attnrewrite.passes.mask_analysis import MaskAnalysis, reshape_groups
from attnrewrite.passes.vocab import ROW_ELEMENTWISE
from attnrewrite.site import MaskClass, Rejected


@dataclasses.dataclass(frozen=True)
class Canonicalize:
    """Insert one canonical ``attention`` node per accepted site."""

    name: ClassVar[str] = "canonicalize"
    #: The sites to canonicalise; in a pipeline, by default the ``select`` pass's ``accepted``.
    matches: tuple[SiteMatch, ...] | None = None
    #: Sites lowered to an exact variant: they keep the model's own dense mask (so a fully masked
    #: row computes what the original computes, whatever fill value the model used); by default
    #: the ``select`` pass's ``exact``.
    dense_masks: frozenset[str] | None = None

    def __call__(self, gm: fx.GraphModule, results: Mapping[str, Any] | None = None) -> PassResult:
        chosen = results["select"].stats if results and "select" in results else {}
        matches = self.matches if self.matches is not None else chosen.get("accepted", ())
        dense_masks = self.dense_masks if self.dense_masks is not None else chosen.get("exact", ())
        rows = _Rows(MaskAnalysis(gm))
        failed: dict[str, str] = {}
        outputs: dict[str, tuple[fx.Node, fx.Node]] = {}
        for match in matches:
            before = match.output
            try:
                problem = canonicalize_site(
                    gm.graph, match, rows, dense=match.site.name in dense_masks
                )
            except Exception as exc:  # noqa: BLE001 - one site's failure must not stop the others
                problem = f"internal error ({type(exc).__name__}: {exc})"
            if problem:
                failed[match.site.name] = problem
            else:
                outputs[match.site.name] = (before, rows.last_output)
        stats = {"canonicalized": len(outputs), "failed": failed, "outputs": outputs}
        diagnostics = tuple(
            Rejected(node=name, module=name, reason=why, stage="canonicalize")
            for name, why in failed.items()
        )
        return PassResult(gm, bool(outputs), stats, diagnostics)


@dataclasses.dataclass
class _Rows:
    """Memo of emitted last-query-row nodes (shared by the sites that read one mask)."""

    analysis: MaskAnalysis
    memo: dict[fx.Node, fx.Node] = dataclasses.field(default_factory=dict)
    lengths: tuple[Any, Any] | None = None  # (Nq, Nk) as ints or sym_size nodes
    device: torch.device | None = None  # where the site's tensors live
    last_output: fx.Node | None = None  # the canonical output of the last site rewritten

    def items(self):
        return self.memo.items()

    def __contains__(self, node: fx.Node) -> bool:
        return node in self.memo

    def __getitem__(self, node: fx.Node) -> fx.Node:
        return self.memo[node]

    def __setitem__(self, node: fx.Node, value: fx.Node) -> None:
        self.memo[node] = value

    def __delitem__(self, node: fx.Node) -> None:
        del self.memo[node]


def canonicalize_site(
    graph: fx.Graph, match: SiteMatch, rows: _Rows, dense: bool = False
) -> str | None:
    """Rewrite one site; return a reason (and leave the graph as it was) if it cannot be done."""
    created_before = set(graph.nodes)
    emit = Emitter(graph, match.output)
    try:
        out = _build(emit, match, rows, dense)
    except _Refuse as why:
        out = None
        reason = str(why)
    if out is None:
        for node in reversed(list(graph.nodes)):
            if node not in created_before and not node.users:
                graph.erase_node(node)
        for k in [k for k, v in rows.items() if v not in set(graph.nodes)]:
            del rows[k]
        return reason if "reason" in locals() else "could not build canonical tensors"
    match.output.replace_all_uses_with(out)
    rows.last_output = out
    return None


class _Refuse(Exception):
    pass


def _build(emit: Emitter, match: SiteMatch, rows: _Rows, dense: bool = False) -> fx.Node:
    site = match.site
    frame = match.frame_batch
    q_batch = match.batch_letters
    heads = site.num_heads if len(frame) == 1 and site.num_heads > 1 else None
    q = _canonical_operand(emit, match.query, q_batch, match.score_batch, frame, heads=heads)
    for op, factor in match.query_scales:
        aligned = factor
        for _ in range(len(frame) + 2 - max(G.rank(factor), 0)):
            aligned = emit.unsqueeze(aligned, 0)
        aligned = _to_4d_mask(emit, aligned, len(frame), heads)
        q = emit.call(aten.mul.Tensor if op == "mul" else aten.div.Tensor, q, aligned)
    k = _canonical_operand(emit, match.key, q_batch, match.score_batch, frame, heads=heads)
    p_batch = match.out_letters.replace(match.out_q, "").replace(match.out_e, "")
    v = _canonical_operand(emit, match.value, p_batch, match.out_batch, frame, heads=heads)
    if match.value.factor != 1.0:
        # A constant factor on the values (v·c) was walked through like a scale; keep it.
        v = emit.call(aten.mul.Tensor, v, match.value.factor)
    q, k, v = _common_batch(emit, q, k, v)
    rows.lengths = (_length(emit, q), _length(emit, k))
    anchor_val = match.anchor.meta.get("val")
    rows.device = anchor_val.device if isinstance(anchor_val, torch.Tensor) else None
    dense = dense and bool(match.mask_terms)
    mask = _canonical_mask(emit, match, rows, heads, dense)
    # A dense mask already holds the causal condition, unless it came from sdpa's is_causal.
    causal = match.sdpa_causal if dense else site.mask.is_causal
    node = emit.call(
        ATTENTION,
        q,
        k,
        v,
        mask,
        causal,
        float(site.scale),
        float(site.dropout_p),
        encode_site(site),
    )
    node.meta[SITE_META] = site
    return _restore_output(emit, node, match, heads)


def _common_batch(emit: Emitter, *xs: fx.Node) -> list[fx.Node]:
    """Expand operands broadcast over the batch (a learned pooling query, learned memory keys:
    batch 1) to the others' batch, so every variant sees q, k, v of one batch size."""
    sizes = [G.shape(x)[0] for x in xs]
    batched = next((x for x, size in zip(xs, sizes) if not G.is_one(size)), None)
    if batched is None:
        return list(xs)
    out = []
    for x, size in zip(xs, sizes):
        if G.is_one(size):
            batch = G.shape(batched)[0]
            if not isinstance(batch, int):
                batch = emit.call(aten.sym_size.int, batched, 0)
            x = emit.call(aten.expand.default, x, [batch, -1, -1, -1])
        out.append(x)
    return out


def _length(emit: Emitter, x: fx.Node) -> Any:
    size = G.shape(x)[2]
    return size if isinstance(size, int) else emit.call(aten.sym_size.int, x, 2)


def _canonical_operand(
    emit: Emitter,
    op: Operand,
    batch_order: str,
    batch_sizes: tuple[Any, ...],
    frame: tuple[Any, ...],
    heads: int | None = None,
) -> fx.Node:
    x = op.source
    for n in op.replay:
        x = emit.copy(n, x)
    letters = op.letters
    perm = [letters.index(c) for c in batch_order if c in letters]
    perm += [letters.index(op.seq), letters.index(op.feature)]
    if len(perm) != len(letters):
        raise _Refuse("an operand has axes that are neither batch, sequence nor feature")
    x = emit.permute(x, perm)
    for i, c in enumerate(batch_order):
        if c not in letters:
            x = emit.unsqueeze(x, i)
    shp = G.shape(x)
    nb = len(batch_order)
    x_batch = shp[:nb]
    if not _same_shape(batch_sizes, frame):
        if not all(G.same_size(a, b) for a, b in zip(x_batch, batch_sizes)):
            x = emit.call(aten.expand.default, x, [*[_size_arg(s) for s in batch_sizes], -1, -1])
        x = emit.reshape(x, [*frame, shp[-2], shp[-1]])
        if x is None:
            raise _Refuse("cannot express the batch reshape with symbolic sizes")
    return _to_4d(emit, x, len(frame), heads)


def _size_arg(s: Any) -> Any:
    return s if isinstance(s, int) else -1


def _same_shape(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    return len(a) == len(b) and all(G.same_size(x, y) for x, y in zip(a, b))


def _to_4d(emit: Emitter, x: fx.Node, nb: int, heads: int | None = None) -> fx.Node:
    """(batch..., N, f) -> (B, H, N, f). A (B·H) batch whose heads are known is split."""
    if nb == 2:
        return x
    if nb == 1:
        shp = G.shape(x)
        if heads is not None and not G.is_one(shp[0]):
            out = emit.reshape(x, [shp[0] // heads, heads, shp[1], shp[2]])
            if out is None:
                raise _Refuse("cannot split the folded heads")
            return out
        return emit.unsqueeze(x, 1)
    if nb == 0:
        return emit.unsqueeze(emit.unsqueeze(x, 0), 0)
    shp = G.shape(x)
    lead = shp[: nb - 1]
    out = emit.reshape(x, [_prod(lead), shp[nb - 1], shp[-2], shp[-1]])
    if out is None:
        raise _Refuse("cannot flatten leading batch axes")
    return out


def _prod(sizes: Any) -> Any:
    n: Any = 1
    for s in sizes:
        n = n * s
    return n


def _restore_output(
    emit: Emitter, node: fx.Node, match: SiteMatch, heads: int | None = None
) -> fx.Node:
    """(B, H, Nq, dv) -> the value product's own layout."""
    nb = len(match.frame_batch)
    shp = G.shape(node)
    x = node
    if nb == 1 and heads is not None:
        x = emit.reshape(x, [*match.frame_batch, shp[-2], shp[-1]])
    elif nb == 1:
        x = emit.call(aten.squeeze.dim, x, 1)
    elif nb == 0:
        x = emit.call(aten.squeeze.dim, emit.call(aten.squeeze.dim, x, 0), 0)
    elif nb > 2:
        x = emit.reshape(x, [*match.frame_batch, shp[-2], shp[-1]])
    if x is None:
        raise _Refuse("cannot restore the output layout")
    shp = G.shape(x)
    if not _same_shape(match.out_batch, match.frame_batch):
        x = emit.reshape(x, [*match.out_batch, shp[-2], shp[-1]])
        if x is None:
            raise _Refuse("cannot restore the output batch layout")
    p_batch = match.out_letters.replace(match.out_q, "").replace(match.out_e, "")
    current = p_batch + match.out_q + match.out_e
    perm = [current.index(c) for c in match.out_letters]
    x = emit.permute(x, perm)
    want = G.shape(match.output)
    if (
        G.dtype(x) is not None
        and G.dtype(match.output) is not None
        and G.dtype(x) != G.dtype(match.output)
    ):
        x = emit.call(aten.to.dtype, x, G.dtype(match.output))
    if want is not None and G.shape(x) is not None and len(want) != len(G.shape(x)):
        raise _Refuse("output rank mismatch")
    return _same_layout(emit, x, match.output)


def _same_layout(emit: Emitter, x: fx.Node, like: fx.Node) -> fx.Node:
    """``x`` laid out in memory like ``like`` (values unchanged). sdpa returns (B, H, N, d) with a
    (B, N, H, d) memory order, and models rely on it: ``out.transpose(1, 2).view(B, N, -1)``
    (JetMoE) is only valid on that layout."""
    want, have = like.meta.get("val"), x.meta.get("val")
    if not (isinstance(want, torch.Tensor) and isinstance(have, torch.Tensor)) or want.dim() < 2:
        return x
    order = sorted(range(want.dim()), key=lambda d: -G.size_hint(want.stride()[d]))
    if order == list(range(want.dim())):
        return x  # the site's output was contiguous: any layout of ours reshapes like it
    inverse = [order.index(d) for d in range(want.dim())]
    dense = emit.call(
        aten.clone.default, emit.permute(x, order), memory_format=torch.contiguous_format
    )
    return emit.permute(dense, inverse)


# -- masks -----------------------------------------------------------------------------------------


def _canonical_mask(
    emit: Emitter, match: SiteMatch, rows: _Rows, heads: int | None = None, dense: bool = False
) -> fx.Node | None:
    cls = match.site.mask
    if not dense and cls in (MaskClass.NONE, MaskClass.CAUSAL):
        return None
    frame_rank = len(match.frame_batch) + 2
    key_only = cls.has_key_term and not dense
    dtype = (
        G.dtype(match.anchor.args[0]) if match.site.kind == "manual" else G.dtype(match.query.node)
    )
    parts: list[fx.Node] = []
    for term in match.mask_terms:
        node = _row(emit, term.node, rows) if key_only else term.node
        parts.append(_to_frame(emit, node, term, match.frame_batch))
    first = match.mask_terms[0]
    boolean = G.dtype(parts[0]) == torch.bool
    if (
        len(parts) == 1
        and first.kind == "keep"
        and first.value == float("-inf")
        and boolean
        and (match.score_floor is None)
    ):
        mask = parts[0]  # a boolean keep mask, as sdpa takes it
    elif len(parts) == 1 and first.kind == "add" and first.value == 1.0:
        mask = parts[0]
    else:
        mask = _combine_terms(emit, match.mask_terms, parts, dtype, rows.device)
    if dense and match.score_floor is not None:
        mask = emit.call(aten.clamp_min.default, mask, match.score_floor)
    for _ in range(frame_rank - G.rank(mask)):
        mask = emit.unsqueeze(mask, 0)
    return _to_4d_mask(emit, mask, len(match.frame_batch), heads)


def _to_frame(emit: Emitter, node: fx.Node, term: MaskTerm, frame: tuple[Any, ...]) -> fx.Node:
    """A mask term applied in another batch layout (heads folded into the batch) -> ``frame``."""
    term_batch = tuple(G.shape(term.frame)[:-2])
    if _same_shape(term_batch, frame):
        return node
    for _ in range(len(term_batch) + 2 - G.rank(node)):
        node = emit.unsqueeze(node, 0)
    shp = G.shape(node)
    if all(G.is_one(s) for s in shp[:-2]):
        out = emit.reshape(node, [*([1] * len(frame)), shp[-2], shp[-1]])
    else:
        # Only axes merged with others need their full size; an axis that stays one axis keeps
        # broadcasting. Swin adds its (nW, N, N) shift mask in a (B, nW, H) layout to scores laid
        # out as (B·nW, H): the mask is expanded over B (a size ``expand(-1)`` would leave at 1)
        # and not over H.
        groups = reshape_groups(term_batch, frame)
        if any(not src or not dst for src, dst in groups):
            groups = [(list(range(len(term_batch))), list(range(len(frame))))]
        sizes: list[Any] = []
        target: list[Any] = []
        for src, dst in groups:
            if len(src) == 1 and len(dst) == 1:
                sizes.append(-1)
                target.append(shp[src[0]])
            else:
                sizes += [_size_node(emit, term_batch[a]) for a in src]
                target += [frame[a] for a in dst]
        full = emit.call(aten.expand.default, node, [*sizes, -1, -1])
        out = emit.reshape(full, [*target, shp[-2], shp[-1]])
    if out is None:
        raise _Refuse("cannot move a mask term to the softmax's batch layout")
    return out


def _size_node(emit: Emitter, size: Any) -> Any:
    """A size as an ``expand`` argument: an int, or nodes computing it from the graph inputs'
    own sizes (a batch size ``view(-1, nW, ...)`` derived is an expression such as ``B·H·W//16``).
    """
    fixed = G.as_int(size)
    if fixed is not None:
        return fixed
    if not isinstance(size, torch.SymInt):
        raise _Refuse(f"cannot name the size {size} that a mask term is broadcast over")
    symbols: dict[Any, tuple[fx.Node, int]] = {}
    for node in emit.graph.nodes:
        if node.op != "placeholder":
            continue
        for axis, own in enumerate(G.shape(node) or ()):
            if isinstance(own, torch.SymInt):
                if own.node.expr == size.node.expr:
                    return emit.call(aten.sym_size.int, node, axis)
                if isinstance(own.node.expr, sympy.Symbol):
                    symbols.setdefault(own.node.expr, (node, axis))
    return _size_expression(emit, size.node.expr, symbols)


def _size_expression(
    emit: Emitter, expr: Any, symbols: dict[Any, tuple[fx.Node, int]]
) -> int | fx.Node:
    """Emit a sympy size expression over input sizes (integers, +, ·, floor division)."""
    if expr.is_Integer:
        return int(expr)
    if expr in symbols:
        node, axis = symbols[expr]
        return emit.call(aten.sym_size.int, node, axis)
    ops = {
        sympy.Add: operator.add,
        sympy.Mul: operator.mul,
        FloorDiv: operator.floordiv,
        # torchvision's window padding: (window - H % window) % window.
        SymMod: operator.mod,
        PythonMod: operator.mod,
        sympy.Mod: operator.mod,
        SymMax: torch.sym_max,
        SymMin: torch.sym_min,
    }
    op = next((fn for cls, fn in ops.items() if isinstance(expr, cls)), None)
    if op is None:
        raise _Refuse(f"cannot compute the size {expr} that a mask term is broadcast over")
    parts = [_size_expression(emit, a, symbols) for a in expr.args]
    out = parts[0]
    for part in parts[1:]:
        if isinstance(out, int) and isinstance(part, int):
            out = op(out, part)
        else:
            out = emit.call(op, out, part)
    return out


def _to_4d_mask(emit: Emitter, mask: fx.Node, nb: int, heads: int | None = None) -> fx.Node:
    if nb == 2:
        return mask
    if nb == 1:
        return _to_4d(emit, mask, 1, heads)
    if nb == 0:
        return emit.unsqueeze(emit.unsqueeze(mask, 0), 0)
    shp = G.shape(mask)
    return _to_4d(emit, mask, nb) if shp is not None else mask


def _combine_terms(
    emit: Emitter,
    terms: tuple[MaskTerm, ...],
    parts: list[fx.Node],
    dtype: torch.dtype | None,
    device: torch.device | None = None,
) -> fx.Node:
    """One additive mask equal to the terms applied in the model's order.

    Terms were collected walking up from softmax, so they are applied in reverse. ``masked_fill``
    and ``where`` *replace* scores: they become ``where(cond, fill, mask_so_far)`` rather than a
    sum,
    so two fills with ``finfo.min`` stay ``finfo.min`` (a sum would overflow to -inf and change
    what a fully masked row computes).
    """
    dtype = dtype or torch.float32
    mask: fx.Node | None = None
    for term, node in reversed(list(zip(terms, parts))):
        if term.kind == "add":
            add = node if term.value == 1.0 else emit.call(aten.mul.Tensor, node, term.value)
            mask = add if mask is None else emit.call(aten.add.Tensor, mask, add)
            continue
        if G.dtype(node) != torch.bool:
            node = emit.call(aten.ne.Scalar, node, 0)  # a 0/1 gate (w·b + c·(1 − b))
        base = (
            mask
            if mask is not None
            else emit.call(aten.scalar_tensor.default, 0.0, dtype=dtype, device=device)
        )
        if term.kind == "fill":
            mask = emit.call(aten.where.ScalarSelf, node, term.value, base)
        else:
            mask = emit.call(aten.where.ScalarOther, node, base, term.value)
    assert mask is not None
    return mask


def _row(emit: Emitter, node: fx.Node, rows: _Rows) -> fx.Node:
    """``node[..., -1:, :]`` (the last query row), computed by pushing the slice to the leaves."""
    if node in rows:
        return rows[node]
    shp = G.shape(node)
    if shp is None or len(shp) < 2 or G.is_one(shp[-2]):
        rows[node] = node
        return node
    name = G.op_name(node)
    out_rank = len(shp)
    positional = _positional_row(emit, node, rows)
    if positional is not None:
        new = positional
    elif name in ROW_ELEMENTWISE:

        def sub(a: Any) -> Any:
            if isinstance(a, fx.Node) and G.rank(a) >= 2 and out_rank - G.rank(a) <= out_rank - 2:
                return _row(emit, a, rows)
            return a

        args = [sub(a) for a in node.args]
        kwargs = {k: sub(v) for k, v in node.kwargs.items()}
        new = emit.call(node.target, *args, **kwargs)
    elif name == "expand":
        src = _row(emit, node.args[0], rows)
        sizes = list(G.arg(node, "size"))
        sizes[-2] = 1
        new = emit.call(node.target, src, sizes)
    else:
        new = emit.call(aten.slice.Tensor, node, out_rank - 2, -1, None)
    rows[node] = new
    return new


def _positional_row(emit: Emitter, node: fx.Node, rows: _Rows) -> fx.Node | None:
    """The last row of a mask that is a pure function of positions (``tril`` of ones, a causal
    buffer, an ``arange`` comparison), rebuilt from ``arange`` in O(Nk)."""
    av = rows.analysis.value(node)
    r = av.rank
    if av.vary or not av.cmps or av.on is None or av.off is None or rows.lengths is None:
        return None
    q_axis, k_axis = r - 2, r - 1
    if any({c.a, c.b} != {q_axis, k_axis} for c in av.cmps):
        return None
    q_len, k_len = rows.lengths
    positions = emit.call(aten.arange.default, k_len, dtype=torch.int64, device=rows.device)
    last = emit.call(operator.sub, q_len, 1) if isinstance(q_len, fx.Node) else q_len - 1
    keep = None
    for c in av.cmps:
        # j - i <= c  ->  j <= last + c ;  i - j <= c  ->  j >= last - c
        if c.a == k_axis:
            bound = emit.call(operator.add, last, c.c) if isinstance(last, fx.Node) else last + c.c
            cond = emit.call(aten.le.Scalar, positions, bound)
        else:
            bound = emit.call(operator.sub, last, c.c) if isinstance(last, fx.Node) else last - c.c
            cond = emit.call(aten.ge.Scalar, positions, bound)
        keep = cond if keep is None else emit.call(aten.logical_and.default, keep, cond)
    dtype = G.dtype(node) or torch.float32
    if dtype == torch.bool and av.on is True and av.off is False:
        row = keep  # a boolean where(keep, True, False) is keep (and ORT has no bool Where)
    elif dtype == torch.bool and av.on is False and av.off is True:
        row = emit.call(aten.logical_not.default, keep)
    else:
        on = emit.call(aten.scalar_tensor.default, av.on, dtype=dtype, device=rows.device)
        row = emit.call(aten.where.ScalarOther, keep, on, av.off)
        if row.meta.get("val") is not None and row.meta["val"].dtype != dtype:
            row = emit.call(aten.to.dtype, row, dtype)
    return emit.call(aten.reshape.default, row, [*([1] * (r - 1)), -1])
