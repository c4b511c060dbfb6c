"""Random Feature Attention (RFA): random Fourier features of a Gaussian kernel on unit vectors."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import AttentionSite
from attnrewrite.variants.base import compute_dtype, default_num_features, key_weights
from attnrewrite.variants.kernel import FeatureMapAttention, KernelOptions
from attnrewrite.variants.kernel_core import kernel_attention, random_projection

#: Initial gate bias: g = sigmoid(3) ≈ 0.95, a recency horizon of about 20 positions.
GATE_BIAS_INIT = 3.0


@dataclasses.dataclass(frozen=True)
class RFAOptions(KernelOptions):
    """Options of ``rfa``."""

    num_features: int | None = None
    sigma: float = 1.0
    learn_sigma: bool = False
    gate: bool = False

    def check(self) -> str | None:
        if self.num_features is not None and self.num_features <= 0:
            return f"num_features must be positive, got {self.num_features}"
        if not self.sigma > 0:
            return f"sigma must be positive, got {self.sigma}"
        return super().check()


class RandomFeatureAttention(FeatureMapAttention):
    """Random Feature Attention: Peng, Pappas, Yogatama, Schwartz, Smith, Kong, "Random Feature
    Attention", ICLR 2021, arXiv:2103.02143.

    Queries and keys are ℓ2-normalised (x̂ = x/|x|, so the site's scale has no effect) and mapped to
    random Fourier features φ(x) = [sin(ω_r·x̂/σ), cos(ω_r·x̂/σ)]_{r=1..m} / √m, ω_r ~ N(0, I_d)
    (Rahimi & Recht 2007), so φ(x)·φ(y) = (1/m) Σ_r cos(ω_r·(x̂ − ŷ)/σ) estimates the Gaussian kernel
    exp(−|x̂ − ŷ|²/2σ²) = exp((x̂·ŷ − 1)/σ²): softmax attention on unit vectors at temperature σ².

    Sign: sin/cos features are not positive, so an estimated kernel value — and, rarely, a whole
    normaliser Σ_j w_j φ(q_i)·φ(k_j) — can be ≤ 0. The core clamps the normaliser to at least 1e-6
    (the tests' dense reference does the same): a non-positive normaliser means the estimate
    failed for that row; the clamp keeps it finite instead of dividing by ~0 or flipping its sign.
    With m features the normaliser's relative error is O(1/√(m·N)), so this is rare.

    Gate (``gate=True``, causal sites only): RFA-Gate's learned recency,
    S_t = g_t S_{t−1} + (1 − g_t) φ(k_t) v_tᵀ (and z alike), g_t = sigmoid(w_h·k_t + b_h) per
    key/value head. The paper computes g_t from the layer input x_t, which a variant does not see;
    the key k_t (before normalisation) is the per-position vector it has. Initialisation: w = 0,
    b = 3 (g ≈ 0.95). A key the mask removes still decays the state but adds nothing to it. The
    default is no gate: a gate changes the model's meaning beyond approximating softmax and only
    pays off once trained, and non-causal attention has no order to decay along.

    Capabilities: masks ``none``, ``key``, ``causal``, ``causal+key``; causal; cross-attention;
    grouped key/value heads. Parameters: ``log_sigma`` per key/value head when ``learn_sigma``;
    ``gate_weight``, ``gate_bias`` when ``gate``. Options: ``num_features`` m (default d·ln d;
    2m features), ``sigma``, ``learn_sigma``, ``gate``, ``chunk_size``. The projection is a buffer.
    Cost: time O(N·m·(d + dv)) (+ O((N/C)²·m·dv) with the gate); memory as ``performer``.
    """

    name: ClassVar[str] = "rfa"
    Options: ClassVar[type] = RFAOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__(site, seed=seed, **options)
        opts = self.options
        if opts.gate and not site.causal:
            raise VariantOptionError(
                f"variant 'rfa': gate=True needs a causal site (a recency gate decays along "
                f"positions); site '{site.name}' is not causal — use gate=False"
            )
        self.num_features = opts.num_features or default_num_features(site.head_dim)
        self.register_buffer(
            "projection",
            random_projection(
                self.num_features, site.head_dim, generator=self.generator(), orthogonal=False
            ),
        )
        log_sigma = torch.full((site.num_kv_heads,), math.log(opts.sigma))
        if opts.learn_sigma:
            self.log_sigma = nn.Parameter(log_sigma)
        else:
            self.register_buffer("log_sigma", log_sigma)
        if opts.gate:
            self.gate_weight = nn.Parameter(torch.zeros(site.num_kv_heads, site.head_dim))
            self.gate_bias = nn.Parameter(torch.full((site.num_kv_heads,), GATE_BIAS_INIT))

    def _features(self, x: Tensor, inv_sigma: Tensor) -> Tensor:
        """[sin, cos](ω·x̂/σ)/√m for x: (B, h, N, d) and inv_sigma: (h,)."""
        unit = F.normalize(x, dim=-1)
        angle = (unit @ self.projection.to(x.dtype).T) * inv_sigma[:, None, None]
        return torch.cat([angle.sin(), angle.cos()], dim=-1) / math.sqrt(self.num_features)

    def feature_maps(
        self, query: Tensor, key: Tensor, weights: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        inv_sigma = (-self.log_sigma).exp().to(query.dtype)  # per key/value head
        group = query.shape[1] // key.shape[1]
        return (
            self._features(query, inv_sigma.repeat_interleave(group)),
            self._features(key, inv_sigma),
        )

    def gate_terms(self, key: Tensor) -> tuple[Tensor, Tensor]:
        """log g_t and 1 − g_t, each (B, Hkv, Nk), from the keys (B, Hkv, Nk, d)."""
        logit = torch.einsum("bhnd,hd->bhn", key, self.gate_weight.to(key.dtype))
        logit = logit + self.gate_bias.to(key.dtype)[:, None]
        # logsigmoid(-x) = log(1 - g), computed without cancellation.
        return F.logsigmoid(logit), torch.sigmoid(-logit)

    def _plain_forward(self) -> bool:
        return not self.options.gate

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
        if not self.options.gate:
            return super().forward(query, key, value, mask=mask, causal=causal, scale=scale)
        if not causal:
            raise ValueError("rfa with gate=True computes causal attention only; got causal=False")
        acc = compute_dtype(query.dtype)
        root = math.sqrt(scale)
        scaled_key = key.to(acc) * root
        phi_q, phi_k = self.feature_maps(query.to(acc) * root, scaled_key, None)
        log_gate, admit = self.gate_terms(scaled_key)
        weights = key_weights(mask, acc)
        if weights is not None:
            if weights.shape[1] not in (1, admit.shape[1]):
                group = weights.shape[1] // admit.shape[1]
                log_gate = log_gate.repeat_interleave(group, dim=1)
                admit = admit.repeat_interleave(group, dim=1)
            admit = admit * weights
        out = kernel_attention(
            phi_q,
            phi_k,
            value,
            key_weights=admit,
            causal=True,
            chunk_size=self.options.chunk_size,
            log_decay=log_gate,
        )
        return out.to(query.dtype)
