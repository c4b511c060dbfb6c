"""Hypothesis strategies that generate attention modules, and look-alikes that are not attention.

A :class:`Spelling` is a frozen record of independent choices — how the score product is written,
how k is transposed, where and how the scale is applied, how the mask is built and applied, the
softmax dtype, dropout, grouped heads, cross-attention — and :class:`GeneratedAttention` is the
``nn.Module`` it spells. The record states what the finder must report (mask class, heads, scale,
cross) and the module exposes its own projections (:meth:`GeneratedAttention.project`) so a test can
compute a reference of any attention definition from the very q, k, v the model computes.

:class:`LookAlike` does the same for modules with a softmax that is not attention (softmax over the
query or head axis, probabilities that feed a sum or a top-k, routers, classifiers, pooling), and
for a few that *are* attention of an unusual shape (roles of q and k swapped, attention over
channels, a learned pooling query), where the site must be correct instead of absent.

The example counts scale with ``HYPOTHESIS_PROFILE=release`` (see ``tests/fuzz/README.md``).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import string
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from torch import Tensor, nn

D_MODEL = 8
MAX_LEN = 32  # size of the registered causal buffers; every generated length stays below it

# -- settings --------------------------------------------------------------------------------------

#: ``HYPOTHESIS_PROFILE=release`` runs thousands of examples (tests/fuzz/README.md); the default
#: keeps the fuzz files under 90 s on 2 cores, derandomised so CI sees the same examples every run.
RELEASE = os.environ.get("HYPOTHESIS_PROFILE", "") == "release"
_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile(
    "fuzz-ci",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=_HEALTH,
    print_blob=True,
    # Shrinking re-exports a model per step (~1 s each): CI reports the
    # example as generated; the release run shrinks.
    phases=(Phase.explicit, Phase.generate),
)
settings.register_profile("release", deadline=None, suppress_health_check=_HEALTH, print_blob=True)


def fuzz_settings(ci_examples: int, release_examples: int) -> settings:
    """Settings of one fuzz test: ``ci_examples`` by default, ``release_examples`` in release."""
    profile = settings.get_profile("release" if RELEASE else "fuzz-ci")
    return settings(profile, max_examples=release_examples if RELEASE else ci_examples)


# -- tally -----------------------------------------------------------------------------------------


class Tally:
    """Counts of generated modules per outcome, printed when a fuzz module finishes.

    Hypothesis' own statistics (``--hypothesis-show-statistics``) count examples per test; this
    counts spellings across tests and outcomes so a run can be quoted ("N tried, N found").
    """

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        self.counts[key] += n

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


TALLY = Tally()


@pytest.fixture(scope="module", autouse=True)
def fuzz_tally(request: pytest.FixtureRequest) -> Iterator[Tally]:
    """Print the tally when the module ends (and keep it in pytest's cache, when enabled, under
    ``attnrewrite/fuzz/<module>``)."""
    yield TALLY
    name = request.module.__name__.rsplit(".", 1)[-1]
    counts = {k: v for k, v in TALLY.counts.items() if k.startswith(name.removeprefix("test_"))}
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is not None:
        cache.set(f"attnrewrite/fuzz/{name}", counts)
    capture = request.config.pluginmanager.getplugin("capturemanager")
    line = f"\n[fuzz tally] {name}: " + json.dumps(dict(sorted(counts.items())))
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print(line)
    else:  # pragma: no cover - pytest always has a capture manager unless -p no:capture
        print(line)


# -- the positive spelling ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spelling:
    """One way of writing attention. Field values are names of spellings; see ``spellings()``.

    The repr lists only the fields that differ from the defaults, so a failing example reads as
    the handful of choices that make it.
    """

    kind: str = "manual"  # manual | sdpa
    product: str = "at"  # at | matmul | bmm | baddbmm | einsum | sdpa
    value_product: str = "at"  # at | matmul (for at/matmul scores)
    letters: str = "bhqkde"  # einsum letters for batch, head, query, key, feature, value feature
    layout: str = "bhnd"  # bhnd | bnhd (the layout q, k, v are in when multiplied; einsum only)
    einsum_out: str = "heads_first"  # heads_first (b h q e) | seq_first (b q h e)
    k_form: str = "t_neg"  # t_neg | t_neg2 | t_pos | mT | permute | none (einsum: k as is)
    scale: float = 0.5
    scale_at: str = "scores"  # scores | q | k | k_t | split | alpha | sdpa_default | sdpa_arg
    scale_op: str = "mul"  # mul | div (by the reciprocal)
    scale_const: str = "python"  # python | tensor | buffer | sqrt_tensor
    key_mask: str = "none"  # none | additive_pad | additive_bias | fill | where
    causal: str = "none"  # none | tril_buffer | triu | arange | is_causal
    causal_form: str = "fill"  # tril_buffer: eq0|fill|where; triu: fill|additive;
    #                            arange: gt|lt|where|additive
    buffer_dtype: str = "float"  # float | bool (tril buffer)
    buffer_4d: bool = False  # GPT-2's (1, 1, L, L) buffer
    combine: bool = False  # causal and key combined into one keep mask before it is applied
    fill: str = "-inf"  # -inf | finfo_min | -1e4 | -1e9
    negate: str = "invert"  # invert | eq0 | logical_not (how ~pad is written)
    where_fill: str = "scalar"  # scalar | tensor (the value of torch.where)
    mask_fold: str = "unfold"  # unfold | fold: masks on (B*H, N, N) scores (bmm/baddbmm)
    baddbmm_input: str = "zeros_beta0"  # zeros_beta0 | zeros_beta1 | key_bias
    upcast: str = "none"  # none | to_float64 | double | softmax_dtype
    softmax_fn: str = "torch"  # torch | functional | method | module
    softmax_dim: str = "neg"  # neg (-1) | pos (rank - 1)
    max_subtract: str = "none"  # none | amax | amax_detach | max_values
    dropout: str = "none"  # none | functional | module
    dropout_p: float = 0.1
    heads: int = 2
    kv_heads: int = 2
    gqa: str = "none"  # none | repeat_interleave | expand_reshape | broadcast | enable_gqa
    head_dim: int = 4
    value_dim: int = 4
    cross: bool = False
    kv_delta: int = 0  # key length - query length (cross-attention only)
    q_len: int = 5

    def __repr__(self) -> str:
        changed = [
            f"{f.name}={getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default or f.name in ("kind", "product")
        ]
        return f"Spelling({', '.join(changed)})"

    # -- what the finder must report ---------------------------------------------------------
    @property
    def expected_mask(self) -> str:
        key, causal = self.key_mask != "none", self.causal != "none"
        return {
            (False, False): "none",
            (True, False): "key",
            (False, True): "causal",
            (True, True): "causal+key",
        }[(key, causal)]

    @property
    def expected_scale(self) -> float:
        return self.head_dim**-0.5 if self.scale_at == "sdpa_default" else self.scale

    @property
    def folded(self) -> bool:
        """Whether heads are folded into the batch ((B·H, N, d) operands)."""
        return self.product in ("bmm", "baddbmm")

    @property
    def is_causal(self) -> bool:
        return self.causal != "none"

    def key_len(self, q_len: int) -> int:
        return q_len + self.kv_delta if self.cross else q_len

    # -- building ------------------------------------------------------------------------------
    def build(self, seed: int = 0) -> GeneratedAttention:
        torch.manual_seed(seed)
        return GeneratedAttention(self).eval()

    def inputs(self, batch: int, q_len: int, seed: int = 0) -> tuple[Tensor, ...]:
        """(x,) + (memory,) for cross-attention + (padding or key bias,) when masked by key."""
        g = torch.Generator().manual_seed(seed)
        n_k = self.key_len(q_len)
        args = [torch.randn(batch, q_len, D_MODEL, generator=g)]
        if self.cross:
            args.append(torch.randn(batch, n_k, D_MODEL, generator=g))
        if self.key_mask == "additive_bias":
            args.append(torch.randn(batch, n_k, generator=g))
        elif self.key_mask != "none":
            # True = a real token. Key 0 is always real, so no row is fully masked (a causal row 0
            # attends key 0 only); the last sequence is padded from the middle.
            lengths = torch.randint(1, n_k + 1, (batch,), generator=g)
            lengths[-1] = max(1, n_k // 2)
            args.append(torch.arange(n_k)[None, :] < lengths[:, None])
        return tuple(args)

    def key_weights(self, args: tuple[Tensor, ...]) -> Tensor | None:
        """Per-key weights w (B, Nk) of the key-only mask: exp(bias), or 1/0 for padding."""
        if self.key_mask == "none":
            return None
        last = args[-1]
        if self.key_mask == "additive_bias":
            return torch.exp(last.double())
        return last.double()  # every generated fill value is <= -1e4: exp(fill) is 0

    def fill_value(self, dtype: torch.dtype) -> float:
        if self.fill == "finfo_min":
            return torch.finfo(dtype).min
        return float(self.fill)


class GeneratedAttention(nn.Module):
    """The attention layer a :class:`Spelling` describes: projections, attention, output."""

    def __init__(self, spelling: Spelling) -> None:
        super().__init__()
        sp = self.spelling = spelling
        self.q = nn.Linear(D_MODEL, sp.heads * sp.head_dim)
        self.k = nn.Linear(D_MODEL, sp.kv_heads * sp.head_dim)
        self.v = nn.Linear(D_MODEL, sp.kv_heads * sp.value_dim)
        self.o = nn.Linear(sp.heads * sp.value_dim, D_MODEL)
        if sp.causal == "tril_buffer":
            dtype = torch.bool if sp.buffer_dtype == "bool" else torch.float32
            tril = torch.tril(torch.ones(MAX_LEN, MAX_LEN, dtype=dtype))
            self.register_buffer(
                "causal_buffer", tril.view(1, 1, MAX_LEN, MAX_LEN) if sp.buffer_4d else tril
            )
        if sp.scale_const == "buffer":
            self.register_buffer("scale_buffer", torch.tensor(self._constant_value()))
        if sp.softmax_fn == "module":
            self.softmax = nn.Softmax(dim=-1)
        if sp.dropout == "module":
            self.drop = nn.Dropout(sp.dropout_p)

    # -- projections -----------------------------------------------------------------------------
    def _project(self, x: Tensor, memory: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v in (B, N, H, d): the layout a linear projection gives."""
        sp = self.spelling
        b, n_q, n_k = x.shape[0], x.shape[1], memory.shape[1]
        q = self.q(x).view(b, n_q, sp.heads, sp.head_dim)
        k = self.k(memory).view(b, n_k, sp.kv_heads, sp.head_dim)
        v = self.v(memory).view(b, n_k, sp.kv_heads, sp.value_dim)
        return q, k, v

    def project(self, x: Tensor, *extra: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The model's own q (B, H, Nq, d), k (B, Hkv, Nk, d), v (B, Hkv, Nk, dv): unscaled and
        not repeated, for references computed outside the model."""
        memory = extra[0] if self.spelling.cross else x
        return tuple(t.transpose(1, 2) for t in self._project(x, memory))  # type: ignore[return-value]

    def merge(self, out: Tensor) -> Tensor:
        """The output projection of a (B, H, Nq, dv) attention output."""
        b, h, n, e = out.shape
        return self.o(out.transpose(1, 2).reshape(b, n, h * e))

    # -- forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, *extra: Tensor) -> Tensor:
        sp = self.spelling
        memory = extra[0] if sp.cross else x
        key_input = extra[-1] if sp.key_mask != "none" else None
        q, k, v = self._project(x, memory)
        if sp.layout == "bhnd":
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self._scale_operands(q, k)
        k, v = self._repeat(k), self._repeat(v)
        if sp.kind == "sdpa":
            out = self._sdpa(q, k, v, key_input)
        else:
            out = self._manual(q, k, v, key_input)
        b, n_q = x.shape[0], x.shape[1]
        if sp.product == "einsum" and sp.einsum_out == "seq_first":  # already (B, Nq, H, dv)
            return self.o(out.reshape(b, n_q, sp.heads * sp.value_dim))
        return self.o(out.transpose(1, 2).reshape(b, n_q, sp.heads * sp.value_dim))

    # -- scale -----------------------------------------------------------------------------------
    def _constant_value(self) -> float:
        """The number written in the model: the scale (or √scale when split), or its reciprocal."""
        sp = self.spelling
        value = math.sqrt(sp.scale) if sp.scale_at == "split" else sp.scale
        return value if sp.scale_op == "mul" else 1.0 / value

    def _constant(self) -> Any:
        sp, value = self.spelling, self._constant_value()
        if sp.scale_const == "tensor":
            return torch.tensor(value)
        if sp.scale_const == "buffer":
            return self.scale_buffer
        if sp.scale_const == "sqrt_tensor":  # `/ torch.sqrt(torch.tensor(d))` in many ports
            return torch.sqrt(torch.tensor(value * value))
        return value

    def _scaled(self, t: Tensor) -> Tensor:
        return t * self._constant() if self.spelling.scale_op == "mul" else t / self._constant()

    def _scale_operands(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        at = self.spelling.scale_at
        if at in ("q", "split"):
            q = self._scaled(q)
        if at in ("k", "split"):
            k = self._scaled(k)
        return q, k

    # -- grouped heads ---------------------------------------------------------------------------
    def _repeat(self, t: Tensor) -> Tensor:
        sp = self.spelling
        rep = sp.heads // sp.kv_heads
        axis = 1 if sp.layout == "bhnd" else 2
        if sp.gqa == "repeat_interleave":
            return t.repeat_interleave(rep, dim=axis)
        if sp.gqa == "expand_reshape":
            shape = list(t.shape)
            grown = t.unsqueeze(axis + 1).expand(*shape[: axis + 1], rep, *shape[axis + 1 :])
            shape[axis] = shape[axis] * rep
            return grown.reshape(shape)
        return t  # none, broadcast (one kv head), enable_gqa (sdpa repeats)

    # -- sdpa --------------------------------------------------------------------------------------
    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, key_input: Tensor | None) -> Tensor:
        sp = self.spelling
        n_q, n_k = q.shape[-2], k.shape[-2]
        mask: Tensor | None = None
        if sp.key_mask == "additive_bias":
            mask = key_input[:, None, None, :]
        elif sp.key_mask == "additive_pad":
            mask = self._pad_bias(key_input, q.dtype)
        elif sp.key_mask != "none":
            mask = key_input[:, None, None, :]
        if sp.causal not in ("none", "is_causal"):
            keep = self._causal_keep(n_q, n_k)
            if mask is None and sp.causal_form == "additive":
                mask = torch.zeros(n_q, n_k).masked_fill(~keep, self.spelling.fill_value(q.dtype))
            elif mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.masked_fill(~keep, float("-inf"))
        kwargs: dict[str, Any] = {}
        if sp.scale_at == "sdpa_arg":
            kwargs["scale"] = sp.scale
        elif sp.scale_at != "sdpa_default":
            kwargs["scale"] = 1.0  # the scale is applied to q and/or k
        if sp.gqa == "enable_gqa":
            kwargs["enable_gqa"] = True
        p = sp.dropout_p if self.training and sp.dropout != "none" else 0.0
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=sp.causal == "is_causal", **kwargs
        )
        return out

    # -- manual ------------------------------------------------------------------------------------
    def _transpose_k(self, k: Tensor) -> Tensor:
        r, form = k.dim(), self.spelling.k_form
        if form == "t_neg":
            return k.transpose(-1, -2)
        if form == "t_neg2":
            return k.transpose(-2, -1)
        if form == "t_pos":
            return k.transpose(r - 2, r - 1)
        if form == "mT":
            return k.mT
        if form == "permute":
            return k.permute(*range(r - 2), r - 1, r - 2)
        return k

    def _manual(self, q: Tensor, k: Tensor, v: Tensor, key_input: Tensor | None) -> Tensor:
        sp = self.spelling
        b = q.shape[0]
        n_q = q.shape[-2] if sp.layout == "bhnd" else q.shape[1]
        n_k = k.shape[-2] if sp.layout == "bhnd" else k.shape[1]
        if sp.product == "einsum":
            scores = self._einsum_scores(q, k)
        elif sp.folded:
            q3 = q.reshape(-1, n_q, sp.head_dim)
            k3 = self._transpose_k(k.reshape(-1, n_k, sp.head_dim))
            if sp.scale_at == "k_t":
                k3 = self._scaled(k3)
            if sp.product == "bmm":
                scores = torch.bmm(q3, k3)
            else:
                scores = self._baddbmm(q3, k3, key_input, b, n_q, n_k)
        else:
            k_t = self._transpose_k(k)
            if sp.scale_at == "k_t":
                k_t = self._scaled(k_t)
            scores = q @ k_t if sp.product == "at" else torch.matmul(q, k_t)
        if sp.scale_at == "scores":
            scores = self._scaled(scores)
        scores = self._masked(scores, key_input, b, n_q, n_k)
        probs = self._dropout(self._softmax(scores, v.dtype))
        if sp.product == "einsum":
            return self._einsum_values(probs, v)
        if sp.folded:
            out = torch.bmm(probs, v.reshape(-1, n_k, sp.value_dim))
            return out.view(b, sp.heads, n_q, sp.value_dim)
        return probs @ v if sp.value_product == "at" else torch.matmul(probs, v)

    def _einsum_letters(self) -> dict[str, str]:
        return dict(zip("bhqkde", self.spelling.letters, strict=True))

    def _einsum_scores(self, q: Tensor, k: Tensor) -> Tensor:
        sp, L = self.spelling, self._einsum_letters()
        if sp.layout == "bhnd":
            q_sub, k_sub = L["b"] + L["h"] + L["q"] + L["d"], L["b"] + L["h"] + L["k"] + L["d"]
        else:
            q_sub, k_sub = L["b"] + L["q"] + L["h"] + L["d"], L["b"] + L["k"] + L["h"] + L["d"]
        if sp.k_form != "none":
            k = self._transpose_k(k)
            k_sub = k_sub[:-2] + k_sub[-1] + k_sub[-2]
        if sp.scale_at == "k_t":
            k = self._scaled(k)
        out = L["b"] + L["h"] + L["q"] + L["k"]
        return torch.einsum(f"{q_sub},{k_sub}->{out}", q, k)

    def _einsum_values(self, probs: Tensor, v: Tensor) -> Tensor:
        sp, L = self.spelling, self._einsum_letters()
        p_sub = L["b"] + L["h"] + L["q"] + L["k"]
        v_sub = (
            L["b"] + L["h"] + L["k"] + L["e"]
            if sp.layout == "bhnd"
            else L["b"] + L["k"] + L["h"] + L["e"]
        )
        out = (
            L["b"] + L["h"] + L["q"] + L["e"]
            if sp.einsum_out == "heads_first"
            else L["b"] + L["q"] + L["h"] + L["e"]
        )
        return torch.einsum(f"{p_sub},{v_sub}->{out}", probs, v)

    def _baddbmm(
        self, q3: Tensor, k3: Tensor, key_input: Tensor | None, b: Any, n_q: Any, n_k: Any
    ) -> Tensor:
        sp = self.spelling
        alpha = sp.scale if sp.scale_at == "alpha" else 1.0
        if sp.baddbmm_input == "key_bias":
            bias = self._fold(self._key_bias(key_input, q3.dtype), b)
            return torch.baddbmm(bias, q3, k3, beta=1.0, alpha=alpha)
        zeros = torch.zeros(q3.shape[0], n_q, n_k, dtype=q3.dtype)
        beta = 0.0 if sp.baddbmm_input == "zeros_beta0" else 1.0
        return torch.baddbmm(zeros, q3, k3, beta=beta, alpha=alpha)

    # -- masks -----------------------------------------------------------------------------------
    def _fold(self, t: Tensor, b: Any) -> Tensor:
        """A (B|1, 1, Nq|1, Nk) mask in the (B·H, Nq|1, Nk) layout of folded scores."""
        h = self.spelling.heads
        return t.expand(b, h, t.shape[-2], t.shape[-1]).reshape(-1, t.shape[-2], t.shape[-1])

    def _pad_bias(self, pad: Tensor, dtype: torch.dtype) -> Tensor:
        """An additive (B, 1, 1, Nk) padding mask, in the spellings BERT-style models use."""
        sp = self.spelling
        pad4 = pad[:, None, None, :]
        if sp.fill in ("-inf", "finfo_min"):  # (1 - pad) * -inf would be NaN where pad is 1
            return torch.zeros(pad4.shape, dtype=dtype).masked_fill(~pad4, sp.fill_value(dtype))
        return (1.0 - pad4.to(dtype)) * sp.fill_value(dtype)

    def _key_bias(self, key_input: Tensor, dtype: torch.dtype) -> Tensor:
        if self.spelling.key_mask == "additive_bias":
            return key_input[:, None, None, :]
        return self._pad_bias(key_input, dtype)

    def _negated(self, pad4: Tensor) -> Tensor:
        form = self.spelling.negate
        if form == "eq0":
            return pad4 == 0
        if form == "logical_not":
            return torch.logical_not(pad4)
        return ~pad4

    def _where_fill(self, dtype: torch.dtype) -> Any:
        value = self.spelling.fill_value(dtype)
        return torch.tensor(value) if self.spelling.where_fill == "tensor" else value

    def _causal_keep(self, n_q: Any, n_k: Any) -> Tensor:
        """Boolean keep matrix j <= i from the spelling's causal source."""
        sp = self.spelling
        if sp.causal == "tril_buffer":
            return self.causal_buffer[..., :n_q, :n_k].bool()
        if sp.causal == "triu":
            return ~torch.triu(torch.ones(n_q, n_k, dtype=torch.bool), diagonal=1)
        i = torch.arange(n_q)[:, None]
        j = torch.arange(n_k)[None, :]
        return j <= i

    def _masked(self, s: Tensor, key_input: Tensor | None, b: Any, n_q: Any, n_k: Any) -> Tensor:
        sp = self.spelling
        if sp.key_mask == "none" and sp.causal == "none":
            return s
        unfold = sp.folded and sp.mask_fold == "unfold"
        if unfold:  # BART/T5 style: view the scores as (B, H, N, N), mask, view back
            s = s.view(b, sp.heads, n_q, n_k)
        fold = (lambda t: self._fold(t, b)) if sp.folded and not unfold else (lambda t: t)
        fill = sp.fill_value(s.dtype)
        if sp.combine:
            keep = fold(self._causal_keep(n_q, n_k) & key_input[:, None, None, :])
            s = (
                s.masked_fill(~keep, fill)
                if sp.key_mask == "fill"
                else torch.where(keep, s, self._where_fill(s.dtype))
            )
        else:
            s = self._key_term(s, key_input, fold)
            s = self._causal_term(s, n_q, n_k, fill)
        return s.view(-1, n_q, n_k) if unfold else s

    def _key_term(self, s: Tensor, key_input: Tensor | None, fold: Any) -> Tensor:
        sp = self.spelling
        if sp.key_mask == "none" or (sp.product == "baddbmm" and sp.baddbmm_input == "key_bias"):
            return s
        if sp.key_mask in ("additive_pad", "additive_bias"):
            return s + fold(self._key_bias(key_input, s.dtype))
        pad4 = key_input[:, None, None, :]
        if sp.key_mask == "fill":
            return s.masked_fill(fold(self._negated(pad4)), sp.fill_value(s.dtype))
        return torch.where(fold(pad4), s, self._where_fill(s.dtype))

    def _causal_term(self, s: Tensor, n_q: Any, n_k: Any, fill: float) -> Tensor:
        sp, form = self.spelling, self.spelling.causal_form
        if sp.causal == "tril_buffer":
            tri = (
                self.causal_buffer[:, :, :n_q, :n_k]
                if sp.buffer_4d
                else self.causal_buffer[:n_q, :n_k]
            )
            if form == "eq0":  # GPT-2 / minGPT
                return s.masked_fill(tri == 0, fill)
            if form == "where":
                return torch.where(tri.bool(), s, self._where_fill(s.dtype))
            return s.masked_fill(~tri.bool(), fill)
        if sp.causal == "triu":
            if form == "additive":  # nn.Transformer.generate_square_subsequent_mask
                return s + torch.triu(torch.full((n_q, n_k), fill), diagonal=1)
            return s.masked_fill(
                torch.triu(torch.ones(n_q, n_k, dtype=torch.bool), diagonal=1), fill
            )
        if sp.causal == "arange":
            i = torch.arange(n_q).unsqueeze(-1)
            j = torch.arange(n_k).unsqueeze(0)
            if form == "lt":
                return s.masked_fill(i < j, fill)
            if form == "where":
                return torch.where(j <= i, s, self._where_fill(s.dtype))
            if form == "additive":
                return s + torch.zeros(n_q, n_k).masked_fill(j > i, fill)
            return s.masked_fill(j > i, fill)
        return s

    # -- softmax and dropout -----------------------------------------------------------------------
    def _softmax(self, s: Tensor, out_dtype: torch.dtype) -> Tensor:
        sp = self.spelling
        if sp.upcast == "to_float64":
            s = s.to(torch.float64)
        elif sp.upcast == "double":
            s = s.double()
        if sp.max_subtract == "amax":
            s = s - s.amax(dim=-1, keepdim=True)
        elif sp.max_subtract == "amax_detach":
            s = s - s.amax(dim=-1, keepdim=True).detach()
        elif sp.max_subtract == "max_values":
            s = s - s.max(dim=-1, keepdim=True).values
        dim = -1 if sp.softmax_dim == "neg" else s.dim() - 1
        if sp.upcast == "softmax_dtype":
            return F.softmax(s, dim=dim, dtype=torch.float64).to(out_dtype)
        if sp.softmax_fn == "functional":
            p = F.softmax(s, dim=dim)
        elif sp.softmax_fn == "method":
            p = s.softmax(dim)
        elif sp.softmax_fn == "module":
            p = self.softmax(s)
        else:
            p = torch.softmax(s, dim=dim)
        if sp.upcast == "double":
            return p.float()
        return p.to(out_dtype) if sp.upcast != "none" else p

    def _dropout(self, p: Tensor) -> Tensor:
        sp = self.spelling
        if sp.dropout == "functional":
            return F.dropout(p, p=sp.dropout_p, training=self.training)
        if sp.dropout == "module":
            return self.drop(p)
        return p


# -- the strategy ---------------------------------------------------------------------------------

_LETTERS = string.ascii_lowercase + string.ascii_uppercase


@st.composite
def spellings(draw: st.DrawFn, kinds: tuple[str, ...] = ("manual", "sdpa")) -> Spelling:
    """A random, valid :class:`Spelling`. Earlier options in each list are the simpler ones, so
    a failing example shrinks towards plain ``softmax(q @ k.transpose(-1, -2) * s) @ v``."""
    kind = draw(st.sampled_from(kinds))
    heads = draw(st.sampled_from([2, 4, 1]))
    kv_heads = draw(st.sampled_from([h for h in (heads, 1, 2) if heads % h == 0]))
    head_dim = draw(st.sampled_from([4, 8]))
    value_dim = draw(st.sampled_from([head_dim, head_dim + 2]))
    cross = draw(st.booleans())
    q_len = draw(st.integers(4, 9))
    kv_delta = draw(st.sampled_from([0, 3, -2, 5])) if cross else 0
    scale = draw(st.sampled_from([head_dim**-0.5, 0.3, 1.0, 0.125]))
    scale_op = draw(st.sampled_from(["mul", "div"]))
    scale_const = draw(st.sampled_from(["python", "tensor", "buffer", "sqrt_tensor"]))
    key_mask = draw(st.sampled_from(["none", "additive_pad", "fill", "where", "additive_bias"]))
    causal = "none"
    fields: dict[str, Any] = {}

    if kind == "sdpa":
        product = "sdpa"
        # is_causal together with attn_mask is an error in some sdpa kernels: a key-masked causal
        # sdpa builds one combined mask instead.
        causal_forms = ["none", "tril_buffer", "triu", "arange"]
        if key_mask == "none":
            causal_forms.insert(1, "is_causal")
        causal = draw(st.sampled_from(causal_forms))
        scale_at = draw(st.sampled_from(["sdpa_default", "sdpa_arg", "q", "k", "split"]))
        gqa_forms = ["enable_gqa", "repeat_interleave", "expand_reshape"]
        if kv_heads == 1:
            gqa_forms.append("broadcast")
        gqa = draw(st.sampled_from(gqa_forms)) if kv_heads != heads else "none"
        layout = "bhnd"
    else:
        product = draw(st.sampled_from(["at", "matmul", "einsum", "bmm", "baddbmm"]))
        causal = draw(st.sampled_from(["none", "tril_buffer", "triu", "arange"]))
        scale_places = ["scores", "q", "k", "split", "k_t"] + (
            ["alpha"] if product == "baddbmm" else []
        )
        scale_at = draw(st.sampled_from(scale_places))
        gqa_forms = ["repeat_interleave", "expand_reshape"]
        if kv_heads == 1 and product in ("at", "matmul", "einsum"):
            gqa_forms.append("broadcast")
        gqa = draw(st.sampled_from(gqa_forms)) if kv_heads != heads else "none"
        layout = draw(st.sampled_from(["bhnd", "bnhd"])) if product == "einsum" else "bhnd"
        k_forms = ["t_neg", "t_neg2", "t_pos", "mT", "permute"]
        fields["k_form"] = draw(
            st.sampled_from(["none", *k_forms] if product == "einsum" else k_forms)
        )
        if product in ("at", "matmul"):
            fields["value_product"] = draw(st.sampled_from(["at", "matmul"]))
        if product == "einsum":
            fields["letters"] = (
                "".join(draw(st.permutations(_LETTERS))[:6]) if draw(st.booleans()) else "bhqkde"
            )
            fields["einsum_out"] = draw(st.sampled_from(["heads_first", "seq_first"]))
        if product in ("bmm", "baddbmm"):
            fields["mask_fold"] = draw(st.sampled_from(["unfold", "fold"]))
        if product == "baddbmm":
            inputs = ["zeros_beta0", "zeros_beta1"]
            if (
                key_mask in ("additive_pad", "additive_bias")
                and fields["mask_fold"] == "fold"
                and scale_at != "scores"
            ):
                inputs.append("key_bias")
            fields["baddbmm_input"] = draw(st.sampled_from(inputs))
        if key_mask in ("fill", "where") and causal != "none":
            fields["combine"] = draw(st.booleans())
        fields["upcast"] = draw(st.sampled_from(["none", "to_float64", "double", "softmax_dtype"]))
        fields["softmax_fn"] = draw(st.sampled_from(["torch", "functional", "method", "module"]))
        fields["softmax_dim"] = draw(st.sampled_from(["neg", "pos"]))
        fields["max_subtract"] = draw(
            st.sampled_from(["none", "amax", "amax_detach", "max_values"])
        )
        if scale_at == "alpha":  # baddbmm's alpha is a Python number
            scale_const, scale_op = "python", "mul"

    if causal == "tril_buffer":
        fields["causal_form"] = draw(st.sampled_from(["fill", "eq0", "where"]))
        fields["buffer_dtype"] = draw(st.sampled_from(["float", "bool"]))
        fields["buffer_4d"] = draw(st.booleans()) and product not in ("bmm", "baddbmm")
    elif causal == "triu":
        fields["causal_form"] = draw(st.sampled_from(["fill", "additive"]))
    elif causal == "arange":
        fields["causal_form"] = draw(st.sampled_from(["gt", "lt", "where", "additive"]))
    if key_mask != "none" or causal not in ("none", "is_causal"):
        fields["fill"] = draw(st.sampled_from(["-inf", "finfo_min", "-1e4", "-1e9"]))
    if key_mask == "fill":
        fields["negate"] = draw(st.sampled_from(["invert", "eq0", "logical_not"]))
    if key_mask == "where" or fields.get("causal_form") == "where":
        fields["where_fill"] = draw(st.sampled_from(["scalar", "tensor"]))
    fields["dropout"] = draw(st.sampled_from(["none", "functional", "module"]))
    if fields["dropout"] != "none":
        fields["dropout_p"] = draw(st.sampled_from([0.1, 0.5]))
    return Spelling(
        kind=kind,
        product=product,
        layout=layout,
        scale=scale,
        scale_at=scale_at,
        scale_op=scale_op,
        scale_const=scale_const,
        key_mask=key_mask,
        causal=causal,
        heads=heads,
        kv_heads=kv_heads,
        gqa=gqa,
        head_dim=head_dim,
        value_dim=value_dim,
        cross=cross,
        kv_delta=kv_delta,
        q_len=q_len,
        **fields,
    )


# -- references ------------------------------------------------------------------------------------


def linear_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, *, scale: float, weights: Tensor | None, causal: bool
) -> Tensor:
    """Dense linear attention (Katharopoulos et al. 2020) in float64, of its own definition:

    out_i = Σ_j w_j φ(q_i√s)·φ(k_j√s) v_j / Σ_j w_j φ(q_i√s)·φ(k_j√s), φ = elu + 1, j <= i when
    causal (top-left aligned), query head h reads key/value head h // (H / Hkv).
    """
    q, k, v = q.double(), k.double(), v.double()
    heads = q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    root = math.sqrt(scale)
    a = (F.elu(q * root) + 1) @ (F.elu(k * root) + 1).transpose(-1, -2)
    if weights is not None:
        a = a * weights[:, None, None, :]
    if causal:
        a = a * torch.ones(a.shape[-2:], dtype=torch.bool).tril()
    return (a @ v) / a.sum(-1, keepdim=True)


def relative_error(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


# -- look-alikes -----------------------------------------------------------------------------------

#: Look-alikes that are not attention: no site may be reported.
NOT_ATTENTION = (
    "softmax_query_axis",  # softmax(q kᵀ, dim=-2) @ v
    "softmax_head_axis",  # softmax over the head axis (dim=1, or permuted to last and back)
    "kq_wrong_axis",  # softmax(k qᵀ) normalised over queries, then contracted over keys
    "probs_sum",  # the probabilities are summed
    "probs_mul",  # the probabilities gate something elementwise
    "probs_topk",  # top-k routing on the probabilities
    "classifier",  # softmax(x Wᵀ) returned as class probabilities
    "moe_router",  # softmax over experts, then a weighted sum of per-token expert outputs
    "moe_router_mul",  # the same weighted sum spelled as multiply-and-sum
    "similarity_sum",  # softmax(x xᵀ) as a similarity matrix, summed
    "probs_gram",  # P Pᵀ: the probabilities multiplied with themselves
    "query_dependent_values",  # Σ_j P_ij V_ij: "values" that depend on the query as well
)
#: Look-alikes that are attention of an unusual shape: exactly one, correct, site.
UNUSUAL_ATTENTION = (
    "kq_roles_swapped",  # softmax(k qᵀ) @ v_q: attention with the roles of q and k exchanged
    "channel_attention",  # XCiT cross-covariance attention: tokens are channels
    "learned_query_pooling",  # a learned query attending over the sequence (PMA, CLIP pool)
    # the same computation spelled key-major: one score per token, softmax over the sequence
    "softmax_pooling",
)


@dataclasses.dataclass(frozen=True)
class LookAlike:
    """A module with a softmax that looks like attention (``kind`` names which)."""

    kind: str
    product: str = "at"  # at | matmul | einsum
    heads: int = 2
    head_dim: int = 4
    experts: int = 4
    scale: float = 0.5
    q_len: int = 6
    use_scale: bool = True
    permute_heads: bool = False  # softmax_head_axis: permute the head axis last instead of dim=1
    top_k: int = 2

    @property
    def is_attention(self) -> bool:
        return self.kind in UNUSUAL_ATTENTION

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return LookAlikeModule(self).eval()

    def inputs(self, batch: int, length: int, seed: int = 0) -> tuple[Tensor, ...]:
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(batch, length, D_MODEL, generator=g),)


class LookAlikeModule(nn.Module):
    def __init__(self, spec: LookAlike) -> None:
        super().__init__()
        self.spec = spec
        inner = spec.heads * spec.head_dim
        self.q = nn.Linear(D_MODEL, inner)
        self.k = nn.Linear(D_MODEL, inner)
        self.v = nn.Linear(D_MODEL, inner)
        self.o = nn.Linear(inner, D_MODEL)
        self.router = nn.Parameter(torch.randn(D_MODEL, spec.experts) * 0.3)
        self.experts = nn.Parameter(torch.randn(spec.experts, D_MODEL, D_MODEL) * 0.3)
        self.pool_score = nn.Parameter(torch.randn(D_MODEL, 1) * 0.3)
        self.pool_query = nn.Parameter(torch.randn(1, 1, inner) * 0.3)

    def _mm(self, a: Tensor, b: Tensor) -> Tensor:
        """a @ b in the spelling's product (einsum over the last two axes)."""
        form = self.spec.product
        if form == "matmul":
            return torch.matmul(a, b)
        if form == "einsum":
            lead = "wxyz"[: max(a.dim(), b.dim()) - 2]
            la, lb = lead[len(lead) - (a.dim() - 2) :], lead[len(lead) - (b.dim() - 2) :]
            return torch.einsum(f"{la}ij,{lb}jk->{lead}ik", a, b)
        return a @ b

    def _heads(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.spec.heads, self.spec.head_dim).transpose(1, 2)

    def _scores(self, a: Tensor, b: Tensor) -> Tensor:
        s = self._mm(a, b.transpose(-1, -2))
        return s * self.spec.scale if self.spec.use_scale else s

    def forward(self, x: Tensor) -> Tensor:
        spec, kind = self.spec, self.spec.kind
        b, n, _ = x.shape
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))

        def merge(out: Tensor) -> Tensor:
            return self.o(out.transpose(1, 2).reshape(b, out.shape[2], -1))

        if kind == "softmax_query_axis":
            return merge(self._mm(self._scores(q, k).softmax(dim=-2), v))
        if kind == "softmax_head_axis":
            s = self._scores(q, k)
            if spec.permute_heads:
                p = s.permute(0, 2, 3, 1).softmax(-1).permute(0, 3, 1, 2)
            else:
                p = s.softmax(dim=1)
            return merge(self._mm(p, v))
        if kind == "kq_wrong_axis":
            p = self._scores(k, q).softmax(-1)  # (B, H, Nk, Nq), normalised over queries
            return merge(torch.einsum("bhji,bhjd->bhid", p, v))
        if kind == "kq_roles_swapped":
            return merge(self._mm(self._scores(k, q).softmax(-1), v))
        if kind == "probs_sum":
            p = self._scores(q, k).softmax(-1)
            return x * p.sum(dim=(1, 2)).unsqueeze(-1)[:, :, :1] + p.mean()
        if kind == "probs_mul":
            p = self._scores(q, k).softmax(-1)
            return merge((p * self._scores(q, k)).sum(-1, keepdim=True) * v)
        if kind == "probs_topk":
            p = self._scores(q, k).softmax(-1)
            top = p.topk(spec.top_k, dim=-1).values
            return x + top.sum(dim=(1, 3)).unsqueeze(-1)
        if kind == "classifier":
            return self._mm(x, self.router).softmax(-1)
        if kind in ("moe_router", "moe_router_mul"):
            gates = self._mm(x, self.router).softmax(-1)  # (B, N, E)
            expert_out = torch.einsum("bnd,edf->bnef", x, self.experts)
            if kind == "moe_router":
                return torch.einsum("bne,bnef->bnf", gates, expert_out)
            return (gates.unsqueeze(-1) * expert_out).sum(-2)
        if kind == "softmax_pooling":
            w = self._mm(x, self.pool_score).softmax(dim=1)  # (B, N, 1): over the sequence
            return self._mm(w.transpose(1, 2), x)
        if kind == "similarity_sum":
            sim = self._mm(self.q(x), self.k(x).transpose(1, 2))
            return x * sim.softmax(dim=-1).sum(-2, keepdim=True).transpose(1, 2)
        if kind == "probs_gram":
            p = self._scores(q, k).softmax(-1)
            return merge(self._mm(self._mm(p, p.transpose(-1, -2)), v))
        if kind == "query_dependent_values":
            p = self._scores(q, k).softmax(-1)  # (B, H, N, N)
            pairwise = v.unsqueeze(2) * q.unsqueeze(3)  # (B, H, Nq, Nk, d): one value per pair
            return merge(torch.einsum("bhqk,bhqkd->bhqd", p, pairwise))
        if kind == "channel_attention":
            # XCiT (El-Nouby et al. 2021): softmax over (d × d) channel scores, applied to vᵀ.
            qn, kn = F.normalize(q, dim=-2), F.normalize(k, dim=-2)
            p = self._mm(qn.transpose(-1, -2), kn).mul(spec.scale).softmax(-1)  # (B, H, d, d)
            return merge(self._mm(p, v.transpose(-1, -2)).transpose(-1, -2))
        if kind == "learned_query_pooling":
            query = self.pool_query.expand(b, 1, self.pool_query.shape[-1])
            p = self._scores(query, self.k(x)).softmax(-1)  # (B, 1, N)
            return self._mm(p, self.v(x))
        raise ValueError(f"unknown look-alike {kind!r}")


@st.composite
def look_alikes(
    draw: st.DrawFn, kinds: tuple[str, ...] = NOT_ATTENTION + UNUSUAL_ATTENTION
) -> LookAlike:
    kind = draw(st.sampled_from(kinds))
    return LookAlike(
        kind=kind,
        product=draw(st.sampled_from(["at", "matmul", "einsum"])),
        heads=draw(st.sampled_from([2, 1, 4])),
        head_dim=draw(st.sampled_from([4, 2])),
        experts=draw(st.sampled_from([4, 3, 8])),
        scale=draw(st.sampled_from([0.5, 1.0, 0.125])),
        q_len=draw(st.integers(4, 9)),
        use_scale=draw(st.booleans()),
        permute_heads=draw(st.booleans()) if kind == "softmax_head_axis" else False,
        top_k=draw(st.sampled_from([2, 1, 3])),
    )
