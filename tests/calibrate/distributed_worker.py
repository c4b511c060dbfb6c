"""One rank of the distributed calibration test (run by ``torchrun``, see test_decoder.py).

Every rank builds the same rewritten tiny decoder from saved weights, calibrates it on the same
list of batches (``calibrate`` shards it by rank), and saves its variant and adapter parameters;
``result.save`` is called on every rank, and only rank 0 may write.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import attnrewrite as ar
from attnrewrite.bench import byte_lm


def main(weights: str, data: str, out: str, options: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = byte_lm.build_model("tiny")
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    batches = torch.load(data, weights_only=True)
    rw = ar.rewrite(model, "hedgehog", kwargs={"input_ids": batches[0]}, window=16, seed=0)
    result = ar.calibrate(rw, batches, progress=False, seed=0, **json.loads(options))
    state = {k: v.detach() for k, v in rw.graph_module.named_parameters() if "attnrewrite" in k}
    torch.save(state, Path(out) / f"parameters-{rank}.pt")
    result.save(Path(out) / f"result-{rank}.json")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
