"""Calibration losses: a site's output, or its attention weights, against softmax's.

- ``mse``: the relative squared error ‖y − t‖² / ‖t‖² of the variant's output y against the exact
  softmax output t computed from the same canonical inputs. Dividing by ‖t‖² makes one learning
  rate fit every layer, whatever the scale of its values.
- ``attn_kl``: the mean over query rows of KL(P_i ‖ A_i) between the softmax attention weights P
  and the normalised weights A_ij = w_j φ(q_i)·φ(k_j) / Σ_l w_l φ(q_i)·φ(k_l) a kernel variant
  implies (w_j the key-only mask as weights). This is the attention distillation of Hedgehog
  (Zhang et al. 2024, arXiv:2402.04347). Both matrices are dense (B, H, Nq, Nk): meant for the
  short sequences of a calibration set, not for long-context inputs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

from attnrewrite.calibrate.mode import SiteCall
from attnrewrite.errors import CalibrationError
from attnrewrite.variants.base import causal_keep, key_weights, repeat_kv
from attnrewrite.variants.kernel import FeatureMapAttention

LOSSES = ("mse", "attn_kl")


def squared_error(output: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Σ (y − t)² and Σ t², in float32 (the numerator and denominator of the relative MSE)."""
    teacher = teacher.float()
    return (output.float() - teacher).square().sum(), teacher.square().sum()


def site_output(module: nn.Module, call: SiteCall) -> Tensor:
    """The site's own output on one recorded call."""
    return module(
        call.query, call.key, call.value, mask=call.mask, causal=call.causal, scale=call.scale
    )


def site_output_terms(module: nn.Module, call: SiteCall) -> tuple[Tensor, Tensor]:
    """The ``mse`` loss as (Σ (y − t)², Σ t²): the loss is their ratio. Kept apart so that under
    ``torch.distributed`` the denominator can be summed over ranks first."""
    return squared_error(site_output(module, call), call.teacher)


def check_attn_kl(module: nn.Module, site: str, variant: str) -> None:
    """Raise unless ``module`` implies attention weights (a kernel variant: φ(q)·φ(k))."""
    if not isinstance(module, FeatureMapAttention):
        raise CalibrationError(
            f"loss='attn_kl' needs a kernel variant (normalised φ(q)·φ(k) weights); site "
            f"'{site}' is rewritten into '{variant}', which has no such weights. Use loss='mse', "
            "or select the kernel-variant sites with layers="
        )


def implied_log_weights(module: FeatureMapAttention, call: SiteCall) -> Tensor:
    """log A_ij of a kernel variant on one call: (B, H, Nq, Nk), −inf where A_ij = 0."""
    root = math.sqrt(call.scale)
    query, key = call.query.float() * root, call.key.float() * root
    weights = key_weights(call.mask, torch.float32)
    phi_q, phi_k = module.feature_maps(query, key, weights)
    kernel = phi_q @ repeat_kv(phi_k, phi_q.shape[1]).transpose(-1, -2)
    if weights is not None:
        kernel = kernel * weights.unsqueeze(-2)
    if call.causal:
        keep = causal_keep(kernel.shape[-2], kernel.shape[-1], kernel.device)
        kernel = kernel * keep
    # The variant clamps its normaliser at 1e-6 (kernel_core): do the same so A matches it.
    normaliser = kernel.sum(dim=-1, keepdim=True).clamp_min(1e-6)
    # Clamp before the log, not after: log's backward at 0 is 0/0 = NaN even under a zero
    # upstream gradient. A key the map gives no weight (a ReLU map) gets log(1e-30): a large but
    # finite cost where softmax attends to it.
    return torch.log(kernel.clamp_min(1e-30)) - torch.log(normaliser)


def softmax_log_weights(call: SiteCall) -> Tensor:
    """log P_ij of exact softmax attention on one call: (B, H, Nq, Nk)."""
    heads = call.query.shape[1]
    scores = call.query.float() @ repeat_kv(call.key.float(), heads).transpose(-1, -2) * call.scale
    if call.mask is not None:
        if call.mask.dtype == torch.bool:
            scores = scores.masked_fill(~call.mask, float("-inf"))
        else:
            scores = scores + call.mask.float()
    if call.causal:
        keep = causal_keep(scores.shape[-2], scores.shape[-1], scores.device)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.log_softmax(scores, dim=-1)


def attention_kl(module: FeatureMapAttention, call: SiteCall) -> Tensor:
    """The ``attn_kl`` loss of one site on one recorded call: mean_i KL(P_i ‖ A_i)."""
    total, rows = attention_kl_terms(module, call)
    return total / rows


def attention_kl_terms(module: FeatureMapAttention, call: SiteCall) -> tuple[Tensor, Tensor]:
    """The ``attn_kl`` loss as (Σ_i KL(P_i ‖ A_i) over valid query rows, the number of them)."""
    log_p = softmax_log_weights(call)
    log_a = implied_log_weights(module, call)
    # A row with every key masked has no weights (NaN in P) and carries no information. This
    # depends on the inputs and the mask only, so a diverging variant still shows up as NaN.
    valid = torch.isfinite(log_p).any(dim=-1)
    p = log_p.exp()
    # Keys softmax ignores (P = 0, log P = -inf) add nothing: 0·log 0 := 0.
    log_p = torch.where(p > 0, log_p, torch.zeros_like(log_p))
    rows = (p * (log_p - log_a)).sum(dim=-1)
    return rows[valid].sum(), valid.sum().to(rows.dtype)


#: Per-site losses by name, as (numerator, denominator) terms.
SITE_LOSS_TERMS = {"mse": site_output_terms, "attn_kl": attention_kl_terms}


# -- model outputs (the end-to-end and LoRA stages) ------------------------------------------------

#: End-to-end losses: ``"auto"`` is ``"kl"`` when the output has ``logits``, else ``"mse"``.
OUTPUT_LOSSES = ("auto", "mse", "kl")


def logits_of(output: Any) -> Tensor | None:
    """The ``logits`` of a model output (a ``ModelOutput``, a dict), or ``None``."""
    value = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    return value if isinstance(value, Tensor) and value.is_floating_point() else None


def output_terms(
    output: Any, reference: Any, kind: str, token_weights: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The end-to-end loss of one batch as (numerator, denominator).

    - ``"mse"``: Σ (y − t)² and Σ t² over every floating-point tensor of the output.
    - ``"kl"``: Σ over positions of KL(softmax(t) ‖ softmax(y)) on the ``logits`` (the original
      model's next-token distribution against the rewritten one's), and the number of positions;
      ``token_weights`` (an ``attention_mask`` shaped like the logits' leading axes) leaves out
      padding.
    """
    if kind == "kl":
        logits, target = logits_of(output), logits_of(reference)
        log_q = torch.log_softmax(logits.float(), dim=-1)
        log_p = torch.log_softmax(target.float(), dim=-1)
        per_position = (log_p.exp() * (log_p - log_q)).sum(dim=-1)
        if token_weights is not None and token_weights.shape == per_position.shape:
            weights = token_weights.to(per_position.dtype)
            return (per_position * weights).sum(), weights.sum()
        return per_position.sum(), torch.tensor(float(per_position.numel()))
    leaves = [
        (y, t)
        for y, t in zip(pytree.tree_leaves(output), pytree.tree_leaves(reference), strict=True)
        if isinstance(t, Tensor) and t.is_floating_point()
    ]
    if not leaves:
        raise CalibrationError(
            "end_to_end needs a model output with floating-point tensors to compare; this "
            "model returns none. Calibrate without end_to_end"
        )
    errors = [squared_error(y, t) for y, t in leaves]
    return sum(e for e, _ in errors), sum(n for _, n in errors)
