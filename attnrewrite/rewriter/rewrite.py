"""``find_attention`` and ``rewrite``: capture, find, decide, canonicalise, lower, clean up."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from attnrewrite.errors import (
    InputMismatchError,
    ParityError,
    UnknownVariantError,
    VariantOptionError,
)
from attnrewrite.passes.base import AliasClasses, dead_code_elimination, written_nodes
from attnrewrite.passes.canonicalize import Canonicalize
from attnrewrite.passes.find_attention import FindAttention, FindResult, SiteMatch
from attnrewrite.passes.lower import VARIANTS_ATTR, LowerToVariants
from attnrewrite.rewriter.capture import Captured, capture, default_positions
from attnrewrite.rewriter.report import Report, SiteRow, Status
from attnrewrite.site import AttentionSite
from attnrewrite.variants import get_variant, variant_names
from attnrewrite.variants.base import AttentionVariant

SiteSelector = str | Iterable[str] | Callable[[AttentionSite], bool] | None
VariantSpec = str | Mapping[str, str]


def _prepare(model: Any, args: Any, kwargs: Any) -> tuple[Captured, FindResult]:
    captured = capture(model, args, kwargs)
    gm = captured.graph_module
    dead_code_elimination(gm)  # unused attention weights must not count as escaping
    found = FindAttention()(gm)
    result = FindResult(found.stats["matches"], list(found.diagnostics))
    return captured, _refuse_sites_written_in_place(gm, result)


def _refuse_sites_written_in_place(gm: fx.GraphModule, found: FindResult) -> FindResult:
    """Mark sites whose intermediate tensors (scores, probabilities) are written in place.

    The finder reads dataflow; a write into a view of the scores (timm MViTv2 adds its
    relative-position bias into ``attn[:, :, 1:, 1:]``) changes them without being an input of
    the softmax, and canonicalisation would drop it. Such a site is refused with a reason.
    Aliasing is torch's (``AliasClasses``: fake-tensor storages and op schemas).
    """
    nodes = list(gm.graph.nodes)
    writes = {node: written for node in nodes if (written := written_nodes(node))}
    if not writes:
        return found
    position = {node: i for i, node in enumerate(nodes)}
    alias = AliasClasses(nodes)
    matches = []
    for match in found.matches:
        operands = [op.source for op in (match.query, match.key, match.value) if op is not None]
        sources = operands or list(match.anchor.all_input_nodes)
        end = position[match.output]
        inside = _between(sources, match.output, position)
        classes = {alias.find(node) for node in inside | set(sources)}
        # Writes before the score product are read by the model and by the canonical form alike
        # (the canonical q, k, v are read right before the site's output): DeepSeek's MLA fills
        # a preallocated q in place. Only writes after the product can change what the site saw.
        start = position[_score_product(match) or min(sources, key=position.__getitem__)]
        writer = next(
            (
                node
                for node, written in writes.items()
                # A write on the path itself (T5's ``scores += position_bias``) is dataflow the
                # finder analysed; only writes beside the path are hidden from it.
                if start < position[node] < end
                and node not in inside
                and any(alias.find(w) in classes for w in written)
            ),
            None,
        )
        if writer is not None and not match.canonical_problem:
            match = dataclasses.replace(
                match,
                canonical_problem=(
                    f"`{writer.name}` writes in place into a tensor computed inside the site "
                    "(e.g. a bias added into a view of the scores); such writes are not "
                    "analysed, so the site is left as it is"
                ),
            )
        matches.append(match)
    return FindResult(matches, found.rejected)


def _score_product(match: SiteMatch) -> fx.Node | None:
    """The node computing q·kᵀ (the sdpa call itself for sdpa sites)."""
    if match.query is None or match.key is None or match.anchor is match.output:
        return match.anchor if match.anchor is match.output else None
    key = match.key.node
    return next((u for u in match.query.node.users if key in u.all_input_nodes), None)


def _between(sources: list[fx.Node], output: fx.Node, position: dict[fx.Node, int]) -> set[fx.Node]:
    """Nodes on a dataflow path from ``sources`` to ``output``, both ends excluded."""
    start = min(position[s] for s in sources)
    after: set[fx.Node] = set(sources)
    for node in sorted(position, key=position.__getitem__):
        if start < position[node] <= position[output] and any(
            i in after for i in node.all_input_nodes
        ):
            after.add(node)
    before: set[fx.Node] = set()
    pending = [output]
    while pending:
        node = pending.pop()
        if node in before or position[node] < start:
            continue
        before.add(node)
        pending.extend(node.all_input_nodes)
    return (after & before) - set(sources) - {output}


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
        _print_rejected(found)
    return [m.site for m in found.matches]


def _print_rejected(found: FindResult) -> None:
    for r in found.rejected:
        where = f" ({r.module})" if r.module else ""
        print(f"[attnrewrite] {r.node}{where}: not attention: {r.reason}")


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
        self._fixed_kwargs = dict(captured.fixed_kwargs)
        self._default_kwargs = dict(captured.default_kwargs)
        self._shape_guards = captured.guards

    @property
    def variant_modules(self) -> dict[str, AttentionVariant]:
        holder = getattr(self.graph_module, VARIANTS_ATTR, None)
        if holder is None:
            return {}
        return {m.site.name: m for m in holder.children() if isinstance(m, AttentionVariant)}

    @property
    def fixed_kwargs(self) -> dict[str, Any]:
        """Keyword arguments capture fixed because the example left them out (``use_cache``)."""
        return dict(self._fixed_kwargs)

    @property
    def example_inputs(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return self._example_args, self._example_kwargs

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the rewritten graph; inputs outside what was captured raise ``InputMismatchError``.

        Keyword arguments that capture fixed because the example left them out
        (``use_cache=False`` for Hugging Face models, see the report's notes) are filled in;
        asking for another value (``use_cache=True``: decoding with a key/value cache) is refused,
        since the rewritten graph has no cache outputs.
        """
        kwargs = self.complete_kwargs(kwargs)
        if torch.compiler.is_compiling():
            # Under torch.compile, Dynamo guards the inputs itself; the eager checks below are
            # Python it need not trace.
            return self.graph_module(*args, **kwargs)
        # Sizes the graph was specialised to: plain int comparisons, checked before the call so
        # the error names the input, the axis and why it was fixed.
        problem = self._shape_guards.violation(args, kwargs, relations=False)
        if problem is None:
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
                # Which of the capture's shape guards (ranges, relations between sizes) the
                # inputs break, evaluated on the guards themselves rather than the error text.
                problem = self._shape_guards.violation(args, kwargs)
                if problem is None:
                    raise
                raise InputMismatchError(self._shape_message(problem)) from exc
        raise InputMismatchError(self._shape_message(problem))

    @staticmethod
    def _shape_message(problem: str) -> str:
        return (
            f"input shapes outside what was captured: {problem}. The report's notes list every "
            "input axis capture specialised and why; capture again with an example of the sizes "
            "you need on those axes."
        )

    def complete_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """``kwargs`` plus the keyword arguments capture fixed (``use_cache=False``); asking for
        another value of one of them raises :class:`InputMismatchError`. Backends that run
        ``graph_module`` directly (Inductor, ONNX) call this first."""
        if not self._fixed_kwargs and not self._default_kwargs:
            return kwargs
        kwargs = dict(kwargs)
        for name in self._default_kwargs:
            ids = kwargs.get("input_ids")
            if kwargs.get(name) is None and isinstance(ids, torch.Tensor):
                kwargs[name] = default_positions(ids)
        for name, value in self._fixed_kwargs.items():
            given = kwargs.get(name)
            if given is not None and given != value:
                raise InputMismatchError(
                    f"{name}={given!r} is not supported: the model was captured with "
                    f"{name}={value!r} (the example did not pass it), so the rewritten graph "
                    "returns no key/value cache. Call it without "
                    f"{name} (or with {name}={value!r}); to generate token by token, use "
                    "rw.generate(input_ids, attention_mask, max_new_tokens=...)."
                )
            kwargs[name] = value
        return kwargs

    # -- generation ---------------------------------------------------------------------------
    def decoder(self, compiler: Any = None, key: str = "eager"):
        """The :class:`~attnrewrite.rewriter.generate.Decoder` of this model (built once per
        ``key``): prefill and step graphs; raises ``DecodeError`` naming what cannot decode.
        ``compiler`` (applied to both graphs) is how ``attnrewrite.compile`` adds Inductor."""
        from attnrewrite.rewriter.generate import Decoder

        cache = self.__dict__.setdefault("_decoders", {})
        if key not in cache:
            cache[key] = Decoder(self, compiler=compiler)
        return cache[key]

    def generate(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any
    ) -> torch.Tensor:
        """Generate like Hugging Face's ``generate``: the prompt followed by up to
        ``max_new_tokens`` tokens, decoding each site as its variant's recurrence (a key/value
        cache for ``softmax``, constant-size sums for the kernel family, a window for ``local``).

        Options: ``max_new_tokens`` (20), ``do_sample`` (False: greedy), ``temperature``,
        ``top_k``, ``top_p``, ``eos_token_id``, ``pad_token_id``, ``seed``, ``check`` (True:
        the first call checks one step against the parallel forward). Prompts of different
        lengths are padded on the left with ``attention_mask`` zeros.
        """
        return self.decoder().generate(input_ids, attention_mask, **options)

    def stream(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **options: Any
    ):
        """Like :meth:`generate`, as an iterator of (batch,) token tensors, one per step."""
        return self.decoder().stream(input_ids, attention_mask, **options)

    def export(self) -> torch.export.ExportedProgram:
        """The graph as a ``torch.export.ExportedProgram`` on the example inputs, with the batch
        and sequence axes dynamic as at capture: save it with ``torch.export.save``. A canonical
        program (:func:`canonicalize`) keeps its ``attnrewrite::attention`` calls; loading it
        needs ``import attnrewrite`` first (which registers the op)."""
        from attnrewrite.rewriter.capture import _auto_dynamic

        kwargs = self.complete_kwargs(dict(self._example_kwargs))
        args = self._example_args
        with torch.no_grad():
            return torch.export.export(
                self.graph_module,
                args,
                kwargs,
                dynamic_shapes=_auto_dynamic(self.graph_module, args, kwargs),
                strict=False,
            )

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
    check: bool = False,
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
        check: before lowering, run the canonical graph (every accepted site as exact attention)
            on the example next to the captured one and compare each site's output and the
            model's outputs; raise :class:`~attnrewrite.errors.ParityError` naming the sites that
            differ. Costs one extra forward on the example; ``debug`` implies it.
        **options: variant options (``num_features=``, ``window=``, ``chunk_size=``...), given to
            every chosen variant that declares them.

    Returns:
        A :class:`RewrittenModel`; ``.report`` says what happened to each site. The original model,
        its parameters and buffers are not modified.
    """
    return _run(
        model, variant, args, kwargs, sites=sites, seed=seed, debug=debug, check=check, **options
    )


def canonicalize(
    model: Any,
    args: Any = None,
    kwargs: Any = None,
    *,
    sites: SiteSelector = None,
    debug: bool = False,
    check: bool = False,
) -> RewrittenModel:
    """The canonical program of ``model``: every accepted site one call of the canonical op
    ``torch.ops.attnrewrite.attention`` (exact softmax attention on (B, H, N, d) tensors, the site
    as data on the op).

    The result is runnable (call it like the model: it computes what the model computes), printable
    (``print(prog.graph_module.code)``), and saveable: ``torch.export.save(prog.export(), path)``;
    ``import attnrewrite`` registers the op again before ``torch.export.load``. Every site the
    finder refuses stays as the model wrote it, with the reason in ``prog.report``. ``sites``,
    ``debug`` and ``check`` are as for :func:`rewrite`.
    """
    return _run(
        model, "softmax", args, kwargs, sites=sites, seed=0, debug=debug, check=check, lower=False
    )


def _run(
    model: Any,
    variant: VariantSpec,
    args: Any,
    kwargs: Any,
    *,
    sites: SiteSelector,
    seed: int | None,
    debug: bool,
    check: bool,
    lower: bool = True,
    **options: Any,
) -> RewrittenModel:
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
            rows.append(SiteRow(site.name, site, "-", Status.SKIPPED, "not selected"))
            continue
        cls = get_variant(name)
        own = {k: v for k, v in options.items() if k in cls.option_names()}
        reason = _refusal(match, cls, own)
        if reason:
            rows.append(SiteRow(site.name, site, name, Status.SKIPPED, reason))
            continue
        modules[site.name] = cls(site, seed=_site_seed(seed, site.name), **own)
        accepted.append(match)
        if lower:
            rows.append(SiteRow(site.name, site, name, Status.REWRITTEN))
        else:
            rows.append(SiteRow(site.name, site, "attention", Status.CANONICAL))

    if debug:
        _print_rejected(found)
    exact = frozenset(
        m.site.name for m in accepted if getattr(modules[m.site.name], "exact", False)
    )
    canon = Canonicalize(tuple(accepted), dense_masks=exact)(gm)
    failed = canon.stats["failed"]
    if debug or check:
        gm.graph.lint()
        gm.recompile()
        _check_parity(model, gm, captured, canon.stats["outputs"], verbose=debug)
    for i, row in enumerate(rows):
        if row.name in failed:
            rows[i] = SiteRow(
                row.name,
                row.site,
                row.variant,
                Status.SKIPPED,
                f"could not canonicalise: {failed[row.name]}",
            )
            modules.pop(row.name, None)
    if lower:
        LowerToVariants(modules)(gm)
    removed = dead_code_elimination(gm)
    gm.graph.lint()
    gm.recompile()
    report = Report(
        tuple(rows),
        tuple(captured.notes),
        (("dead_nodes_removed", removed),),
        rejected=tuple(found.rejected),
    )
    return RewrittenModel(gm, report, captured)


def _check_parity(
    model: Any,
    gm: fx.GraphModule,
    captured: Captured,
    outputs: Mapping[str, tuple[fx.Node, fx.Node]],
    *,
    verbose: bool = False,
    tolerance: float = 1e-4,
) -> None:
    """The canonical graph (exact attention everywhere) must reproduce the original: each site's
    canonical output against the captured computation it replaced (both still in the graph before
    dead-code elimination), then the model's outputs against ``model`` itself."""
    from torch.fx import _pytree as fx_pytree
    from torch.utils import _pytree as pytree

    kwargs = {**captured.kwargs, **getattr(captured, "fixed_kwargs", {})}
    watched = {node for pair in outputs.values() for node in pair}
    seen: dict[fx.Node, Any] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            result = super().run_node(n)
            if n in watched:
                seen[n] = result
            return result

    spec = getattr(gm, "_in_spec", None)
    flat = (
        fx_pytree.tree_flatten_spec((captured.args, kwargs), spec)
        if spec is not None
        else pytree.tree_leaves((captured.args, kwargs))
    )
    with torch.no_grad():
        Recorder(gm).run(*flat)
    wrong = []
    for name, (before, after) in outputs.items():
        a, b = seen.get(before), seen.get(after)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            err = _relative_error(b, a)
            if not err <= tolerance:
                wrong.append(f"{name} (relative error {err:.2e})")
    if wrong:
        raise ParityError(
            "the canonical form of these sites does not reproduce the model's own computation "
            f"on the example: {', '.join(wrong)}. Please report this (with the model); exclude "
            "the sites with rewrite(..., sites=...) meanwhile."
        )
    reference = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    with torch.no_grad():
        want = pytree.tree_leaves(reference(*captured.args, **kwargs))
        got = pytree.tree_leaves(gm(*captured.args, **kwargs))
    for a, b in zip(want, got):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            err = _relative_error(b, a)
            if not err <= tolerance:
                raise ParityError(
                    "the canonical graph differs from the original model on the example "
                    f"(relative error {err:.2e}) although every site matches: a graph edit "
                    "outside the sites changed the model. Please report this."
                )
    if verbose:
        print(
            f"[attnrewrite] debug: canonical graph matches the original ({len(outputs)} site(s), "
            f"{len(want)} output(s))"
        )


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| over finite entries; non-finite entries must agree."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    finite = torch.isfinite(want)
    if not torch.equal(finite, torch.isfinite(got)):
        return float("inf")
    if not finite.any():
        return 0.0
    diff = (got - want)[finite].abs().max()
    return (diff / want[finite].abs().max().clamp_min(1e-12)).item()


def _refusal(match: SiteMatch, cls: type[AttentionVariant], options: dict[str, Any]) -> str | None:
    site = match.site
    if match.canonical_problem:
        return match.canonical_problem
    if site.weights_escape:
        return (
            "the attention probabilities are used elsewhere (e.g. returned with "
            "output_attentions); no variant can reproduce them"
        )
    if site.attends_over == "channels" and not getattr(cls, "exact", False):
        # A decision, not a limitation: the softmax runs over d channels with tokens contracted,
        # so the site already costs O(N·d²); an approximation would lose accuracy for no saving.
        return (
            "channel attention (softmax over feature channels, tokens contracted) is already "
            "linear in the sequence length; only exact variants are applied to it"
        )
    return cls.refuse(site, options)
