"""Two-operand contractions (``matmul``, ``bmm``, ``mm``, ``einsum``, ``baddbmm``) in einsum terms.

Every product the finder meets is described by letters, one per axis of each operand and of the
output, so the checks "q·kᵀ contracts the feature axis" and "the value product contracts the key
axis" are the same code whatever the spelling.
"""

from __future__ import annotations

import dataclasses
import string

from torch import fx

from attnrewrite.passes import graph as G
from attnrewrite.passes.vocab import PRODUCT_OPS


@dataclasses.dataclass(frozen=True)
class Product:
    """out[out_letters] = Σ lhs[lhs_letters] · rhs[rhs_letters] (· alpha, + beta·bias)."""

    node: fx.Node
    lhs: fx.Node
    rhs: fx.Node
    lhs_letters: str
    rhs_letters: str
    out_letters: str
    alpha: float = 1.0
    bias: fx.Node | None = None
    beta: float = 1.0

    @property
    def contracted(self) -> set[str]:
        return (set(self.lhs_letters) & set(self.rhs_letters)) - set(self.out_letters)

    def operand(self, side: str) -> tuple[fx.Node, str]:
        return (self.lhs, self.lhs_letters) if side == "lhs" else (self.rhs, self.rhs_letters)

    def side_of_free(self, letter: str) -> str | None:
        """Which operand a free output letter comes from (``None`` if batch or absent)."""
        in_l, in_r = letter in self.lhs_letters, letter in self.rhs_letters
        if in_l and not in_r:
            return "lhs"
        if in_r and not in_l:
            return "rhs"
        return None


def as_product(node: fx.Node) -> Product | None:
    """Describe ``node`` as a :class:`Product`, or ``None`` if it is none we understand."""
    name = G.op_name(node)
    if name not in PRODUCT_OPS:
        return None
    if name == "einsum":
        equation, operands = G.arg(node, "equation"), G.arg(node, "tensors")
        if len(operands) != 2:
            return None
        parsed = parse_einsum(equation, [G.rank(o) for o in operands])
        if parsed is None:
            return None
        (la, lb), lo = parsed
        return Product(node, operands[0], operands[1], la, lb, lo)
    if name == "baddbmm":
        b1, b2 = G.arg(node, "batch1"), G.arg(node, "batch2")
        alpha = G.arg(node, "alpha", 1)
        beta = G.arg(node, "beta", 1)
        if not isinstance(alpha, (int, float)) or not isinstance(beta, (int, float)):
            return None
        return Product(
            node,
            b1,
            b2,
            "bmk",
            "bkn",
            "bmn",
            float(alpha),
            G.arg(node, "self") if beta != 0 else None,
            float(beta),
        )
    a, b = node.args[0], node.args[1]
    ra, rb = G.rank(a), G.rank(b)
    if ra < 2 or rb < 2:
        return None
    out_rank = max(ra, rb)
    batch = "abcdefgh"[: out_rank - 2]
    lhs = batch[len(batch) - (ra - 2) :] + "mk"
    rhs = batch[len(batch) - (rb - 2) :] + "kn"
    return Product(node, a, b, lhs, rhs, batch + "mn")


def parse_einsum(equation: str, ranks: list[int]) -> tuple[tuple[str, str], str] | None:
    """Letters of a two-operand einsum, with ``...`` expanded to fresh upper-case letters."""
    eq = equation.replace(" ", "")
    if "->" not in eq:
        return None
    ins, out = eq.split("->")
    parts = ins.split(",")
    if len(parts) != 2:
        return None
    fresh = [c for c in string.ascii_uppercase]
    ell = None
    expanded = []
    for part, r in zip(parts, ranks):
        if "..." in part:
            n = r - (len(part) - 3)
            if ell is None or len(ell) < n:
                ell = "".join(fresh[:n]) if ell is None or len(ell) < n else ell
            part = part.replace("...", ell[len(ell) - n :] if n > 0 else "")
        if len(part) != r:
            return None
        expanded.append(part)
    if "..." in out:
        out = out.replace("...", ell or "")
    return (expanded[0], expanded[1]), out
