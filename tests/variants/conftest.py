"""Shared fixtures for variant tests: a site record without a model."""

from __future__ import annotations

import pytest

from attnrewrite.site import AttentionSite, MaskClass


def make_site(
    *,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    head_dim: int = 16,
    value_dim: int | None = None,
    mask: MaskClass | str = MaskClass.NONE,
    causal: bool = False,
    is_cross: bool = False,
    scale: float | None = None,
    query_len: int = 32,
    key_len: int | None = None,
) -> AttentionSite:
    mask = MaskClass(mask)
    return AttentionSite(
        name="test.attn",
        kind="manual",
        num_heads=num_heads,
        num_kv_heads=num_kv_heads or num_heads,
        head_dim=head_dim,
        value_dim=value_dim or head_dim,
        scale=scale if scale is not None else head_dim**-0.5,
        mask=mask,
        causal=causal or mask.is_causal,
        is_cross=is_cross,
        query_len=query_len,
        key_len=key_len or query_len,
    )


@pytest.fixture
def site_factory():
    return make_site
