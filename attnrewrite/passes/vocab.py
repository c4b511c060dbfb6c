"""The op vocabularies the passes share: which ATen ops count as a copy, a cast, a reshape, ...

Each name below is one meaning, spelled once; the finder (``find_attention.py``), the mask analysis
(``mask_analysis.py``), the product reader (``products.py``) and the graph helpers (``graph.py``)
read these sets instead of listing op names inline (canonicalisation's row slicing is
:data:`ROW_ELEMENTWISE`). Ops are named as
:func:`attnrewrite.passes.graph.op_name` reports them: the ATen overload packet (``softmax`` for
``aten.softmax.int``), in-place ops as their functional name (``div_`` reads as ``div``).

Two vocabularies that differ on purpose are kept as two names and the difference is written next to
them (e.g. :data:`SCALE_COMMUTING_VIEWS` is not :data:`RESHAPES`): merging them would change what
the passes accept.
"""

from __future__ import annotations

# -- anchors and products --------------------------------------------------------------------------

#: Softmax over one axis, in every spelling export leaves (``_safe_softmax`` is what sdpa's math
#: path and ``nn.MultiheadAttention`` decompose to; ``special_softmax`` is ``torch.special``'s).
SOFTMAX_OPS = frozenset({"softmax", "_softmax", "_safe_softmax", "special_softmax"})

#: Fused attention: a site as it stands.
SDPA_OPS = frozenset({"scaled_dot_product_attention"})

#: Two-operand contractions described in einsum letters by ``products.as_product``.
PRODUCT_OPS = frozenset({"matmul", "bmm", "mm", "einsum", "baddbmm"})

# -- value-preserving ops --------------------------------------------------------------------------

#: Same values as the first argument, same dtype: copies and aliases (``lift_fresh_copy`` is how
#: export lifts ``torch.tensor(...)`` constants into the graph).
COPIES = frozenset({"clone", "contiguous", "alias", "detach", "detach_", "lift_fresh_copy"})

#: Same values as the first argument, possibly another dtype.
CASTS = frozenset({"to", "_to_copy", "type_as"})

#: The copies and casts ``graph.scalar_value`` looks through on a 0-d tensor. Narrower than
#: ``COPIES | CASTS``: ``lift_fresh_copy`` is read there by its own rule (at any rank), and a
#: ``contiguous`` or ``type_as`` of a scalar constant is not taken as that constant.
SCALAR_COPIES = (COPIES | CASTS) - {"contiguous", "lift_fresh_copy", "type_as"}

#: Dropout on the attention probabilities (its ``p`` becomes the site's ``dropout_p``).
DROPOUTS = frozenset({"dropout", "feature_dropout", "alpha_dropout"})

# -- layout ops ------------------------------------------------------------------------------------

#: Reshapes to explicit sizes, which may merge or split axes (heads folded into the batch).
FOLDS = frozenset({"view", "reshape", "_unsafe_view"})

#: ``flatten`` / ``unflatten``: reshapes that name the axes they merge or split.
FLATTENS = frozenset({"flatten", "unflatten"})

#: Add or remove size-1 axes.
SIZE_ONE_AXES = frozenset({"unsqueeze", "squeeze"})

#: Broadcasts of size-1 axes to a larger size (a view; no data moves).
BROADCASTS = frozenset({"expand", "expand_as", "broadcast_to"})

#: What the finder walks through between the score product and softmax, and between softmax and
#: the value product, when it keeps the (query, key) axes in place (``expand`` only upward).
RESHAPES = FOLDS | FLATTENS | SIZE_ONE_AXES | {"expand"}

#: Reshapes whose axis map ``mask_analysis.reshape_axis_map`` recovers from the sizes alone.
REGROUPS = FOLDS | FLATTENS

#: Views a scalar scale commutes with, walked through (and replayed) from a product operand down
#: to the scale. Unlike :data:`RESHAPES`: ``slice`` is included, ``flatten``/``unflatten`` are not.
SCALE_COMMUTING_VIEWS = FOLDS | SIZE_ONE_AXES | {"expand", "slice"}

#: Ops that swap the last two axes whatever the rank (``t`` does too, but only on 2-d tensors).
MATRIX_TRANSPOSES = frozenset({"mT", "adjoint"})

#: Ops that reorder axes.
AXIS_PERMUTES = frozenset({"transpose", "permute", "t"}) | MATRIX_TRANSPOSES

# -- elementwise ops -------------------------------------------------------------------------------

#: Elementwise comparisons (boolean result).
COMPARISONS = frozenset({"lt", "le", "gt", "ge", "eq", "ne"})

#: Elementwise boolean connectives of two operands.
LOGICAL_BINARY = frozenset(
    {"__and__", "bitwise_and", "logical_and", "__or__", "bitwise_or", "logical_or"}
)

#: Elementwise boolean negation.
LOGICAL_NOT = frozenset({"logical_not", "bitwise_not", "__invert__"})

#: Elementwise arithmetic of two operands.
ARITHMETIC = frozenset({"add", "sub", "rsub", "mul", "div"})

#: Elementwise minimum / maximum of two operands (``fmin``/``fmax`` ignore NaN).
EXTREMA = frozenset({"minimum", "maximum", "fmin", "fmax"})

#: Elementwise maps of one operand with a known scalar meaning.
UNARY_MATH = frozenset({"neg", "abs", "exp", "log"})

#: Elementwise selections: ``where(cond, a, b)``, ``masked_fill(x, cond, value)``.
SELECTS = frozenset({"where", "masked_fill"})

#: Elementwise ops the mask analysis evaluates position by position: applied to masks, they keep
#: the structure (which axes vary, which position comparisons hold) computable. Each has a scalar
#: rule in ``mask_analysis`` (a test checks that the rules cover exactly this set).
MASK_ELEMENTWISE = (
    COPIES
    | CASTS
    | COMPARISONS
    | LOGICAL_BINARY
    | LOGICAL_NOT
    | ARITHMETIC
    | EXTREMA
    | UNARY_MATH
    | SELECTS
    | {"clamp"}
)

#: Elementwise ops through which canonicalisation pushes "take the last query row" of a mask
#: (``canonicalize._row``). Narrower than :data:`MASK_ELEMENTWISE`: ``detach``, ``detach_``,
#: ``lift_fresh_copy``, ``type_as``, ``fmin`` and ``fmax`` are sliced as they stand instead.
ROW_ELEMENTWISE = MASK_ELEMENTWISE - {
    "detach",
    "detach_",
    "lift_fresh_copy",
    "type_as",
    "fmin",
    "fmax",
}

# -- score transforms ------------------------------------------------------------------------------

#: Bounded maps of the scores before softmax (Gemma 2's logit soft-capping ``cap·tanh(s/cap)``,
#: clipping): still attention, but no variant reproduces them.
SCORE_CAPS = frozenset({"tanh", "clamp", "clamp_min", "clamp_max"})
