"""One rank of the distributed calibration tests (run by ``torchrun``, see test_decoder.py).

Every rank builds the same rewritten tiny decoder from saved weights and, for each case (its
options and output folder; one launch runs them all, as starting processes is most of the time),
calibrates a copy of it on the same list of batches (``calibrate`` shards it by rank) and saves
its variant and adapter parameters; ``result.save`` is called on every rank, and only rank 0 may
write. It also saves what the sharding test checks: the most frozen numbers the rewritten model
itself held while its first site ran during calibration, its whole state afterwards, and its
logits on the first batch once the process group is gone, before and after ``merge_lora``.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import attnrewrite as ar
from attnrewrite.bench import byte_lm

#: The rewrite's own modules (trainable); everything else in the rewritten model is frozen.
OWN = ("attnrewrite_variants", "attnrewrite_lora")


def main(weights: str, data: str, cases: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = byte_lm.build_model("tiny")
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    batches = torch.load(data, weights_only=True)
    base = ar.rewrite(model, "hedgehog", kwargs={"input_ids": batches[0]}, window=16, seed=0)
    done = []
    for options, out in json.loads(cases):
        rw = copy.deepcopy(base)
        held: list[int] = []

        def count_frozen(*_: object, rw=rw, held=held) -> None:
            named = rw.graph_module.named_parameters()
            held.append(sum(p.numel() for name, p in named if not name.startswith(OWN)))

        first_site = next(iter(rw.variant_modules.values()))
        hook = first_site.register_forward_hook(count_frozen)
        result = ar.calibrate(rw, batches, progress=False, seed=0, **options)
        hook.remove()
        state = {k: v.detach() for k, v in rw.graph_module.named_parameters() if k.startswith(OWN)}
        torch.save(state, Path(out) / f"parameters-{rank}.pt")
        result.save(Path(out) / f"result-{rank}.json")
        done.append((rw, held, out))
    dist.destroy_process_group()
    for rw, held, out in done:
        after = {"held_while_calibrating": max(held), "state": dict(rw.graph_module.state_dict())}
        with torch.no_grad():
            after["logits"] = rw(input_ids=batches[0]).logits
            after["merged"] = rw.merge_lora()
            after["merged_logits"] = rw(input_ids=batches[0]).logits
        torch.save(after, Path(out) / f"after-{rank}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
