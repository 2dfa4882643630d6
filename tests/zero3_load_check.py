"""Load models into ZeRO-3 partitions with loki_dist's loader and compare them with transformers' own
whole-model load (run by torchrun; tests/test_loading.py reads what it writes).

    python -m torch.distributed.run --nproc_per_node 2 tests/zero3_load_check.py OUT.json MODEL_DIR...

For each model directory, every rank: loads it with `modeling.load_causal_lm` under a ZeRO-3 config
while metering is on, gathers each parameter and compares it bit for bit with the same parameter of
`AutoModelForCausalLM.from_pretrained` (whole, no DeepSpeed: an independent reading of the files), and
records what its "load" phase received and read. Writes OUT.json.rank<r>.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import deepspeed
import torch
from transformers import AutoModelForCausalLM

from loki_dist.core import distributed, dsconfig, metering
from loki_dist.core.modeling import load_causal_lm


def main(out: str, model_dirs: list[str]) -> None:
    world = distributed.world_from_env()
    distributed.prepare_deepspeed(world)
    config = dsconfig.fill(
        dsconfig.load("zero3"),
        {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
         "train_batch_size": world.size, "bf16.enabled": False},
    )  # fmt: skip
    results = {}
    for model_dir in model_dirs:
        metering._phases.pop("load", None)
        sharded = load_causal_lm(model_dir, torch.float32, config)
        whole = dict(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).named_parameters())
        differ = []
        for name, param in sharded.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                if name not in whole or not torch.equal(param.data.cpu(), whole[name].data):  # any device
                    differ.append(name)
        load = metering.report()["phases"]["load"]
        tied = sharded.get_output_embeddings().weight is sharded.get_input_embeddings().weight
        results[model_dir] = {
            "differ": differ,
            "received": load["received"],
            "read": load["read"],
            "tied": tied,
        }
    Path(f"{out}.rank{world.rank}").write_text(json.dumps(results))
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
