"""save_implant and merge_rows refusing under ZeRO-3 (run by torchrun on 2 ranks, from test_api.py).

    python -m torch.distributed.run --nproc_per_node 2 tests/api_zero3_refusals.py BASE POSITIONS OUT

Each call is made on both ranks, as the API asks; what makes it fail is on one rank only: a NaN in the
part of a layer's rows that rank 1 holds (rank 0's part is finite), or an existing output that rank 1
alone is told not to overwrite. Every rank must come to the same refusal before any gather, and the
ranks must stay in step: the last call, with nothing wrong, must still work. Writes OUT/rank<r>.json:
{case: the UserError's message, or "done"}; the process group's timeout is short so that ranks left out
of step fail the run in seconds rather than hang.
"""

from __future__ import annotations

import json
import sys
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig

import loki_dist
from loki_dist.core import distributed
from loki_dist.core.errors import UserError
from loki_dist.implant.api import implanted_layers


def outcome(call) -> str:
    try:
        call()
    except UserError as err:
        return str(err)
    return "done"


def main(base: str, positions: str, out: Path) -> None:
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    config = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
              "train_micro_batch_size_per_gpu": 1}  # fmt: skip
    keep_alive = HfDeepSpeedConfig(config)  # noqa: F841 - from_pretrained loads into zero.Init shards
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = loki_dist.implant_rows(model, positions)
    trained = model.model.layers[2].mlp.down_proj.trained
    held = trained.ds_tensor.data.view(-1)
    assert held.numel() * 2 >= trained.ds_numel > held.numel(), "each rank holds part of layer 2's rows"
    kept = held.clone()
    results = {}
    if rank == 1:
        held[-1] = float("nan")  # rank 1's last element: inside the rows, rank 0 holds none of it
    results["save_implant: a NaN on rank 1"] = outcome(
        lambda: loki_dist.save_implant(model, out / "nan.safetensors", base=base)
    )
    results["merge_rows: a NaN on rank 1"] = outcome(lambda: loki_dist.merge_rows(model))
    held.copy_(kept)
    results["save_implant: rank 1 alone must not overwrite"] = outcome(
        lambda: loki_dist.save_implant(model, out / "exists.safetensors", base=base, overwrite=rank == 0)
    )
    results["implanted layers after the refusals"] = len(implanted_layers(model))
    results["save_implant: nothing wrong"] = outcome(
        lambda: loki_dist.save_implant(model, out / "good.safetensors", base=base)
    )
    (out / f"rank{rank}.json").write_text(json.dumps(results))
    distributed.shutdown()  # leave the group together: a rank exiting first sometimes aborts (SIGABRT)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
