"""Classify a mask or bias by *how it is computed*: an abstract interpretation of its subgraph.

Reads: the subgraph that computes a mask tensor (from graph inputs, constants, ``arange``...).
Changes: nothing. Produces: an :class:`AbstractValue` per node, and for the additive mask of a site
its :class:`~attnrewrite.site.MaskClass`.

The abstract domain describes a tensor m(x) over its index vector x as *piecewise*:

    m(x) = D(x)   where every position comparison in ``cmps`` holds,
           off    elsewhere (a known scalar),

where D varies only along the axes in ``vary`` (or is the known scalar ``on``). A comparison
``Cmp(a, b, c)`` means x[a] − x[b] <= c. Position tensors (``arange`` and what is derived from it by
adding constants and moving axes) are tracked exactly as ``Index``; their differences as ``Diff``.
Comparing two positions gives a ``Cmp``: this is how ``j <= i`` is recognised as causal whether it
is
spelled with ``tril``, ``triu``, a ``tril`` buffer or an ``arange`` comparison. Anything the rules
do not cover becomes "varies along every axis it has" — i.e. ``general`` — never a guess from the
example's values.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from attnrewrite.passes import graph as G
from attnrewrite.passes.vocab import BROADCASTS, CASTS, COMPARISONS, COPIES, REGROUPS
from attnrewrite.site import MaskClass

#: Additive values at or below this are "masked": exp(-1000) is 0 in float32 and float64, so a
#: fill of -10000 (HF's old value) plus any moderate bias still masks.
MASKED_THRESHOLD = -1e3
MASKED = float("-inf")

#: Constant tensors (buffers) up to this many elements are inspected for a causal triangle on their
#: last two axes (a registered ``tril`` buffer); larger ones are taken as data ("general").
TRIANGLE_BUFFER_MAX_NUMEL = 1 << 26
#: Diagonal offsets d tried when matching a constant buffer against ``tril``/``triu(diagonal=d)``.
TRIANGLE_DIAGONALS = range(-2, 3)
#: Bound on the merge/split steps that align one group of axes across a reshape; a group needs at
#: most one step per axis, so this only stops a walk on inconsistent (unprovable symbolic) sizes.
REGROUP_STEP_LIMIT = 64


@dataclasses.dataclass(frozen=True)
class Cmp:
    """x[a] − x[b] <= c, with axes counted in the owning tensor's own rank."""

    a: int
    b: int
    c: int

    def moved(self, mapping: dict[int, int]) -> Cmp | None:
        if self.a in mapping and self.b in mapping:
            return Cmp(mapping[self.a], mapping[self.b], self.c)
        return None


@dataclasses.dataclass(frozen=True)
class AbstractValue:
    """See the module docstring. ``index``/``diff`` describe exact position tensors."""

    rank: int
    vary: frozenset[int] = frozenset()
    cmps: frozenset[Cmp] = frozenset()
    on: Any = None  # known value of D, or None when D is data
    off: Any = None  # value outside the comparisons (only meaningful when cmps)
    index: tuple[int, int] | None = None  # x[axis] + offset
    diff: tuple[int, int, int] | None = None  # x[a] - x[b] + offset

    @property
    def is_const(self) -> bool:
        return not self.vary and not self.cmps and self.index is None and self.diff is None

    @property
    def const(self) -> Any:
        return self.on if self.is_const else None


def _oriented(av: AbstractValue) -> AbstractValue:
    """Orient a two-valued single comparison so that the outside value is the absorbing one.

    ``triu(ones, 1)`` used as "masked where True" and ``tril(ones)`` used as "kept where True" are
    the same set; keeping the masked/False/0 value outside lets a later combination with a data
    term (key padding) stay exact instead of losing the structure.
    """
    if len(av.cmps) != 1 or av.on is None or av.off is None:
        return av
    on, off = _canon(av.on), _canon(av.off)
    if on == MASKED or on is False or (on == 0.0 and off not in (MASKED, 0.0)):
        (c,) = av.cmps
        return dataclasses.replace(
            av, cmps=frozenset({Cmp(c.b, c.a, -c.c - 1)}), on=av.off, off=av.on
        )
    return av


def _const(value: Any, rank: int = 0) -> AbstractValue:
    return AbstractValue(rank=rank, on=value)


def _dense(rank: int, shape: Sequence[Any] | None) -> AbstractValue:
    axes = frozenset(i for i in range(rank) if shape is None or not G.is_one(shape[i]))
    return AbstractValue(rank=rank, vary=axes)


def _flatten(av: AbstractValue, shape: Sequence[Any] | None) -> AbstractValue:
    """Forget structure: varies along every axis it (or its comparisons/positions) touches."""
    axes = set(av.vary)
    for c in av.cmps:
        axes |= {c.a, c.b}
    if av.index:
        axes.add(av.index[0])
    if av.diff:
        axes |= {av.diff[0], av.diff[1]}
    if shape is not None:
        axes = {a for a in axes if a < len(shape) and not G.is_one(shape[a])}
    return AbstractValue(rank=av.rank, vary=frozenset(axes))


def _remap(
    av: AbstractValue, mapping: dict[int, int], rank: int, shape: Sequence[Any] | None
) -> AbstractValue:
    """Move axes (old -> new). Structure on an axis without a new home is flattened."""
    lost = False
    vary = set()
    for a in av.vary:
        if a in mapping:
            vary.add(mapping[a])
        else:
            lost = True
    cmps = set()
    for c in av.cmps:
        moved = c.moved(mapping)
        if moved is None:
            lost = True
        else:
            cmps.add(moved)
    index = diff = None
    if av.index:
        if av.index[0] in mapping:
            index = (mapping[av.index[0]], av.index[1])
        else:
            lost = True
    if av.diff:
        a, b, off = av.diff
        if a in mapping and b in mapping:
            diff = (mapping[a], mapping[b], off)
        else:
            lost = True
    out = AbstractValue(rank, frozenset(vary), frozenset(cmps), av.on, av.off, index, diff)
    if lost:
        # An axis disappeared (merged with another, or selected away): keep only what is safe.
        kept = _flatten(av, None)
        axes = {mapping[a] for a in kept.vary if a in mapping}
        return AbstractValue(
            rank=rank,
            vary=frozenset(
                a
                for a in axes | set(range(rank)) - set(mapping.values())
                if shape is None or not G.is_one(shape[a])
            ),
        )
    return out


def swap_last_two(av: AbstractValue) -> AbstractValue:
    """``av`` with its last two axes exchanged: a mask on key-major (…, key, query) scores read in
    the (…, query, key) order :meth:`MaskAnalysis.classify` expects."""
    r = av.rank
    if r < 2:
        return av
    mapping = {a: a for a in range(r - 2)} | {r - 2: r - 1, r - 1: r - 2}
    return _remap(av, mapping, r, None)


# -- scalar semantics of elementwise ops -----------------------------------------------------------


def _masked(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v <= MASKED_THRESHOLD


def _canon(v: Any) -> Any:
    """Scalars compared for equality: all masked values are one, bool/int/float unified."""
    if isinstance(v, bool):
        return v
    if isinstance(v, (int, float)):
        if _masked(v):
            return MASKED
        if isinstance(v, float) and math.isnan(v):
            return "nan"
        return float(v)
    return v


def _where(c: Any, a: Any, b: Any) -> Any:
    return a if bool(c) else b


def _add(a: Any, b: Any, alpha: Any = 1) -> Any:
    return a + alpha * b


_BINARY: dict[str, Callable[..., Any]] = {
    "add": _add,
    "sub": lambda a, b, alpha=1: a - alpha * b,
    "rsub": lambda a, b, alpha=1: b - alpha * a,
    "mul": operator.mul,
    "div": lambda a, b: a / b if b != 0 else math.copysign(math.inf, a) * (1 if a else math.nan),
    "__and__": lambda a, b: bool(a) and bool(b),
    "bitwise_and": lambda a, b: bool(a) and bool(b),
    "logical_and": lambda a, b: bool(a) and bool(b),
    "__or__": lambda a, b: bool(a) or bool(b),
    "bitwise_or": lambda a, b: bool(a) or bool(b),
    "logical_or": lambda a, b: bool(a) or bool(b),
    "eq": lambda a, b: _canon(a) == _canon(b),
    "ne": lambda a, b: _canon(a) != _canon(b),
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
    "minimum": min,
    "maximum": max,
    "fmin": min,
    "fmax": max,
}
_UNARY: dict[str, Callable[[Any], Any]] = {
    "logical_not": lambda a: not bool(a),
    "bitwise_not": lambda a: not bool(a),
    "__invert__": lambda a: not bool(a),
    "neg": lambda a: -a,
    "abs": abs,
    "exp": lambda a: 0.0 if a == -math.inf else math.exp(min(a, 700.0)),
    "log": lambda a: -math.inf if a == 0 else math.log(a) if a > 0 else math.nan,
}

#: Stand-ins for an unknown data value: a result counts as known only if it is the same for all
#: of them — absorbing elements (False & x, -inf + x, 0 * x, where with a known condition).
#: Comparisons of data never use them (see ``_compare``): data compared is data.
_BOOL_SAMPLES = (True, False)
_FLOAT_SAMPLES = (0.0, 1.5, -2.25, 7.0, MASKED)


def _safe(fn: Callable[..., Any], *xs: Any) -> Any:
    try:
        return fn(*xs)
    except (ArithmeticError, TypeError, ValueError):
        return "error"


#: Constant-filled tensor constructors and the value each fills with (``None``: read from the
#: call's ``fill_value``/``s`` argument).
_FILL_VALUES: dict[str, Any] = {
    "zeros": 0,
    "ones": 1,
    "new_ones": 1,
    "new_zeros": 0,
    "zeros_like": 0,
    "ones_like": 1,
}
_FILLS = (*_FILL_VALUES, "full", "scalar_tensor", "new_full", "full_like", "empty_like")

#: One abstract evaluation rule: (analysis, node, op name, shape, rank) -> value or ``None``.
Rule = Callable[["MaskAnalysis", fx.Node, str, Any, int], "AbstractValue | None"]


class MaskAnalysis:
    """Abstract interpretation of mask subgraphs of one graph module (results are memoised)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self._memo: dict[fx.Node, AbstractValue] = {}

    # -- public ---------------------------------------------------------------------------------
    def value(self, x: Any) -> AbstractValue:
        if not isinstance(x, fx.Node):
            return _const(x)
        if x not in self._memo:
            self._memo[x] = self._eval(x)
        return self._memo[x]

    def additive(
        self, av: AbstractValue, *, fill_where_true: Any = None, keep_where_true: Any = None
    ) -> AbstractValue:
        """Turn a boolean condition into the additive mask it acts as.

        ``fill_where_true=v``: positions where the condition holds get value v (masked_fill);
        ``keep_where_true=v``: positions where it fails get v (where(cond, scores, v), sdpa bool).
        """
        if fill_where_true is not None:
            v = fill_where_true
            return self._map(av, lambda c: v if bool(c) else 0.0)
        v = keep_where_true
        return self._map(av, lambda c: 0.0 if bool(c) else v)

    def combine_additive(self, terms: Sequence[AbstractValue], rank: int) -> AbstractValue:
        """The sum of additive mask terms, right-aligned to ``rank``."""
        out = _const(0.0, rank)
        for t in terms:
            out = self._elementwise(lambda a, b: a + b, [out, self._align(t, rank)], rank, None)
        return out

    @staticmethod
    def classify(av: AbstractValue, *, boolean: bool = False) -> tuple[MaskClass, str]:
        """Mask class of an additive (or, with ``boolean``, keep) mask aligned to (..., Nq, Nk)."""
        if av.rank < 2:
            q_axis, k_axis = -10, av.rank - 1
        else:
            q_axis, k_axis = av.rank - 2, av.rank - 1
        neutral = True if boolean else 0.0
        if av.index is not None or av.diff is not None:
            return MaskClass.GENERAL, "the mask is a position tensor"
        window = MaskAnalysis.sliding_window(av, boolean=boolean)
        if window is not None:
            return MaskClass.GENERAL, f"causal with a sliding window of {window} keys"
        causal = False
        for c in av.cmps:
            if (c.a, c.b, c.c) == (k_axis, q_axis, 0):
                causal = True
            else:
                return MaskClass.GENERAL, f"position comparison {c} is not the causal j <= i"
        if av.cmps:
            outside = _canon(av.off)
            if not (outside is False if boolean else outside == MASKED):
                return MaskClass.GENERAL, "positions outside the causal triangle are not masked"
        if q_axis in av.vary:
            return MaskClass.GENERAL, "the mask varies with the query position"
        has_key_term = bool(av.vary) or (av.on is not None and _canon(av.on) != _canon(neutral))
        if av.on is not None and _canon(av.on) == MASKED:
            return MaskClass.GENERAL, "every position is masked"
        if causal:
            return (MaskClass.CAUSAL_KEY if has_key_term else MaskClass.CAUSAL), ""
        return (MaskClass.KEY if has_key_term else MaskClass.NONE), ""

    @staticmethod
    def sliding_window(av: AbstractValue | None, *, boolean: bool = False) -> int | None:
        """w when the mask (aligned to (..., Nq, Nk)) keeps key j for query i exactly when
        i - w < j <= i, together with at most a key-only term; ``None`` otherwise.

        This is the sliding-window causal mask (Mistral, Gemma 2's local layers...): still the
        ``general`` class for the variants, but the exact decode keeps only the last w keys.
        """
        if av is None or av.rank < 2 or av.index is not None or av.diff is not None:
            return None
        q_axis, k_axis = av.rank - 2, av.rank - 1
        widths = [c.c + 1 for c in av.cmps if (c.a, c.b) == (q_axis, k_axis)]
        if Cmp(k_axis, q_axis, 0) not in av.cmps or len(av.cmps) != 2 or len(widths) != 1:
            return None
        outside = _canon(av.off)
        if widths[0] < 1 or not (outside is False if boolean else outside == MASKED):
            return None
        if q_axis in av.vary or (av.on is not None and _canon(av.on) == MASKED):
            return None
        return int(widths[0])

    # -- rules ----------------------------------------------------------------------------------
    def _eval(self, node: fx.Node) -> AbstractValue:
        shp = G.shape(node)
        r = len(shp) if shp is not None else 0
        if node.op == "placeholder":
            return _dense(r, shp)
        if node.op == "get_attr":
            return self._constant_tensor(node, shp)
        if node.op != "call_function":
            return _dense(r, shp)
        name = G.op_name(node)
        try:
            out = self._rule(node, name, shp, r)
        except (KeyError, IndexError, TypeError, ValueError):
            out = None
        return out if out is not None else _dense(r, shp)

    def _rule(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        """The rule for ``name`` in :data:`RULES` (``None``: no rule, the value is dense)."""
        rule = RULES.get(name)
        if shp is None or rule is None:
            return None
        return rule(self, node, name, shp, r)

    def _copy(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        return self.value(node.args[0])

    def _cast(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        dt = G.dtype(node)
        src = self.value(node.args[0])
        if dt == torch.bool:
            return self._map(src, bool)
        if dt is not None and dt.is_floating_point:
            return self._map(src, lambda v: float(v))
        if src.index or src.diff:
            return src
        return self._map(src, lambda v: int(v) if not isinstance(v, bool) else int(v))

    def _fill(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        value = _FILL_VALUES.get(name)
        if value is None and name in ("full", "new_full", "full_like"):
            value = G.scalar_value(G.arg(node, "fill_value"), self.gm)
        if value is None and name == "scalar_tensor":
            value = G.scalar_value(G.arg(node, "s"), self.gm)
        if value is None:
            return None
        if G.dtype(node) == torch.bool:
            value = bool(value)
        return _const(value, r)

    def _arange(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        start = G.arg(node, "start", 0) if G.overload_name(node) != "default" else 0
        step = G.arg(node, "step", 1) if G.overload_name(node) == "start_step" else 1
        if not isinstance(start, int) or step != 1:
            return None
        return AbstractValue(rank=r, index=(0, start))

    def _triangle_op(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        diagonal = G.arg(node, "diagonal", 0)
        if not isinstance(diagonal, int) or r < 2:
            return None
        i_ax, j_ax = r - 2, r - 1
        # tril keeps j - i <= d; triu keeps j - i >= d, i.e. i - j <= -d. Elsewhere: 0.
        cmp = Cmp(j_ax, i_ax, diagonal) if name == "tril" else Cmp(i_ax, j_ax, -diagonal)
        inner = self.value(node.args[0])
        keep = AbstractValue(rank=r, cmps=frozenset({cmp}), on=True, off=False)
        zero = False if G.dtype(node) == torch.bool else 0
        return self._elementwise(
            lambda k, x: x if k else zero, [keep, self._align(inner, r)], r, shp
        )

    def _unsqueeze(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        src = self.value(node.args[0])
        d = G.normalize_dim(G.arg(node, "dim"), r)
        return _remap(src, {a: (a if a < d else a + 1) for a in range(src.rank)}, r, shp)

    def _squeeze(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        src_shape = G.shape(node.args[0])
        dims = self._squeezed_dims(node, src_shape)
        if dims is None:
            return None
        kept = [a for a in range(len(src_shape)) if a not in dims]
        return _remap(self.value(node.args[0]), {a: i for i, a in enumerate(kept)}, r, shp)

    def _transpose(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        if name == "t":
            return _remap(self.value(node.args[0]), {0: 1, 1: 0}, r, shp) if r == 2 else None
        d0 = G.normalize_dim(G.arg(node, "dim0"), r)
        d1 = G.normalize_dim(G.arg(node, "dim1"), r)
        m = {a: a for a in range(r)}
        m[d0], m[d1] = d1, d0
        return _remap(self.value(node.args[0]), m, r, shp)

    def _permute(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        dims = [G.normalize_dim(d, r) for d in G.arg(node, "dims")]
        return _remap(self.value(node.args[0]), {old: new for new, old in enumerate(dims)}, r, shp)

    def _broadcast(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        src = self.value(node.args[0])
        lead = r - src.rank
        return _remap(src, {a: a + lead for a in range(src.rank)}, r, shp)

    def _regroup(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        mapping = reshape_axis_map(G.shape(node.args[0]), shp)
        return _remap(self.value(node.args[0]), mapping, r, shp)

    def _select(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        src = self.value(node.args[0])
        d = G.normalize_dim(G.arg(node, "dim"), src.rank)
        mapping = {a: (a if a < d else a - 1) for a in range(src.rank) if a != d}
        if src.index and src.index[0] == d:
            return _const(None, r)
        return _remap(src, mapping, r, shp)

    def _masked_fill(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        x, cond, v = node.args[0], node.args[1], node.args[2]
        return self._nary(lambda a, c, f: f if c else a, [x, cond, v], shp, r)

    def _where_op(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        return self._nary(_where, list(node.args), shp, r) if len(node.args) == 3 else None

    def _add_sub(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        """Positions plus or minus positions or constants stay positions; otherwise values."""
        alpha = G.arg(node, "alpha", 1)
        a, b = node.args[0], node.args[1]
        if name in ("add", "sub") and alpha == 1:
            sign = 1 if name == "add" else -1
            pos = self._position_add(self.value(a), self.value(b), r, sign=sign)
            if pos is not None:
                return pos
        fn = _BINARY[name]
        return self._nary(lambda x, y: fn(x, y, alpha), [a, b], shp, r)

    def _binary(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        return self._nary(_BINARY[name], [node.args[0], node.args[1]], shp, r)

    def _unary(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        return self._map(self.value(node.args[0]), _UNARY[name], shp)

    def _clamp(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        lo, hi = G.arg(node, "min", None), G.arg(node, "max", None)

        def clamp(v: Any) -> Any:
            v = max(v, lo) if lo is not None else v
            return min(v, hi) if hi is not None else v

        return self._map(self.value(node.args[0]), clamp, shp)

    # -- leaves ---------------------------------------------------------------------------------
    def _constant_tensor(self, node: fx.Node, shp: Any) -> AbstractValue:
        r = len(shp) if shp is not None else 0
        obj = G.fetch_attr(self.gm, str(node.target))
        if not isinstance(obj, torch.Tensor) or isinstance(obj, torch.nn.Parameter):
            return _dense(r, shp)
        if obj.numel() == 1:
            return _const(obj.reshape(()).item(), r)
        if obj.dim() >= 2 and obj.numel() <= TRIANGLE_BUFFER_MAX_NUMEL:
            return self._triangle(obj, r, shp) or _dense(r, shp)
        return _dense(r, shp)

    @staticmethod
    def _triangle(t: torch.Tensor, r: int, shp: Any) -> AbstractValue | None:
        """A constant that is a triangle on its last two axes (a registered causal buffer)."""
        flat = t.reshape(-1, t.shape[-2], t.shape[-1])
        if not bool((flat == flat[:1]).all()):
            return None
        m = flat[0]
        n_i, n_j = m.shape
        i = torch.arange(n_i)[:, None]
        j = torch.arange(n_j)[None, :]
        values = torch.unique(m)
        if values.numel() != 2:
            return None
        lo, hi = values[0].item(), values[1].item()
        for d in TRIANGLE_DIAGONALS:
            for keep, cmp in (
                ((j - i) <= d, Cmp(r - 1, r - 2, d)),
                ((i - j) <= -d, Cmp(r - 2, r - 1, -d)),
            ):
                for on, off in ((hi, lo), (lo, hi)):
                    expect = torch.where(
                        keep, torch.tensor(on, dtype=m.dtype), torch.tensor(off, dtype=m.dtype)
                    )
                    if torch.equal(expect, m):
                        if m.dtype == torch.bool:
                            on, off = bool(on), bool(off)
                        return _oriented(
                            AbstractValue(rank=r, cmps=frozenset({cmp}), on=on, off=off)
                        )
        return None

    # -- helpers --------------------------------------------------------------------------------
    @staticmethod
    def _align(av: AbstractValue, rank: int) -> AbstractValue:
        lead = rank - av.rank
        if lead == 0:
            return av
        return _remap(av, {a: a + lead for a in range(av.rank)}, rank, None)

    def _map(self, av: AbstractValue, fn: Callable[[Any], Any], shp: Any = None) -> AbstractValue:
        if av.index is not None or av.diff is not None:
            return _flatten(av, shp)
        on = _safe(fn, av.on) if av.on is not None else None
        off = _safe(fn, av.off) if av.cmps else None
        if "error" in (on, off):
            return _flatten(av, shp)
        if av.cmps and on is not None and _canon(on) == _canon(off):
            return _const(on, av.rank)
        return _oriented(dataclasses.replace(av, on=on, off=off))

    def _nary(self, fn: Callable[..., Any], args: Sequence[Any], shp: Any, r: int) -> AbstractValue:
        avs = [
            self._align(self.value(a), r) if isinstance(a, fx.Node) else _const(a, r) for a in args
        ]
        return self._elementwise(fn, avs, r, shp)

    def _elementwise(
        self, fn: Callable[..., Any], avs: Sequence[AbstractValue], r: int, shp: Any
    ) -> AbstractValue:
        if any(av.index is not None or av.diff is not None for av in avs):
            return self._flat_union(avs, r, shp)
        cmps = frozenset().union(*(av.cmps for av in avs))
        vary = frozenset().union(*(av.vary for av in avs))
        samples = list(_BOOL_SAMPLES + _FLOAT_SAMPLES)
        # Inside (every comparison holds) and outside (some operand is outside its comparisons):
        # each is one known scalar if ``fn`` gives the same result whatever the data values are.
        inside_choices = [[av.on] if av.on is not None else samples for av in avs]
        inside = self._outcomes(fn, inside_choices, None)
        if not cmps:
            if inside is None:
                return AbstractValue(rank=r, vary=vary)
            if inside == "error":
                return self._flat_union(avs, r, shp)
            return AbstractValue(rank=r, on=inside[0])
        outside_choices = []
        for av in avs:
            values = [(v, False) for v in ([av.on] if av.on is not None else samples)]
            outside_choices.append(values + ([(av.off, True)] if av.cmps else []))
        outside = self._outcomes(fn, outside_choices, lambda combo: any(o for _, o in combo))
        if outside == "error":
            return self._flat_union(avs, r, shp)
        if outside is not None and inside is not None and inside != "error":
            if _canon(inside[0]) == _canon(outside[0]):
                return AbstractValue(rank=r, on=inside[0])
            return _oriented(AbstractValue(rank=r, cmps=cmps, on=inside[0], off=outside[0]))
        if outside is not None and inside is None:
            return _oriented(AbstractValue(rank=r, vary=vary, cmps=cmps, on=None, off=outside[0]))
        if outside is None and inside not in (None, "error") and len(cmps) == 1:
            # Data outside, a constant inside: the complement of one comparison is one comparison.
            (c,) = cmps
            return AbstractValue(
                rank=r, vary=vary, cmps=frozenset({Cmp(c.b, c.a, -c.c - 1)}), on=None, off=inside[0]
            )
        return self._flat_union(avs, r, shp)

    @staticmethod
    def _outcomes(
        fn: Callable[..., Any],
        choices: Sequence[Sequence[Any]],
        keep: Callable[[tuple[Any, ...]], bool] | None,
    ) -> Any:
        """``(value,)`` if ``fn`` is one scalar over every combination (``keep`` filters them),
        ``None`` if it varies, ``"error"`` if it cannot be evaluated."""
        results: set[Any] = set()
        first = None
        for combo in itertools.product(*choices):
            if keep is not None and not keep(combo):
                continue
            values = [v[0] if isinstance(v, tuple) else v for v in combo]
            res = _safe(fn, *values)
            if res == "error":
                return "error"
            key = _canon(res)
            if key == "nan":
                return None
            results.add(key)
            first = res if first is None else first
            if len(results) > 1:
                return None
        return (first,) if results else "error"

    @staticmethod
    def _flat_union(avs: Sequence[AbstractValue], r: int, shp: Any) -> AbstractValue:
        axes: set[int] = set()
        for av in avs:
            axes |= _flatten(av, None).vary
        if shp is not None:
            axes = {a for a in axes if a < len(shp) and not G.is_one(shp[a])}
        return AbstractValue(rank=r, vary=frozenset(axes))

    def _position_add(
        self, a: AbstractValue, b: AbstractValue, r: int, sign: int
    ) -> AbstractValue | None:
        a, b = self._align(a, r), self._align(b, r)
        const_b = b.const if b.is_const else None
        const_a = a.const if a.is_const else None
        if a.index and isinstance(const_b, int) and not isinstance(const_b, bool):
            return AbstractValue(rank=r, index=(a.index[0], a.index[1] + sign * const_b))
        if b.index and isinstance(const_a, int) and not isinstance(const_a, bool) and sign == 1:
            return AbstractValue(rank=r, index=(b.index[0], b.index[1] + const_a))
        if a.diff and isinstance(const_b, int) and not isinstance(const_b, bool):
            x, y, off = a.diff
            return AbstractValue(rank=r, diff=(x, y, off + sign * const_b))
        if sign == -1 and a.index and b.index and a.index[0] != b.index[0]:
            return AbstractValue(rank=r, diff=(a.index[0], b.index[0], a.index[1] - b.index[1]))
        return None

    def _compare(self, node: fx.Node, name: str, shp: Any, r: int) -> AbstractValue | None:
        lhs, rhs = node.args[0], node.args[1]
        a = self._align(self.value(lhs), r) if isinstance(lhs, fx.Node) else _const(lhs, r)
        b = self._align(self.value(rhs), r) if isinstance(rhs, fx.Node) else _const(rhs, r)
        # Normalise to  (u - v) OP c  over positions.
        diff = None
        if a.index and b.index and a.index[0] != b.index[0]:
            diff = (a.index[0], b.index[0], a.index[1] - b.index[1])
        elif a.diff and b.is_const and isinstance(b.const, int):
            diff = (a.diff[0], a.diff[1], a.diff[2] - b.const)
        elif b.diff and a.is_const and isinstance(a.const, int):
            # c OP (u - v + o)  <=>  (v - u - o + c) OP c... rewrite as (v - u) OP' (o - c) mirrored
            u, v, o = b.diff
            diff = (v, u, -o + a.const)
        if diff is not None:
            u, v, off = diff  # value = x[u] - x[v] + off, compared against 0 with `name`
            # x[u] - x[v] + off <= 0  <=>  x[u] - x[v] <= -off, etc.
            rules = {
                "le": [Cmp(u, v, -off)],
                "lt": [Cmp(u, v, -off - 1)],
                "ge": [Cmp(v, u, off)],
                "gt": [Cmp(v, u, off - 1)],
            }
            if name in rules:
                return AbstractValue(rank=r, cmps=frozenset(rules[name]), on=True, off=False)
            if name == "eq" and off == 0:
                return _flatten(AbstractValue(rank=r, diff=(u, v, off)), shp)
            return _flatten(AbstractValue(rank=r, diff=(u, v, off)), shp)
        if (a.on is None and not a.cmps) or (b.on is None and not b.cmps):
            if not (a.index or a.diff or b.index or b.diff):
                # Data compared with anything is data (no sample set can prove it constant).
                return self._flat_union([a, b], r, shp)
        if a.index and b.is_const and isinstance(b.const, (int, float)):
            lo = a.index[1]  # positions are >= their offset
            c = b.const
            always = {"ge": lo >= c, "gt": lo > c}.get(name)
            never = {"lt": lo >= c, "le": lo > c}.get(name)
            if always:
                return _const(True, r)
            if never:
                return _const(False, r)
            return _flatten(a, shp)
        return self._nary(_BINARY[name], [lhs, rhs], shp, r)

    def _slice(self, node: fx.Node, shp: Any, r: int) -> AbstractValue | None:
        src = self.value(node.args[0])
        d = G.normalize_dim(G.arg(node, "dim", 0), r)
        start = G.arg(node, "start", None)
        step = G.arg(node, "step", 1)
        start = 0 if start is None else G.as_int(start) if not isinstance(start, int) else start
        if step != 1 or start is None or start < 0:
            return _flatten(src, shp)
        if start == 0:
            return src
        cmps = set()
        for c in src.cmps:
            cc = c.c
            if c.a == d:
                cc -= start
            if c.b == d:
                cc += start
            cmps.add(Cmp(c.a, c.b, cc))
        index = src.index
        if index and index[0] == d:
            index = (d, index[1] + start)
        diff = src.diff
        if diff:
            u, v, off = diff
            off = off + (start if u == d else 0) - (start if v == d else 0)
            diff = (u, v, off)
        return dataclasses.replace(src, cmps=frozenset(cmps), index=index, diff=diff)

    def _index(self, node: fx.Node, shp: Any, r: int) -> AbstractValue | None:
        src_node, indices = node.args[0], node.args[1]
        src_shape = G.shape(src_node)
        if src_shape is None or any(i is None for i in indices) or len(indices) != len(src_shape):
            return None
        # Advanced indexing with every axis indexed: out[x] = src[i0(x), i1(x), ...].
        # The result varies where any index varies (and where the source varies along that axis).
        src = self.value(src_node)
        gathered = self._gather_positions(src, indices, r, shp)
        if gathered is not None:
            return gathered
        axes: set[int] = set()
        for k, idx in enumerate(indices):
            iv = self._align(self.value(idx), r)
            if k in src.vary or src.cmps or src.index or src.diff:
                axes |= _flatten(iv, None).vary
        if src.is_const:
            return _const(src.const, r)
        return AbstractValue(rank=r, vary=frozenset(a for a in axes if not G.is_one(shp[a])))

    def _gather_positions(
        self, src: AbstractValue, indices: Sequence[Any], r: int, shp: Any
    ) -> AbstractValue | None:
        """``src[i0, i1, ...]`` where every axis ``src`` has structure on is indexed by a position.

        Hugging Face's mask functions read ``position_ids[b, q_idx]`` and
        ``position_ids[b, kv_idx]`` (``remap_positions_for_packed_sequence``): when the positions
        are themselves an ``arange``, the gathered values are positions of the result's axes and
        their comparison is a causal condition. An index x[a] + o with o >= 0 is never negative,
        so no wrap-around can reorder it; out-of-range indices raise instead of reading.
        """
        structured: set[int] = set()
        for c in src.cmps:
            structured |= {c.a, c.b}
        if src.index:
            structured.add(src.index[0])
        if src.diff:
            structured |= {src.diff[0], src.diff[1]}
        if not structured:
            return None
        where: dict[int, tuple[int, int]] = {}
        for k in structured:
            idx = indices[k]
            iv = self._align(self.value(idx), r) if isinstance(idx, fx.Node) else None
            if iv is None or iv.index is None or iv.index[1] < 0 or iv.vary or iv.cmps:
                return None
            where[k] = iv.index
        vary: set[int] = set()
        for k in src.vary:
            idx = indices[k]
            if isinstance(idx, fx.Node):
                vary |= _flatten(self._align(self.value(idx), r), None).vary
        cmps = set()
        for c in src.cmps:
            (xa, oa), (xb, ob) = where[c.a], where[c.b]
            if xa == xb:
                return None
            cmps.add(Cmp(xa, xb, c.c - oa + ob))
        index = diff = None
        if src.index:
            x, o = where[src.index[0]]
            index = (x, src.index[1] + o)
        if src.diff:
            u, v, off = src.diff
            (xu, ou), (xv, ov) = where[u], where[v]
            if xu == xv:
                return None
            diff = (xu, xv, off + ou - ov)
        vary = {a for a in vary if not G.is_one(shp[a])}
        return AbstractValue(r, frozenset(vary), frozenset(cmps), src.on, src.off, index, diff)

    def _diff(self, node: fx.Node, r: int) -> AbstractValue | None:
        """``torch.diff`` (n=1) of a position tensor along its own axis is 1 everywhere, provided a
        ``prepend`` is the position just before the first (HF's ``find_packed_sequence_indices``
        prepends ``position_ids[:, :1] - 1``)."""
        src = self.value(node.args[0])
        d = G.normalize_dim(G.arg(node, "dim", -1), r)
        prepend, append = G.arg(node, "prepend", None), G.arg(node, "append", None)
        if G.arg(node, "n", 1) != 1 or append is not None:
            return None
        if src.index is None or src.index[0] != d:
            return None
        if prepend is not None:
            p_shape = G.shape(prepend) if isinstance(prepend, fx.Node) else None
            if p_shape is None or len(p_shape) != r or not G.is_one(p_shape[d]):
                return None
            p = self.value(prepend)
            if p.index is not None and p.index[0] == d:
                before = p.index[1]  # its only position along d is 0
            elif p.is_const and isinstance(p.const, int) and not isinstance(p.const, bool):
                before = p.const
            else:
                return None
            if before != src.index[1] - 1:
                return None
        return _const(1, r)

    def _cumsum(self, node: fx.Node, r: int) -> AbstractValue | None:
        """A cumulative sum of a constant 0 is 0; of a constant 1 it is the position plus one."""
        src = self.value(node.args[0])
        if not src.is_const or isinstance(src.const, float) and math.isnan(src.const):
            return None
        d = G.normalize_dim(G.arg(node, "dim"), r)
        dt = G.dtype(node)
        if src.const is False or src.const == 0:
            return _const(0.0 if dt is not None and dt.is_floating_point else 0, r)
        if (src.const is True or src.const == 1) and not (dt is not None and dt.is_floating_point):
            return AbstractValue(rank=r, index=(d, 1))
        return None

    @staticmethod
    def _squeezed_dims(node: fx.Node, src_shape: Any) -> set[int] | None:
        if src_shape is None:
            return None
        n = len(src_shape)
        if G.overload_name(node) == "default":
            return {i for i, s in enumerate(src_shape) if G.is_one(s)}
        dims = G.arg(node, "dim")
        dims = dims if isinstance(dims, (list, tuple)) else [dims]
        return {G.normalize_dim(d, n) for d in dims if G.is_one(src_shape[G.normalize_dim(d, n)])}


#: Abstract evaluation rule per op name (overload-free ATen or Python name): one entry per op
#: family, each a method of :class:`MaskAnalysis` returning the op's abstract value or ``None``
#: ("not understood": the value is dense, i.e. ``general``). An op with no entry is dense too.
#: Extending the analysis is one entry here and, if needed, one method.
RULES: dict[str, Rule] = {}
for _names, _rule in (
    (COPIES, MaskAnalysis._copy),
    (CASTS, MaskAnalysis._cast),
    (_FILLS, MaskAnalysis._fill),
    (("arange",), MaskAnalysis._arange),
    (("tril", "triu"), MaskAnalysis._triangle_op),
    (("unsqueeze",), MaskAnalysis._unsqueeze),
    (("squeeze",), MaskAnalysis._squeeze),
    (("transpose", "t"), MaskAnalysis._transpose),
    (("permute",), MaskAnalysis._permute),
    (BROADCASTS, MaskAnalysis._broadcast),
    (REGROUPS, MaskAnalysis._regroup),
    (("slice",), lambda self, node, name, shp, r: self._slice(node, shp, r)),
    (("select",), MaskAnalysis._select),
    (("index",), lambda self, node, name, shp, r: self._index(node, shp, r)),
    (("diff",), lambda self, node, name, shp, r: self._diff(node, r)),
    (("cumsum",), lambda self, node, name, shp, r: self._cumsum(node, r)),
    (("masked_fill",), MaskAnalysis._masked_fill),
    (("where",), MaskAnalysis._where_op),
    (COMPARISONS, MaskAnalysis._compare),
    (("add", "sub", "rsub"), MaskAnalysis._add_sub),
    (_BINARY, MaskAnalysis._binary),
    (_UNARY, MaskAnalysis._unary),
    (("clamp",), MaskAnalysis._clamp),
):
    for _name in _names:
        RULES.setdefault(_name, _rule)  # the first family that names an op owns it
del _names, _rule, _name


def reshape_groups(src: Sequence[Any], dst: Sequence[Any]) -> list[tuple[list[int], list[int]]]:
    """Matching groups of axes of a reshape: each (src axes, dst axes) covers the same elements."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        gs, gd = [], []
        ps: Any = 1
        pd: Any = 1
        while True:
            if gs and gd and G.same_size(ps, pd):
                break
            if i < len(src) and (not gs or G.size_hint(ps) <= G.size_hint(pd) or j >= len(dst)):
                ps = ps * src[i]
                gs.append(i)
                i += 1
            elif j < len(dst):
                pd = pd * dst[j]
                gd.append(j)
                j += 1
            else:
                break
        groups.append((gs, gd))
        if i >= len(src) and j >= len(dst):
            break
    return groups


def reshape_axis_map(src: Sequence[Any] | None, dst: Sequence[Any] | None) -> dict[int, int]:
    """Axes of ``src`` that survive a reshape to ``dst`` unchanged (same size, alone in its group).

    Size-1 axes are ignored (they can appear or vanish freely). Groups are found by matching
    prefix products of the non-1 sizes; an axis maps only if its group is one axis on both sides.
    """
    if src is None or dst is None:
        return {}
    s_idx = [i for i, v in enumerate(src) if not G.is_one(v)]
    d_idx = [i for i, v in enumerate(dst) if not G.is_one(v)]
    mapping: dict[int, int] = {}
    i = j = 0
    while i < len(s_idx) and j < len(d_idx):
        if G.same_size(src[s_idx[i]], dst[d_idx[j]]):
            mapping[s_idx[i]] = d_idx[j]
            i += 1
            j += 1
            continue
        # Merge/split: advance both sides until their products agree.
        ps, pd = src[s_idx[i]], dst[d_idx[j]]
        i += 1
        j += 1
        for _ in range(REGROUP_STEP_LIMIT):
            if G.same_size(ps, pd):
                break
            if G.size_hint(ps) <= G.size_hint(pd) and i < len(s_idx):
                ps = ps * src[s_idx[i]]
                i += 1
            elif j < len(d_idx):
                pd = pd * dst[d_idx[j]]
                j += 1
            elif i < len(s_idx):
                ps = ps * src[s_idx[i]]
                i += 1
            else:
                break
    return mapping
