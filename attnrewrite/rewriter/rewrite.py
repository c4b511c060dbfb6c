"""``find_attention`` and ``rewrite``: capture, find, decide, canonicalise, lower, clean up."""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, ClassVar

import torch
from torch import fx, nn

from attnrewrite.errors import (
    InputMismatchError,
    ParityError,
    UnknownVariantError,
    VariantOptionError,
)
from attnrewrite.passes.base import PassResult
from attnrewrite.passes.canonicalize import Canonicalize
from attnrewrite.passes.find_attention import FindAttention, SiteMatch
from attnrewrite.passes.lower import VARIANTS_ATTR, LowerToVariants
from attnrewrite.passes.pipeline import DeadCodeElimination, Named, Pass, Pipeline
from attnrewrite.rewriter.capture import Captured, capture, default_positions
from attnrewrite.rewriter.report import Report, SiteRow, Status
from attnrewrite.site import AttentionSite, Rejected
from attnrewrite.variants import get_variant, variant_names
from attnrewrite.variants.base import AttentionVariant

SiteSelector = str | Iterable[str] | Callable[[AttentionSite], bool] | None
VariantSpec = str | Mapping[str, str]


#: What ``find_attention`` runs, and the start of every rewrite: dead-code elimination first (so
#: unused attention weights do not count as escaping), then the finder.
FIND_PASSES: tuple[Pass, ...] = (Named(DeadCodeElimination(), "dce-before-find"), FindAttention())


def _pipeline(
    model: Any, captured: Captured, select: SelectVariants, *, lower: bool, check: bool, debug: bool
) -> Pipeline:
    """The rewrite, declared once: find → decide → canonicalise → (check) → lower → clean up.

    ``ar.canonicalize`` is the same pipeline without ``lower``; ``check``/``debug`` add the parity
    check of the canonical graph against the original (run before lowering, while the replaced
    nodes are still in the graph).
    """
    return Pipeline(
        (
            *FIND_PASSES,
            select,
            Canonicalize(),
            *((CheckParity(model, captured, verbose=debug),) if check or debug else ()),
            *((LowerToVariants(),) if lower else ()),
            DeadCodeElimination(),
        ),
        lint=debug,
    )


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
    found = Pipeline(FIND_PASSES)(capture(model, args, kwargs).graph_module)
    if debug:
        _print_rejected(found.diagnostics)
    return [m.site for m in found["find"].stats["matches"]]


def _print_rejected(rejected: Iterable[Rejected]) -> None:
    for r in rejected:
        if r.stage in ("find", "find-error"):
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
    def lora_adapters(self) -> dict[str, nn.Module]:
        """The low-rank adapters ``calibrate(..., lora_rank=r)`` inserted on the attention
        projections, by name (each says its site, role and target weight); empty without."""
        from attnrewrite.calibrate.lora import adapters

        return adapters(self.graph_module)

    def merge_lora(self) -> int:
        """Fold the LoRA adapters into this model's own projection weights (W + scale · B A) and
        drop their extra matmuls, e.g. before export. The original model is not touched (the
        rewritten model holds private copies of its parameters). Returns how many were merged."""
        from attnrewrite.calibrate.lora import merge

        merged = merge(self.graph_module)
        self.__dict__.pop("_decoders", None)
        return merged

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

    captured = capture(model, args, kwargs)
    select = SelectVariants(variant, sites, seed, options, lower)
    done = _pipeline(model, captured, select, lower=lower, check=check, debug=debug)(
        captured.graph_module
    )
    if debug:
        _print_rejected(done.diagnostics)
    failed = done["canonicalize"].stats["failed"]
    rows = [
        dataclasses.replace(
            r, status=Status.SKIPPED, reason=f"could not canonicalise: {failed[r.name]}"
        )
        if r.name in failed
        else r
        for r in done["select"].stats["rows"]
    ]
    report = Report(
        tuple(rows),
        tuple(captured.notes),
        (("dead_nodes_removed", done["dce"].stats["removed"]),),
        rejected=tuple(d for d in done.diagnostics if d.stage != "canonicalize"),
    )
    return RewrittenModel(done.graph_module, report, captured)


@dataclasses.dataclass(frozen=True)
class SelectVariants:
    """Decide per site (the policy; the graph is not changed): which variant, or why none.

    Reads the ``find`` pass's matches. ``stats``: ``rows`` (one report row per site),
    ``accepted`` (the matches to canonicalise), ``modules`` (site name -> variant module),
    ``exact`` (sites whose variant is exact: they keep the model's dense mask).
    """

    name: ClassVar[str] = "select"
    variant: VariantSpec
    sites: SiteSelector
    seed: int | None
    options: Mapping[str, Any]
    lower: bool = True

    def __call__(self, gm: fx.GraphModule, results: Mapping[str, PassResult]) -> PassResult:
        rows: list[SiteRow] = []
        accepted: list[SiteMatch] = []
        modules: dict[str, nn.Module] = {}
        for match in results["find"].stats["matches"]:
            site = match.site
            name = _variant_for(site, self.variant) if _selected(site, self.sites) else None
            if name is None:
                rows.append(SiteRow(site.name, site, "-", Status.SKIPPED, "not selected"))
                continue
            cls = get_variant(name)
            own = {k: v for k, v in self.options.items() if k in cls.option_names()}
            reason = _refusal(match, cls, own)
            if reason:
                rows.append(SiteRow(site.name, site, name, Status.SKIPPED, reason))
                continue
            modules[site.name] = cls(site, seed=_site_seed(self.seed, site.name), **own)
            accepted.append(match)
            if self.lower:
                rows.append(SiteRow(site.name, site, name, Status.REWRITTEN))
            else:
                rows.append(SiteRow(site.name, site, "attention", Status.CANONICAL))
        exact = frozenset(n for n, m in modules.items() if getattr(m, "exact", False))
        stats = {"rows": rows, "accepted": tuple(accepted), "modules": modules, "exact": exact}
        return PassResult(gm, False, stats)


@dataclasses.dataclass(frozen=True)
class CheckParity:
    """Run the canonical graph on the example next to the captured computation it replaced
    (``canonicalize``'s ``outputs``) and the model; raise ``ParityError`` naming what differs."""

    name: ClassVar[str] = "check"
    model: Any
    captured: Captured
    verbose: bool = False

    def __call__(self, gm: fx.GraphModule, results: Mapping[str, PassResult]) -> PassResult:
        gm.recompile()
        outputs = results["canonicalize"].stats["outputs"]
        _check_parity(self.model, gm, self.captured, outputs, verbose=self.verbose)
        return PassResult(gm, False, {"checked": len(outputs)})


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
                # a copy: a later in-place op (Nyströmformer's ``context += conv(v)`` on the
                # site's output) must not change what was recorded
                seen[n] = result.clone() if isinstance(result, torch.Tensor) else result
            return result

    spec = getattr(gm, "_in_spec", None)
    flat = (
        fx_pytree.tree_flatten_spec((captured.args, kwargs), spec)
        if spec is not None
        else pytree.tree_leaves((captured.args, kwargs))
    )
    with torch.no_grad(), _same_draws():
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
        with _same_draws():
            want = pytree.tree_leaves(reference(*captured.args, **kwargs))
        with _same_draws():
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


@contextlib.contextmanager
def _same_draws() -> Iterator[None]:
    """Run with the global RNG at one fixed seed, restored afterwards: models that draw random
    numbers in eval mode (MAE's random patch masking) draw the same in the model and the graph."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| over finite entries; non-finite entries must agree, except
    where ``want`` is NaN: a query whose keys are all masked gets NaN from a hand-written softmax
    and zeros from sdpa and the canonical op, and the NaN spreads from there (a model output that
    is NaN at the example is undefined there, not a value to reproduce)."""
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    undefined = torch.isnan(want)
    if undefined.any():
        got, want = got.masked_fill(undefined, 0.0), want.masked_fill(undefined, 0.0)
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
