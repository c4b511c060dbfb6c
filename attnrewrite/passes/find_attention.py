"""Find softmax-attention sites in an ATen-level FX graph by walking dataflow.

Reads: a ``GraphModule`` captured by ``torch.export`` (ATen training IR, ``meta["val"]`` on nodes).
Changes: nothing. Produces: one :class:`SiteMatch` per site — the facts (:class:`AttentionSite`)
plus the graph positions the canonicalisation needs — and, for each other softmax, why it was not
taken as attention.

A manual site is anchored on a softmax. The softmax's axis picks a :data:`SCORE_LAYOUTS` entry:
which of the last two axes of the scores holds the keys (the softmax axis) and which the queries —
(…, query, key) for q·kᵀ normalised over the last axis, (…, key, query) for k·qᵀ normalised over
axis −2. Upward, the walk takes one :data:`SCORE_RULES` step per node (casts, copies, batch-only
reshapes, scalar scales, learned temperatures, additive masks, ``masked_fill`` and ``where`` with a
masking value, ...) up to a product whose query and key axes are free axes of different operands
(Q, K), with exactly one contracted axis (the feature axis). Downward, it passes the nodes a
:data:`PROBS_RULES` entry accepts (casts, copies, dropout, batch-only reshapes, transposes of the
last two axes) down to a product that contracts the key axis — and only it — with a value operand.
Anything else (softmax over the query or head axis, a product with no value operand) is not
attention, and the reason is returned.

The alternatives are tables of :class:`Rule` entries (a name, the ops it applies to, a function
that returns ``None`` when a node is not its spelling), each tried in order by one small driver
(:func:`first_match`). A new spelling is one entry plus one case in ``tests/passes/spellings.py``.

An ``F.scaled_dot_product_attention`` call is a site as it stands.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, Generic, TypeVar

import torch
from torch import fx

from attnrewrite.passes import graph as G
from attnrewrite.passes.base import AliasClasses, PassResult, written_nodes
from attnrewrite.passes.mask_analysis import (
    AbstractValue,
    MaskAnalysis,
    _masked,
    reshape_groups,
    swap_last_two,
)
from attnrewrite.passes.products import Product, as_product
from attnrewrite.passes.vocab import (
    AXIS_PERMUTES,
    CASTS,
    COPIES,
    DROPOUTS,
    FOLDS,
    MATRIX_TRANSPOSES,
    RESHAPES,
    SCALE_COMMUTING_VIEWS,
    SCORE_CAPS,
    SDPA_OPS,
    SOFTMAX_OPS,
)
from attnrewrite.site import AttentionSite, MaskClass, Rejected

# Bounds on the walks below. Each walk follows one chain of nodes; a chain longer than its bound is
# not a spelling the finder knows (and a cycle-free FX graph cannot loop, so the bounds only cap
# the work spent on an unusual graph).

#: Nodes between the score product and softmax (casts, scales, each mask term, reshapes).
SCORE_CHAIN_LIMIT = 64
#: Nodes between softmax and the value product (casts, copies, dropout, reshapes).
PROBS_CHAIN_LIMIT = 32
#: Permutations, copies, reshapes and scales walked up from a product operand to its source.
OPERAND_CHAIN_LIMIT = 24
#: Nodes walked up from a score candidate looking for the product it comes from (also the depth
#: of the recursion into both operands of an add, mul, where, ...).
REACH_PRODUCT_DEPTH = 24
#: Nodes walked up from a product operand to the reshape that folded heads into its batch axis.
FOLDED_HEADS_CHAIN_LIMIT = 12
#: Depth of the structural comparison of two mask computations (a mask recomputed after softmax).
SAME_VALUE_DEPTH = 12
#: Ancestors of q and k visited when deciding whether they share a source (self-attention): past
#: this many nodes the site is taken as cross-attention, which every variant handles correctly.
SHARED_SOURCE_ANCESTORS = 400


class NotAttention(Exception):
    """Raised inside the walk with the reason a softmax is not taken as attention."""


_Match = TypeVar("_Match")


@dataclasses.dataclass(frozen=True)
class Rule(Generic[_Match]):
    """One spelling the finder knows, tried on nodes whose op is one of ``ops``.

    ``match(node, *context)`` returns what the spelling makes of ``node`` (the next node of a walk)
    or ``None`` when ``node`` is not this spelling, so the next rule is tried. It raises
    :class:`NotAttention` when ``node`` is this spelling but the softmax is then not attention.
    """

    name: str
    ops: frozenset[str]
    match: Callable[..., _Match | None]


def first_match(rules: Sequence[Rule[_Match]], node: fx.Node, *context: Any) -> _Match | None:
    """The answer of the first rule that applies to ``node``'s op and matches, in table order."""
    name = G.op_name(node)
    for rule in rules:
        if name in rule.ops:
            found = rule.match(node, *context)
            if found is not None:
                return found
    return None


@dataclasses.dataclass(frozen=True)
class MaskTerm:
    """One mask/bias applied to the scores.

    kind: ``add`` (scores + scale·node), ``fill`` (positions where node is True get ``value``),
    ``keep`` (positions where node is False get ``value``).
    """

    kind: str
    node: fx.Node
    value: float
    frame: fx.Node


@dataclasses.dataclass(frozen=True)
class Operand:
    """How to build a canonical (batch..., seq, feature) tensor from a product operand.

    ``replay`` lists permutation/copy nodes to re-apply on top of ``source`` (the node before a
    stripped scale or head repeat) to recover the operand's layout; ``factor`` is the stripped
    scale.
    """

    node: fx.Node
    letters: str
    seq: str
    feature: str
    source: fx.Node
    replay: tuple[fx.Node, ...] = ()
    factor: float = 1.0
    kv_source_heads: Any = None  # heads before a stripped repeat (grouped KV), else None
    repeat_letter: str | None = None


@dataclasses.dataclass(frozen=True)
class SiteMatch:
    """A found site: the facts plus where it sits in the graph."""

    site: AttentionSite
    anchor: fx.Node
    output: fx.Node
    query: Operand | None
    key: Operand | None
    value: Operand | None
    batch_letters: str
    frame_batch: tuple[Any, ...]
    score_batch: tuple[Any, ...]
    out_letters: str
    out_batch: tuple[Any, ...]
    out_q: str
    out_e: str
    mask_terms: tuple[MaskTerm, ...]
    mask_value: AbstractValue | None
    sdpa_causal: bool = False
    canonical_problem: str | None = None
    query_scales: tuple[tuple[str, fx.Node], ...] = ()
    #: ``max(scores + mask, floor)`` before softmax: folded into the dense mask (exact variants).
    score_floor: float | None = None


@dataclasses.dataclass
class FindResult:
    matches: list[SiteMatch]
    rejected: list[Rejected]


@dataclasses.dataclass(frozen=True)
class FindAttention:
    """The find pass in the common pass shape: the graph is not changed; ``stats["matches"]``
    holds the sites' records and ``diagnostics`` every rejected softmax with its stage and
    reason (what ``report.rejected`` shows and ``debug=True`` prints)."""

    name: ClassVar[str] = "find"

    def __call__(self, gm: fx.GraphModule, results: Mapping[str, Any] | None = None) -> PassResult:
        found = _refuse_sites_written_in_place(gm, find_sites(gm))
        return PassResult(
            gm,
            False,
            {"matches": found.matches, "sites": len(found.matches)},
            diagnostics=tuple(found.rejected),
        )


def find_sites(gm: fx.GraphModule) -> FindResult:
    """All attention sites of ``gm`` in graph order, and every softmax looked at and rejected."""
    analysis = MaskAnalysis(gm)
    matches: list[SiteMatch] = []
    rejected: list[tuple[str, str]] = []
    for node in gm.graph.nodes:
        name = G.op_name(node)
        try:
            if name in SOFTMAX_OPS:
                matches.append(_manual_site(gm, node, analysis))
            elif name in SDPA_OPS:
                matches.append(_sdpa_site(gm, node, analysis))
        except NotAttention as why:
            rejected.append(Rejected(node.name, G.module_path(node), str(why)))
        except Exception as exc:  # noqa: BLE001 - one site's analysis must not abort the others
            reason = f"internal error while analysing it ({type(exc).__name__}: {exc}); left as is"
            rejected.append(Rejected(node.name, G.module_path(node), reason, "find-error"))
    _name_sites(matches)
    for m in matches:
        if m.site.mask is MaskClass.GENERAL:
            window = MaskAnalysis.sliding_window(m.mask_value)
            if window is not None:
                object.__setattr__(m, "site", m.site.replace(window=window))
    return FindResult(matches, rejected)


def _refuse_sites_written_in_place(gm: fx.GraphModule, found: FindResult) -> FindResult:
    """Mark sites whose intermediate tensors (scores, probabilities) are written in place.

    The finder reads dataflow; a write into a view of the scores (timm MViTv2 adds its
    relative-position bias into ``attn[:, :, 1:, 1:]``) changes them without being an input of
    the softmax, and canonicalisation would drop it. Such a site is refused with a reason.
    Aliasing is torch's (``AliasClasses``: fake-tensor storages and op schemas).
    """
    nodes = list(gm.graph.nodes)
    writes = {node: written for node in nodes if (written := written_nodes(node))}
    if not writes:
        return found
    position = {node: i for i, node in enumerate(nodes)}
    alias = AliasClasses(nodes)
    matches = []
    for match in found.matches:
        operands = [op.source for op in (match.query, match.key, match.value) if op is not None]
        sources = operands or list(match.anchor.all_input_nodes)
        end = position[match.output]
        inside = _between(sources, match.output, position)
        classes = {alias.find(node) for node in inside | set(sources)}
        # Writes before the score product are read by the model and by the canonical form alike
        # (the canonical q, k, v are read right before the site's output): DeepSeek's MLA fills
        # a preallocated q in place. Only writes after the product can change what the site saw.
        start = position[_score_product(match) or min(sources, key=position.__getitem__)]
        writer = next(
            (
                node
                for node, written in writes.items()
                # A write on the path itself (T5's ``scores += position_bias``) is dataflow the
                # finder analysed; only writes beside the path are hidden from it.
                if start < position[node] < end
                and node not in inside
                and any(alias.find(w) in classes for w in written)
            ),
            None,
        )
        if writer is not None and not match.canonical_problem:
            match = dataclasses.replace(
                match,
                canonical_problem=(
                    f"`{writer.name}` writes in place into a tensor computed inside the site "
                    "(e.g. a bias added into a view of the scores); such writes are not "
                    "analysed, so the site is left as it is"
                ),
            )
        matches.append(match)
    return FindResult(matches, found.rejected)


def _score_product(match: SiteMatch) -> fx.Node | None:
    """The node computing q·kᵀ (the sdpa call itself for sdpa sites)."""
    if match.query is None or match.key is None or match.anchor is match.output:
        return match.anchor if match.anchor is match.output else None
    key = match.key.node
    return next((u for u in match.query.node.users if key in u.all_input_nodes), None)


def _between(sources: list[fx.Node], output: fx.Node, position: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes on a dataflow path from ``sources`` to ``output``, both ends excluded."""
    start = min(position[s] for s in sources)
    after: set[fx.Node] = set(sources)
    for node in sorted(position, key=position.__getitem__):
        if start < position[node] <= position[output] and any(
            i in after for i in node.all_input_nodes
        ):
            after.add(node)
    before: set[fx.Node] = set()
    pending = [output]
    while pending:
        node = pending.pop()
        if node in before or position[node] < start:
            continue
        before.add(node)
        pending.extend(node.all_input_nodes)
    return (after & before) - set(sources) - {output}


def _name_sites(matches: list[SiteMatch]) -> None:
    """Give every site a unique name: its module path, suffixed when a module holds several."""
    seen: dict[str, int] = {}
    for m in matches:
        seen[m.site.name] = seen.get(m.site.name, 0) + 1
    counters: dict[str, int] = {}
    for i, m in enumerate(matches):
        base = m.site.name or "<root>"
        if seen[m.site.name] > 1:
            k = counters.get(base, 0)
            counters[base] = k + 1
            base = f"{base}#{k}"
        object.__setattr__(m, "site", m.site.replace(name=base))
        matches[i] = m


# -- manual sites ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ScoreLayout:
    """Where a softmax's input holds its query and key axes (negative, counted from the end).

    The softmax normalises ``key_axis``; ``query_axis`` is the other of the last two axes. Mask
    terms are put in canonical form in the (…, query, key) layout only: in another layout a masked
    site is found (its mask class read in (query, key) order) but left as it is.
    """

    name: str
    key_axis: int
    query_axis: int
    #: Said in the site's notes (empty for the usual layout).
    note: str = ""

    @property
    def key_last(self) -> bool:
        return self.key_axis == -1


#: The ways a softmax's input is read as attention scores, tried in order.
SCORE_LAYOUTS: tuple[ScoreLayout, ...] = (
    ScoreLayout("q·kᵀ over the last axis", key_axis=-1, query_axis=-2),
    # Key-major scores k·qᵀ, (…, key, query), normalised over the keys by softmax(dim=-2); the value
    # product contracts axis −2 (pᵀ·v, or an einsum naming it). A (…, N, 1) column of scores
    # softmaxed over N and applied to values is softmax pooling: attention with one query (the
    # scoring vector), the same computation as a learned pooling query in the first layout.
    ScoreLayout(
        "kᵀ·q over axis -2",
        key_axis=-2,
        query_axis=-1,
        note="key-major scores (k·qᵀ, softmax over dim -2)",
    ),
)


@dataclasses.dataclass
class _ScoreWalk:
    """What the walk from softmax up to the score product has collected so far."""

    gm: fx.GraphModule
    analysis: MaskAnalysis
    scale: float = 1.0
    terms: list[MaskTerm] = dataclasses.field(default_factory=list)
    tensor_scales: list[tuple[str, fx.Node]] = dataclasses.field(default_factory=list)
    transforms: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    floor: float | None = None  # max(scores, floor) right before softmax
    product: Product | None = None  # set when the walk reaches it

    def add_term(self, term: MaskTerm) -> None:
        # Walking up from softmax, the scales met so far are applied *after* this term: the term is
        # scaled with the scores (softmax((q·kᵀ + b)·s) adds s·b). A learned temperature there
        # would have to multiply the mask too, which the canonical form cannot say.
        if self.tensor_scales:
            self.problems.append("a mask or bias is added inside a tensor-valued temperature")
        if self.scale <= 0:
            self.problems.append("a mask or bias is scaled by a non-positive factor")
        self.terms.append(term)


@dataclasses.dataclass(frozen=True)
class _ScoreOperands:
    """The score product read as q·kᵀ: the query and key operands, their letters, the feature."""

    product: Product
    query: fx.Node
    query_letters: str
    query_seq: str
    key: fx.Node
    key_letters: str
    key_seq: str
    feature: str

    @property
    def batch_letters(self) -> str:
        return self.product.out_letters[:-2]


@dataclasses.dataclass(frozen=True)
class _ValueProduct:
    """The product of the probabilities with the values, and the path the probabilities took."""

    product: Product
    probs: fx.Node  # the probabilities as the product reads them
    chain: tuple[fx.Node, ...]  # the nodes from softmax (excluded) to ``probs``
    dropout_p: float
    escape: bool
    probs_letters: str
    value: fx.Node
    value_letters: str
    query: str  # the query letter of the product's output
    key: str  # the contracted key letter
    feature: str  # the value's feature letter


def _softmax_parts(node: fx.Node) -> tuple[fx.Node, int, bool]:
    x = node.args[0]
    r = G.rank(x)
    dim = G.normalize_dim(G.arg(node, "dim"), r)
    out_dt, in_dt = G.dtype(node), G.dtype(x)
    upcast = bool(out_dt and in_dt and out_dt.itemsize > in_dt.itemsize)
    return x, dim, upcast


def _manual_site(gm: fx.GraphModule, softmax: fx.Node, analysis: MaskAnalysis) -> SiteMatch:
    """A softmax read as attention: scores of a q·kᵀ product laid out as a :data:`SCORE_LAYOUTS`
    entry says, probabilities multiplied with values over the key axis."""
    scores, dim, _ = _softmax_parts(softmax)
    r = G.rank(scores)
    if r < 2:
        raise NotAttention("softmax of a vector (no query axis)")
    layout = _layout_of(scores, dim, r)
    walk = _walk_scores(gm, scores, analysis)
    qk = _score_operands(walk.product, layout)
    pv = _value_product(softmax, layout)
    frame_batch = tuple(G.shape(scores)[:-2])
    score_batch = tuple(G.shape(qk.product.node)[:-2])
    out_batch = tuple(G.shape(pv.probs)[:-2])
    head = qk.batch_letters[-1] if len(qk.batch_letters) >= 2 else None
    query = _operand(gm, qk.query, qk.query_letters, qk.query_seq, qk.feature)
    key = _operand(gm, qk.key, qk.key_letters, qk.key_seq, qk.feature, head)
    p_batch = pv.probs_letters[:-2]
    p_head = p_batch[-1] if len(p_batch) >= 2 else None
    # The value operand keeps the value product's own letters: it is canonicalised with the
    # value product's batch order (its letters need not match the score product's).
    value = _operand(gm, pv.value, pv.value_letters, pv.key, pv.feature, p_head)
    mask_value, mask_class, mask_reason = _classify_terms(analysis, walk.terms, r, layout)
    problem = _manual_problem(gm, walk, layout, pv, (frame_batch, score_batch, out_batch))
    return SiteMatch(
        site=_manual_facts(softmax, layout, walk, qk, pv, query, key, (mask_class, mask_reason)),
        anchor=softmax,
        output=pv.product.node,
        query=query,
        key=key,
        value=value,
        batch_letters=qk.batch_letters,
        frame_batch=frame_batch,
        score_batch=score_batch,
        out_letters=pv.product.out_letters,
        out_batch=out_batch,
        out_q=pv.query,
        out_e=pv.feature,
        mask_terms=tuple(walk.terms),
        mask_value=mask_value,
        canonical_problem=problem,
        query_scales=tuple(walk.tensor_scales),
        score_floor=walk.floor,
    )


def _layout_of(scores: fx.Node, dim: int, rank: int) -> ScoreLayout:
    """The :data:`SCORE_LAYOUTS` entry whose key axis the softmax normalises."""
    layout = next((lay for lay in SCORE_LAYOUTS if dim == rank + lay.key_axis), None)
    if layout is None:
        known = "; ".join(lay.name for lay in SCORE_LAYOUTS)
        raise NotAttention(
            f"softmax over axis {dim} of a rank-{rank} input, not the key axis of any score "
            f"layout ({known})"
        )
    return layout


def _score_operands(prod: Product, layout: ScoreLayout) -> _ScoreOperands:
    """Read the score product as q·kᵀ with its axes where ``layout`` says, or raise."""
    q_letter, k_letter = prod.out_letters[layout.query_axis], prod.out_letters[layout.key_axis]
    k_side = prod.side_of_free(k_letter)
    q_side = prod.side_of_free(q_letter)
    if k_side is None or q_side is None or k_side == q_side:
        raise NotAttention(
            "the score product is not q·kᵀ (query and key axes do not come from different operands)"
        )
    if len(prod.contracted) != 1:
        raise NotAttention(f"the score product contracts {len(prod.contracted)} axes, not one")
    (feature,) = prod.contracted
    q_node, q_letters = prod.operand(q_side)
    k_node, k_letters = prod.operand(k_side)
    for b in prod.out_letters[:-2]:
        if b not in q_letters and b not in k_letters:
            raise NotAttention("a batch axis of the scores comes from neither operand")
    extra = set(q_letters + k_letters) - set(prod.out_letters) - {feature}
    if extra:
        raise NotAttention("the score product reduces axes other than the feature axis")
    return _ScoreOperands(prod, q_node, q_letters, q_letter, k_node, k_letters, k_letter, feature)


def _value_product(softmax: fx.Node, layout: ScoreLayout) -> _ValueProduct:
    """Walk down from softmax to the value product and check that it contracts the key axis."""
    probs_end, dropout_p, escape, chain = _walk_probs(softmax)
    vprod = as_product(probs_end)
    if vprod is None:
        raise NotAttention(
            f"the attention probabilities feed {G.op_name(probs_end) or probs_end.op}, "
            "not a product with values"
        )
    p_node = chain[-1] if chain else softmax
    if vprod.lhs is p_node and vprod.rhs is not p_node:
        p_letters, v_node, v_letters = vprod.lhs_letters, vprod.rhs, vprod.rhs_letters
    elif vprod.rhs is p_node and vprod.lhs is not p_node:
        p_letters, v_node, v_letters = vprod.rhs_letters, vprod.lhs, vprod.lhs_letters
    else:
        raise NotAttention("the probabilities are multiplied with themselves")
    if vprod.bias is not None or vprod.alpha != 1.0:
        raise NotAttention("the value product adds a bias or scales (baddbmm)")
    # An odd number of transposes on the way moves the key axis to the other of the last two.
    swapped = sum(_swaps_last_two(n) for n in chain) % 2 == 1
    key_last = layout.key_last != swapped
    pq, pk = (p_letters[-2], p_letters[-1]) if key_last else (p_letters[-1], p_letters[-2])
    if vprod.contracted != {pk}:
        raise NotAttention(
            "the value product does not contract the key axis (softmax over the "
            "query axis, or probabilities used another way)"
        )
    if pq not in vprod.out_letters:
        raise NotAttention("the value product reduces the query axis")
    if pq in v_letters:
        raise NotAttention(
            "the value operand varies with the query position (an MoE router "
            "or a pairwise product, not attention)"
        )
    if _depends_on(v_node, softmax):
        raise NotAttention("the values are computed from the probabilities themselves")
    v_free = [c for c in v_letters if c not in p_letters]
    if len(v_free) != 1 or v_free[0] not in vprod.out_letters:
        raise NotAttention("the value operand has no single feature axis")
    if any(c not in vprod.out_letters for c in p_letters[:-2]):
        raise NotAttention("the value product reduces a batch axis")
    return _ValueProduct(
        vprod,
        p_node,
        tuple(chain),
        dropout_p,
        escape,
        p_letters,
        v_node,
        v_letters,
        pq,
        pk,
        v_free[0],
    )


def _manual_problem(
    gm: fx.GraphModule,
    walk: _ScoreWalk,
    layout: ScoreLayout,
    pv: _ValueProduct,
    batches: tuple[tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]],
) -> str | None:
    """Why a manual site cannot be put in canonical form (it is still a site), or ``None``."""
    problem = _canonical_problem(walk, *batches)
    if walk.transforms:
        problem = (
            f"the scores pass through {'/'.join(walk.transforms)} (logit soft-capping or "
            "clipping) before softmax, which no variant reproduces"
        )
    problems = list(walk.problems)
    post = _post_mask_problem(list(pv.chain), walk.terms, gm)
    if post:
        problems.append(post)
    if walk.terms and not layout.key_last:
        problems.append(f"a mask on {layout.note or layout.name} is not put in canonical form")
    if any(_slices_last(n) for n in pv.chain) and not problems:
        problems.append("the probabilities are cut along the key axis before the values")
    return "; ".join(problems) if problems else problem


def _manual_facts(
    softmax: fx.Node,
    layout: ScoreLayout,
    walk: _ScoreWalk,
    qk: _ScoreOperands,
    pv: _ValueProduct,
    query: Operand,
    key: Operand,
    mask: tuple[MaskClass, str],
) -> AttentionSite:
    """The facts of a manual site, as the report and the policy read them."""
    scores, _, upcast = _softmax_parts(softmax)
    frame_batch = tuple(G.shape(scores)[:-2])
    mask_class, mask_reason = mask
    heads, kv_heads = _heads(frame_batch, key, qk.batch_letters, query)
    q_shape, k_shape = G.shape(qk.query), G.shape(qk.key)
    q_len = q_shape[qk.query_letters.index(qk.query_seq)]
    k_len = k_shape[qk.key_letters.index(qk.key_seq)]
    head_dim = q_shape[qk.query_letters.index(qk.feature)]
    over = _attends_over(head_dim, q_len, k_len)
    notes = []
    if query.factor != 1.0 or key.factor != 1.0:
        notes.append("scale applied to q/k")
    if mask_reason:
        notes.append(mask_reason)
    if len(frame_batch) == 1:
        notes.append("heads folded into the batch")
    if walk.tensor_scales:
        notes.append("a tensor-valued scale (learned temperature) is folded into q")
    if over == "channels":
        notes.append("channel attention: softmax over feature channels, tokens contracted")
    if layout.note:
        notes.append(layout.note)
    return AttentionSite(
        name=G.module_path(softmax),
        kind="manual",
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=_int_or(head_dim),
        value_dim=_int_or(G.shape(pv.value)[pv.value_letters.index(pv.feature)]),
        scale=float(walk.scale * qk.product.alpha * query.factor * key.factor),
        mask=mask_class,
        causal=mask_class.is_causal,
        dropout_p=pv.dropout_p,
        is_cross=_is_cross(qk.query, qk.key, q_len, k_len),
        weights_escape=pv.escape,
        query_len=G.size_text(q_len),
        key_len=G.size_text(k_len),
        dtype=str(G.dtype(scores)).replace("torch.", ""),
        upcast=upcast,
        notes=tuple(notes),
        attends_over=over,
    )


def _attends_over(feature: Any, q_len: Any, k_len: Any) -> str:
    """``"channels"`` when the contracted axis carries a captured (symbolic) length and the query
    and key axes are fixed sizes: the softmax runs over channels (cross-covariance attention)."""
    fixed = G.as_int(q_len) is not None and G.as_int(k_len) is not None
    return "channels" if fixed and G.as_int(feature) is None else "tokens"


def _depends_on(node: fx.Node, source: fx.Node) -> bool:
    """Whether ``node`` is computed from ``source`` (only nodes after ``source`` can be)."""
    order = {n: i for i, n in enumerate(source.graph.nodes)}
    start = order[source]
    seen: set[fx.Node] = set()
    stack = [node]
    while stack:
        cur = stack.pop()
        if cur is source:
            return True
        if cur in seen or order.get(cur, -1) < start:
            continue
        seen.add(cur)
        stack.extend(cur.all_input_nodes)
    return False


def _int_or(size: Any) -> int:
    v = G.as_int(size)
    return v if v is not None else G.size_hint(size)


def _is_cross(q_node: fx.Node, k_node: fx.Node, q_len: Any, k_len: Any) -> bool:
    if not G.same_size(q_len, k_len):
        return True
    return not _share_source(q_node, k_node)


def _share_source(a: fx.Node, b: fx.Node, limit: int = SHARED_SOURCE_ANCESTORS) -> bool:
    """Whether q and k derive from a common non-parameter tensor (self-attention)."""

    def ancestors(n: fx.Node) -> set[fx.Node]:
        seen: set[fx.Node] = set()
        stack = [n]
        while stack and len(seen) < limit:
            cur = stack.pop()
            for i in cur.all_input_nodes:
                if i not in seen:
                    seen.add(i)
                    stack.append(i)
        return seen

    common = (ancestors(a) | {a}) & (ancestors(b) | {b})
    return any(
        n.op in ("placeholder", "call_function") and G.rank(n) >= 2 and n.op != "get_attr"
        for n in common
    )


def _folded_heads(operand: Operand, letter: str) -> int | None:
    """Heads folded into a (B·H) batch axis, read off the reshape that folded them.

    Walks up from the operand through permutations to the reshape that created the folded axis;
    in the matching group of that reshape the first input axis is the batch, so
    H = (elements of the input group) / (batch · the other output axes of the group).
    """
    if letter not in operand.letters:
        return None  # the operand is broadcast over the batch (a learned query): nothing folded
    node, axis = operand.node, operand.letters.index(letter)
    for _ in range(FOLDED_HEADS_CHAIN_LIMIT):
        name = G.op_name(node)
        if name in COPIES or name in CASTS or name in ("mul", "div"):
            node = node.args[0]
            continue
        if name == "transpose":
            r = G.rank(node)
            d0, d1 = (G.normalize_dim(G.arg(node, d), r) for d in ("dim0", "dim1"))
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
            node = node.args[0]
            continue
        if name == "permute":
            axis = [G.normalize_dim(d, G.rank(node)) for d in G.arg(node, "dims")][axis]
            node = node.args[0]
            continue
        if name in FOLDS:
            src, dst = G.shape(node.args[0]), G.shape(node)
            for gs, gd in reshape_groups(src, dst):
                if axis in gd and len(gs) >= 2:
                    others: Any = 1
                    for d in gd:
                        if d != axis:
                            others = others * dst[d]
                    total: Any = 1
                    for d in gs:
                        total = total * src[d]
                    heads = G.as_int(total // (src[gs[0]] * others)) if others else None
                    return heads if heads and heads > 1 else None
            return None
        return None
    return None


def _heads(
    frame_batch: tuple[Any, ...], key: Operand, batch_letters: str, query: Operand | None = None
) -> tuple[int, int]:
    if len(frame_batch) >= 2:
        heads = _int_or(frame_batch[-1])
    else:
        heads = 1
        if query is not None and batch_letters:
            folded = _folded_heads(query, batch_letters[-1])
            if folded:
                return folded, folded
    kv = heads
    if key.kv_source_heads is not None:
        kv = _int_or(key.kv_source_heads)
    elif len(frame_batch) >= 2 and batch_letters:
        head_letter = batch_letters[-1]
        if head_letter in key.letters:
            size = G.shape(key.node)[key.letters.index(head_letter)]
            if G.is_one(size):
                kv = 1
        else:
            kv = 1
    return heads, kv


def _canonical_problem(
    walk: _ScoreWalk,
    frame_batch: tuple[Any, ...],
    score_batch: tuple[Any, ...],
    out_batch: tuple[Any, ...],
) -> str | None:
    """Why the site cannot be put in canonical form (it is still a site), or ``None``."""
    total = _numel(frame_batch)
    for term in walk.terms:
        # Terms applied where heads are folded into the batch (BLOOM's baddbmm bias) are
        # reshaped to the softmax's batch layout when canonicalised.
        if not G.same_size(_numel(tuple(G.shape(term.frame)[:-2])), total):
            return "a mask is applied in a batch layout of another size than the softmax"
    for other in (score_batch, out_batch):
        if not G.same_size(_numel(other), total):
            return "the batch axes of the products and the softmax differ in size"
    return None


def _numel(sizes: tuple[Any, ...]) -> Any:
    n: Any = 1
    for s in sizes:
        n = n * s
    return n


def _walk_scores(gm: fx.GraphModule, x: fx.Node, analysis: MaskAnalysis) -> _ScoreWalk:
    """From the softmax input up to the score product, one :data:`SCORE_RULES` step per node."""
    walk = _ScoreWalk(gm, analysis)
    cur = x
    for _ in range(SCORE_CHAIN_LIMIT):
        product = as_product(cur)
        if product is not None:
            if product.bias is not None:  # baddbmm's input: a bias added to the scores
                walk.add_term(MaskTerm("add", product.bias, product.beta * walk.scale, cur))
            walk.product = product
            return walk
        step = first_match(SCORE_RULES, cur, walk)
        if step is None:
            name = G.op_name(cur)
            if name == "getitem" or cur.op != "call_function":
                raise NotAttention("softmax input does not come from a product")
            raise NotAttention(f"unsupported op {name!r} between the score product and softmax")
        cur = step
    raise NotAttention("score chain too long")


# Score rules: ``(node, walk) -> the node one step nearer the product``, recording scales and mask
# terms in ``walk``; ``None`` when ``node`` is not the rule's spelling.


def _score_copy(node: fx.Node, walk: _ScoreWalk) -> fx.Node:
    return node.args[0]


def _score_reshape(node: fx.Node, walk: _ScoreWalk) -> fx.Node:
    src = node.args[0]
    if not _keeps_last_two(src, node):
        raise NotAttention(
            f"{G.op_name(node)} between the score product and softmax moves the query/key axes"
        )
    return src


def _score_permute(node: fx.Node, walk: _ScoreWalk) -> fx.Node:
    if not _identity_on_last_two(node):
        raise NotAttention(f"{G.op_name(node)} of the scores swaps axes before softmax")
    return node.args[0]


def _score_constant_scale(node: fx.Node, walk: _ScoreWalk) -> fx.Node | None:
    name = G.op_name(node)
    a, b = node.args[0], node.args[1]
    for path, other in ((a, b), (b, a)) if name == "mul" else ((a, b),):
        factor = G.scalar_value(other, walk.gm)
        if isinstance(path, fx.Node) and factor is not None:
            walk.scale = walk.scale * factor if name == "mul" else walk.scale / factor
            return path
    return None


def _score_temperature(node: fx.Node, walk: _ScoreWalk) -> fx.Node:
    """A learned temperature (scalar or per head, e.g. cosine attention's logit scale) is constant
    along the query and key axes: it folds into q exactly."""
    name = G.op_name(node)
    a, b = node.args[0], node.args[1]
    path, other = (a, b) if _reaches_product(a) or name == "div" else (b, a)
    if not (isinstance(path, fx.Node) and _is_batch_only(other, node)):
        raise NotAttention(
            f"scores are {name}-combined with a tensor that varies along the query or key axis"
        )
    walk.tensor_scales.append((name, other))
    return path


def _score_gate(node: fx.Node, walk: _ScoreWalk) -> fx.Node | None:
    gated = _gated_scores(node, walk.analysis, walk.gm)
    if gated is None:
        return None
    path, gate, fill = gated
    walk.add_term(MaskTerm("keep", gate, fill * walk.scale, node))
    return path


def _score_row_max(node: fx.Node, walk: _ScoreWalk) -> fx.Node | None:
    """softmax(x − max x) == softmax(x): the max subtraction changes nothing."""
    path, other, _ = _score_operand(node, node.args[0], node.args[1])
    return path if path is node.args[0] and _is_row_max(other, path) else None


def _score_additive(node: fx.Node, walk: _ScoreWalk) -> fx.Node:
    a, b = node.args[0], node.args[1]
    path, other, sign = _score_operand(node, a, b)
    if G.op_name(node) == "sub":
        if path is not a:
            raise NotAttention("scores are negated")
        sign = -1.0
    if not isinstance(other, fx.Node):
        return path  # adding a constant to every score changes nothing after softmax
    alpha = float(G.arg(node, "alpha", 1)) * walk.scale
    walk.add_term(MaskTerm("add", other, sign * alpha, node))
    return path


def _score_masked_fill(node: fx.Node, walk: _ScoreWalk) -> fx.Node:
    fill = G.scalar_value(node.args[2], walk.gm)
    if fill is None or not _masked(fill):
        raise NotAttention("masked_fill of the scores with a value that does not mask")
    walk.add_term(MaskTerm("fill", node.args[1], fill * walk.scale, node))
    return node.args[0]


def _score_where(node: fx.Node, walk: _ScoreWalk) -> fx.Node | None:
    if len(node.args) != 3:
        return None
    cond, a, b = node.args
    va, vb = G.scalar_value(a, walk.gm), G.scalar_value(b, walk.gm)
    analysis = walk.analysis
    if va is None and vb is None and isinstance(b, fx.Node):
        vb = analysis.value(b).const if analysis.value(b).is_const else None
    if va is None and vb is None and isinstance(a, fx.Node):
        va = analysis.value(a).const if analysis.value(a).is_const else None
    if vb is not None and _masked(vb) and isinstance(a, fx.Node):
        walk.add_term(MaskTerm("keep", cond, vb * walk.scale, node))
        return a
    if va is not None and _masked(va) and isinstance(b, fx.Node):
        walk.add_term(MaskTerm("fill", cond, va * walk.scale, node))
        return b
    raise NotAttention("where() on the scores does not select a masking value")


def _score_floor(node: fx.Node, walk: _ScoreWalk) -> fx.Node | None:
    """torch.max(scores, finfo.min) (XGLM, OPT): keeps -inf sums finite, so a fully masked row
    stays uniform. Met above any mask term, it folds into the mask exactly (finfo.min absorbs any
    moderate score); in between mask terms it would not."""
    floor = _masked_floor(node, walk.gm)
    if floor is None:
        return None
    if walk.terms or walk.tensor_scales or abs(floor * walk.scale) < _ABSORBING:
        walk.problems.append("the scores are clamped from below between mask terms")
    else:
        walk.floor = floor * walk.scale
    return node.args[0]


def _score_cap(node: fx.Node, walk: _ScoreWalk) -> fx.Node | None:
    """Logit soft-capping (Gemma 2: cap·tanh(s/cap)) or clipping: still attention, but a nonlinear
    map of the scores that no variant reproduces; the site is reported as is."""
    if not _reaches_product(node.args[0]):
        return None
    walk.transforms.append(G.op_name(node))
    return node.args[0]


def _score_sinks(node: fx.Node, walk: _ScoreWalk) -> fx.Node | None:
    """Attention sinks (gpt-oss): a learned logit per head appended as an extra key column, dropped
    again after softmax. Still attention, but the sink takes probability mass from every row,
    which the canonical form cannot say."""
    if not _sink_columns(node):
        return None
    walk.problems.append(
        "attention sinks (an extra score column outside the keys) take part in the "
        "softmax; no variant reproduces them"
    )
    parts = node.args[0]
    scores = [a for a in parts if not (G.shape(a) and G.is_one(G.shape(a)[-1]))]
    return next(a for a in (scores if len(scores) == 1 else parts) if _reaches_product(a))


#: What may stand between the score product and softmax, tried in order on each node walking up.
SCORE_RULES: tuple[Rule[fx.Node], ...] = (
    Rule("copy or cast", COPIES | CASTS, _score_copy),
    Rule("reshape keeping the query and key axes", RESHAPES, _score_reshape),
    Rule("identity permutation", frozenset({"transpose", "permute"}), _score_permute),
    Rule("constant scale", frozenset({"mul", "div"}), _score_constant_scale),
    Rule("learned temperature", frozenset({"mul", "div"}), _score_temperature),
    # GPT-1's multiplicative causal mask w·b + c·(1 − b).
    Rule("0/1 gate", frozenset({"add"}), _score_gate),
    Rule("row max subtracted", frozenset({"sub"}), _score_row_max),
    Rule("additive mask or bias", frozenset({"add", "sub"}), _score_additive),
    Rule("masked_fill", frozenset({"masked_fill"}), _score_masked_fill),
    Rule("where", frozenset({"where"}), _score_where),
    Rule("masking floor", frozenset({"maximum", "max", "clamp_min", "clamp"}), _score_floor),
    Rule("soft-capping or clipping", SCORE_CAPS, _score_cap),
    Rule("attention sinks", frozenset({"cat"}), _score_sinks),
)


def _gated_scores(
    node: fx.Node, analysis: MaskAnalysis, gm: fx.GraphModule
) -> tuple[fx.Node, fx.Node, float] | None:
    """``w·b + c·(1 − b)`` with ``b`` proven to hold only 0 and 1: that is ``where(b, w, c)``
    (GPT-1's multiplicative causal mask). Returns (scores path, b, c)."""
    if G.op_name(node) != "add" or G.arg(node, "alpha", 1) != 1 or len(node.args) < 2:
        return None
    for gated, filled in ((node.args[0], node.args[1]), (node.args[1], node.args[0])):
        if not (isinstance(gated, fx.Node) and G.op_name(gated) == "mul"):
            continue
        if not (isinstance(filled, fx.Node) and G.op_name(filled) == "mul"):
            continue
        for path, gate in ((gated.args[0], gated.args[1]), (gated.args[1], gated.args[0])):
            if not (isinstance(path, fx.Node) and isinstance(gate, fx.Node)):
                continue
            if not _reaches_product(path) or not _zero_one(analysis.value(gate), gate):
                continue
            for inverse, factor in (
                (filled.args[0], filled.args[1]),
                (filled.args[1], filled.args[0]),
            ):
                c = G.scalar_value(factor, gm)
                if c is not None and _one_minus(inverse, gate, gm) and _masked(c):
                    return path, gate, float(c)
    return None


def _zero_one(av: AbstractValue, node: fx.Node) -> bool:
    """The mask analysis proves every element of ``node`` is 0 or 1 (or it is boolean)."""
    if G.dtype(node) == torch.bool:
        return True
    if av.vary or av.index is not None or av.diff is not None or av.on is None:
        return False
    values = [av.on] + ([av.off] if av.cmps else [])
    return all(v is not None and float(v) in (0.0, 1.0) for v in values)


def _one_minus(node: Any, gate: fx.Node, gm: fx.GraphModule) -> bool:
    """``1 - gate`` (``rsub(gate, 1)`` or ``sub(1, gate)``)."""
    if not isinstance(node, fx.Node):
        return False
    name = G.op_name(node)
    if name == "rsub" and node.args[0] is gate:
        return G.scalar_value(node.args[1], gm) == 1 and G.arg(node, "alpha", 1) == 1
    if name == "sub" and node.args[1] is gate:
        return G.scalar_value(node.args[0], gm) == 1 and G.arg(node, "alpha", 1) == 1
    return False


#: A floor this far down absorbs any score added to it in float32/bfloat16 (finfo.min ≈ -3.4e38).
_ABSORBING = 1e30


def _masked_floor(node: fx.Node, gm: fx.GraphModule) -> float | None:
    """``maximum(scores, c)`` / ``clamp_min(scores, c)`` / ``clamp(scores, min=c)`` with a
    constant masking ``c``: the value, else ``None``."""
    name = G.op_name(node)
    if not node.args or not isinstance(node.args[0], fx.Node) or not _reaches_product(node.args[0]):
        return None
    if name == "maximum" or (name == "max" and G.overload_name(node) == "other"):
        other = node.args[1]
        while isinstance(other, fx.Node) and G.op_name(other) in COPIES:
            other = other.args[0]  # torch.tensor(finfo.min) is lifted, copied and detached
        c = G.scalar_value(other, gm)
    elif name == "clamp_min":
        c = G.scalar_value(G.arg(node, "min", None), gm)
    elif name == "clamp" and G.arg(node, "max", None) is None:
        c = G.scalar_value(G.arg(node, "min", None), gm)
    else:
        return None
    return c if c is not None and _masked(c) else None


def _sink_columns(cat: fx.Node) -> bool:
    """``cat([scores, sinks], dim=-1)``: the scores (computed from a product) and sink columns.

    Sinks are either learned constants (gpt-oss) or computed per query from the hidden states by
    a projection (Inkling's ``sink_proj``, itself a product): a part is a sink column when it is
    one wide on the key axis, and exactly one other part, the scores, must reach a product."""
    parts = cat.args[0]
    r = G.rank(cat)
    dim = G.normalize_dim(G.arg(cat, "dim", 0), r) if r else None
    if dim != r - 1 or not isinstance(parts, (list, tuple)):
        return False
    shapes = [G.shape(a) if isinstance(a, fx.Node) else None for a in parts]
    if all(shp is not None for shp in shapes):
        columns = [bool(shp) and G.is_one(shp[-1]) for shp in shapes]
        scores = [a for a, column in zip(parts, columns, strict=True) if not column]
        return len(scores) == 1 and _reaches_product(scores[0])
    return sum(isinstance(a, fx.Node) and _reaches_product(a) for a in parts) == 1


def _is_batch_only(other: Any, frame: fx.Node) -> bool:
    """A tensor of size 1 on the frame's last two axes (a scalar or per-batch/head factor)."""
    shp = G.shape(other)
    if shp is None:
        return False
    if len(shp) < 2:
        return all(G.is_one(s) for s in shp)
    return G.is_one(shp[-1]) and G.is_one(shp[-2]) and len(shp) <= G.rank(frame)


def _score_operand(node: fx.Node, a: Any, b: Any) -> tuple[fx.Node, Any, float]:
    """Which operand of an add carries the scores: the one that reaches a product first."""
    out_shape = G.shape(node)
    candidates = [x for x in (a, b) if isinstance(x, fx.Node) and _reaches_product(x)]
    full = [
        x
        for x in candidates
        if G.shape(x) is not None
        and len(G.shape(x)) == len(out_shape)
        and all(G.same_size(s, t) for s, t in zip(G.shape(x), out_shape))
    ]
    pick = (full or candidates or [None])[0]
    if pick is None:
        raise NotAttention("neither operand of an add before softmax comes from a product")
    return pick, (b if pick is a else a), 1.0


def _reaches_product(x: fx.Node, depth: int = REACH_PRODUCT_DEPTH) -> bool:
    cur = x
    for _ in range(depth):
        if as_product(cur) is not None:
            return True
        name = G.op_name(cur)
        if name == "cat" and isinstance(cur.args[0], (list, tuple)):
            return any(
                isinstance(n, fx.Node) and _reaches_product(n, depth - 1) for n in cur.args[0]
            )
        if cur.op != "call_function" or not cur.args or not isinstance(cur.args[0], fx.Node):
            return False
        if name in SCORE_CAPS:
            cur = cur.args[0]
            continue
        if name in ("add", "sub", "mul", "div", "where", "masked_fill"):
            nexts = [n for n in cur.args if isinstance(n, fx.Node)]
            if name == "where":
                nexts = nexts[1:]
            return any(_reaches_product(n, depth - 1) for n in nexts)
        cur = cur.args[0]
    return False


def _is_row_max(other: Any, path: fx.Node) -> bool:
    if not isinstance(other, fx.Node):
        return False
    n = other
    while G.op_name(n) in COPIES:
        n = n.args[0]
    if G.op_name(n) == "getitem":
        n = n.args[0]
    if G.op_name(n) not in ("amax", "max"):
        return False
    return n.args[0] is path


def _keeps_last_two(src: fx.Node, dst: fx.Node) -> bool:
    s, d = G.shape(src), G.shape(dst)
    if s is None or d is None or len(s) < 2 or len(d) < 2:
        return False
    if G.op_name(dst) == "expand" and len(d) == len(s):
        return all(G.same_size(a, b) for a, b in zip(s, d))
    return G.same_size(s[-1], d[-1]) and G.same_size(s[-2], d[-2]) and (G.op_name(dst) != "expand")


def _identity_on_last_two(node: fx.Node) -> bool:
    r = G.rank(node)
    if G.op_name(node) == "transpose":
        d0 = G.normalize_dim(G.arg(node, "dim0"), r)
        d1 = G.normalize_dim(G.arg(node, "dim1"), r)
        return d0 == d1
    dims = [G.normalize_dim(d, r) for d in G.arg(node, "dims")]
    return dims == list(range(r))


def _walk_probs(softmax: fx.Node) -> tuple[fx.Node, float, bool, list[fx.Node]]:
    """From softmax down to the first node that is not a cast/copy/dropout/batch reshape."""
    cur = softmax
    dropout_p = 0.0
    escape = False
    chain: list[fx.Node] = []
    for _ in range(PROBS_CHAIN_LIMIT):
        users = list(cur.users)
        onward = [u for u in users if _passes_probs(u, cur)]
        products = [u for u in users if as_product(u) is not None]
        if len(users) == 1 and products:
            return users[0], dropout_p, escape, chain
        if products and onward:
            # The probabilities feed a value product *and* go elsewhere (nn.MultiheadAttention's
            # averaged weights: a view then a mean): the product is the site, the rest escapes.
            if len(products) > 1:
                raise NotAttention("the probabilities feed several products")
            return products[0], dropout_p, True, chain
        if len(onward) == 1 and len(users) >= 1:
            nxt = onward[0]
            escape = escape or len(users) > 1
            if G.op_name(nxt) in DROPOUTS:
                train = G.arg(nxt, "train", False)
                if train:
                    dropout_p = float(G.arg(nxt, "p", 0.0))
            chain.append(nxt)
            cur = nxt
            continue
        if products:
            escape = escape or len(users) > 1
            if len(products) > 1:
                raise NotAttention("the probabilities feed several products")
            return products[0], dropout_p, escape, chain
        if not users:
            raise NotAttention("the softmax output is unused")
        raise NotAttention(
            f"the softmax output feeds {', '.join(G.op_name(u) or u.op for u in users)}"
            ", not a product with values"
        )
    raise NotAttention("probability chain too long")


def _passes_probs(node: fx.Node, src: fx.Node) -> bool:
    """Whether the probabilities ``src`` flow on through ``node`` (a :data:`PROBS_RULES` entry)."""
    if not node.args or node.args[0] is not src:
        return False
    return first_match(PROBS_RULES, node, src) is not None


# Probability rules: ``(node, src) -> node`` when the probabilities ``src`` pass through ``node``
# unchanged up to layout; ``None`` when ``node`` is not the rule's spelling.


def _probs_unchanged(node: fx.Node, src: fx.Node) -> fx.Node:
    return node


def _probs_reshape(node: fx.Node, src: fx.Node) -> fx.Node | None:
    return node if _keeps_last_two(src, node) else None


def _probs_zeroed(node: fx.Node, src: fx.Node) -> fx.Node | None:
    # Checked against the scores' own mask in _post_mask_problem.
    return node if G.scalar_value(node.args[2]) == 0.0 else None


def _probs_transposed(node: fx.Node, src: fx.Node) -> fx.Node | None:
    return node if _swaps_last_two(node) else None


def _probs_sliced(node: fx.Node, src: fx.Node) -> fx.Node | None:
    return node if _slices_last(node) else None


#: What may stand between softmax and the value product, tried in order on each node walking down.
PROBS_RULES: tuple[Rule[fx.Node], ...] = (
    Rule("copy, cast or dropout", COPIES | CASTS | DROPOUTS, _probs_unchanged),
    Rule("reshape keeping the query and key axes", RESHAPES - {"expand"}, _probs_reshape),
    # CPM-Ant zeroes the masked probabilities again after softmax.
    Rule("masked_fill with 0", frozenset({"masked_fill"}), _probs_zeroed),
    # Channels-first values (v @ pᵀ), and key-major scores' pᵀ @ v.
    Rule("transpose of the last two axes", AXIS_PERMUTES, _probs_transposed),
    # gpt-oss drops its sink column after softmax.
    Rule("slice along the last axis", frozenset({"slice"}), _probs_sliced),
)


def _post_mask_problem(down_chain: list[fx.Node], terms: list[MaskTerm], gm: fx.GraphModule) -> str:
    """Probabilities zeroed again after softmax (CPM-Ant) change nothing when the zeroed positions
    were already filled with -inf before softmax (a fully masked row is 0 either way, as sdpa
    computes it); any other post-softmax mask is outside the canonical form."""
    for node in down_chain:
        if G.op_name(node) != "masked_fill":
            continue
        cond = node.args[1]
        if not any(
            t.kind == "fill" and t.value == float("-inf") and _same_value(t.node, cond, gm)
            for t in terms
        ):
            return "the probabilities are masked after softmax by another mask than the scores"
    return ""


def _same_value(a: Any, b: Any, gm: fx.GraphModule, depth: int = SAME_VALUE_DEPTH) -> bool:
    """Whether ``a`` and ``b`` compute the same value: the same node, or the same op applied to
    the same inputs (a mask recomputed from the same tensors), constants compared by value."""
    if a is b:
        return True
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            return len(a) == len(b) and all(_same_value(x, y, gm, depth) for x, y in zip(a, b))
        return not isinstance(a, fx.Node) and not isinstance(b, fx.Node) and a == b
    va, vb = G.scalar_value(a, gm), G.scalar_value(b, gm)
    if va is not None or vb is not None:
        return va == vb
    if depth == 0 or a.op != "call_function" or b.op != "call_function" or a.target != b.target:
        return False
    if G.is_inplace(a) or G.op_name(a) in DROPOUTS or set(a.kwargs) != set(b.kwargs):
        return False
    return _same_value(list(a.args), list(b.args), gm, depth - 1) and all(
        _same_value(a.kwargs[k], b.kwargs[k], gm, depth - 1) for k in a.kwargs
    )


def _slices_last(node: fx.Node) -> bool:
    """``p[..., a:b]``: probabilities cut along the key axis (the sink column dropped)."""
    r = G.rank(node)
    return (
        G.op_name(node) == "slice"
        and r is not None
        and G.normalize_dim(G.arg(node, "dim", 0), r) == r - 1
    )


def _swaps_last_two(node: fx.Node) -> bool:
    """``p.transpose(-2, -1)`` / ``p.mT`` / a permute that swaps only the last two axes: the
    channels-first value product ``v @ pᵀ`` (EfficientViT, SHViT, CoAtNet's ``Attention2d``)."""
    name = G.op_name(node)
    r = G.rank(node)
    if r is None or r < 2:
        return False
    if name == "transpose":
        dims = {G.normalize_dim(G.arg(node, d), r) for d in ("dim0", "dim1")}
        return dims == {r - 2, r - 1}
    if name in MATRIX_TRANSPOSES or (name == "t" and r == 2):
        return True
    if name == "permute":
        dims = [G.normalize_dim(d, r) for d in G.arg(node, "dims")]
        return dims == [*range(r - 2), r - 1, r - 2]
    return False


# -- operands: strip scale and head repeats --------------------------------------------------------

#: Permutations and copies: a replay made only of these keeps every axis (and its size).
_PERMUTES = AXIS_PERMUTES | COPIES


def _operand(
    gm: fx.GraphModule, node: fx.Node, letters: str, seq: str, feature: str, head: str | None = None
) -> Operand:
    """Walk up from a product operand through permutations, copies and reshapes, collecting a
    scalar scale and a grouped-KV head repeat; the canonical tensor is rebuilt from the node before
    them by replaying the walked permutations/reshapes.

    A repeat is stripped only when the repeated axis ends up as the operand's head axis (``head``)
    and no reshape has to be replayed on top of it (its sizes would name the repeated heads).
    """
    replay: list[fx.Node] = []
    factor = 1.0
    cur = node
    kv_heads = None
    for _ in range(OPERAND_CHAIN_LIMIT):
        name = G.op_name(cur)
        if kv_heads is None and head is not None and all(G.op_name(n) in _PERMUTES for n in replay):
            strip = _strip_repeat(cur)
            if strip is not None:
                small, axis = strip
                if _lands_on(axis, list(reversed(replay)), letters) == head:
                    cur, kv_heads = small, G.shape(small)[axis]
                    continue
        views = name in _PERMUTES or name in SCALE_COMMUTING_VIEWS
        if views and cur.args and isinstance(cur.args[0], fx.Node):
            replay.append(cur)
            cur = cur.args[0]
            continue
        if name in ("mul", "div") and isinstance(cur.args[0], fx.Node):
            other = cur.args[1]
            f = G.scalar_value(other, gm)
            path = cur.args[0]
            if f is None and name == "mul" and isinstance(other, fx.Node):
                f2 = G.scalar_value(cur.args[0], gm)
                if f2 is not None:
                    f, path = f2, other
            if f is not None and G.shape(path) == G.shape(cur):
                factor = factor * f if name == "mul" else factor / f
                cur = path
                continue
        break
    return Operand(
        node=node,
        letters=letters,
        seq=seq,
        feature=feature,
        source=cur,
        replay=tuple(reversed(replay)),
        factor=factor,
        kv_source_heads=kv_heads,
    )


def _lands_on(axis: int, replay: list[fx.Node], letters: str) -> str | None:
    """The operand letter that axis ``axis`` of the replay chain's input becomes."""
    for node in replay:
        name = G.op_name(node)
        r = G.rank(node)
        if name == "transpose":
            d0, d1 = (G.normalize_dim(G.arg(node, d), r) for d in ("dim0", "dim1"))
            axis = d1 if axis == d0 else d0 if axis == d1 else axis
        elif name in MATRIX_TRANSPOSES or (name == "t" and r == 2):
            axis = r - 1 if axis == r - 2 else r - 2 if axis == r - 1 else axis
        elif name == "permute":
            dims = [G.normalize_dim(d, r) for d in G.arg(node, "dims")]
            axis = dims.index(axis)
        elif name not in COPIES:
            return None
    return letters[axis] if 0 <= axis < len(letters) else None


def _strip_repeat(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``repeat_interleave(x, r, dim)`` or ``reshape(expand(x.unsqueeze(a+1)))`` merging (a, a+1).

    Returns the un-repeated tensor (same layout, fewer heads on the repeated axis) and that axis.
    Only the interleaved form (head h reads h // r) is stripped; ``Tensor.repeat`` tiles and is
    left alone.
    """
    name = G.op_name(node)
    shp = G.shape(node)
    if shp is None or len(shp) < 3:
        return None
    if name == "repeat_interleave" and G.overload_name(node) == "self_int":
        dim = G.arg(node, "dim", None)
        if dim is None:
            return None
        return node.args[0], G.normalize_dim(dim, len(shp))
    if name in FOLDS:
        src = node.args[0]
        s = G.shape(src)
        if s is None or len(s) != len(shp) + 1 or G.op_name(src) != "expand":
            return None
        # (..., Hkv, r, ...) -> (..., Hkv*r, ...), the r axis expanded from size 1.
        for a in range(len(shp)):
            if (
                all(G.same_size(x, y) for x, y in zip(s[:a], shp[:a]))
                and all(G.same_size(x, y) for x, y in zip(s[a + 2 :], shp[a + 1 :]))
                and G.same_size(s[a] * s[a + 1], shp[a])
                and not G.is_one(s[a + 1])
            ):
                break
        else:
            return None
        base = _through_slices(src.args[0])
        bs = G.shape(base)
        if bs is None or len(bs) != len(s) or not G.is_one(bs[a + 1]):
            return None
        if G.op_name(base) == "unsqueeze" and G.normalize_dim(G.arg(base, "dim"), len(s)) == a + 1:
            return _through_slices(base.args[0]), a
        return None
    return None


def _through_slices(node: fx.Node) -> fx.Node:
    """Skip full-range ``slice`` nodes (``x[:, :]`` spells them)."""
    cur = node
    while G.op_name(cur) == "slice":
        start = G.arg(cur, "start", None)
        end = G.arg(cur, "end", None)
        step = G.arg(cur, "step", 1)
        dim = G.normalize_dim(G.arg(cur, "dim", 0), G.rank(cur))
        src = cur.args[0]
        if (
            step != 1
            or start not in (None, 0)
            or not G.same_size(G.shape(src)[dim], G.shape(cur)[dim])
        ):
            break
        del end
        cur = src
    return cur


# -- sdpa sites ------------------------------------------------------------------------------------


def _sdpa_site(gm: fx.GraphModule, node: fx.Node, analysis: MaskAnalysis) -> SiteMatch:
    q, k, v = G.arg(node, "query"), G.arg(node, "key"), G.arg(node, "value")
    dropout_p = float(G.arg(node, "dropout_p", 0.0))
    scale_arg = G.arg(node, "scale", None)
    qs, ks, vs = G.shape(q), G.shape(k), G.shape(v)
    r = len(qs)
    if r < 2:
        raise NotAttention("sdpa on vectors")
    head_dim = _int_or(qs[-1])
    scale = float(scale_arg) if scale_arg is not None else 1.0 / math.sqrt(head_dim)
    batch = "abcdefgh"[: r - 2]
    letters_q, letters_k, letters_v = batch + "qd", batch + "kd", batch + "ke"
    head = batch[-1] if len(batch) >= 2 else None
    query = _operand(gm, q, letters_q, "q", "d")
    key = _operand(gm, k, letters_k, "k", "d", head)
    value = _operand(gm, v, letters_v, "k", "e", head)
    terms, mask_value, mask_class, reason = _sdpa_mask(analysis, node, r)
    frame_batch = tuple(
        torch.broadcast_shapes(tuple(qs[:-2]), tuple(ks[:-2]))
        if all(isinstance(s, int) for s in (*qs[:-2], *ks[:-2]))
        else qs[:-2]
    )
    heads, kv_heads = _heads(tuple(qs[:-2]), key, batch)
    if bool(G.arg(node, "enable_gqa", False)) and len(ks) >= 3:
        kv_heads = _int_or(ks[-3])
    notes = ["scale applied to q/k"] if query.factor != 1.0 or key.factor != 1.0 else []
    if reason:
        notes.append(reason)
    site = AttentionSite(
        name=G.module_path(node),
        kind="sdpa",
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        value_dim=_int_or(vs[-1]),
        scale=scale * query.factor * key.factor,
        mask=mask_class,
        causal=mask_class.is_causal,
        dropout_p=dropout_p,
        is_cross=_is_cross(q, k, qs[-2], ks[-2]),
        weights_escape=False,
        query_len=G.size_text(qs[-2]),
        key_len=G.size_text(ks[-2]),
        dtype=str(G.dtype(q)).replace("torch.", ""),
        notes=tuple(notes),
    )
    return SiteMatch(
        site=site,
        anchor=node,
        output=node,
        query=query,
        key=key,
        value=value,
        batch_letters=batch,
        frame_batch=tuple(qs[:-2]),
        score_batch=tuple(qs[:-2]),
        out_letters=batch + "qe",
        out_batch=tuple(qs[:-2]),
        out_q="q",
        out_e="e",
        mask_terms=tuple(terms),
        mask_value=mask_value,
        sdpa_causal=bool(G.arg(node, "is_causal", False)),
        canonical_problem=None if frame_batch is not None else "sdpa batch shapes",
    )


def _sdpa_mask(
    analysis: MaskAnalysis, node: fx.Node, rank: int
) -> tuple[list[MaskTerm], AbstractValue | None, MaskClass, str]:
    """sdpa's ``attn_mask`` as a mask term (a boolean mask keeps where True), with ``is_causal``
    folded into the mask class."""
    attn_mask = G.arg(node, "attn_mask", None)
    terms: list[MaskTerm] = []
    if attn_mask is not None:
        if G.dtype(attn_mask) == torch.bool:
            terms.append(MaskTerm("keep", attn_mask, float("-inf"), node))
        else:
            terms.append(MaskTerm("add", attn_mask, 1.0, node))
    mask_value, mask_class, reason = _classify_terms(analysis, terms, rank)
    if bool(G.arg(node, "is_causal", False)):
        if mask_class in (MaskClass.NONE,):
            mask_class = MaskClass.CAUSAL
        elif mask_class == MaskClass.KEY:
            mask_class = MaskClass.CAUSAL_KEY
        elif mask_class != MaskClass.GENERAL:
            mask_class = MaskClass.GENERAL  # causal given twice: keep it exact as general
            reason = "is_causal together with a causal mask"
    return terms, mask_value, mask_class, reason


# -- masks -----------------------------------------------------------------------------------------


def term_additive(analysis: MaskAnalysis, term: MaskTerm) -> AbstractValue:
    av = analysis.value(term.node)
    if term.kind == "add":
        if term.value != 1.0:
            f = term.value
            return analysis._map(av, lambda x: x * f)
        return av
    if term.kind == "fill":
        return analysis.additive(av, fill_where_true=term.value)
    return analysis.additive(av, keep_where_true=term.value)


def _classify_terms(
    analysis: MaskAnalysis,
    terms: list[MaskTerm],
    rank: int,
    layout: ScoreLayout = SCORE_LAYOUTS[0],
) -> tuple[AbstractValue | None, MaskClass, str]:
    """The combined additive mask and its class, read in (…, query, key) order."""
    if not terms:
        return None, MaskClass.NONE, ""
    avs = [term_additive(analysis, t) for t in terms]
    combined = analysis.combine_additive(avs, max(rank, max(a.rank for a in avs)))
    if not layout.key_last:
        combined = swap_last_two(combined)
    cls, reason = MaskAnalysis.classify(combined)
    return combined, cls, reason
