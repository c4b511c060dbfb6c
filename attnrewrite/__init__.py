"""attnrewrite: find softmax attention in any PyTorch model and rewrite it into efficient variants.

Public API (see DESIGN.md)::

    sites = attnrewrite.find_attention(model, args=(x,))
    rw = attnrewrite.rewrite(model, "linear", args=(x,))
    print(rw.report)
"""

from __future__ import annotations

from attnrewrite.errors import (
    AttnRewriteError,
    CaptureError,
    InputMismatchError,
    UnknownVariantError,
    VariantOptionError,
)
from attnrewrite.rewriter.report import Report, SiteRow
from attnrewrite.rewriter.rewrite import RewrittenModel, find_attention, rewrite
from attnrewrite.site import AttentionSite, MaskClass
from attnrewrite.variants import register_variant, variants
from attnrewrite.variants.base import AttentionVariant

__version__ = "0.1.0"

__all__ = [
    "AttentionSite", "AttentionVariant", "AttnRewriteError", "CaptureError", "InputMismatchError",
    "MaskClass", "Report", "RewrittenModel", "SiteRow", "UnknownVariantError", "VariantOptionError",
    "find_attention", "register_variant", "rewrite", "variants",
]
