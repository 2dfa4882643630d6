"""Training methods side by side on one model and one data set: LoKI (masked, split), full fine-tuning and
LoRA r=16, under DeepSpeed ZeRO-3; then attribution `fast` against `reference`.

    python bench/bench_training.py [--nproc 2] [--steps 14] [--markdown bench/training.md]

Each method runs in its own `torchrun` process group (so peak memory is its own) on a tiny Llama of
realistic proportions (4 layers, hidden 256, intermediate 688, 256-token sequences, q = 10% for LoKI),
with the real Trainer: LoKI masked (`--row-params masked`), LoKI split (`--row-params split`, the
default: gradients and optimizer state only for the selected rows), masking switched off (a cost
reference only: rows unprotected), full fine-tuning, and LoRA r=16 on every projection (peft). Reported:
median step time, tokens/s, peak resident memory of rank 0, optimizer-state bytes of rank 0 (DeepSpeed's
fp32 master partition plus Adam's moments) and trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from loki_dist.cli import build_parser
from loki_dist.core import distributed, files, provenance
from loki_dist.demo.tiny import save_tiny
from loki_dist.implant.data.examples import collate
from loki_dist.implant.train import plan_run
from loki_dist.implant.trainer.model import Trainer
from loki_dist.implant.trainer.schedule import global_batch_indices, micro_batches, normaliser

METHODS = ("LoKI masked", "LoKI split", "masking off", "full fine-tuning", "LoRA r=16")


class BenchTrainer(Trainer):
    """The real Trainer for one method, timing its masking and row decay on their own."""

    row_params = "masked"

    def __init__(self, plan, device):
        plan.args.row_params = self.row_params
        self.mask_seconds: list[float] = []
        super().__init__(plan, device)

    def _prepare_update(self, lr: float) -> None:
        start = time.perf_counter()
        super()._prepare_update(lr)
        self.mask_seconds.append(time.perf_counter() - start)


class SplitTrainer(BenchTrainer):
    row_params = "split"


class UnmaskedTrainer(BenchTrainer):
    def _prepare_update(self, lr: float) -> None:
        for group in self.inner.param_groups:
            group["lr"] = lr


class FullTrainer(BenchTrainer):
    def make_trainable(self, model):
        model.requires_grad_(True)
        return model, []


class LoraTrainer(BenchTrainer):
    def make_trainable(self, model):
        from peft import LoraConfig, get_peft_model

        targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=targets)), []


TRAINERS = dict(
    zip(METHODS, (BenchTrainer, SplitTrainer, UnmaskedTrainer, FullTrainer, LoraTrainer), strict=True)
)


def make_inputs(root: Path, quota: float = 0.1) -> None:
    save_tiny(root / "model", "llama", seed=0, num_layers=4, hidden_size=256, intermediate_size=688)
    rng = random.Random(0)
    rows = [sorted(rng.sample(range(256), int(quota * 256))) for _ in range(4)]
    (root / "positions.json").write_text(json.dumps(rows))
    words = ["the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "knowledge", "model", "row"]
    text = lambda: " ".join(rng.choices(words, k=120))  # noqa: E731
    data = [{"instruction": text(), "input": "", "output": text()} for _ in range(64)]
    (root / "data.json").write_text(json.dumps(data))


def optimizer_state_bytes(trainer: Trainer) -> int:
    """fp32 master partitions plus every tensor of Adam's state, as held by this rank."""
    from loki_dist.implant.trainer.rowstate import optimizer_state_holders

    holders = optimizer_state_holders(trainer.inner, trainer.engine.optimizer if trainer.engine else None)
    state = [t for s in trainer.inner.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in [*holders, *state] if t.dim() > 0)


def timed_steps(trainer: Trainer, plan, steps: int, warmup: int = 2) -> tuple[list[float], list[int]]:
    """Seconds and tokens of `steps` optimizer steps after `warmup` untimed ones (device-synchronised)."""
    times, tokens = [], []
    for step in range(steps + warmup):
        indices = global_batch_indices(step, plan)
        scale = normaliser(indices, plan)
        start = time.perf_counter()
        for i, mine in enumerate(micro_batches(indices, plan)):
            loss = trainer.loss_sum(collate([plan.examples[j] for j in mine], pad_id=plan.pad_id)) / scale
            trainer.backward(loss, 1e-4, boundary=i == plan.accum - 1)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize(trainer.device)
        distributed.barrier()
        times.append(time.perf_counter() - start)
        tokens.append(sum(len(plan.examples[j].input_ids) for j in indices))
    return times[warmup:], tokens[warmup:]


def worker(method: str, root: Path, steps: int, result: Path) -> None:
    """One method under torchrun: time `steps` optimizer steps after two warm-up steps."""
    world = distributed.world_from_env()
    distributed.prepare_deepspeed(world)
    args = build_parser().parse_args(
        ["train", "--model", str(root / "model"), "--positions", str(root / "positions.json"),
         "--data", str(root / "data.json"), "--output-dir", str(root / "out"), "--max-seq-len", "256",
         "--micro-batch-size", "1", "--gradient-accumulation", "1", "--weight-decay", "0.01"]
    )  # fmt: skip
    plan = plan_run(args, world)
    trainer = TRAINERS[method](plan, distributed.device_for(world))
    times, tokens = timed_steps(trainer, plan, steps)
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.params)
    if world.is_main:
        step_time = statistics.median(times)
        result.write_text(json.dumps({
            "step_s": step_time, "tokens_per_s": statistics.median(tokens) / step_time,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "optimizer_state_mib": optimizer_state_bytes(trainer) / 2**20, "trainable": trainable,
            "mask_ms": 1000 * statistics.median(trainer.mask_seconds) if trainer.mask_seconds else None,
        }))  # fmt: skip
    distributed.shutdown()


def run_method(method: str, root: Path, steps: int, nproc: int) -> dict:
    result = root / f"{METHODS.index(method)}.json"
    port = 29000 + (os.getpid() % 1000) * 10 + METHODS.index(method)
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                "--master_addr=127.0.0.1", f"--master_port={port}"]  # fmt: skip
    job = ["--worker", method, "--root", str(root), "--steps", str(steps), "--result", str(result)]
    command = [*launcher, __file__, *job]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // nproc))}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads(result.read_text())


def attribution_rows() -> str:
    """fast vs reference attribution, as bench_attribution.py times them on a 16-layer model."""
    script = str(Path(__file__).with_name("bench_attribution.py"))
    output = subprocess.run(
        [sys.executable, script, "--skip-ranks"], capture_output=True, text=True, check=True
    )
    keep = ("model:", "fast", "reference", "speed-up")
    return "```\n" + "\n".join(line for line in output.stdout.splitlines() if line.startswith(keep)) + "\n```"


def markdown(results: dict[str, dict], nproc: int) -> str:
    masked = results["LoKI masked"]
    lines = [
        f"| ZeRO-3, {nproc} ranks | step (s) | tokens/s | peak RSS rank 0 (MiB) | optimizer state rank 0 "
        "| trainable |",
        "|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        share = 100 * r["optimizer_state_mib"] / masked["optimizer_state_mib"]
        lines.append(
            f"| {method} | {r['step_s']:.4f} | {r['tokens_per_s']:.0f} | {r['peak_rss_mib']:.0f} | "
            f"{r['optimizer_state_mib']:.2f} MiB ({share:.0f}% of masked) | {r['trainable']:,} |"
        )
    lines.append(f"\nMasking plus row decay, timed alone: {masked['mask_ms']:.2f} ms per update.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--skip-attribution", action="store_true")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker, opts.root, opts.steps, opts.result)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_inputs(root)
        results = {}
        for method in METHODS:
            print(f"{method} ...", flush=True)
            results[method] = run_method(method, root, opts.steps, opts.nproc)
    table = markdown(results, opts.nproc)
    if not opts.skip_attribution:
        table += "\nAttribution, fast against reference:\n\n" + attribution_rows() + "\n"
    print(table)
    if opts.markdown:
        command = f"python bench/bench_training.py --markdown {opts.markdown} --nproc {opts.nproc}"
        threads = max(1, (os.cpu_count() or 1) // opts.nproc)  # as run_method sets OMP_NUM_THREADS
        header = f"{provenance.measured(command)} {threads} thread(s) per rank, gloo, {opts.steps} steps.\n\n"
        files.write_text(opts.markdown, header + table)


if __name__ == "__main__":
    main()
