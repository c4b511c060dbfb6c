"""Splitting a captured graph into per-layer stages, and the frozen weights sharded with FSDP2 for
the length of a block (``calibrate(..., shard_frozen=True)``; the two-process run against one
process is in test_decoder.py).

Structural: which stage owns which weight, on small stacks captured with ``torch.export``;
numerical: the staged module computes the same bits; the context: weights released and gathered
back bit for bit, also when calibration diverges, and a model that could not be gathered back
refuses to run."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from attnrewrite.calibrate.distributed import Ranks
from attnrewrite.calibrate.sharding import layer_stages, sharded_frozen, split_into_layers
from attnrewrite.errors import CalibrationDivergedError, CalibrationError

WIDTH = 16


class Block(nn.Module):
    def __init__(self, experts: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)
        self.experts = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(experts))

    def forward(self, x: torch.Tensor, mixer: torch.Tensor | None = None) -> torch.Tensor:
        h = self.proj(self.norm(x))
        if mixer is not None:
            h = h + x @ mixer
        for expert in self.experts:
            h = h + expert(h)
        return x + h


class Stack(nn.Module):
    """An embedding, ``layers`` blocks in a ModuleList, and an output projection: ``"linear"``,
    ``"transposed"`` (``h @ W.t()``, a view of the weight) or ``"tied"`` (the embedding's weight);
    with ``mixer``, every layer also reads one view (a transpose) of a weight of the stack's own."""

    def __init__(
        self, layers: int, experts: int = 0, head: str = "linear", mixer: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(8, WIDTH, bias=False)
        self.mixer = nn.Parameter(torch.empty(WIDTH, WIDTH)) if mixer else None
        self.layers = nn.ModuleList(Block(experts) for _ in range(layers))
        self.head = nn.Linear(WIDTH, 8, bias=False)
        self.kind = head
        if head == "tied":
            del self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        mixer = None if self.mixer is None else self.mixer.t()
        for layer in self.layers:
            h = layer(h, mixer)
        if self.kind == "tied":
            return h @ self.embed.weight
        if self.kind == "transposed":
            return h @ self.head.weight.t()
        return self.head(h)


def captured(model: nn.Module) -> torch.fx.GraphModule:
    torch.manual_seed(0)
    for parameter in model.parameters():
        nn.init.normal_(parameter)
    return torch.export.export(model.eval(), (torch.randn(2, 5, 8),)).module()


def owners(staged: torch.fx.GraphModule) -> dict[str, str]:
    """Parameter name (dots as underscores) -> the stage owning it, ``"outer"`` for the outer
    module."""
    found = {}
    for name, _ in staged.named_parameters():
        stage, _, rest = name.partition(".")
        if stage in staged.meta["partition_names"]:
            found[rest] = stage
        else:
            found[name.replace(".", "_")] = "outer"
    return found


#: name -> (model, stages, some parameters and the stage that must own them).
CASES = {
    "three layers, the embedding and head join their neighbours": (
        lambda: Stack(3),
        3,
        {"embed_weight": "submod_0", "layers_1_proj_weight": "submod_1", "head_weight": "submod_2"},
    ),
    "experts inside a layer do not split it": (
        lambda: Stack(2, experts=3),
        2,
        {"layers_0_experts_2_weight": "submod_0", "layers_1_experts_0_bias": "submod_1"},
    ),
    "a view of a weight, computed where it is used, goes with it": (
        lambda: Stack(2, head="transposed"),
        2,
        {"head_weight": "submod_1", "embed_weight": "submod_0"},
    ),
    "a view of a weight read by two layers keeps the weight out of both": (
        lambda: Stack(2, mixer=True),
        2,
        {"mixer": "outer", "head_weight": "submod_1"},
    ),
    "a weight tied across stages stays with the outer module": (
        lambda: Stack(2, head="tied"),
        2,
        {"embed_weight": "outer", "layers_1_norm_bias": "submod_1"},
    ),
    "one layer is no repetition: a single stage": (
        lambda: Stack(1),
        1,
        {"embed_weight": "submod_0", "layers_0_proj_weight": "submod_0"},
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_split_into_layers(case: str) -> None:
    build, stages, expected = CASES[case]
    gm = captured(build())
    assert len(set(layer_stages(gm.graph).values())) == stages
    staged = split_into_layers(gm)
    assert len(staged.meta["partition_names"]) == stages
    found = owners(staged)
    assert {name: found.get(name) for name in expected} == expected
    # Every weight is held once, shared (not copied) with the captured module.
    assert sorted(map(id, staged.parameters())) == sorted(map(id, gm.parameters()))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert torch.equal(staged(x), gm(x))


@pytest.fixture
def group_of_one(tmp_path):
    """A gloo process group of one rank in this process (FSDP2 needs one to shard)."""
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield Ranks(0, 1)
    dist.destroy_process_group()


def frozen(gm: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in gm.named_parameters()}


def test_weights_are_released_while_sharded_and_gathered_back_bit_for_bit(group_of_one) -> None:
    gm = captured(Stack(3, head="tied"))
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        want = gm(x)
    before, identities = frozen(gm), list(map(id, gm.parameters()))
    with torch.no_grad(), sharded_frozen(gm, [], group_of_one) as sharding:
        assert all(p.numel() == 0 for p in gm.parameters())
        assert torch.equal(gm(x), want)
    assert sharding.stages == 3 and sharding.shared == 8 * WIDTH
    assert sharding.held == (sharding.parameters,) == (sum(t.numel() for t in before.values()),)
    assert list(map(id, gm.parameters())) == identities
    assert all(torch.equal(p, before[name]) for name, p in gm.named_parameters())
    assert "forward" not in gm.__dict__
    with torch.no_grad():
        assert torch.equal(gm(x), want)


def test_divergence_gathers_back_and_any_other_error_leaves_a_model_that_says_so(
    group_of_one,
) -> None:
    gm = captured(Stack(2))
    before = frozen(gm)
    with pytest.raises(CalibrationDivergedError), sharded_frozen(gm, [], group_of_one):
        raise CalibrationDivergedError("loss is nan", site="layers.0", step=1)
    assert all(torch.equal(p, before[name]) for name, p in gm.named_parameters())
    with pytest.raises(KeyboardInterrupt), sharded_frozen(gm, [], group_of_one):
        raise KeyboardInterrupt  # may be one rank's alone: no collective to gather back with
    with pytest.raises(CalibrationError, match="rewrite the original model again"):
        gm(torch.randn(2, 5, 8))
