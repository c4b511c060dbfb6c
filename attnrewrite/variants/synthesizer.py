"""Synthesizer: attention weights synthesised without query-key dot products."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import ALL_MASK_CLASSES, AttentionSite, MaskClass
from attnrewrite.variants.base import (
    AttentionVariant,
    additive_mask,
    combine_mask,
    compute_dtype,
    repeat_kv,
)
from attnrewrite.variants.blockwise import fused_attention, safe_softmax
from attnrewrite.variants.linformer import leading

#: Longest sequence when neither the option nor the site's lengths at capture give one.
DEFAULT_MAX_LEN = 512
MODES = ("dense", "random", "factorized_random")


@dataclasses.dataclass(frozen=True)
class SynthesizerOptions:
    mode: str = "dense"
    max_len: int | None = None
    factor: int = 8

    def check(self) -> str | None:
        if self.mode not in MODES:
            return f"mode must be one of {', '.join(MODES)}, got {self.mode!r}"
        if self.max_len is not None and self.max_len < 1:
            return f"max_len must be a positive integer, got {self.max_len}"
        if self.factor < 1:
            return f"factor must be a positive integer, got {self.factor}"
        return None


class SynthesizerAttention(AttentionVariant):
    """Synthesizer: Tay, Bahri, Metzler, Juan, Zhao, Zheng, "Synthesizer: Rethinking
    Self-Attention in Transformer Models", ICML 2021, arXiv:2005.00743.

    out = softmax(B + m) v, with per-head logits B sliced to (Nq, Nk) from a max_len-sized table:

    - ``dense``: B_i = W₂ relu(W₁ x_i + b₁) + b₂, a 2-layer MLP d -> d -> max_len per head, with
      the head's query q_i standing for the layer input x_i (the variant sees canonical q, k, v
      only; q is a per-head linear function of x);
    - ``random``: B = R, learned logits (H, max_len, max_len), input-independent;
    - ``factorized_random``: B = R₁ R₂ᵀ with R₁, R₂ of shape (H, max_len, ``factor``).

    What a rewrite into a Synthesizer keeps from the original layer: the value path and the output
    projection (v, and whatever the model does after attention), the mask and causality. The
    q·k scores and the site's scale are discarded (dense mode reuses q as its input).

    Initialisation: the last logit layer (W₂, b₂), R and R₂ start at zero, so the untrained
    rewrite attends uniformly over the allowed keys (a masked mean of v); W₁ and R₁ start random
    (from the variant's seed) so gradients reach every parameter. The synthesised logits are
    therefore meaningful only after training.

    Capabilities: every mask class (the logits are a dense (Nq, Nk) matrix, so a ``general`` bias
    is added as is), causal, cross-attention, grouped heads. Parameters: the MLP (dense), R
    (random) or R₁, R₂ (factorized). Options: ``mode``, ``max_len`` (default the longest of the
    site's lengths at capture if known, else 512; a site known to be longer is refused at
    construction), ``factor`` (rank of factorized_random, default 8). Cost: time O(N²·dv)
    (+ O(N·d·max_len) dense); memory O(N²) for random, and for ``dense`` and
    ``factorized_random`` O(N·d) beside the site's own mask: their logits are a product plus a
    per-key bias, B = L·Rᵀ + b, so they run as one fused ``scaled_dot_product_attention`` with
    queries L and keys R (the same values; it is what makes ``dense`` as fast as the softmax it
    replaces). Parameters O(H·max_len²) for random.
    """

    name: ClassVar[str] = "synthesizer"
    mask_classes: ClassVar[frozenset[MaskClass]] = ALL_MASK_CLASSES
    Options: ClassVar[type] = SynthesizerOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        known = [n for n in (site.query_len, site.key_len) if isinstance(n, int)]
        self.max_len = self.options.max_len or max(known, default=DEFAULT_MAX_LEN)
        if known and max(known) > self.max_len:
            raise VariantOptionError(
                f"variant 'synthesizer': the site has sequences of {max(known)} positions but "
                f"max_len={self.max_len}; pass max_len >= {max(known)}"
            )
        heads, dim, length = site.num_heads, site.head_dim, self.max_len
        generator = self.generator()
        if self.options.mode == "dense":
            bound = 1 / math.sqrt(dim)  # nn.Linear's default range for fan-in d
            self.hidden_weight = nn.Parameter(
                (torch.rand(heads, dim, dim, generator=generator) * 2 - 1) * bound
            )
            self.hidden_bias = nn.Parameter(torch.zeros(heads, dim))
            self.logit_weight = nn.Parameter(torch.zeros(heads, dim, length))
            self.logit_bias = nn.Parameter(torch.zeros(heads, length))
        elif self.options.mode == "random":
            self.logits = nn.Parameter(torch.zeros(heads, length, length))
        else:
            rank = self.options.factor
            self.query_factor = nn.Parameter(
                torch.randn(heads, length, rank, generator=generator) / math.sqrt(rank)
            )
            self.key_factor = nn.Parameter(torch.zeros(heads, length, rank))

    def _factors(self, query: Tensor, key_len: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The logits as a product plus a per-key bias, B = L·Rᵀ + b: L (B|1, H, Nq, e),
        R (1, H, Nk, e) and b (1, H, 1, Nk) or None, in float32 (or the query's dtype if wider).
        ``dense``: L = relu(W₁ q + b₁), R = W₂ᵀ, b = b₂; ``factorized_random``: L = R₁, R = R₂."""
        acc = compute_dtype(query.dtype)
        if self.options.mode == "dense":
            left = torch.relu(
                torch.matmul(query.to(acc), self.hidden_weight.to(acc))
                + self.hidden_bias.to(acc)[:, None, :]
            )
            # (H, Nk, d) made contiguous: with a transposed view (stride 1 along keys)
            # scaled_dot_product_attention leaves its fused kernel, at 3-4x the time.
            right = leading(self.logit_weight, 2, key_len).to(acc).transpose(1, 2).contiguous()
            right = right.unsqueeze(0)
            bias = leading(self.logit_bias, 1, key_len).to(acc)[None, :, None, :]
            return left, right, bias
        left = leading(self.query_factor, 1, query.shape[-2]).to(acc).unsqueeze(0)
        right = leading(self.key_factor, 1, key_len).to(acc).unsqueeze(0)
        return left, right, None

    def _as_sdpa(
        self, query: Tensor, value: Tensor, mask: Tensor | None, causal: bool, key_len: int
    ) -> Tensor:
        """softmax(L·Rᵀ + b + mask) v as one ``scaled_dot_product_attention`` with queries L,
        keys R and the bias b folded into the mask (scale 1): the same values as the dense
        definition, through the fused kernel (no (Nq, Nk) logits in memory without a dense
        mask). Rows with no allowed key are 0, as :func:`safe_softmax` gives them."""
        left, right, bias = self._factors(query, key_len)
        batch, heads = max(left.shape[0], query.shape[0]), query.shape[1]
        left = left.expand(batch, heads, -1, -1)
        value = repeat_kv(value.to(left.dtype), heads)
        combined = combine_mask(mask, causal, query.shape[-2], key_len, query.device)
        attn_mask = additive_mask(combined, left.dtype)
        if bias is not None:
            attn_mask = bias if attn_mask is None else attn_mask + bias
        out = fused_attention(left, right.expand(batch, heads, -1, -1), value, attn_mask)
        return out.to(query.dtype)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float = 1.0,
    ) -> Tensor:
        q_len, key_len = query.shape[-2], key.shape[-2]
        max_len = self.max_len  # a plain int in the message: Dynamo cannot trace closures over self
        torch._check(
            q_len <= max_len,
            lambda: f"synthesizer was built for sequences of at most max_len={max_len}",
        )
        torch._check(
            key_len <= max_len,
            lambda: f"synthesizer was built for sequences of at most max_len={max_len}",
        )
        if self.options.mode != "random":
            return self._as_sdpa(query, value, mask, causal, key_len)
        # random: input-independent logits, a slice of the (H, max_len, max_len) table
        logits = leading(leading(self.logits, 1, q_len), 2, key_len).unsqueeze(0)
        logits = logits.to(compute_dtype(query.dtype))
        if mask is not None:
            if mask.dtype == torch.bool:
                logits = logits.masked_fill(~mask, float("-inf"))
            else:
                logits = logits + mask.to(logits.dtype)
        if causal:
            rows = torch.arange(q_len, device=query.device)[:, None]
            cols = torch.arange(key_len, device=query.device)[None, :]
            logits = logits.masked_fill(cols > rows, float("-inf"))
        weights = safe_softmax(logits)
        value = repeat_kv(value.to(weights.dtype), query.shape[1])
        return torch.matmul(weights, value).to(query.dtype)
