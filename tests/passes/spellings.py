"""A catalogue of hand-written attention spellings (and look-alikes that are not attention).

Each case builds a module and example inputs, and states what the finder must report. Inputs take
``(batch, length)`` so every case can also be run at a length other than the capture example's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

D_MODEL, HEADS = 32, 4
HEAD_DIM = D_MODEL // HEADS


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], tuple[Any, ...]]
    sites: int
    masks: tuple[str, ...] = ()  # expected mask class per site, in graph order
    kv_heads: int | None = None
    cross: bool | None = None
    escape: bool = False
    scale: float | None = None
    dynamic: bool = True  # whether a different length can be used after capture
    refused: str = ""  # a site found but left as it is: a phrase of the reason
    over: str = "tokens"  # AttentionSite.attends_over of the first site
    head_dim: int = 8  # the sites' head_dim and value_dim
    slow: bool = False  # a twin of a fast case, run with -m slow only (keeps the default run short)


def _x(batch: int, length: int) -> tuple[Any, ...]:
    return (torch.randn(batch, length, D_MODEL),)


def _x_pad(batch: int, length: int) -> tuple[Any, ...]:
    pad = torch.ones(batch, length, dtype=torch.bool)
    pad[-1, length // 2 :] = False  # True = real token
    return (torch.randn(batch, length, D_MODEL), pad)


def _x_cross(batch: int, length: int) -> tuple[Any, ...]:
    return (torch.randn(batch, length, D_MODEL), torch.randn(batch, length + 3, D_MODEL))


class Projections(nn.Module):
    """q, k, v projections into (B, H, N, d), shared by the hand-written cases."""

    def __init__(self, kv_heads: int = HEADS) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        self.q = nn.Linear(D_MODEL, D_MODEL)
        self.k = nn.Linear(D_MODEL, kv_heads * HEAD_DIM)
        self.v = nn.Linear(D_MODEL, kv_heads * HEAD_DIM)
        self.o = nn.Linear(D_MODEL, D_MODEL)

    def split(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, heads, HEAD_DIM).transpose(1, 2)

    def qkv(self, x: torch.Tensor, mem: torch.Tensor | None = None):
        mem = x if mem is None else mem
        return (
            self.split(self.q(x), HEADS),
            self.split(self.k(mem), self.kv_heads),
            self.split(self.v(mem), self.kv_heads),
        )

    def merge(self, out: torch.Tensor) -> torch.Tensor:
        b, h, n, d = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * d))


def manual(fn: Callable[..., torch.Tensor], kv_heads: int = HEADS, buffers: dict | None = None):
    """A module whose attention core is ``fn(self, q, k, v, *extra)``."""

    class M(Projections):
        def __init__(self) -> None:
            super().__init__(kv_heads)
            for name, t in (buffers or {}).items():
                self.register_buffer(name, t)

        def forward(self, x, *extra):
            mem = extra[0] if extra and extra[0].is_floating_point() else None
            rest = extra[1:] if mem is not None else extra
            q, k, v = self.qkv(x, mem)
            return self.merge(fn(self, q, k, v, *rest))

    M.__name__ = fn.__name__
    return M


S = 1.0 / math.sqrt(HEAD_DIM)


def plain(self, q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * S, dim=-1) @ v


def div_sqrt(self, q, k, v):
    return F.softmax(torch.matmul(q, k.transpose(2, 3)) / math.sqrt(HEAD_DIM), dim=-1).matmul(v)


def in_no_grad_block(self, q, k, v):
    """A ``with torch.no_grad():`` block in the forward (torch.export keeps it as a higher-order
    op around a subgraph; recurrent-depth models run their early cycles so)."""
    with torch.no_grad():
        first = torch.softmax(q @ k.transpose(-2, -1) * S, dim=-1) @ v
    return torch.softmax(first @ k.transpose(-2, -1) * S, dim=-1) @ v


def scale_on_q(self, q, k, v):
    return (q * S @ k.transpose(-1, -2)).softmax(-1) @ v


def scale_on_k(self, q, k, v):
    return (q @ (k / math.sqrt(HEAD_DIM)).transpose(-1, -2)).softmax(-1) @ v


def scale_both_sqrt(self, q, k, v):
    r = S**0.5
    return ((q * r) @ (k * r).transpose(-1, -2)).softmax(-1) @ v


def bmm_folded(self, q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    w = torch.bmm(q3, k3.transpose(1, 2)) * S
    return torch.bmm(w.softmax(-1), v3).view(b, h, n, d)


def einsum_bhqd(self, q, k, v):
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) * S
    return torch.einsum("bhqk,bhkd->bhqd", w.softmax(-1), v)


def einsum_bnhd(self, q, k, v):
    # (B, N, H, d) layout with other letters, output straight back in (B, N, H, d).
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    w = torch.einsum("xiyz,xjyz->xyij", q, k) * S
    o = torch.einsum("xyij,xjyz->xiyz", w.softmax(dim=3), v)
    return o.transpose(1, 2)


def baddbmm_bias(self, q, k, v):
    b, h, n, d = q.shape
    q3, k3, v3 = (t.reshape(b * h, -1, d) for t in (q, k, v))
    zeros = torch.zeros(b * h, n, k3.shape[1])
    w = torch.baddbmm(zeros, q3, k3.transpose(1, 2), beta=0.0, alpha=S)
    return torch.bmm(w.softmax(-1), v3).view(b, h, n, d)


def additive_key_mask(self, q, k, v, pad):
    bias = (1.0 - pad[:, None, None, :].float()) * -10000.0
    return torch.softmax(q @ k.transpose(-2, -1) * S + bias, dim=-1) @ v


def finfo_min_key_mask(self, q, k, v, pad):
    bias = torch.zeros(pad.shape, dtype=q.dtype).masked_fill(~pad, torch.finfo(q.dtype).min)
    return torch.softmax(q @ k.transpose(-2, -1) * S + bias[:, None, None, :], dim=-1) @ v


def masked_fill_key(self, q, k, v, pad):
    w = (q @ k.transpose(-2, -1) * S).masked_fill(~pad[:, None, None, :], float("-inf"))
    return w.softmax(-1) @ v


def where_key(self, q, k, v, pad):
    w = q @ k.transpose(-2, -1) * S
    w = torch.where(pad[:, None, None, :], w, torch.tensor(float("-inf")))
    return w.softmax(-1) @ v


def causal_tril_buffer(self, q, k, v):
    n = q.shape[-2]
    w = (q @ k.transpose(-2, -1) * S).masked_fill(self.tril[:n, :n] == 0, float("-inf"))
    return w.softmax(-1) @ v


def causal_triu(self, q, k, v):
    n = q.shape[-2]
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
    return (q @ k.transpose(-2, -1) * S).masked_fill(upper, float("-inf")).softmax(-1) @ v


def causal_positions(self, q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    bias = torch.zeros(n, n).masked_fill(j > i, float("-inf"))
    return (q @ k.transpose(-2, -1) * S + bias).softmax(-1) @ v


def causal_and_key(self, q, k, v, pad):
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool).tril() & pad[:, None, None, :]
    return (q @ k.transpose(-2, -1) * S).masked_fill(~keep, -1e9).softmax(-1) @ v


def sdpa_plain(self, q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_causal(self, q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_key_mask(self, q, k, v, pad):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=pad[:, None, None, :], scale=0.2)


def upcast(self, q, k, v):
    w = (q @ k.transpose(-2, -1) * S).to(torch.float64).softmax(-1).to(q.dtype)
    return w @ v


def softmax_dtype_arg(self, q, k, v):
    return F.softmax(q @ k.transpose(-2, -1) * S, dim=-1, dtype=torch.float64).to(v.dtype) @ v


def dropout_eval(self, q, k, v):
    return F.dropout((q @ k.transpose(-2, -1) * S).softmax(-1), p=0.1, training=False) @ v


def stable_max(self, q, k, v):
    w = q @ k.transpose(-2, -1) * S
    w = w - w.amax(dim=-1, keepdim=True).detach()
    return w.softmax(-1) @ v


def gqa_repeat_interleave(self, q, k, v):
    k = k.repeat_interleave(HEADS // k.shape[1], dim=1)
    v = v.repeat_interleave(HEADS // v.shape[1], dim=1)
    return (q @ k.transpose(-2, -1) * S).softmax(-1) @ v


def gqa_expand_reshape(self, q, k, v):
    b, hk, n, d = k.shape
    rep = HEADS // hk
    k = k[:, :, None].expand(b, hk, rep, n, d).reshape(b, hk * rep, n, d)
    v = v[:, :, None].expand(b, hk, rep, n, d).reshape(b, hk * rep, n, d)
    return (q @ k.transpose(-2, -1) * S).softmax(-1) @ v


def mqa_broadcast(self, q, k, v):
    return (q @ k.transpose(-2, -1) * S).softmax(-1) @ v  # k, v have one head: matmul broadcasts


def cross_plain(self, q, k, v):
    return (q @ k.transpose(-2, -1) * S).softmax(-1) @ v


def relative_bias(self, q, k, v):
    n = q.shape[-2]
    return (q @ k.transpose(-2, -1) * S + self.rel[:, :n, :n]).softmax(-1) @ v


def alibi(self, q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n)
    dist = (pos[None, :] - pos[:, None]).float()
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(HEADS)])[:, None, None]
    return (q @ k.transpose(-2, -1) * S + slopes * dist).softmax(-1) @ v


def sliding_window(self, q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n)
    far = (pos[None, :] - pos[:, None]).abs() > 2
    return (q @ k.transpose(-2, -1) * S).masked_fill(far, float("-inf")).softmax(-1) @ v


def returns_weights(self, q, k, v):
    w = (q @ k.transpose(-2, -1) * S).softmax(-1)
    self.last = None
    return (w @ v) + 0 * w.sum(-1, keepdim=True)  # the weights are used outside the value product


# -- look-alikes that are not attention ------------------------------------------------------------


def softmax_query_axis(self, q, k, v):
    return (q @ k.transpose(-2, -1) * S).softmax(dim=-2) @ v


def probs_transposed(self, q, k, v):
    w = (q @ k.transpose(-2, -1) * S).softmax(-1)
    return w.transpose(-1, -2) @ v  # contracts the query axis


def no_value_product(self, q, k, v):
    w = (q @ k.transpose(-2, -1) * S).softmax(-1)
    return w[..., :HEAD_DIM] * v


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(D_MODEL, D_MODEL)
        self.head = nn.Linear(D_MODEL, 5)

    def forward(self, x):
        logits = self.head(torch.relu(self.body(x)))
        return (
            torch.softmax(logits, dim=-1) @ torch.randn(5, 3).abs().clamp_min(1) * 0
            + logits.softmax(-1).sum()
        )


class MoERouter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = nn.Linear(D_MODEL, 4)
        self.experts = nn.Parameter(torch.randn(4, D_MODEL, D_MODEL) * 0.1)

    def forward(self, x):
        gates = self.router(x).softmax(-1)  # (B, N, E)
        expert_out = torch.einsum("bnd,edf->bnef", x, self.experts)
        return torch.einsum("bne,bnef->bnf", gates, expert_out)


class SoftmaxPooling(nn.Module):
    """One score per token (a learned scoring vector: the one query), softmax over the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.score = nn.Parameter(torch.randn(D_MODEL, 1) * 0.3)

    def forward(self, x):
        w = (x @ self.score).softmax(dim=1)  # (B, N, 1) over the sequence
        return w.transpose(1, 2) @ x  # (B, 1, D)


class SimilaritySoftmax(nn.Module):
    """softmax(x xᵀ) used as a similarity matrix, multiplied with a fixed codebook (not v-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x):
        sim = self.proj(x) @ self.proj(x).transpose(1, 2)
        return sim.softmax(dim=1).sum(-1)


# -- torch.nn modules -----------------------------------------------------------------------------


class MHASelf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, x, pad):
        out, _ = self.mha(x, x, x, key_padding_mask=~pad)
        return out


class MHACross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)
        self.register_buffer("bias", torch.randn(64, 64))  # a float (Nq, Nk) bias: general

    def forward(self, x, mem):
        n, m = x.shape[1], mem.shape[1]
        out, _ = self.mha(x, mem, mem, attn_mask=self.bias[:n, :m])
        return out


class MHAZeroMask(nn.Module):
    """An all-zero float attn_mask built in forward is provably no mask at all."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, x, mem):
        out, _ = self.mha(x, mem, mem, attn_mask=torch.zeros(x.shape[1], mem.shape[1]))
        return out


class MHASeqFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS)

    def forward(self, x):
        xs = x.transpose(0, 1)
        out, _ = self.mha(xs, xs, xs, need_weights=False)
        return out.transpose(0, 1)


class EncoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, 64, dropout=0.0, batch_first=True)

    def forward(self, x, pad):
        return self.layer(x, src_key_padding_mask=~pad)


class DecoderLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(D_MODEL, HEADS, 64, dropout=0.0, batch_first=True)

    def forward(self, x, mem):
        return self.layer(
            x,
            mem,
            tgt_is_causal=True,
            tgt_mask=nn.Transformer.generate_square_subsequent_mask(x.shape[1]),
        )


def _tril(n: int = 64) -> torch.Tensor:
    return torch.tril(torch.ones(n, n))


CASES: list[Case] = [
    Case("plain", manual(plain), _x, 1, ("none",), scale=S),
    Case("div_sqrt", manual(div_sqrt), _x, 1, ("none",), scale=S),
    Case("scale_on_q", manual(scale_on_q), _x, 1, ("none",), scale=S),
    Case("scale_on_k", manual(scale_on_k), _x, 1, ("none",), scale=S),
    Case("scale_both_sqrt", manual(scale_both_sqrt), _x, 1, ("none",), scale=S),
    Case("bmm_folded", manual(bmm_folded), _x, 1, ("none",), scale=S),
    Case("einsum_bhqd", manual(einsum_bhqd), _x, 1, ("none",), scale=S),
    Case("einsum_bnhd", manual(einsum_bnhd), _x, 1, ("none",), scale=S),
    Case("baddbmm", manual(baddbmm_bias), _x, 1, ("none",), scale=S),
    Case("additive_key_mask", manual(additive_key_mask), _x_pad, 1, ("key",)),
    Case("finfo_min_key_mask", manual(finfo_min_key_mask), _x_pad, 1, ("key",)),
    Case("masked_fill_key", manual(masked_fill_key), _x_pad, 1, ("key",)),
    Case("where_key", manual(where_key), _x_pad, 1, ("key",)),
    Case(
        "causal_tril_buffer",
        manual(causal_tril_buffer, buffers={"tril": _tril()}),
        _x,
        1,
        ("causal",),
    ),
    Case("causal_triu", manual(causal_triu), _x, 1, ("causal",)),
    Case("causal_positions", manual(causal_positions), _x, 1, ("causal",)),
    Case("causal_and_key", manual(causal_and_key), _x_pad, 1, ("causal+key",)),
    Case("sdpa_plain", manual(sdpa_plain), _x, 1, ("none",), scale=S),
    Case("sdpa_causal", manual(sdpa_causal), _x, 1, ("causal",)),
    Case("sdpa_key_mask", manual(sdpa_key_mask), _x_pad, 1, ("key",), scale=0.2),
    Case("upcast_float64", manual(upcast), _x, 1, ("none",)),
    Case("softmax_dtype_arg", manual(softmax_dtype_arg), _x, 1, ("none",)),
    Case("dropout_eval", manual(dropout_eval), _x, 1, ("none",)),
    Case("stable_max_subtraction", manual(stable_max), _x, 1, ("none",)),
    Case(
        "gqa_repeat_interleave",
        manual(gqa_repeat_interleave, kv_heads=2),
        _x,
        1,
        ("none",),
        kv_heads=2,
    ),
    Case(
        "gqa_expand_reshape", manual(gqa_expand_reshape, kv_heads=2), _x, 1, ("none",), kv_heads=2
    ),
    Case("mqa_broadcast", manual(mqa_broadcast, kv_heads=1), _x, 1, ("none",), kv_heads=1),
    Case("cross_attention", manual(cross_plain), _x_cross, 1, ("none",), cross=True),
    Case(
        "relative_bias",
        manual(relative_bias, buffers={"rel": torch.randn(HEADS, 64, 64)}),
        _x,
        1,
        ("general",),
    ),
    Case("alibi", manual(alibi), _x, 1, ("general",)),
    Case("sliding_window", manual(sliding_window), _x, 1, ("general",)),
    Case("weights_escape", manual(returns_weights), _x, 1, ("none",), escape=True),
    Case("mha_self_key_padding", MHASelf, _x_pad, 1, ("key",)),
    Case("mha_cross_attn_mask", MHACross, _x_cross, 1, ("general",), cross=True),
    Case("mha_cross_zero_mask", MHAZeroMask, _x_cross, 1, ("none",), cross=True),
    Case("mha_seq_first", MHASeqFirst, _x, 1, ("none",)),
    Case("transformer_encoder_layer", EncoderLayer, _x_pad, 1, ("key",)),
    Case("transformer_decoder_layer", DecoderLayer, _x_cross, 2, ("causal", "none")),
    Case("in_no_grad_block", manual(in_no_grad_block), _x, 2, ("none", "none")),
    # Softmax pooling (one score per token, softmax over the sequence, pᵀ·x): attention with one
    # query, the same computation as a learned pooling query.
    Case("softmax_pooling", SoftmaxPooling, _x, 1, ("none",), cross=True, head_dim=D_MODEL),
    # Not attention.
    Case("neg_softmax_query_axis", manual(softmax_query_axis), _x, 0),
    Case("neg_probs_transposed", manual(probs_transposed), _x, 0),
    Case("neg_no_value_product", manual(no_value_product), _x, 0),
    Case("neg_classifier", Classifier, _x, 0),
    Case("neg_moe_router", MoERouter, _x, 0),
    Case("neg_similarity_softmax", SimilaritySoftmax, _x, 0),
]


class LearnedTemperature(Projections):
    """Cosine attention with a learned per-head logit scale (Swin v2 style)."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(HEADS, 1, 1)))

    def forward(self, x):
        q, k, v = self.qkv(x)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        scale = torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        return self.merge(((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v)


class NanoGPT(Projections):
    """nanoGPT's spelling: a (1, 1, T, T) tril buffer compared with 0, then masked_fill."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bias", torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64))

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return self.merge(F.softmax(att, dim=-1) @ v)


class FullInfTriu(Projections):
    """An additive causal mask built as triu(full(-inf), 1)."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf")), diagonal=1)
        return self.merge(torch.softmax(q @ k.transpose(-2, -1) * S + mask, dim=-1) @ v)


CASES += [
    Case("learned_temperature", LearnedTemperature, _x, 1, ("none",)),
    Case("nanogpt_buffer", NanoGPT, _x, 1, ("causal",), scale=S),
    Case("triu_full_inf", FullInfTriu, _x, 1, ("causal",), scale=S),
]


# -- issue 12: spellings found in the wild (each is our own code, after the library named) ------


def bias_before_scale(self, q, k, v):
    # BROS / XLNet: the bias is added before the scale, softmax((q·kᵀ + b)·s).
    n = q.shape[-2]
    return (((q @ k.transpose(-2, -1)) + self.rel[:, :n, :n]) * S).softmax(-1) @ v


def value_factor(self, q, k, v):
    # MiMo-V2-Flash: a constant factor applied to the values inside the attention.
    return (q @ k.transpose(-2, -1) * S).softmax(-1) @ (v * 0.707)


def channels_first_values(self, q, k, v):
    # EfficientViT-M / SHViT / CoAtNet Attention2d: values kept (B, H, d, N), v @ pᵀ.
    p = (q @ k.transpose(-2, -1) * S).softmax(-1)
    return (v.transpose(-2, -1) @ p.transpose(-2, -1)).transpose(-2, -1)


def attention_sinks(self, q, k, v):
    # gpt-oss: a learned per-head sink logit appended as an extra column, dropped after softmax.
    b, h, n, _ = q.shape
    scores = q @ k.transpose(-2, -1) * S
    sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, n, -1)
    logits = torch.cat([scores, sinks], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    return F.softmax(logits, dim=-1)[..., :-1] @ v


def projected_sinks(self, q, k, v):
    # Inkling: the sink logit is computed per query by a projection (itself a product), cast
    # after the concatenation; still one sink column, dropped after softmax.
    scores = q @ k.transpose(-2, -1) * S
    sinks = q @ self.sink_proj
    logits = torch.cat([scores, sinks], dim=-1).float()
    return F.softmax(logits, dim=-1)[..., :-1] @ v


def multiplicative_causal(self, q, k, v):
    # openai-gpt: w·b + (-1e4)·(1 − b) with a 0/1 tril buffer.
    n = q.shape[-2]
    b = self.tril[:, :, :n, :n]
    w = q @ k.transpose(-2, -1) * S
    return (w * b + -1e4 * (1 - b)).softmax(-1) @ v


def max_floor_key_mask(self, q, k, v, pad):
    # XGLM / OPT: torch.max(scores + mask, finfo.min) keeps sums of two masks finite.
    mask = (~pad)[:, None, None, :].float() * torch.finfo(torch.float32).min
    w = q @ k.transpose(-2, -1) * S + mask
    w = torch.max(w, torch.tensor(torch.finfo(w.dtype).min))
    return w.softmax(-1) @ v


def post_softmax_mask(self, q, k, v, pad):
    # CPM-Ant: the probabilities are zeroed again with the same mask, recomputed.
    n = q.shape[-2]
    keep = pad[:, None, None, :].expand(-1, 1, n, -1)
    w = torch.masked_fill(q @ k.transpose(-2, -1) * S, keep == torch.tensor(False), float("-inf"))
    p = torch.masked_fill(w.softmax(-1), keep == torch.tensor(False), 0.0)
    return p @ v


def post_softmax_other_mask(self, q, k, v, pad):
    # Zeroing the probabilities with another mask than the scores' renormalises nothing: refused.
    n = q.shape[-2]
    drop = torch.rand(n) > 2.0  # all False, but not provably the scores' own mask
    p = (q @ k.transpose(-2, -1) * S).softmax(-1).masked_fill(drop, 0.0)
    return p @ v


def sdpa_then_view(self, q, k, v):
    # JetMoE: sdpa's output is (B, H, N, d) laid out as (B, N, H, d); transpose(1, 2).view relies
    # on that layout, so the rewritten output must keep it.
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).view(b, n, h * d).view(b, n, h, d).transpose(1, 2)


def preallocated_query(self, q, k, v):
    # DeepSeek-V3 / MiniCPM3 (multi-head latent attention): q and k are assembled in place in
    # preallocated tensors from a "nope" part and a rotary part, then used as usual.
    half = HEAD_DIM // 2
    query = q.new_empty(q.shape)
    query[..., :half] = q[..., :half]
    query[..., half:] = q[..., half:] * 2.0
    key = k.new_empty(k.shape)
    key[..., :half] = k[..., :half]
    key[..., half:] = k[..., half:]
    return (query @ key.transpose(-2, -1) * S).softmax(-1) @ v


def bias_written_into_scores(self, q, k, v):
    # timm MViTv2: a relative-position bias added in place into a view of the scores. The
    # finder reads dataflow only, so the site is refused rather than losing the bias.
    scores = q @ k.transpose(-2, -1) * S
    scores[:, :, 1:, 1:] += self.rel[: scores.shape[1], 0:1, 0:1]
    return scores.softmax(-1) @ v


class AveragedWeights(nn.Module):
    """nn.MultiheadAttention returning its head-averaged weights: found, weights escape."""

    def __init__(self) -> None:
        super().__init__()
        self.mha = nn.MultiheadAttention(D_MODEL, HEADS, batch_first=True)

    def forward(self, x):
        out, weights = self.mha(x, x, x, need_weights=True)
        return out + weights.sum(-1, keepdim=True)


class ChannelAttention(nn.Module):
    """XCiT's cross-covariance attention: q, k, v are (B, H, d, N), softmax over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.temperature = nn.Parameter(torch.ones(HEADS, 1, 1))
        self.proj = nn.Linear(D_MODEL, D_MODEL)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 4, 1)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)  # (B, H, d, d)
        out = (attn @ v).permute(0, 3, 1, 2).reshape(b, n, D_MODEL)
        return self.proj(out)


CASES += [
    Case(
        "bias_before_scale",
        manual(bias_before_scale, buffers={"rel": torch.randn(HEADS, 64, 64)}),
        _x,
        1,
        ("general",),
        scale=S,
    ),
    Case("value_factor", manual(value_factor), _x, 1, ("none",), scale=S),
    Case("channels_first_values", manual(channels_first_values), _x, 1, ("none",), scale=S),
    Case(
        "attention_sinks",
        manual(attention_sinks, buffers={"sinks": torch.randn(HEADS)}),
        _x,
        1,
        ("none",),
        refused="attention sinks",
    ),
    Case(
        "projected_sinks",
        manual(projected_sinks, buffers={"sink_proj": torch.randn(HEAD_DIM, 1)}),
        _x,
        1,
        ("none",),
        refused="attention sinks",
    ),
    Case(
        "multiplicative_causal",
        manual(multiplicative_causal, buffers={"tril": _tril().view(1, 1, 64, 64)}),
        _x,
        1,
        ("causal",),
        scale=S,
    ),
    Case("max_floor_key_mask", manual(max_floor_key_mask), _x_pad, 1, ("key",), scale=S),
    Case("post_softmax_mask", manual(post_softmax_mask), _x_pad, 1, ("key",), scale=S),
    Case(
        "post_softmax_other_mask",
        manual(post_softmax_other_mask),
        _x_pad,
        1,
        ("none",),
        refused="masked after softmax",
    ),
    Case("mha_averaged_weights", AveragedWeights, _x, 1, ("none",), escape=True),
    Case("sdpa_then_view", manual(sdpa_then_view), _x, 1, ("none",), scale=S),
    Case("preallocated_query", manual(preallocated_query), _x, 1, ("none",)),
    Case(
        "bias_written_into_scores",
        manual(bias_written_into_scores, buffers={"rel": torch.randn(HEADS, 4, 4)}),
        _x,
        1,
        ("none",),
        scale=S,
        refused="writes in place",
    ),
    Case("channel_attention", ChannelAttention, _x, 1, ("none",), over="channels"),
]


# -- Shifted-window attention (Swin v1/v2; issue 12 item 2) ---------------------------------------
# Windows are folded into the batch: scores are (B·nW, H, N, N), and the shift mask (nW, N, N), 0 or
# -100 by whether two tokens come from the same image region, is added in a (B, nW, H) layout.
# It depends on (window, i, j): general for kernel variants, exact for softmax at any batch size.
SWIN_IMAGE, SWIN_WINDOW, SWIN_SHIFT = 8, 4, 2
SWIN_TOKENS = SWIN_WINDOW * SWIN_WINDOW
SWIN_REGIONS = ((0, -SWIN_WINDOW), (-SWIN_WINDOW, -SWIN_SHIFT), (-SWIN_SHIFT, None))


def _image(batch: int, length: int) -> tuple[Any, ...]:
    """A (B, C, H, W) feature map as after a patch embedding (the image size is fixed)."""
    return (torch.randn(batch, D_MODEL, SWIN_IMAGE, SWIN_IMAGE),)


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, window², C), as timm and torchvision partition windows."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    c = windows.shape[-1]
    x = windows.view(-1, h // window, w // window, window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def region_ids_to_shift_mask(windows: torch.Tensor) -> torch.Tensor:
    """(nW, N) region ids -> (nW, N, N): 0 within a region, -100 across (timm and torchvision)."""
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def timm_shift_mask() -> torch.Tensor:
    """timm's ``attn_mask`` buffer: a slice-assigned ``img_mask`` partitioned into windows."""
    img_mask = torch.zeros(1, SWIN_IMAGE, SWIN_IMAGE, 1)
    region = 0
    for h0, h1 in SWIN_REGIONS:
        for w0, w1 in SWIN_REGIONS:
            img_mask[:, h0:h1, w0:w1, :] = region
            region += 1
    return region_ids_to_shift_mask(window_partition(img_mask, SWIN_WINDOW).view(-1, SWIN_TOKENS))


class ShiftedWindowAttention(nn.Module):
    """A shifted Swin block's attention: roll, partition, windowed attention with a relative
    position bias and the shift mask, merge, roll back.

    ``mask_in_forward``: torchvision builds the mask inside ``forward`` with in-place slice writes
    (``shifted_window_attention``); timm stores it as the buffer ``attn_mask``. ``cosine``: Swin
    v2's cosine attention with a learned, clamped logit scale instead of q·kᵀ/√d.
    """

    def __init__(self, mask_in_forward: bool = False, cosine: bool = False) -> None:
        super().__init__()
        self.mask_in_forward, self.cosine = mask_in_forward, cosine
        self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
        self.proj = nn.Linear(D_MODEL, D_MODEL)
        self.relative_position_bias = nn.Parameter(
            0.5 * torch.randn(HEADS, SWIN_TOKENS, SWIN_TOKENS)
        )
        if cosine:
            self.logit_scale = nn.Parameter(torch.log(10 * torch.ones(HEADS, 1, 1)))
        if not mask_in_forward:
            self.register_buffer("attn_mask", timm_shift_mask(), persistent=False)

    def shift_mask(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision's spelling: written region by region into ``x.new_zeros`` every call."""
        regions = x.new_zeros((SWIN_IMAGE, SWIN_IMAGE))
        count = 0
        for h0, h1 in SWIN_REGIONS:
            for w0, w1 in SWIN_REGIONS:
                regions[h0:h1, w0:w1] = count
                count += 1
        side = SWIN_IMAGE // SWIN_WINDOW
        regions = regions.view(side, SWIN_WINDOW, side, SWIN_WINDOW).permute(0, 2, 1, 3)
        return region_ids_to_shift_mask(regions.reshape(-1, SWIN_TOKENS))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 2, 3, 1)
        shifted = torch.roll(x, shifts=(-SWIN_SHIFT, -SWIN_SHIFT), dims=(1, 2))
        windows = window_partition(shifted, SWIN_WINDOW)
        bw, n, c = windows.shape
        qkv = self.qkv(windows).reshape(bw, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if self.cosine:
            attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
            attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        else:
            attn = (q * HEAD_DIM**-0.5) @ k.transpose(-2, -1)
        attn = attn + self.relative_position_bias.unsqueeze(0)
        mask = self.shift_mask(x) if self.mask_in_forward else self.attn_mask
        num_windows = mask.shape[0]
        attn = attn.view(-1, num_windows, HEADS, n, n) + mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, HEADS, n, n).softmax(dim=-1)
        out = self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))
        out = window_reverse(out, SWIN_WINDOW, SWIN_IMAGE, SWIN_IMAGE)
        return torch.roll(out, shifts=(SWIN_SHIFT, SWIN_SHIFT), dims=(1, 2)).permute(0, 3, 1, 2)


CASES += [
    Case(
        "swin_shift_mask_buffer",
        ShiftedWindowAttention,
        _image,
        1,
        ("general",),
        scale=HEAD_DIM**-0.5,
        slow=True,
    ),
    Case(
        "swin_shift_mask_in_forward",
        lambda: ShiftedWindowAttention(mask_in_forward=True),
        _image,
        1,
        ("general",),
    ),
    Case(
        "swinv2_cosine_shift_mask",
        lambda: ShiftedWindowAttention(cosine=True),
        _image,
        1,
        ("general",),
        slow=True,
    ),
    Case(
        "swinv2_cosine_mask_in_forward",
        lambda: ShiftedWindowAttention(mask_in_forward=True, cosine=True),
        _image,
        1,
        ("general",),
    ),
]
# -- end of the shifted-window block --------------------------------------------------------------


# -- Key-major scores (issue 13 item 4: a finder spelling added as one rule entry) ----------------
# Scores laid out (…, key, query), k·qᵀ, and normalised over the keys with softmax(dim=-2): the
# second ``SCORE_LAYOUTS`` entry of find_attention.py. The value product contracts axis −2.


def key_major(self, q, k, v):
    p = (k @ q.transpose(-2, -1) * S).softmax(dim=-2)  # (B, H, Nk, Nq), over the keys
    return p.transpose(-2, -1) @ v


def key_major_einsum(self, q, k, v):
    p = torch.einsum("bhkd,bhqd->bhkq", k, q).mul(S).softmax(dim=-2)
    return torch.einsum("bhkq,bhkd->bhqd", p, v)


def key_major_causal(self, q, k, v):
    # Key j after query i is masked: in (key, query) order that is tril(-1), not triu(1). Found
    # with its class, but masks are canonicalised in (query, key) order only: left as it is.
    n = q.shape[-2]
    later = torch.tril(torch.ones(n, n, dtype=torch.bool), diagonal=-1)
    p = (k @ q.transpose(-2, -1) * S).masked_fill(later, float("-inf")).softmax(dim=-2)
    return p.transpose(-2, -1) @ v


CASES += [
    Case("key_major_scores", manual(key_major), _x, 1, ("none",), scale=S),
    Case("key_major_einsum", manual(key_major_einsum), _x, 1, ("none",), scale=S),
    Case(
        "key_major_causal",
        manual(key_major_causal),
        _x,
        1,
        ("causal",),
        scale=S,
        refused="key-major scores",
    ),
]
