"""Training cost of the two row layouts: masked and split, against masking switched off.

Run on 2 ranks (gloo on CPU, or NCCL on GPUs):

    torchrun --nproc_per_node 2 bench/bench_training.py [--steps 14] [--rounds 3] [--markdown FILE]

A tiny Llama of realistic proportions (4 layers, hidden 256, intermediate 688, 256-token sequences,
q = 10%) is trained by the real Trainer under ZeRO-3:
- masked: `--row-params masked`, the whole down_proj trains, unselected rows' gradients are zeroed;
- masking off: the same with the mask and row decay skipped (rows unprotected: only a cost reference);
- split: `--row-params split`, the selected rows are their own parameter.
Rounds rotate the order so that machine noise hits all alike; median step times are reported, with the
optimizer-state bytes rank 0 holds (DeepSpeed's fp32 master partition plus Adam's two moments).
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
    """The real Trainer with --row-params masked, timing its masking and row decay on its own."""

    row_params = "masked"
    mask_seconds: list[float] = []

    def __init__(self, plan, device):
        plan.args.row_params = self.row_params
        super().__init__(plan, device)

    def _prepare_update(self, lr: float) -> None:
        start = time.perf_counter()
        super()._prepare_update(lr)
        self.mask_seconds.append(time.perf_counter() - start)


class SplitTrainer(MaskedTrainer):
    row_params = "split"


class UnmaskedTrainer(MaskedTrainer):
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


def optimizer_state_bytes(trainer: Trainer) -> int:
    """fp32 master partitions plus every tensor of Adam's state, as held by this rank."""
    from loki_dist.rowstate import optimizer_state_holders

    holders = optimizer_state_holders(trainer.inner, trainer.engine.optimizer if trainer.engine else None)
    state = [t for s in trainer.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in [*holders, *state] if t.dim() > 0)


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
        variants = {"masked": MaskedTrainer, "masking off": UnmaskedTrainer, "split": SplitTrainer}
        results: dict[str, list[float]] = {name: [] for name in variants}
        state_bytes: dict[str, int] = {}
        for round_index in range(opts.rounds):
            names = list(variants)
            for name in names[round_index % 3 :] + names[: round_index % 3]:
                trainer = variants[name](plan, distributed.device_for(world))
                results[name] += time_steps(trainer, plan, opts.steps)
                state_bytes[name] = optimizer_state_bytes(trainer)
                del trainer
    medians = {name: statistics.median(times) for name, times in results.items()}
    reference = medians["masking off"]
    mask_cost = statistics.median(MaskedTrainer.mask_seconds)
    if world.is_main:
        rows = "".join(
            f"| {name} | {medians[name]:.4f} | {100 * (medians[name] - reference) / reference:+.1f}% | "
            f"{state_bytes[name] / 2**20:.2f} MiB "
            f"({100 * state_bytes[name] / state_bytes['masked']:.0f}%) |\n"
            for name in variants
        )
        table = (
            f"| ZeRO-3, {world.size} ranks, {torch.get_num_threads()} thread(s)/rank, q = 10% "
            f"| median step (s) | vs masking off | optimizer state, rank 0 (vs masked) |\n"
            f"|---|---|---|---|\n{rows}"
            f"\nMasking plus row decay, timed alone: {1000 * mask_cost:.2f} ms per update "
            f"({100 * mask_cost / medians['masked']:.1f}% of a masked step).\n"
        )
        print(table)
        if opts.markdown:
            opts.markdown.write_text(table)
    distributed.shutdown()


if __name__ == "__main__":
    main()
