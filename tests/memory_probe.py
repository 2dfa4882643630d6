"""Run under torchrun: the bytes of a real DeepSpeed ZeRO-3 bf16 engine's model states on each rank.

After one training step, for full fine-tuning and for masked LoKI (only down_proj trainable), it sums
the real tensors the engine keeps per rank: the 16-bit parameter partitions, the 16-bit gradient
partition buffer plus the largest fp32 gradient copy of an optimizer sub-group made during the step, and
the fp32 master partitions plus Adam's moments. Usage: memory_probe.py OUT_DIR.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from loki_dist.tiny import build_model

TINY = dict(num_layers=2, hidden_size=64, intermediate_size=176, vocab_size=512, num_heads=4, num_kv_heads=2)
DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "bf16": {"enabled": True},
    # threshold 0: shard every parameter (the default keeps modules under 1e5 elements whole per rank)
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "zero_force_ds_cpu_optimizer": False,
    "steps_per_print": 10**9,
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(method: str) -> dict[str, int]:
    import deepspeed

    model = build_model("llama", **TINY).to(torch.bfloat16).train()
    if method == "loki_masked":
        model.requires_grad_(False)
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(trainable, lr=1e-3), config=DS_CONFIG
    )
    tokens = torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))
    zero = engine.optimizer
    step_copies = []  # the fp32 gradient of each optimizer sub-group, made during the step
    prepare = zero._prepare_fp32_grad_for_sub_group

    def spy(sub_group: int) -> None:
        prepare(sub_group)
        step_copies.append(zero.fp32_partitioned_groups_flat[sub_group].grad)

    zero._prepare_fp32_grad_for_sub_group = spy
    engine.backward(engine(input_ids=tokens, labels=tokens).loss)
    engine.step()
    state = [t for s in zero.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "parameters": _bytes(p.ds_tensor for p in engine.module.parameters()),
        "gradients": _bytes([zero.grad_partitions_flat_buffer]) + max(_bytes([g]) for g in step_copies),
        "optimizer_state": _bytes(zero.fp32_partitioned_groups_flat) + _bytes(state),
    }


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    result = {method: measure(method) for method in ("full", "loki_masked")}
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
