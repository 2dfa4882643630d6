"""Run under torchrun: the bytes of real DeepSpeed ZeRO-3 bf16 engines' model states on each rank.

After one training step it sums the real tensors the engine keeps per rank: the 16-bit parameter
partitions, the 16-bit gradient partition buffer plus the largest fp32 gradient copy of an optimizer
sub-group made during the step, and the fp32 master partitions plus Adam's moments. Full fine-tuning is
a plain engine over the whole model; LoKI is loki_dist's own Trainer (`loki-dist train`'s model loading,
freezing, row layout and update), once per row layout: masked (the whole down_proj trains, unselected
rows' gradients zeroed), split (the selected rows as their own parameter) and LoKI* (their update A B
of rank STAR_RANK, `--lora-rank`).
Usage: memory_probe.py OUT_DIR, where OUT_DIR holds base/ (TINY), positions.json and data.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from loki_dist.demo.tiny import build_model

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
STAR_RANK = 4
# method: `loki-dist train` flags of its layout
LAYOUTS = {
    "loki_masked": ["--row-params", "masked"],
    "loki_compact": ["--row-params", "split"],
    "loki_star": ["--lora-rank", str(STAR_RANK)],
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _states_after(engine, step) -> dict[str, int]:
    """Run `step()` (one forward, backward and update), then the bytes of the engine's model states."""
    zero = engine.optimizer
    step_copies = []  # the fp32 gradient of each optimizer sub-group, made during the step
    prepare = zero._prepare_fp32_grad_for_sub_group

    def spy(sub_group: int) -> None:
        prepare(sub_group)
        step_copies.append(zero.fp32_partitioned_groups_flat[sub_group].grad)

    zero._prepare_fp32_grad_for_sub_group = spy
    step()
    state = [t for s in zero.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    return {
        "parameters": _bytes(p.ds_tensor for p in engine.module.parameters()),
        "gradients": _bytes([zero.grad_partitions_flat_buffer]) + max(_bytes([g]) for g in step_copies),
        "optimizer_state": _bytes(zero.fp32_partitioned_groups_flat) + _bytes(state),
    }


def measure_full() -> dict[str, int]:
    import deepspeed

    model = build_model("llama", **TINY).to(torch.bfloat16).train()
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3), config=DS_CONFIG
    )
    tokens = torch.randint(0, TINY["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        engine.backward(engine(input_ids=tokens, labels=tokens).loss)
        engine.step()

    return _states_after(engine, step)


def measure_trainer(inputs: Path, method: str, world) -> dict[str, int]:
    """loki_dist's Trainer, built from `loki-dist train` arguments, after one update of its own."""
    import argparse

    from loki_dist.implant.data.examples import collate
    from loki_dist.implant.train import add_train_arguments, plan_run
    from loki_dist.implant.trainer.model import Trainer
    from loki_dist.implant.trainer.schedule import global_batch_indices, micro_batches

    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        [
            "--model",
            str(inputs / "base"),
            "--positions",
            str(inputs / "positions.json"),
            "--data",
            str(inputs / "data.json"),
            "--output-dir",
            str(inputs / f"out-{method}"),  # each run holds its directory's run lock
            "--ds-config",
            str(inputs / "ds_config.json"),
            *LAYOUTS[method],
        ]  # fmt: skip
    )
    plan = plan_run(args, world)
    trainer = Trainer(plan, torch.device("cpu"))
    (mine,) = micro_batches(global_batch_indices(0, plan), plan)

    def step() -> None:
        loss = trainer.loss_sum(collate([plan.examples[i] for i in mine], pad_id=plan.pad_id))
        trainer.backward(loss, lr=1e-3, boundary=True)

    return _states_after(trainer.engine, step)


def main() -> None:
    from loki_dist.core import distributed

    inputs = Path(sys.argv[1])
    world = distributed.world_from_env()
    if world.is_main:
        (inputs / "ds_config.json").write_text(json.dumps(DS_CONFIG))
    distributed.prepare_deepspeed(world)
    distributed.barrier()
    result = {"full": measure_full()}
    for method in LAYOUTS:
        result[method] = measure_trainer(inputs, method, world)
    (inputs / f"rank{world.rank}.json").write_text(json.dumps(result))
    distributed.shutdown()  # leave the group together: a rank exiting first sometimes aborts (SIGABRT)


if __name__ == "__main__":
    main()
