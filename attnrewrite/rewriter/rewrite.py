"""``find_attention`` and ``rewrite``: capture, find, decide, canonicalise, lower, clean up."""

from __future__ import annotations

import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from attnrewrite.errors import InputMismatchError, UnknownVariantError, VariantOptionError
from attnrewrite.passes.base import dead_code_elimination
from attnrewrite.passes.canonicalize import Canonicalize
from attnrewrite.passes.find_attention import FindResult, SiteMatch, find_sites
from attnrewrite.passes.lower import VARIANTS_ATTR, LowerToVariants
from attnrewrite.rewriter.capture import Captured, capture
from attnrewrite.rewriter.report import Report, SiteRow
from attnrewrite.site import AttentionSite
from attnrewrite.variants import get_variant, variant_names
from attnrewrite.variants.base import AttentionVariant

SiteSelector = str | Iterable[str] | Callable[[AttentionSite], bool] | None
VariantSpec = str | Mapping[str, str]


def _prepare(model: Any, args: Any, kwargs: Any) -> tuple[Captured, FindResult]:
    captured = capture(model, args, kwargs)
    gm = captured.graph_module
    dead_code_elimination(gm)  # unused attention weights must not count as escaping
    return captured, find_sites(gm)


def find_attention(
    model: Any, args: Any = None, kwargs: Any = None, *, debug: bool = False
) -> list[AttentionSite]:
    """Every softmax-attention site of ``model``, in graph order.

    Args:
        model: an ``nn.Module``, a ``torch.fx.GraphModule`` or a ``torch.export.ExportedProgram``.
        args, kwargs: example inputs (as for ``model(*args, **kwargs)``).
        debug: print, for every softmax that was not taken as attention, the reason.

    The model is not modified.
    """
    captured, found = _prepare(model, args, kwargs)
    if debug:
        for node, reason in found.rejected:
            print(f"[attnrewrite] {node}: not attention: {reason}")
    return [m.site for m in found.matches]


class RewrittenModel(nn.Module):
    """A model whose attention sites were rewritten. Call it like the original.

    Attributes:
        graph_module: the rewritten ``torch.fx.GraphModule`` (variant modules live under
            ``graph_module.attnrewrite_variants``).
        report: a :class:`~attnrewrite.rewriter.report.Report`, one row per site.
    """

    def __init__(self, graph_module: fx.GraphModule, report: Report, captured: Captured) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.report = report
        self._example_structure = _structure(captured.args, captured.kwargs)
        self._example_args = captured.args
        self._example_kwargs = captured.kwargs

    @property
    def variant_modules(self) -> dict[str, AttentionVariant]:
        holder = getattr(self.graph_module, VARIANTS_ATTR, None)
        if holder is None:
            return {}
        return {m.site.name: m for m in holder.children() if isinstance(m, AttentionVariant)}

    @property
    def example_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self._example_args, self._example_kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.graph_module(*args, **kwargs)
        except Exception as exc:
            got = _structure(args, kwargs)
            if got != self._example_structure:
                raise InputMismatchError(
                    "the rewritten model was called with inputs unlike the captured example: "
                    f"captured {self._example_structure}, got {got}. Call it with the same "
                    "positional/keyword arguments and tensor ranks as the example passed to "
                    "rewrite()."
                ) from exc
            text = str(exc).lower()
            if isinstance(exc, (RuntimeError, AssertionError, ValueError)) and any(
                k in text for k in ("shape", "expected input", "guard failed", "size()")
            ):
                raise InputMismatchError(
                    f"input shapes outside what was captured: {exc}. Dimensions that were "
                    "specialised at capture (see the report's notes) must keep their example size."
                ) from exc
            raise

    def train(self, mode: bool = True) -> RewrittenModel:
        # Exported graph modules refuse train()/eval(); only the variant modules carry a mode.
        self.training = mode
        for module in self.variant_modules.values():
            module.train(mode)
        return self


def _structure(args: Any, kwargs: Any) -> str:
    def one(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"Tensor(rank={x.dim()}, {str(x.dtype).replace('torch.', '')})"
        if isinstance(x, (list, tuple)):
            inner = ", ".join(one(v) for v in x)
            return f"({inner})"
        if isinstance(x, dict):
            return "{" + ", ".join(f"{k}: {one(v)}" for k, v in x.items()) + "}"
        return type(x).__name__

    return f"args={one(tuple(args))}, kwargs={one(dict(sorted((kwargs or {}).items())))}"


def _selected(site: AttentionSite, sites: SiteSelector) -> bool:
    if sites is None:
        return True
    if callable(sites):
        return bool(sites(site))
    patterns = [sites] if isinstance(sites, str) else list(sites)
    return any(fnmatch.fnmatchcase(site.name, p) for p in patterns)


def _variant_for(site: AttentionSite, variant: VariantSpec) -> str | None:
    if isinstance(variant, str):
        return variant
    for pattern, name in variant.items():
        if fnmatch.fnmatchcase(site.name, pattern):
            return name
    return None


def _site_seed(seed: int | None, name: str) -> int | None:
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def _check_options(classes: list[type[AttentionVariant]], options: dict[str, Any]) -> None:
    known = {o for cls in classes for o in cls.option_names()}
    unknown = sorted(set(options) - known)
    if unknown:
        names = ", ".join(sorted({c.name for c in classes}))
        offered = ", ".join(sorted(known)) or "none"
        raise VariantOptionError(
            f"option(s) {', '.join(map(repr, unknown))} are not options of {names}; "
            f"their options are: {offered}"
        )


def rewrite(
    model: Any,
    variant: VariantSpec = "softmax",
    args: Any = None,
    kwargs: Any = None,
    *,
    sites: SiteSelector = None,
    seed: int | None = 0,
    debug: bool = False,
    **options: Any,
) -> RewrittenModel:
    """Rewrite every softmax-attention site of ``model`` into ``variant``.

    Args:
        model: an ``nn.Module``, ``torch.fx.GraphModule`` or ``torch.export.ExportedProgram``.
        variant: a registered variant name (see ``attnrewrite.variants()``), or a dict mapping
            site-name glob patterns to variant names (first match wins; unmatched sites are left).
        args, kwargs: example inputs.
        sites: which sites to rewrite: names, glob patterns, or a predicate on ``AttentionSite``.
        seed: seed for random features/initialisation (each site derives its own).
        debug: lint the graph after every pass, check that the canonical graph (every accepted
            site as exact attention) reproduces the original outputs on the example, and print why
            each softmax that is not a site was rejected.
        **options: variant options (``num_features=``, ``window=``, ``chunk_size=``...), given to
            every chosen variant that declares them.

    Returns:
        A :class:`RewrittenModel`; ``.report`` says what happened to each site. The original model,
        its parameters and buffers are not modified.
    """
    if not isinstance(variant, (str, Mapping)):
        raise UnknownVariantError(
            f"variant must be a name or a {{pattern: name}} dict, got {type(variant).__name__}; "
            f"registered variants: {', '.join(variant_names())}"
        )
    names = [variant] if isinstance(variant, str) else list(dict(variant).values())
    classes = [get_variant(n) for n in names]
    _check_options(classes, options)

    captured, found = _prepare(model, args, kwargs)
    gm = captured.graph_module
    rows: list[SiteRow] = []
    accepted: list[SiteMatch] = []
    modules: dict[str, nn.Module] = {}
    for match in found.matches:
        site = match.site
        name = _variant_for(site, variant) if _selected(site, sites) else None
        if name is None:
            rows.append(SiteRow(site.name, site, "-", "skipped", "not selected"))
            continue
        cls = get_variant(name)
        reason = _refusal(match, cls)
        if reason:
            rows.append(SiteRow(site.name, site, name, "skipped", reason))
            continue
        own = {k: v for k, v in options.items() if k in cls.option_names()}
        modules[site.name] = cls(site, seed=_site_seed(seed, site.name), **own)
        accepted.append(match)
        rows.append(SiteRow(site.name, site, name, "rewritten"))

    if debug:
        for node, reason in found.rejected:
            print(f"[attnrewrite] {node}: not attention: {reason}")
    exact = frozenset(
        m.site.name for m in accepted if getattr(modules[m.site.name], "exact", False)
    )
    canon = Canonicalize(tuple(accepted), dense_masks=exact)(gm)
    failed = canon.stats["failed"]
    if debug:
        gm.graph.lint()
        gm.recompile()
        _check_parity(model, gm, captured)
    for i, row in enumerate(rows):
        if row.name in failed:
            rows[i] = SiteRow(
                row.name,
                row.site,
                row.variant,
                "skipped",
                f"could not canonicalise: {failed[row.name]}",
            )
            modules.pop(row.name, None)
    LowerToVariants(modules)(gm)
    removed = dead_code_elimination(gm)
    gm.graph.lint()
    gm.recompile()
    report = Report(tuple(rows), tuple(captured.notes), (("dead_nodes_removed", removed),))
    return RewrittenModel(gm, report, captured)


def _check_parity(model: Any, gm: fx.GraphModule, captured: Captured) -> None:
    """Debug mode: the canonical graph (exact attention everywhere) must match the original."""
    from torch.utils import _pytree as pytree

    reference = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with torch.no_grad():
        want = pytree.tree_leaves(reference(*captured.args, **captured.kwargs))
        got = pytree.tree_leaves(gm(*captured.args, **captured.kwargs))
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            err = ((a - b).abs().max() / a.abs().max().clamp_min(1e-12)).item()
            if err > 1e-4:
                raise AssertionError(
                    f"canonical graph differs from the original: relative error {err:.2e}"
                )
    print(f"[attnrewrite] debug: canonical graph matches the original ({len(want)} outputs)")


def _refusal(match: SiteMatch, cls: type[AttentionVariant]) -> str | None:
    site = match.site
    if match.canonical_problem:
        return match.canonical_problem
    if site.weights_escape:
        return (
            "the attention probabilities are used elsewhere (e.g. returned with "
            "output_attentions); no variant can reproduce them"
        )
    return cls.refuse(site)
