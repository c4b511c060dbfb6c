"""The frozen weights sharded with FSDP2 while calibrating under ``torch.distributed``
(``calibrate(..., shard_frozen=True)``).

Calibration trains only the variants' parameters and the LoRA adapters; the rewritten model's own
copy of the original weights is frozen, yet without this option every rank holds all of it for the
whole call. With it, and a default process group of W > 1 ranks, for the duration of the call:

1. **split** (:func:`split_into_layers`): the rewritten graph is cut into one stage per repeated
   block (a transformer layer), read from the ``nn_module_stack`` metadata capture leaves on every
   node; a node outside any block (final norm, the rewrite's own layout nodes and variant calls)
   joins the latest stage its inputs come from, and one that reads only the model's inputs and
   weights (embedding, rotary tables) joins its first user's (:func:`layer_stages`). Every
   parameter read by one stage only, directly or through views, becomes that stage's own; one
   read by several (tied input and output embeddings) stays with the whole model;
2. **shard**: each stage, then the whole staged model, is given to ``fully_shard`` (FSDP2) over a
   one-dimensional mesh of all ranks, with the variant modules' and adapters' parameters left out
   (``ignored_params``): they stay plain tensors, replicated, whose gradients
   :meth:`~attnrewrite.calibrate.distributed.Ranks.sum_gradients` sums as before. The frozen
   weights are held as DTensor shards, 1/W of each per rank, and a stage's are all-gathered only
   while it runs (forward, and again in the backward of the end-to-end and LoRA stages);
3. **release**: the rewritten model's full copies of those weights are released (each parameter
   keeps its identity, with an empty tensor for data), and its graph module runs the staged one;
4. **gather back** when the call returns (or raises
   :class:`~attnrewrite.errors.CalibrationDivergedError`, which every rank raises together): every
   released parameter gets its full value again, bit for bit (an all-gather copies, it does not
   compute), and the graph module runs its own graph. The staged model is dropped, so ``rw(...)``,
   ``rw.state_dict()`` and ``rw.merge_lora()`` work afterwards as without the option, in this
   process or another.

The numbers are exact: a stage computes what the same nodes compute in the unsplit graph, from
the same weights, so the option changes memory, not results. The mesh is on the device type of
the frozen weights (``cpu`` with gloo, ``cuda`` with NCCL; each rank's model on its own device).

Limits:

- each rank holds the full rewritten model before the call and after it (``rewrite`` gives it a
  full copy); the option lowers the memory *during* calibration, where the recorded site calls
  and the activations are held, not the memory needed to build the model;
- one stage's frozen weights are gathered in full while it runs: one layer must fit, plus the
  weights several stages read (tied embeddings), which stay gathered for the whole forward;
- buffers are not sharded (FSDP2 shards parameters only);
- a graph without repeated blocks is one stage: sharded at rest, gathered whole for every forward
  (a warning says so);
- an exception other than ``CalibrationDivergedError`` may come from one rank only, where an
  all-gather would wait forever for the others: the weights are then not gathered back, and the
  rewritten model refuses to run (rewrite the original model again; it is untouched).
"""

from __future__ import annotations

import contextlib
import copy
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.fx.passes.split_module import split_module

from attnrewrite.calibrate.distributed import Ranks
from attnrewrite.calibrate.lora import LORA_ATTR
from attnrewrite.calibrate.result import FrozenSharding
from attnrewrite.errors import CalibrationDivergedError, CalibrationError
from attnrewrite.passes.graph import fetch_attr, set_attr
from attnrewrite.passes.lower import VARIANTS_ATTR

#: A module path that ends in an index: ``model.layers.3`` (torch.export) or
#: ``L['self'].model.layers[3]`` (Dynamo); the parent and the index.
_INDEXED = re.compile(r"^(?P<parent>.*?)(?:\.(?P<dotted>\d+)|\[(?P<bracketed>\d+)\])$")


# -- splitting the graph into layers ---------------------------------------------------------------


def _indexed(path: str) -> tuple[str, str] | None:
    """(parent, index) of a module path that ends in an index (an entry of a ``ModuleList``)."""
    found = _INDEXED.match(path)
    if found is None:
        return None
    return found["parent"], found["dotted"] or found["bracketed"]


def _stack_entries(node: fx.Node) -> list[tuple[str, Any]]:
    """The node's ``nn_module_stack``, outermost first: (module path, module type)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(entry[0], entry[1]) for entry in stack.values() if isinstance(entry, tuple)]


def _repeated_blocks(graph: fx.Graph) -> set[str]:
    """Module paths of repeated blocks: entries of a container (``layers.0``, ``layers.1``) of
    which at least two of the same type run in the graph."""
    paths: dict[tuple[str, Any], set[str]] = {}
    for node in graph.nodes:
        for path, kind in _stack_entries(node):
            parent = _indexed(path)
            if parent is not None:
                paths.setdefault((parent[0], kind), set()).add(path)
    return {path for group in paths.values() if len(group) > 1 for path in group}


def layer_stages(graph: fx.Graph) -> dict[fx.Node, int]:
    """The stage of every computing node (not placeholders, attributes or the output).

    A node inside a repeated block (its outermost one: a layer, not an expert inside it) takes
    the block's stage, numbered in order of first use, and no node runs before the latest stage
    of its inputs, so stages only pass values forward. A node outside every block takes the
    latest stage of its inputs; one that reads only the model's inputs and attributes (an
    embedding, rotary tables, a transposed weight) takes the stage of its first user, so it is
    computed where it is needed.
    """
    blocks = _repeated_blocks(graph)
    numbers: dict[str, int] = {}
    stages: dict[fx.Node, int] = {}
    floating = []
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output"):
            continue
        block = next((path for path, _ in _stack_entries(node) if path in blocks), None)
        own = [] if block is None else [numbers.setdefault(block, len(numbers))]
        inputs = [stages[n] for n in node.all_input_nodes if n in stages]
        if own or inputs:
            stages[node] = max(own + inputs)
        else:
            floating.append(node)
    last = max(stages.values(), default=0)
    # In reverse, so that a floating node's users are placed before it.
    for node in reversed(floating):
        users = [last if user.op == "output" else stages[user] for user in node.users]
        stages[node] = min(users, default=0)
    return stages


def split_into_layers(gm: fx.GraphModule) -> fx.GraphModule:
    """A module computing what ``gm`` computes, whose children ``submod_<i>`` are its stages
    (:func:`layer_stages`), each owning the parameters and buffers only it reads, shared (not
    copied) with ``gm``. Takes the same arguments and returns the same structure as ``gm``."""
    stages = layer_stages(gm.graph)
    owners = _attribute_owners(gm, stages)
    staged = split_module(gm, gm, stages.__getitem__, keep_original_order=True)
    _move_attributes_into_stages(staged, owners)
    # torch.export's graph modules take and return pytrees (keyword arguments, a ModelOutput):
    # the split graph takes the same flat placeholders, so the same codegen applies.
    staged.graph._codegen = copy.copy(gm.graph._codegen)
    staged.recompile()
    return staged


def _is_view(node: fx.Node) -> bool:
    """Whether the node's value may share memory with an input (its ATen schema says so)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:  # an element of split/unbind's list of views
        return isinstance(node.args[0], fx.Node) and _is_view(node.args[0])
    schema = getattr(node.target, "_schema", None)
    return schema is not None and any(ret.alias_info is not None for ret in schema.returns)


def _attribute_owners(gm: fx.GraphModule, stages: dict[fx.Node, int]) -> dict[str, int]:
    """For each tensor attribute read by one stage only, that stage, by attribute name.

    A stage's parameters are gathered only while it runs, so neither they nor a view of them
    (a transpose, a slice) may reach another stage: an attribute read by several stages, directly
    or through views, stays with the outer module, gathered for the whole forward. Attributes
    naming the same tensor (tied weights) go together."""
    readers: dict[int, set[int]] = {}
    targets: dict[int, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or not isinstance(fetch_attr(gm, node.target), Tensor):
            continue
        key = id(fetch_attr(gm, node.target))
        targets.setdefault(key, []).append(node.target)
        found = readers.setdefault(key, set())
        frontier = [node]
        while frontier:
            value = frontier.pop()
            for user in value.users:
                found.add(stages.get(user, -1))  # -1: the output node (a returned weight)
                if _is_view(user):
                    frontier.append(user)
    return {
        target: next(iter(found))
        for key, found in readers.items()
        if len(found) == 1 and -1 not in found
        for target in targets[key]
    }


def _move_attributes_into_stages(staged: fx.GraphModule, owners: dict[str, int]) -> None:
    """``split_module`` leaves every tensor attribute on the outer module and passes it to the
    stages as an argument: give each one ``owners`` names to its stage, so that ``fully_shard``
    on the stage shards it and gathers it only while the stage runs."""
    values = {
        n.target: fetch_attr(staged, n.target) for n in staged.graph.nodes if n.op == "get_attr"
    }
    changed = set()
    for node in list(staged.graph.nodes):
        if node.op != "get_attr" or node.target not in owners:
            continue
        (call,) = node.users
        stage = staged.get_submodule(call.target)
        placeholders = [n for n in stage.graph.nodes if n.op == "placeholder"]
        index = next(i for i, value in enumerate(call.args) if value is node)
        name = node.target.replace(".", "_")
        set_attr(stage, name, values[node.target])
        with stage.graph.inserting_after(placeholders[-1]):
            attribute = stage.graph.get_attr(name)
        attribute.meta = dict(placeholders[index].meta)
        placeholders[index].replace_all_uses_with(attribute)
        stage.graph.erase_node(placeholders[index])
        call.args = call.args[:index] + call.args[index + 1 :]
        staged.graph.erase_node(node)
        changed.add(stage)
    for stage in changed:
        stage.graph.lint()
        stage.recompile()
    for target in owners.keys() & values.keys():
        holder, _, attr = target.rpartition(".")
        delattr(staged.get_submodule(holder), attr)
    staged.delete_all_unused_submodules()  # the holders of the moved attributes, now empty
    staged.graph.lint()
    staged.recompile()


# -- sharding --------------------------------------------------------------------------------------


def replicated_parameters(gm: fx.GraphModule) -> list[nn.Parameter]:
    """The parameters calibration may train: the variant modules' and the LoRA adapters'."""
    holders = [getattr(gm, name, None) for name in (VARIANTS_ATTR, LORA_ATTR)]
    return [p for holder in holders if holder is not None for p in holder.parameters()]


@contextlib.contextmanager
def sharded_frozen(
    gm: fx.GraphModule, trainable: Iterable[nn.Parameter], ranks: Ranks
) -> Iterator[FrozenSharding]:
    """Within the block, ``gm``'s frozen parameters are sharded over the ranks (see the module
    docstring); ``trainable`` and the variants' and adapters' parameters stay replicated."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    keep = {id(p) for p in [*replicated_parameters(gm), *trainable]}
    staged = split_into_layers(gm)
    stages = [staged.get_submodule(name) for name in sorted(staged.meta["partition_names"])]
    units = _frozen_by_unit([*stages, staged], keep)
    frozen = {id(p): p for named in units.values() for _, p in named}
    if len([unit for unit in units if unit is not staged]) < 2:
        warnings.warn(
            "shard_frozen: no repeated layers were found in the rewritten graph's module "
            "metadata, so the frozen weights are gathered whole for every forward (sharded only "
            "between forwards)",
            stacklevel=5,
        )
    if not frozen:
        yield FrozenSharding(0, 0, (0,) * ranks.world, 0, 0)
        return
    for named in units.values():
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) > 1:
            # FSDP2 gathers a unit's parameters in one flat buffer of one dtype.
            raise CalibrationError(
                "shard_frozen: one layer of the rewritten model holds frozen weights of several "
                f"dtypes ({', '.join(sorted(map(str, dtypes)))}), which FSDP2 cannot gather "
                "together; cast the model to one dtype before rewrite(), or calibrate without "
                "shard_frozen"
            )
    mesh = init_device_mesh(next(iter(frozen.values())).device.type, (ranks.world,))
    ignored = {p for p in staged.parameters() if id(p) in keep}
    for unit in units:  # the stages first: the outer module then manages only what is left
        fully_shard(unit, mesh=mesh, ignored_params=ignored)
    # FSDP2 puts each shard where the parameter was, under the same name.
    shards = {id(p): fetch_attr(unit, name) for unit, named in units.items() for name, p in named}
    sizes = [
        sum(p.numel() for _, p in named) for unit, named in units.items() if unit is not staged
    ]
    sharding = FrozenSharding(
        stages=len(sizes),
        parameters=sum(p.numel() for p in frozen.values()),
        held=tuple(int(n) for n in ranks.each(sum(s.to_local().numel() for s in shards.values()))),
        largest_stage=max(sizes, default=0),
        shared=sum(p.numel() for _, p in units.get(staged, [])),
    )
    with torch.no_grad():
        for parameter in frozen.values():
            parameter.data = parameter.data.new_empty(0)
    gm.forward = _running(staged)
    try:
        yield sharding
    except CalibrationDivergedError:
        _gather_back(gm, frozen, shards)
        raise
    except BaseException:
        gm.forward = _released
        raise
    _gather_back(gm, frozen, shards)


def _frozen_by_unit(
    units: list[nn.Module], keep: set[int]
) -> dict[nn.Module, list[tuple[str, nn.Parameter]]]:
    """Each unit's frozen parameters (not in ``keep``), by name within it; a parameter goes to the
    first unit holding it (the stages come before the outer module). Units without any are left
    out."""
    found: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
    seen: set[int] = set()
    for unit in units:
        for name, parameter in unit.named_parameters():
            if id(parameter) not in keep and id(parameter) not in seen:
                seen.add(id(parameter))
                found.setdefault(unit, []).append((name, parameter))
    return found


def _running(staged: fx.GraphModule) -> Callable[..., Any]:
    # A plain function, not the module itself: assigning a module to an attribute would register
    # it as a submodule (and its shards in the rewritten model's state_dict).
    def forward(*args: Any, **kwargs: Any) -> Any:
        return staged(*args, **kwargs)

    return forward


def _released(*args: Any, **kwargs: Any) -> Any:
    raise CalibrationError(
        "this rewritten model's frozen weights were released by a calibration with "
        "shard_frozen=True that was interrupted, and could not be gathered back; rewrite the "
        "original model again (it is untouched)"
    )


def _gather_back(
    gm: fx.GraphModule, frozen: dict[int, nn.Parameter], shards: dict[int, Tensor]
) -> None:
    """Every released parameter's full value again, from the shards (an all-gather each, in the
    same order on every rank)."""
    with torch.no_grad():
        for key, parameter in frozen.items():
            parameter.data = shards[key].full_tensor()
    del gm.forward
