"""What each optimizer step of `loki-dist train` sees: its learning rate, its samples, this rank's share.

Every one is a pure function of the step and the plan, so a resume on any number of ranks continues the
same schedule over the same samples in the same order.
"""

from __future__ import annotations

import math

import torch

from loki_dist.core.flags import steps_of
from loki_dist.implant.data.examples import num_targets
from loki_dist.implant.trainer.plan import Plan


def lr_at(step: int, plan: Plan) -> float:
    """Linear warm-up from 0, then cosine or linear decay to 0, or constant (a pure function of the step).
    The warm-up lasts --warmup-steps where that is above 0, else the --warmup-ratio share of the steps
    (rounded up), as Hugging Face's schedulers count it."""
    total, base = plan.total_steps, plan.args.learning_rate
    warmup = steps_of(plan.args.warmup_steps, total) or math.ceil(plan.args.warmup_ratio * total)
    if step < warmup:
        return base * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if plan.args.lr_scheduler == "constant":
        return base
    if plan.args.lr_scheduler == "linear":
        return base * max(0.0, 1.0 - progress)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def global_batch_indices(step: int, plan: Plan) -> list[int]:
    """The samples of optimizer step `step`: a seeded permutation per epoch, cut into global batches."""
    epoch, index = divmod(step, plan.steps_per_epoch)
    generator = torch.Generator().manual_seed(plan.args.seed + epoch)
    order = torch.randperm(len(plan.examples), generator=generator).tolist()
    return order[index * plan.global_batch : (index + 1) * plan.global_batch]


def micro_batches(indices: list[int], plan: Plan) -> list[list[int]]:
    """This rank's micro-batches of a global batch (micro-batch i of rank r: slot i*world + r)."""
    w, m = plan.world, plan.micro
    return [indices[(i * w.size + w.rank) * m : (i * w.size + w.rank + 1) * m] for i in range(plan.accum)]


def normaliser(indices: list[int], plan: Plan) -> float:
    """Divide each rank's summed loss by this, so gradients are the mean over the global batch's tokens.

    DeepSpeed averages gradients over ranks, so its per-rank loss carries a factor world_size; a plain
    run has one rank. Normalising by the global token count makes the update independent of how the
    global batch is split into ranks and micro-batches (1 rank = 2 ranks).
    """
    targets = sum(num_targets(plan.examples[i]) for i in indices)
    return max(targets, 1) / plan.world.size
