"""Synthesizer: attention weights synthesised without query-key dot products."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import ALL_MASK_CLASSES, AttentionSite, MaskClass
from attnrewrite.variants.base import AttentionVariant, compute_dtype, repeat_kv
from attnrewrite.variants.blockwise import safe_softmax
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
    (+ O(N·d·max_len) dense), memory O(N²); parameters O(H·max_len²) for random.
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

    def synthesized_logits(self, query: Tensor, key_len: int) -> Tensor:
        """Logits (B|1, H, Nq, Nk) in float32 (or the query's dtype if wider)."""
        acc = compute_dtype(query.dtype)
        q_len = query.shape[-2]
        if self.options.mode == "dense":
            hidden = torch.relu(
                torch.matmul(query.to(acc), self.hidden_weight.to(acc))
                + self.hidden_bias.to(acc)[:, None, :]
            )
            weight = leading(self.logit_weight, 2, key_len).to(acc)
            bias = leading(self.logit_bias, 1, key_len).to(acc)
            return torch.matmul(hidden, weight) + bias[:, None, :]
        if self.options.mode == "random":
            return leading(leading(self.logits, 1, q_len), 2, key_len).unsqueeze(0).to(acc)
        left = leading(self.query_factor, 1, q_len).to(acc)
        right = leading(self.key_factor, 1, key_len).to(acc)
        return torch.matmul(left, right.transpose(-1, -2)).unsqueeze(0)

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
        logits = self.synthesized_logits(query, key_len)
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
