"""Attention variants: an explicit, ordered table, imported lazily (no import-time side effects).

Each entry maps a registry name to ``"module:Class"`` inside this package. ``register_variant`` adds
a user's own class at run time.
"""

from __future__ import annotations

import importlib

from attnrewrite.errors import UnknownVariantError
from attnrewrite.variants.base import AttentionVariant

_TABLE: dict[str, str] = {
    "softmax": "softmax:SoftmaxAttention",
    "linear": "linear:LinearAttention",
    # The kernel family (issue 3): one shared core, kernel_core.py.
    "kernel": "kernel:KernelAttention",
    "performer": "performer:PerformerAttention",
    "rfa": "rfa:RandomFeatureAttention",
    "cosformer": "cosformer:CosFormerAttention",
    "t2r": "t2r:T2RAttention",
    "hedgehog": "hedgehog:HedgehogAttention",
    # The structural family (issue 4): patterns (blockwise core), projections, synthesis.
    "local": "patterns:LocalAttention",
    "sparse_strided": "patterns:StridedSparseAttention",
    "sparse_fixed": "patterns:FixedSparseAttention",
    "longformer": "patterns:LongformerAttention",
    "bigbird": "patterns:BigBirdAttention",
    "linformer": "linformer:LinformerAttention",
    "nystrom": "nystrom:NystromAttention",
    "synthesizer": "synthesizer:SynthesizerAttention",
    # Content-based sparse, inducing points and compression, more patterns (issue 16).
    "reformer": "content:ReformerAttention",
    "routing": "content:RoutingAttention",
    "sinkhorn": "content:SinkhornAttention",
    "set_transformer": "inducing:SetTransformerAttention",
    "memory_compressed": "inducing:MemoryCompressedAttention",
    "axial": "block_patterns:AxialAttention",
    "transformer_xl": "block_patterns:TransformerXLAttention",
}
_USER: dict[str, type[AttentionVariant]] = {}


def _load(spec: str) -> type[AttentionVariant]:
    module, cls = spec.split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def variant_names(*, builtin_only: bool = False) -> list[str]:
    """Registered names: the built-in table in order, then users' own (unless ``builtin_only``)."""
    if builtin_only:
        return list(_TABLE)
    return [*_TABLE, *(n for n in _USER if n not in _TABLE)]


def get_variant(name: str) -> type[AttentionVariant]:
    """The variant class registered as ``name``."""
    if not isinstance(name, str):
        raise UnknownVariantError(
            f"a variant is named by a string, got {type(name).__name__}; "
            f"registered variants: {', '.join(variant_names())}"
        )
    if name in _USER:
        return _USER[name]
    if name in _TABLE:
        return _load(_TABLE[name])
    raise UnknownVariantError(
        f"unknown attention variant '{name}'; registered variants: {', '.join(variant_names())} "
        "(add your own with attnrewrite.register_variant)"
    )


def variants() -> dict[str, type[AttentionVariant]]:
    """Registry name -> variant class, in table order, then user-registered ones."""
    return {name: get_variant(name) for name in variant_names()}


def register_variant(
    cls: type[AttentionVariant], name: str | None = None
) -> type[AttentionVariant]:
    """Register a user's variant class (an ``AttentionVariant`` subclass); usable as a decorator."""
    if not (isinstance(cls, type) and issubclass(cls, AttentionVariant)):
        raise TypeError(f"register_variant expects an AttentionVariant subclass, got {cls!r}")
    key = name or cls.name
    if not key:
        raise ValueError("the variant has no name: set the class attribute `name` or pass name=")
    _USER[key] = cls
    return cls


__all__ = ["AttentionVariant", "get_variant", "register_variant", "variant_names", "variants"]
