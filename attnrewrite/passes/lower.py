"""Lower: replace each canonical ``attention`` node by a call of its variant module.

Reads: canonical ``torch.ops.attnrewrite.attention`` nodes (their :class:`AttentionSite` from
:func:`attnrewrite.ops.site_of`) and a mapping site name -> variant module. Changes: registers each
module on the graph module under ``attnrewrite_variants.<site>`` (so its parameters and buffers are
in ``state_dict()``) and swaps the node for a ``call_module`` on the same q, k, v, mask, causal and
scale. Canonical nodes without a module stay, and
compute exact softmax attention.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, ClassVar

from torch import fx, nn

from attnrewrite.ops import is_attention, operands, site_of
from attnrewrite.passes.base import PassResult

VARIANTS_ATTR = "attnrewrite_variants"


def module_key(site_name: str) -> str:
    """A submodule name for a site: its path with every non-identifier character as ``_``."""
    key = re.sub(r"\W", "_", site_name).strip("_") or "root"
    return key if not key[0].isdigit() else f"site_{key}"


@dataclasses.dataclass(frozen=True)
class LowerToVariants:
    """Swap canonical nodes for their variant modules (site name -> module; in a pipeline, by
    default the ``select`` pass's ``modules``). Canonical nodes without a module stay."""

    name: ClassVar[str] = "lower"
    modules: dict[str, nn.Module] | None = None

    def __call__(self, gm: fx.GraphModule, results: Mapping[str, Any] | None = None) -> PassResult:
        modules = self.modules
        if modules is None:
            modules = results["select"].stats["modules"] if results and "select" in results else {}
        holder = getattr(gm, VARIANTS_ATTR, None)
        if holder is None:
            holder = nn.Module()
            gm.add_module(VARIANTS_ATTR, holder)
        lowered = 0
        for node in list(gm.graph.nodes):
            if not is_attention(node):
                continue
            site = site_of(node)
            module = modules.get(site.name)
            if module is None:
                continue
            key = module_key(site.name)
            holder.add_module(key, module)
            with gm.graph.inserting_before(node):
                args = operands(node)
                new = gm.graph.call_module(
                    f"{VARIANTS_ATTR}.{key}",
                    (args["query"], args["key"], args["value"]),
                    {"mask": args["mask"], "causal": args["causal"], "scale": args["scale"]},
                )
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            lowered += 1
        return PassResult(gm, lowered > 0, {"lowered": lowered})
