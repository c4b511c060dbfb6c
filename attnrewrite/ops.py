"""The canonical attention op, ``torch.ops.attnrewrite.attention``: the IR every stage speaks.

After canonicalisation every accepted site of a model is one call of this op on (batch, heads,
seq, feature) tensors, whatever the model's spelling was::

    attention(query, key, value, mask=None, causal=False, scale=1.0, dropout_p=0.0, site="")

- ``query`` (B, H, Nq, d), ``key`` (B, Hkv, Nk, d), ``value`` (B, Hkv, Nk, dv) with H a multiple
  of Hkv (grouped KV heads are an argument fact: query head h reads key head h // (H / Hkv));
- ``mask``: ``None``, a boolean keep mask or an additive float mask broadcastable to
  (B, H, Nq, Nk) — the dense model mask, or for ``key`` / ``causal+key`` sites only the key term
  (B|1, H|1, 1, Nk);
- ``causal``: add the condition j <= i (top-left aligned, positions from 0);
- ``site``: the site's :class:`~attnrewrite.site.AttentionSite` as JSON, so a saved canonical
  program (``torch.export.save``) still says what each call is.

Kernels: the reference (CPU, CUDA, any device) is exact softmax attention through
``scaled_dot_product_attention``; a fake kernel gives ``torch.export`` the output shape; autograd
differentiates the reference; :func:`decompose` rewrites the op into ``aten`` (sdpa), which is
what Inductor and the ONNX exporter receive (:data:`DECOMPOSITIONS`).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
from torch import Tensor, fx

from attnrewrite.site import AttentionSite, MaskClass
from attnrewrite.variants.kernel_core import DECOMPOSITIONS as KERNEL_DECOMPOSITIONS
from attnrewrite.variants.softmax import exact_attention

#: Node meta key holding a canonical node's :class:`AttentionSite` (also encoded in ``site=``).
SITE_META = "attnrewrite_site"


def decompose(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    site: str = "",
) -> Tensor:
    """The op's reference kernel, in ``aten`` terms (scaled_dot_product_attention): also its
    decomposition for compilers and exporters."""
    return exact_attention(query, key, value, mask, causal, scale, dropout_p)


_attention_op = torch.library.custom_op("attnrewrite::attention", mutates_args=())(decompose)


@_attention_op.register_fake
def _attention_fake(query, key, value, mask=None, causal=False, scale=1.0, dropout_p=0.0, site=""):
    _check_shapes(query, key, value)
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _setup_context(ctx, inputs, output) -> None:
    query, key, value, mask, causal, scale, dropout_p, _ = inputs
    ctx.save_for_backward(query, key, value, mask)
    ctx.options = (causal, scale, dropout_p)


def _backward(ctx, grad: Tensor):
    query, key, value, mask = ctx.saved_tensors
    causal, scale, dropout_p = ctx.options
    leaves = [t.detach().requires_grad_(t.requires_grad) for t in (query, key, value)]
    with torch.enable_grad():
        out = exact_attention(*leaves, mask, causal, scale, dropout_p)
        wanted = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
    dq, dk, dv = (next(grads) if t.requires_grad else None for t in leaves)
    return dq, dk, dv, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)

#: The op overload every pass matches on.
ATTENTION = torch.ops.attnrewrite.attention.default


def _check_shapes(query: Tensor, key: Tensor, value: Tensor) -> None:
    torch._check(query.dim() == 4 and key.dim() == 4 and value.dim() == 4, lambda: "rank 4")
    torch._check(
        query.shape[1] % key.shape[1] == 0,
        lambda: f"query heads {query.shape[1]} not a multiple of key heads {key.shape[1]}",
    )


def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    mask: Tensor | None = None,
    causal: bool = False,
    scale: float = 1.0,
    dropout_p: float = 0.0,
    site: str = "",
) -> Tensor:
    """Call the canonical op (exact softmax attention on (B, H, N, d) tensors)."""
    return ATTENTION(query, key, value, mask, causal, float(scale), float(dropout_p), site)


def is_attention(node: fx.Node) -> bool:
    """Whether ``node`` calls the canonical attention op."""
    return node.op == "call_function" and node.target is ATTENTION


# -- the site as data on the op ------------------------------------------------------------------


def encode_site(site: AttentionSite) -> str:
    """``site`` as JSON (sizes that are symbolic at capture become strings)."""
    fields = dataclasses.asdict(site)
    fields["mask"] = str(site.mask)
    for key in ("query_len", "key_len"):
        if not isinstance(fields[key], (int, type(None))):
            fields[key] = str(fields[key])
    return json.dumps(fields, sort_keys=True)


def decode_site(text: str) -> AttentionSite:
    """The :class:`AttentionSite` written by :func:`encode_site`."""
    fields: dict[str, Any] = json.loads(text)
    known = {f.name for f in dataclasses.fields(AttentionSite)}
    fields = {k: v for k, v in fields.items() if k in known}
    fields["mask"] = MaskClass(fields["mask"])
    fields["notes"] = tuple(fields.get("notes", ()))
    return AttentionSite(**fields)


def site_of(node: fx.Node) -> AttentionSite:
    """The site of a canonical node: from its meta, or decoded from its ``site=`` argument (a
    program loaded with ``torch.export.load`` keeps only the argument)."""
    site = node.meta.get(SITE_META)
    if site is None:
        text = node.kwargs.get("site", node.args[7] if len(node.args) > 7 else "")
        site = decode_site(text)
        node.meta[SITE_META] = site
    return site


def operands(node: fx.Node) -> dict[str, Any]:
    """The op's arguments by name (positional or keyword, defaults filled in)."""
    names = ("query", "key", "value", "mask", "causal", "scale", "dropout_p", "site")
    defaults = {"mask": None, "causal": False, "scale": 1.0, "dropout_p": 0.0, "site": ""}
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return {name: bound.get(name, defaults.get(name)) for name in names}


# -- decomposition (Inductor, ONNX) --------------------------------------------------------------


#: ``{op: decomposition}`` for ``ExportedProgram.run_decompositions`` / compiler tables.
DECOMPOSITIONS = {ATTENTION: decompose, **KERNEL_DECOMPOSITIONS}


def register_inductor_decomposition() -> None:
    """Put :func:`decompose` in Inductor's decomposition table (idempotent): a compiled canonical
    program then fuses the op's sdpa like any other instead of calling the op as an opaque kernel.
    Called by ``attnrewrite.compile``; importing Inductor is slow, so it is not done at import."""
    from torch._inductor import decomposition

    if ATTENTION not in decomposition.decompositions:
        decomposition.register_decomposition(ATTENTION)(decompose)
