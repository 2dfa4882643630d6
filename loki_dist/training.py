"""`loki-dist train`: implant new knowledge by training only the selected down_proj rows.

The recipe, top to bottom: check every input (before any process group or model exists, so a mistake
costs nothing and overwrites nothing) -> load the model sharded (ZeRO-3 zero.Init through the HF
DeepSpeed integration, or ZeRO-1/2, or one plain process) -> freeze everything, then make the selected
rows trainable (trainer.py) -> loop over global batches (schedule.py): forward/backward per
micro-batch, then at each update (masked layout) zero the gradients of unselected rows on this rank's
partition, apply decoupled weight decay to selected rows only, let the optimizer step -> row-level
checkpoints -> OUT/final built from the base model's shards.

resume.py chooses the checkpoint to resume from; stopping.py says how a run ends early:
REQUEUE_EXIT_CODE after a stop signal and a checkpoint, DIVERGED_EXIT_CODE on NaN or Inf.

One run per output directory at a time (runlock.py); every collective is bounded by the process group's
timeout, and one that breaks off names the stage (distributed.stage).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loki_dist import (
    checkpoint,
    checkpoint_export,
    distributed,
    dsconfig,
    files,
    monitor,
    positions,
    runlock,
)
from loki_dist.adapters import ModelSpec, spec_from_dir
from loki_dist.checkpoint import FINAL_DIR
from loki_dist.data import (
    Example,
    add_data_arguments,
    check_data_flags,
    collate,
    input_paths,
    load_examples,
    num_targets,
    read_conversations,
)
from loki_dist.errors import UserError, require_at_least
from loki_dist.export import fingerprint
from loki_dist.modeling import check_weights, load_tokenizer
from loki_dist.resume import find_resume
from loki_dist.schedule import global_batch_indices, lr_at, micro_batches, normaliser
from loki_dist.stopping import DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE, STACKS_SIGNAL, StopRequest
from loki_dist.trainer import Trainer


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: a Hugging Face directory (safetensors)")
    p.add_argument("--positions", required=True, help="positions JSON: L lists of down_proj rows to train")
    add_data_arguments(p)  # --data or --dataset (LLaMA-Factory), --mix-ratios, --chat-template...
    p.add_argument("--output-dir", required=True, help="checkpoints, TensorBoard runs and final/ go here")
    p.add_argument(
        "--ds-config",
        default="ds_configs/zero3.json",
        help="DeepSpeed config (path or shipped name: zero3, zero3_offload, zero2) or none",
    )
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled, applied to selected rows only")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument(
        "--lr-scheduler",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="after warm-up: decay to 0 (cosine, linear) or stay at --learning-rate (constant)",
    )
    p.add_argument("--micro-batch-size", type=int, help="per rank (default 1)")
    p.add_argument("--gradient-accumulation", type=int, help="micro-batches per update (default 1)")
    p.add_argument("--max-seq-len", type=int, default=2048)
    p.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 on GPUs, fp32 on CPU")
    p.add_argument(
        "--row-params",
        choices=("split", "masked"),
        default="split",
        help="split: the selected rows are their own parameter (gradients and optimizer state "
        "only for them); masked: the whole down_proj trains with unselected rows' gradients zeroed",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0 disables)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--save-steps", type=int, default=500, help="checkpoint every N optimizer steps (0: end only)"
    )
    p.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument(
        "--resume", default="auto", help="auto (newest checkpoint in --output-dir), never, or a path"
    )
    p.add_argument("--overwrite", action="store_true", help="discard a finished run in --output-dir")
    monitor.add_monitor_arguments(p)


@dataclass
class Plan:
    """Everything validated and settled before any heavy work."""

    args: argparse.Namespace
    spec: ModelSpec
    positions: list[list[int]]
    examples: list[Example]
    micro: int
    accum: int
    bf16: bool
    max_grad_norm: float
    ds_config: dict | None
    out: Path
    resume_from: Path | None
    base_print: str
    data_print: str
    world: distributed.World
    pad_id: int
    log: list[str] = field(default_factory=list)
    lock: runlock.RunLock | None = None  # the output directory's, held by rank 0 (resume.find_resume)
    evals: monitor.Inputs | None = None  # this rank's share of --eval-data / --general-data

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world.size

    @property
    def steps_per_epoch(self) -> int:
        return len(self.examples) // self.global_batch

    @property
    def total_steps(self) -> int:
        return self.args.max_steps or self.args.epochs * self.steps_per_epoch


def check_flags(args: argparse.Namespace) -> None:
    """The numbers of the command line, before anything is read: a NaN or negative one would reach the
    optimizer (a traceback there) or train without a word of warning on a schedule nobody asked for."""
    rates = {"--learning-rate": args.learning_rate, "--weight-decay": args.weight_decay}
    rates.update({"--warmup-ratio": args.warmup_ratio, "--max-grad-norm": args.max_grad_norm})
    for flag, value in rates.items():
        # float32's range: the optimizer holds the rate as a float32 scalar (1e39 is a traceback there)
        if value is not None and not (math.isfinite(value) and 0 <= value <= torch.finfo(torch.float32).max):
            raise UserError(f"{flag} {value}: expected a finite number, 0 or more, within float32's range")
    if args.warmup_ratio > 1:
        raise UserError(f"--warmup-ratio {args.warmup_ratio}: expected a fraction of the steps, in [0, 1]")
    counts = [("--save-steps", args.save_steps, 0), ("--save-total-limit", args.save_total_limit, 0)]
    counts.append(("--logging-steps", args.logging_steps, 1))
    counts.append(
        ("--max-steps", args.max_steps, 1) if args.max_steps is not None else ("--epochs", args.epochs, 1)
    )
    require_at_least(*counts)
    check_data_flags(args)
    if not -(2**62) <= args.seed < 2**62:
        raise UserError(f"--seed {args.seed}: expected an integer between -2**62 and 2**62")
    monitor.check_flags(args)


def plan_run(args: argparse.Namespace, world: distributed.World) -> Plan:
    check_flags(args)
    spec = spec_from_dir(args.model)
    check_weights(args.model, safetensors_only=True, spec=spec)  # export reads the base's safetensors
    out = Path(args.output_dir)
    replaced = [out / FINAL_DIR, out / "runs", *checkpoint.list_checkpoints(out)] if out.is_dir() else []
    inputs = {"--model": args.model, "--positions": args.positions, **input_paths(args)}
    inputs.update(monitor.input_files(args))
    files.refuse_output_over_inputs("--output-dir", out, inputs, replaced)
    files.check_writable("--output-dir", out, directory=True)
    rows = positions.load(args.positions, spec)
    if not any(rows):
        raise UserError(f"--positions {args.positions}: every layer list is empty, nothing would train")
    ds_config = dsconfig.load(args.ds_config)
    for section in ("optimizer", "scheduler"):  # DeepSpeed drops them silently beside a client optimizer
        if ds_config is not None and section in ds_config:
            raise UserError(
                f"--ds-config {args.ds_config}: its `{section}` section would be ignored: loki-dist train "
                "steps torch's AdamW on the schedule of --learning-rate, --lr-scheduler, --warmup-ratio "
                "and --weight-decay; remove the section"
            )
    micro = dsconfig.settle(
        ds_config, "train_micro_batch_size_per_gpu", "--micro-batch-size", args.micro_batch_size, 1
    )
    accum = dsconfig.settle(
        ds_config, "gradient_accumulation_steps", "--gradient-accumulation", args.gradient_accumulation, 1
    )
    want_bf16 = None if args.precision is None else args.precision == "bf16"
    bf16 = dsconfig.settle(ds_config, "bf16.enabled", "--precision", want_bf16, torch.cuda.is_available())
    clip = dsconfig.settle(ds_config, "gradient_clipping", "--max-grad-norm", args.max_grad_norm, 1.0)
    if not (isinstance(clip, (int, float)) and math.isfinite(clip) and clip >= 0):
        raise UserError(
            f"--ds-config {args.ds_config}: gradient_clipping {clip!r}: expected a number, 0 or more"
        )
    stage = dsconfig.zero_stage(ds_config)
    if ds_config is not None:
        ds_config = dsconfig.fill(
            ds_config,
            {
                "train_micro_batch_size_per_gpu": micro,
                "gradient_accumulation_steps": accum,
                "train_batch_size": micro * accum * world.size,
                "gradient_clipping": clip,
                "bf16.enabled": bf16,
                "zero_force_ds_cpu_optimizer": False,
            },
        )
    if stage is None and world.size > 1:
        raise UserError(f"--ds-config none runs one process, but the launcher started {world.size}")
    for name, value in (
        ("--micro-batch-size", micro),
        ("--gradient-accumulation", accum),
        ("--max-seq-len", args.max_seq_len),
    ):
        if value < 1:
            raise UserError(f"{name} {value}: expected a positive integer")
    tokenizer = load_tokenizer(args.model, chat_template=args.chat_template)
    conversations, data_name = read_conversations(args)
    data = load_examples(conversations, tokenizer, args.max_seq_len, data_name)
    plan = Plan(
        args=args,
        spec=spec,
        positions=rows,
        examples=data.examples,
        micro=micro,
        accum=accum,
        bf16=bool(bf16),
        max_grad_norm=float(clip),
        ds_config=ds_config,
        out=Path(args.output_dir),
        resume_from=None,
        base_print=fingerprint(args.model),
        data_print=_data_print(data.examples),
        world=world,
        pad_id=tokenizer.pad_token_id or 0,
    )
    if plan.steps_per_epoch == 0:
        raise UserError(
            f"{data_name}: {len(data.examples)} usable samples, fewer than one global batch "
            f"({micro} micro x {accum} accumulation x {world.size} ranks)"
        )
    plan.log.append(
        f"{len(data.examples)} samples ({data.truncated} truncated to {args.max_seq_len} tokens, "
        f"{data.dropped} dropped with no response token left)"
    )
    plan.evals = monitor.read_inputs(args, tokenizer, world)
    plan.resume_from = find_resume(plan)
    return plan


def _data_print(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()[:32]


def run_train(args: argparse.Namespace) -> None:
    world = distributed.world_from_env()
    # a run that seems stuck: `kill -USR2 <pid>` prints where each of its threads is, and it goes on
    # (to the process's own stderr, file descriptor 2, whatever sys.stderr has become)
    faulthandler.register(STACKS_SIGNAL, file=sys.__stderr__, all_threads=True)
    plan = None
    try:
        with distributed.agreement(world):  # every rank checks; one agreed error before any work
            plan = plan_run(args, world)
        # each rank chose the checkpoint on its own, from the same files: a difference would mix two
        chosen = plan.resume_from.name if plan.resume_from is not None else None
        distributed.same_on_every_rank(world, chosen, "the checkpoint to resume from")
        if plan.ds_config is None:
            distributed.init(world)
        else:
            distributed.prepare_deepspeed(world)
        try:
            status = _train(plan)
        except BaseException:
            distributed.shutdown(wait_for_peers=False)  # peers may never reach a barrier now
            raise
        distributed.shutdown()
    finally:
        if plan is not None and plan.lock is not None:
            plan.lock.release()
    if status:
        sys.exit(status)


def _train(plan: Plan) -> int:
    """Train, checkpoint, export; returns the exit status: 0 when finished, REQUEUE_EXIT_CODE when a stop
    signal ended it early (after a checkpoint), DIVERGED_EXIT_CODE when a step diverged."""
    from tqdm import tqdm

    world, out = plan.world, plan.out
    stop = StopRequest()
    if world.is_main:
        if plan.args.overwrite:
            for old in [out / FINAL_DIR, out / "runs", *checkpoint.checkpoint_dirs(out)]:
                shutil.rmtree(old, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        for line in plan.log:
            print(line, flush=True)
    torch.manual_seed(plan.args.seed + world.rank)
    with distributed.stage("loading the model"):
        trainer = Trainer(plan, distributed.device_for(world))
    start = 0
    if plan.resume_from is not None:
        with distributed.stage(f"resuming from {plan.resume_from}"):
            state = checkpoint.load(plan.resume_from, trainer.states, trainer.prepare_optimizer, world.rank)
        start = state["step"]
        if world.is_main:
            print(f"resumed from {plan.resume_from} at step {start}", flush=True)
    with distributed.stage("the probe loss before training"):
        probe_at_start_step = _probe_loss(trainer, plan)
    writer = _tensorboard(out) if world.is_main else None
    bar = tqdm(
        total=plan.total_steps, initial=start, desc="train", disable=not world.is_main, dynamic_ncols=True
    )
    try:
        watch = monitor.Monitor.begin(plan, trainer, start, bar, writer)  # the first evaluation, if asked
        status = _steps(plan, trainer, stop, start, bar, writer, watch)
    finally:
        bar.close()
        if writer is not None:
            writer.close()
    if status:
        return status
    with distributed.stage("the probe loss after training"):
        probe = _probe_loss(trainer, plan)
    end = watch.stopped_at or plan.total_steps  # the last step, or the one that stopped on forgetting
    last = out / f"checkpoint-{end}"  # saved by that step (every rank knows its name)
    with distributed.stage(f"exporting {out / FINAL_DIR}"):
        checkpoint_export.export_checkpoint(last, out / FINAL_DIR, world, base_dir=plan.args.model)
    if world.is_main:
        summary = {
            "steps": end,
            "global_batch": plan.global_batch,
            "world_size": world.size,
            "samples": len(plan.examples),
            "probe_loss": probe,
            "probe_loss_at_start_step": probe_at_start_step,
            "start_step": start,
            "probe_samples": global_batch_indices(0, plan),
            **watch.summary(),
        }
        files.write_json(out / "train_summary.json", summary, indent=2)
        print(f"done: {out / FINAL_DIR} (probe loss {probe:.6f})", flush=True)
    return 0


def _steps(
    plan: Plan, trainer: Trainer, stop: StopRequest, start: int, bar, writer, watch: monitor.Monitor
) -> int:
    """The optimizer steps from `start`, with their logs, evaluations and checkpoints; returns _train's
    status (0 also when the forgetting monitor stopped the run early: watch.stopped_at)."""
    world, out = plan.world, plan.out
    run_state = {
        "base_model": str(Path(plan.args.model).resolve()),
        "base_fingerprint": plan.base_print,
        "positions": plan.positions,
        "data_fingerprint": plan.data_print,
        "global_batch": plan.global_batch,
        "world_size": world.size,
    }
    window = _Window()
    for step in range(start, plan.total_steps):
        done = step + 1
        with distributed.stage(f"step {done}"):
            indices = global_batch_indices(step, plan)
            scale = normaliser(indices, plan)
            lr = lr_at(step, plan)
            loss = torch.zeros(1, dtype=torch.float64)  # this rank's share of the step's mean loss
            for i, mine in enumerate(micro_batches(indices, plan)):
                part = trainer.loss_sum(collate([plan.examples[i] for i in mine], pad_id=plan.pad_id)) / scale
                grad_norm = trainer.backward(part, lr, boundary=i == plan.accum - 1)
                loss += part.detach().double().cpu()
            window.loss += loss / world.size
            window.steps += 1
            window.tokens += sum(len(plan.examples[i].input_ids) for i in indices)
            bar.update(1)
            if done % plan.args.logging_steps == 0 or done == plan.total_steps:
                loss_value = float(distributed.all_reduce_sum(window.loss)) / window.steps
                tokens_per_s = window.tokens / (time.time() - window.start)
                if world.is_main:
                    _log(
                        writer, bar, done, loss=loss_value, lr=lr, grad_norm=grad_norm,
                        tokens_per_s=tokens_per_s,
                    )  # fmt: skip
                window = _Window()
            finite = math.isfinite(float(loss)) and (grad_norm is None or math.isfinite(grad_norm))
            stopping, diverged = stop.agreed(world, trainer.device, not finite)
        if diverged:
            norm = "unknown" if grad_norm is None else f"{grad_norm:.4g}"
            ranks = f" (non-finite on {diverged} of {world.size} ranks)" if world.size > 1 else ""
            bar.close()
            return _diverged(plan, done, f"loss {float(loss):.4g}, gradient norm {norm}{ranks}")
        forgetting = watch.after_step(done, bar, writer)  # evaluates when due; True: stop, as an end
        stopping = stopping and done < plan.total_steps and not forgetting
        if (
            (plan.args.save_steps and done % plan.args.save_steps == 0)
            or done == plan.total_steps
            or stopping
            or forgetting
        ):
            try:
                with distributed.stage(f"saving checkpoint-{done}"):
                    state = {**run_state, **watch.state()}  # the evaluations too: a resume keeps the baseline
                    checkpoint.save(out, done, trainer.states, state, world, plan.args.save_total_limit)
            except checkpoint.NonFinite as err:
                bar.close()
                return _diverged(plan, done, f"its update left NaN or Inf in the trained rows ({err})")
        if forgetting:
            return 0
        if stopping:
            bar.close()
            if world.is_main:
                print(
                    f"stopped by signal {stop.received or 'on another rank'} after step {done}: saved "
                    f"{out / f'checkpoint-{done}'}; rerun the same command to resume "
                    f"(exit status {REQUEUE_EXIT_CODE})",
                    flush=True,
                )
            return REQUEUE_EXIT_CODE
    return 0


def _diverged(plan: Plan, step: int, why: str) -> int:
    """Say (rank 0) that step `step` diverged and what is left; every rank returns DIVERGED_EXIT_CODE."""
    if plan.world.is_main:
        before = [p for p in checkpoint.list_checkpoints(plan.out) if checkpoint.step_of(p) < step]
        kept = f"{before[-1]} is the newest checkpoint" if before else "no checkpoint was saved before it"
        print(
            f"loki-dist train: error: training diverged at step {step}: {why}; nothing of step {step} was "
            f"saved and final/ was not written, {kept}. Lower --learning-rate or --weight-decay (or check "
            f"the data) and rerun, which resumes from the newest checkpoint "
            f"(exit status {DIVERGED_EXIT_CODE})",
            file=sys.stderr,
            flush=True,
        )
    return DIVERGED_EXIT_CODE


@dataclass
class _Window:
    """What is averaged between two log lines."""

    loss: torch.Tensor = field(default_factory=lambda: torch.zeros(1, dtype=torch.float64))
    steps: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.time)


@torch.no_grad()
def _probe_loss(trainer: Trainer, plan: Plan) -> float:
    """Mean response-token loss of the trained model on the first global batch of epoch 0.

    Recorded in train_summary.json so that anyone can check the exported model against the trained
    engine: from_pretrained(OUT/final) must reproduce it.
    """
    indices = global_batch_indices(0, plan)
    total = torch.zeros(1, dtype=torch.float64)
    trainer.model.eval()
    for mine in micro_batches(indices, plan):
        total += (
            trainer.loss_sum(collate([plan.examples[i] for i in mine], pad_id=plan.pad_id)).double().cpu()
        )
    trainer.model.train()
    targets = sum(num_targets(plan.examples[i]) for i in indices)
    return float(distributed.all_reduce_sum(total)) / max(targets, 1)


def _tensorboard(out: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(out / "runs"))


def _log(writer, bar, step: int, **scalars: float | None) -> None:
    scalars = {name: value for name, value in scalars.items() if value is not None}
    for name, value in scalars.items():
        writer.add_scalar(f"train/{name}", value, step)
    bar.write(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
