"""What does row masking cost? Step time of masked ZeRO-3 training vs the same run with masking off.

Run on 2 ranks (gloo on CPU, or NCCL on GPUs):

    torchrun --nproc_per_node 2 bench/bench_masking.py [--steps 12] [--rounds 3] [--markdown bench/masking.md]

A tiny Llama of realistic proportions (4 layers, hidden 256, intermediate 688, 256-token sequences) is
trained by the real Trainer; "masking off" is the same Trainer with the per-update mask and row decay
skipped (the rows are then not protected: this is only a cost reference). Rounds alternate between the
two so that machine noise hits both alike; the median step time of each is reported.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loki_dist import distributed
from loki_dist.cli import build_parser
from loki_dist.data import collate
from loki_dist.tiny import save_tiny
from loki_dist.training import Trainer, _normaliser, global_batch_indices, micro_batches, plan_run


class MaskedTrainer(Trainer):
    """The real Trainer, timing its masking and row decay on its own."""

    mask_seconds: list[float] = []

    def _prepare_update(self, lr: float) -> None:
        start = time.perf_counter()
        super()._prepare_update(lr)
        self.mask_seconds.append(time.perf_counter() - start)


class UnmaskedTrainer(Trainer):
    def _prepare_update(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr


def make_inputs(root: Path, world: distributed.World, quota: float = 0.1) -> list[str]:
    model_dir = root / "model"
    if world.is_main:
        save_tiny(model_dir, "llama", seed=0, num_layers=4, hidden_size=256, intermediate_size=688)
        rng = random.Random(0)
        rows = [sorted(rng.sample(range(256), int(quota * 256))) for _ in range(4)]
        (root / "positions.json").write_text(json.dumps(rows))
        words = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "knowledge", "model", "row"]
        data = [
            {
                "instruction": " ".join(rng.choices(words, k=120)),
                "input": "",
                "output": " ".join(rng.choices(words, k=120)),
            }
            for _ in range(64)
        ]
        (root / "data.json").write_text(json.dumps(data))
    distributed.barrier()
    return [
        "train",
        "--model",
        str(model_dir),
        "--positions",
        str(root / "positions.json"),
        "--data",
        str(root / "data.json"),
        "--output-dir",
        str(root / "out"),
        "--max-seq-len",
        "256",
        "--micro-batch-size",
        "1",
        "--gradient-accumulation",
        "1",
        "--weight-decay",
        "0.01",
    ]


def time_steps(trainer: Trainer, plan, steps: int) -> list[float]:
    times = []
    for step in range(steps):
        indices = global_batch_indices(step, plan)
        scale = _normaliser(indices, plan)
        start = time.perf_counter()
        for i, mine in enumerate(micro_batches(indices, plan)):
            loss = trainer.loss_sum(collate([plan.examples[j] for j in mine], pad_id=plan.pad_id)) / scale
            trainer.backward(loss, 1e-4, boundary=i == plan.accum - 1)
        distributed.barrier()
        times.append(time.perf_counter() - start)
    return times[2:]  # the first steps warm up allocators and DeepSpeed's prefetch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--markdown", type=Path)
    opts = parser.parse_args()
    world = distributed.world_from_env()
    distributed.prepare_deepspeed(world)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if world.size == 1 else Path("/tmp/loki_bench_masking")
        root.mkdir(exist_ok=True)
        args = build_parser().parse_args(make_inputs(root, world))
        plan = plan_run(args, world)
        results: dict[str, list[float]] = {"masked": [], "unmasked": []}
        order = [("masked", MaskedTrainer), ("unmasked", UnmaskedTrainer)]
        for round_index in range(opts.rounds):
            for name, cls in order[:: 1 if round_index % 2 == 0 else -1]:
                trainer = cls(plan, distributed.device_for(world))
                results[name] += time_steps(trainer, plan, opts.steps)
                del trainer
    masked, unmasked = (statistics.median(results[k]) for k in ("masked", "unmasked"))
    overhead = 100.0 * (masked - unmasked) / unmasked
    mask_cost = statistics.median(MaskedTrainer.mask_seconds)
    if world.is_main:
        table = (
            f"| ZeRO-3, {world.size} ranks, {torch.get_num_threads()} thread(s)/rank | median step (s) |\n"
            f"|---|---|\n| masking off | {unmasked:.4f} |\n| masked (loki_dist) | {masked:.4f} |\n"
            f"| difference of medians | {overhead:+.1f}% |\n"
            f"| masking + row decay, timed alone | {mask_cost:.4f} "
            f"({100 * mask_cost / masked:.1f}% of a step) |\n"
        )
        print(table)
        if opts.markdown:
            opts.markdown.write_text(table)
    distributed.shutdown()


if __name__ == "__main__":
    main()
