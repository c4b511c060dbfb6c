"""Facts about one attention site, shared by the passes (which find them) and the variants.

An :class:`AttentionSite` is pure data: it holds no graph nodes, so it can be printed, compared,
pickled and handed to a variant's constructor. The graph-side record of a site lives in
``attnrewrite.passes.find_attention`` and refers to its ``AttentionSite``.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class MaskClass(str, enum.Enum):
    """Which axes a site's mask or bias m(b, h, i, j) varies along (DESIGN.md, "Mask semantics").

    - ``none``: no mask or bias.
    - ``key``: varies with batch, head and key j only (padding masks, per-key bias).
    - ``causal``: the comparison j <= i (query i, key j, both counted from 0), nothing else.
    - ``causal+key``: causal combined (conjunction) with a key-only term.
    - ``general``: anything else, or anything the analysis could not prove to be one of the above.
    """

    NONE = "none"
    KEY = "key"
    CAUSAL = "causal"
    CAUSAL_KEY = "causal+key"
    GENERAL = "general"

    def __str__(self) -> str:
        return self.value

    @property
    def is_causal(self) -> bool:
        return self in (MaskClass.CAUSAL, MaskClass.CAUSAL_KEY)

    @property
    def has_key_term(self) -> bool:
        return self in (MaskClass.KEY, MaskClass.CAUSAL_KEY)


#: Mask classes every kernel (linear-time) attention can keep exactly.
KERNEL_MASK_CLASSES = frozenset(
    {MaskClass.NONE, MaskClass.KEY, MaskClass.CAUSAL, MaskClass.CAUSAL_KEY}
)
ALL_MASK_CLASSES = frozenset(MaskClass)


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """One softmax-attention site of a model, as found in its graph.

    Shapes use the canonical layout (batch, heads, seq, head_dim) whatever the model's spelling.

    Attributes:
        name: module path of the attention (from ``nn_module_stack``), e.g.
        ``encoder.layer.0.attention.self``.
        kind: how the model spelled it: ``"manual"`` (product, softmax, product) or ``"sdpa"``.
        num_heads: query heads H (1 when the model folds heads into the batch and the fold could
            not be traced).
        num_kv_heads: key/value heads (< ``num_heads`` for grouped/multi-query attention).
        head_dim: query/key feature size d.
        value_dim: value feature size.
        scale: the total factor applied to q·k (on scores, on q, on k or as sdpa ``scale``).
        mask: the mask class, see :class:`MaskClass`.
        causal: whether the site is causal (j <= i), from any spelling.
        dropout_p: attention-probability dropout active at capture (0.0 in eval mode).
        is_cross: keys/values come from another sequence than the queries.
        weights_escape: the attention probabilities are used by something else than the value
            product (for example returned with ``output_attentions``).
        query_len, key_len: lengths at capture (ints, or strings of symbolic sizes).
        dtype: dtype of the attention scores at capture.
        upcast: the softmax runs in a wider dtype than its input (fp32 upcast).
        notes: free-form remarks from the analysis (where the scale was found, etc.).
        attends_over: ``"tokens"`` (softmax over key positions), or ``"channels"`` for channel
            attention (XCiT's cross-covariance attention, DaViT's channel blocks, EdgeNeXt's XCA):
            q·kᵀ contracts the token axis, so the "queries" and "keys" are feature channels and
            ``head_dim`` is the token count. Detected from symbolic sizes: the contracted axis
            has the captured sequence length, the query/key axes a fixed size.
        window: for a ``general`` mask proven to be causal with a sliding window (query i sees
            keys i - window < j <= i, plus at most a key-only term), the window; ``None``
            otherwise. The exact decode keeps the last ``window`` keys.
    """

    name: str
    kind: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    scale: float
    mask: MaskClass
    causal: bool
    dropout_p: float = 0.0
    is_cross: bool = False
    weights_escape: bool = False
    query_len: Any = None
    key_len: Any = None
    dtype: str = "float32"
    upcast: bool = False
    notes: tuple[str, ...] = ()
    attends_over: str = "tokens"
    window: int | None = None

    def replace(self, **changes: Any) -> AttentionSite:
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A softmax (or sdpa call) that was looked at and not taken as a site, and why.

    ``stage`` is where it was decided: ``"find"`` (not attention: a router, a pooling softmax,
    talking-heads mixing...) or ``"find-error"`` (an unexpected error while analysing it; the
    other sites are still rewritten).
    """

    node: str
    module: str
    reason: str
    stage: str = "find"
