"""The contract every attention variant keeps, and the small helpers they share.

A variant is an ``nn.Module`` built once per rewritten site from that site's
:class:`~attnrewrite.site.AttentionSite` and its options. Its ``forward`` receives canonical
tensors and knows nothing of the model it came from:

- ``query``: (B, H, Nq, d); ``key``: (B, Hkv, Nk, d); ``value``: (B, Hkv, Nk, dv), with
  ``H % Hkv == 0`` (grouped heads: query head h reads key/value head ``h // (H // Hkv)``).
- ``mask``: ``None`` or a tensor broadcastable to (B, H, Nq, Nk) in ``scaled_dot_product_attention``
  convention: ``bool`` means True = attend, floating means an additive bias. For sites of mask class
  ``key`` and ``causal+key`` the rewriter passes only the key-only term, shaped (B|1, H|1, 1, Nk).
- ``causal``: add the condition j <= i (positions counted from 0, top-left aligned).
- ``scale``: the factor on q·k. Kernel variants apply their feature map to q·√scale and k·√scale.

It returns (B, H, Nq, dv) in the dtype of ``query``.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from attnrewrite.errors import VariantOptionError
from attnrewrite.site import KERNEL_MASK_CLASSES, AttentionSite, MaskClass


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """Options of a variant that takes none."""


class AttentionVariant(nn.Module):
    """Base class of attention variants.

    Subclasses set the class attributes, define ``Options`` (a frozen dataclass whose fields are
    the variant's options with their types and defaults) and implement ``forward``.
    """

    #: Registry name, e.g. ``"performer"``.
    name: ClassVar[str] = ""
    #: Mask classes the variant reproduces exactly.
    mask_classes: ClassVar[frozenset[MaskClass]] = KERNEL_MASK_CLASSES
    #: Whether the variant can be causal (j <= i), and if not, why (said in the report).
    supports_causal: ClassVar[bool] = True
    why_not_causal: ClassVar[str] = ""
    #: Whether the variant accepts Nq != Nk and keys from another sequence.
    supports_cross: ClassVar[bool] = True
    #: Whether the variant computes exactly what the original softmax attention computes.
    exact: ClassVar[bool] = False
    #: Options dataclass.
    Options: ClassVar[type] = NoOptions

    def __init__(self, site: AttentionSite, *, seed: int | None = None, **options: Any) -> None:
        super().__init__()
        self.site = site
        self.seed = seed
        self.options = self.parse_options(options)

    # -- deciding -----------------------------------------------------------------------------
    @classmethod
    def refuse(cls, site: AttentionSite, options: dict[str, Any] | None = None) -> str | None:
        """Return why this variant cannot keep ``site``'s meaning with these ``options`` (as
        given to ``rewrite``), or ``None`` if it can."""
        if site.causal and not cls.supports_causal:
            return cls.why_not_causal or f"'{cls.name}' is not causal; the site is"
        if site.mask not in cls.mask_classes:
            accepted = ", ".join(sorted(str(m) for m in cls.mask_classes))
            return (
                f"mask class '{site.mask}' is not representable by '{cls.name}' "
                f"(it keeps {accepted})"
            )
        if site.is_cross and not cls.supports_cross:
            return f"'{cls.name}' does not support cross-attention"
        return None

    # -- decoding one token at a time ----------------------------------------------------------
    #: Names of the tensors of the decode state (empty: the variant cannot decode token by token).
    state_names: ClassVar[tuple[str, ...]] = ()
    #: Why the variant has no one-token step (said when decoding is refused).
    why_not_decodable: ClassVar[str] = (
        "has no one-token step: its output at a position depends on keys it has not seen yet or "
        "on the whole sequence"
    )

    #: Whether ``step`` keeps a sliding-window causal mask (``site.window``) exactly.
    decodes_windows: ClassVar[bool] = False

    def decode_refusal(self) -> str | None:
        """Why this site cannot be decoded token by token with this variant (``None``: it can).

        Decoding needs a causal self-attention site whose mask is causal, optionally with a
        key-only term (padding): the new token's row is then the old keys' terms plus its own.
        """
        if not self.state_names:
            return f"'{self.name}' {self.why_not_decodable}"
        site = self.site
        if site.mask is MaskClass.GENERAL and site.window is not None and not self.decodes_windows:
            return (
                f"its mask is causal with a sliding window of {site.window} keys, which "
                f"'{self.name}' does not keep (the exact 'softmax' rewrite decodes it)"
            )
        if site.mask is MaskClass.GENERAL and site.window is None:
            return (
                "its mask is not proven causal with a key-only term (a sliding window, a "
                "relative-position bias, ...): the new token's mask row cannot be built from "
                "what decoding stores"
            )
        if not site.mask.is_causal and site.window is None:
            return (
                f"the site is not causal (mask class '{site.mask}'): every position attends to "
                "later ones, so outputs change as tokens are added"
            )
        if site.is_cross:
            return "cross-attention: its keys come from another sequence, not from decoding"
        if site.attends_over != "tokens":
            return "channel attention mixes every token's features; it has no one-token step"
        return None

    def prefill(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float = 1.0,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """The prompt in parallel form: ``forward``'s output and the decode state after it."""
        raise NotImplementedError(f"'{self.name}' {self.why_not_decodable}")

    def step(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        state: tuple[Tensor, ...],
        *,
        mask: Tensor | None = None,
        scale: float = 1.0,
    ) -> tuple[Tensor, tuple[Tensor, ...]]:
        """One new position per sequence: q, k, v (B, H|Hkv, 1, d), the state from ``prefill``
        or the previous step, and ``mask`` the new key's own term (the model's mask computed for
        that one token). Returns the output (B, H, 1, dv) and the new state."""
        raise NotImplementedError(f"'{self.name}' {self.why_not_decodable}")

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls.Options))

    @classmethod
    def parse_options(cls, options: dict[str, Any]) -> Any:
        """Validate ``options`` against ``cls.Options`` and return an ``Options`` instance."""
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            known = ", ".join(fields) or "none"
            raise VariantOptionError(
                f"variant '{cls.name}' has no option {', '.join(map(repr, unknown))}; "
                f"its options are: {known}"
            )
        hints = typing.get_type_hints(cls.Options)
        for key, value in options.items():
            if not _isinstance_hint(value, hints[key]):
                raise VariantOptionError(
                    f"option {key}={value!r} of variant '{cls.name}' must be of type "
                    f"{_hint_name(hints[key])}, not {type(value).__name__}"
                )
        parsed = cls.Options(**options)
        check = getattr(parsed, "check", None)
        if check is not None:
            problem = check()
            if problem:
                raise VariantOptionError(f"variant '{cls.name}': {problem}")
        return parsed

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A generator seeded from the variant's seed (random features stay reproducible)."""
        g = torch.Generator(device=device)
        g.manual_seed(0 if self.seed is None else int(self.seed))
        return g

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(self.options).items())
        return f"site={self.site.name!r}" + (f", {opts}" if opts else "")

    def forward(  # pragma: no cover - abstract
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        mask: Tensor | None = None,
        causal: bool = False,
        scale: float = 1.0,
    ) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement forward")


def _isinstance_hint(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union or (
        origin is not None and str(origin) == "<class 'types.UnionType'>"
    ):
        return any(_isinstance_hint(value, h) for h in typing.get_args(hint))
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin is not None:
        hint = origin
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is typing.Callable or str(hint) == "collections.abc.Callable":
        return callable(value)
    return isinstance(value, hint)


def _hint_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


# -- helpers shared by variants ------------------------------------------------------------------


def repeat_kv(x: Tensor, num_heads: int) -> Tensor:
    """Repeat (B, Hkv, N, d) key/value heads to (B, num_heads, N, d), query head h -> h // group."""
    kv_heads = x.shape[1]
    if kv_heads == num_heads:
        return x
    return x.repeat_interleave(num_heads // kv_heads, dim=1)


def key_weights(mask: Tensor | None, dtype: torch.dtype = torch.float32) -> Tensor | None:
    """Per-key weights w_j of a key-only mask, so that softmax(s + m_j) = w_j e^{s} / sum(...).

    ``mask`` is (B|1, H|1, 1, Nk): boolean (True = attend, weight 1 or 0) or additive (weight
    exp(m_j), computed as exp(m_j - max_j m) since any per-row factor cancels in the normaliser;
    -inf gives 0). Returns (B|1, H|1, Nk) in ``dtype`` or ``None`` for no mask.
    """
    if mask is None:
        return None
    if mask.dim() < 1 or mask.shape[-2:-1] not in (torch.Size([1]), torch.Size([])):
        raise ValueError(
            f"a key-only mask must have a query axis of size 1, got shape {tuple(mask.shape)}"
        )
    m = mask.squeeze(-2) if mask.dim() >= 2 else mask
    if m.dtype == torch.bool:
        return m.to(dtype)
    m = m.to(torch.float32)
    top = m.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return torch.exp(m - top).to(dtype)


def causal_keep(q_len: int, k_len: int, device: torch.device) -> Tensor:
    """Boolean (Nq, Nk) matrix of j <= i (dense; only for exact/reference use)."""
    i = torch.arange(q_len, device=device)[:, None]
    j = torch.arange(k_len, device=device)[None, :]
    return j <= i


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An sdpa-style mask as an additive bias in ``dtype``: 0 / -inf for a boolean one."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
        ~mask, float("-inf")
    )


def combine_mask(
    mask: Tensor | None, causal: bool, q_len: int, k_len: int, device: torch.device
) -> Tensor | None:
    """One sdpa-style mask equal to ``mask`` with the causal condition folded in (dense)."""
    if not causal:
        return mask
    keep = causal_keep(q_len, k_len, device)
    if mask is None:
        return keep
    if mask.dtype == torch.bool:
        return mask & keep
    return mask.masked_fill(~keep, float("-inf"))


def key_bias(mask: Tensor | None, like: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The key-only term of a causal(+key) mask as an additive bias (B, 1|H, Nk), for decoding.

    ``mask`` is what a site receives: a key-only term (B|1, H|1, 1, Nk), or a dense mask whose
    last query row sees every key the causal condition allows (so that row is the key term);
    booleans become 0 / -inf. ``like`` is the site's key (B, Hkv, Nk, d): without a mask the bias
    is zeros (B, 1, Nk).
    """
    batch, length = like.shape[0], like.shape[-2]
    if mask is None:
        return torch.zeros(batch, 1, length, dtype=dtype, device=like.device)
    row = mask[..., -1, :] if mask.dim() >= 2 else mask
    while row.dim() < 3:
        row = row.unsqueeze(0)
    if row.dtype == torch.bool:
        zeros = torch.zeros(row.shape, dtype=dtype, device=row.device)
        row = zeros.masked_fill(~row, float("-inf"))
    return row.to(dtype).expand(batch, -1, length)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half-precision inputs, the input dtype otherwise."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def default_num_features(head_dim: int) -> int:
    """d·ln d rounded (Performer's recommended feature count), at least ``head_dim``."""
    return max(head_dim, int(round(head_dim * math.log(max(head_dim, 2)))))
