"""`loki-dist train`: implant new knowledge by training only the selected down_proj rows.

The command: its flags, `plan_run`, which builds the run's Plan (trainer/plan.py) with every input
checked before any process group or model exists, so a mistake costs nothing and overwrites nothing,
and `run_train`, which runs the training recipe's lifecycle (trainer/recipe.py: setup -> train -> save
-> cleanup). A step is followed in trainer/: recipe.py (the loop), model.py (the model, its trainable
rows, the update), schedule.py (each step's learning rate and samples), and artifacts/checkpoint.py;
trainer/resume.py chooses the checkpoint to resume from, and trainer/stopping.py says how a run ends
early: REQUEUE_EXIT_CODE after a stop signal and a checkpoint, DIVERGED_EXIT_CODE on NaN or Inf.

One run per output directory at a time (trainer/runlock.py); every collective is bounded by the process
group's timeout, and one that breaks off names the stage (distributed.stage).
"""

from __future__ import annotations

import argparse
import faulthandler
import hashlib
import json
import math
import sys
from pathlib import Path

import torch

from loki_dist.core import checks, distributed, dsconfig, flags, plotting, positions
from loki_dist.core.errors import UserError, require_at_least
from loki_dist.core.families import ModelSpec, spec_from_dir
from loki_dist.core.modeling import check_weights, load_tokenizer, sized_for
from loki_dist.implant.artifacts import checkpoint
from loki_dist.implant.artifacts.checkpoint import FINAL_DIR
from loki_dist.implant.artifacts.implant_file import fingerprint
from loki_dist.implant.data import held_out
from loki_dist.implant.data.examples import Example, load_examples
from loki_dist.implant.data.sources import (
    add_data_arguments,
    check_data_flags,
    input_paths,
    read_conversations,
)
from loki_dist.implant.trainer import lowrank, monitor
from loki_dist.implant.trainer.plan import Plan
from loki_dist.implant.trainer.recipe import TrainRecipe
from loki_dist.implant.trainer.resume import find_resume
from loki_dist.implant.trainer.stopping import STACKS_SIGNAL


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="base model: a Hugging Face directory (safetensors)")
    p.add_argument("--positions", required=True, help="positions JSON: L lists of down_proj rows to train")
    add_data_arguments(p)  # --data or --dataset (LLaMA-Factory), --mix-ratios, --chat-template...
    p.add_argument("--output-dir", required=True, help="checkpoints, TensorBoard runs and final/ go here")
    flags.add_ds_config(
        p, "ds_configs/zero3.json", "(a path, a shipped name: zero3, zero3_offload, zero2; or none)"
    )
    p.add_argument("--epochs", type=float, default=1, help="passes over the data; a fraction (2.5) ends "
                   "part-way through the last, as Hugging Face's num_train_epochs")  # fmt: skip
    p.add_argument("--max-steps", type=int, help="optimizer steps; overrides --epochs")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0, help="decoupled, applied to selected rows only")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--warmup-steps", type=flags.steps_or_share, default=0, metavar="N",
                   help="warm-up steps (a share in (0, 1) of the steps); above 0 it replaces --warmup-ratio, "
                   "as in Hugging Face's TrainingArguments")  # fmt: skip
    p.add_argument(
        "--lr-scheduler",
        choices=("cosine", "linear", "constant"),
        default="cosine",
        help="after warm-up: decay to 0 (cosine, linear) or stay at --learning-rate (constant)",
    )
    p.add_argument("--micro-batch-size", type=int, help="per rank (default 1)")
    p.add_argument("--gradient-accumulation", type=int, help="micro-batches per update (default 1)")
    flags.add_max_seq_len(p, 2048, "a longer sample is cut, and counted in the log")
    flags.add_precision(
        p, "precision", None, "bf16: bfloat16 weights and compute, the trained rows' master copy and Adam "
        "state in fp32; fp32: all fp32; auto (default): bf16 on GPUs, fp32 on CPU; fp16 is refused"
    )  # fmt: skip
    p.add_argument(
        "--row-params",
        choices=("split", "masked"),
        default="split",
        help="split: the selected rows are their own parameter (gradients and optimizer state "
        "only for them); masked: the whole down_proj trains with unselected rows' gradients zeroed",
    )
    p.add_argument(
        "--lora-rank",
        type=int,
        default=0,
        metavar="R",
        help="LoKI*: train the selected rows of each layer as W_S0 + A B, A [k, R] (zero at first) and "
        "B [R, F] (kaiming-uniform, as LoRA), R*(k+F) parameters instead of k*F; with --row-params "
        "split. 0 (default): the rows themselves",
    )
    p.add_argument(
        "--train-bias",
        action="store_true",
        help="the selected rows' down_proj bias entries train too, as in the LoKI reference (a model whose "
        "down_proj has a bias: GPT-NeoX, Llama with mlp_bias); with --row-params split",
    )
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    p.add_argument("--max-grad-norm", type=float, help="gradient clipping (default 1.0; 0 disables)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--save-steps",
        type=flags.steps_or_share,
        default=500,
        metavar="N",
        help="checkpoint every N optimizer steps (0: end only; a share in (0, 1): that share of the steps)",
    )
    p.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    p.add_argument("--logging-steps", type=flags.steps_or_share, default=10, metavar="N",
                   help="a log line every N steps (a share in (0, 1): that share of the steps)")  # fmt: skip
    p.add_argument("--plot-loss", action="store_true",
                   help="at the end, plot the logged training loss into OUTPUT_DIR/training_loss.png "
                   "(needs matplotlib; LLaMA-Factory's plot_loss)")  # fmt: skip
    p.add_argument(
        "--resume", default="auto", help="auto (newest checkpoint in --output-dir), never, or a path"
    )
    flags.add_overwrite(p, "a finished run in --output-dir")
    monitor.add_monitor_arguments(p)
    held_out.add_held_out_arguments(p)  # --val-size, --eval-dataset: LLaMA-Factory's held-out task set


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
    counts = [("--save-total-limit", args.save_total_limit, 0), ("--lora-rank", args.lora_rank, 0)]
    if args.max_steps is not None:
        counts.append(("--max-steps", args.max_steps, 1))
    elif not (math.isfinite(args.epochs) and 0 < args.epochs <= 1e6):
        raise UserError(f"--epochs {args.epochs}: expected a number of passes above 0 (2.5 ends mid-pass)")
    if args.logging_steps == 0:
        raise UserError("--logging-steps 0: expected 1 or more steps between log lines, or a share in (0, 1)")
    require_at_least(*counts)
    if args.plot_loss:
        plotting.pyplot("--plot-loss")  # before any work: matplotlib is optional
    if args.train_bias and (args.lora_rank or args.row_params != "split"):
        raise UserError(
            "--train-bias: trains the rows' bias entries as a parameter beside the split rows; it cannot be "
            "combined with " + (f"--lora-rank {args.lora_rank}" if args.lora_rank else "--row-params masked")
        )
    if args.lora_rank and args.row_params != "split":
        raise UserError(
            f"--lora-rank {args.lora_rank}: LoKI*'s low-rank rows are a layout of their own; "
            f"it cannot be combined with --row-params {args.row_params} (leave --row-params at split)"
        )
    check_data_flags(args)
    flags.check_seed(args.seed)
    flags.training_bf16(args.precision)  # fp16 is refused before anything is read
    held_out.check_flags(args)
    monitor.check_flags(args)


def plan_run(args: argparse.Namespace, world: distributed.World) -> Plan:
    check_flags(args)
    spec = spec_from_dir(args.model)
    check_weights(args.model, safetensors_only=True, spec=spec)  # export reads the base's safetensors
    out = Path(args.output_dir)
    replaced = [out / FINAL_DIR, out / "runs", *checkpoint.list_checkpoints(out)] if out.is_dir() else []
    inputs = {"--model": args.model, "--positions": args.positions, **input_paths(args)}
    inputs.update({**monitor.input_files(args), **held_out.input_paths(args)})
    checks.refuse_output_over_inputs("--output-dir", out, inputs, replaced)
    checks.check_writable("--output-dir", out, directory=True)
    rows = positions.load(args.positions, spec)
    if not any(rows):
        raise UserError(f"--positions {args.positions}: every layer list is empty, nothing would train")
    lowrank.check_rank(args.lora_rank, rows, spec.intermediate_size, "--lora-rank")
    if args.train_bias:
        _check_bias(args.model, spec, rows)
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
    want_bf16 = flags.training_bf16(args.precision)
    bf16 = dsconfig.settle(ds_config, "bf16.enabled", "--precision", want_bf16, torch.cuda.is_available())
    clip = dsconfig.settle(ds_config, "gradient_clipping", "--max-grad-norm", args.max_grad_norm, 1.0)
    stage = dsconfig.zero_stage(ds_config)
    if ds_config is not None:
        dsconfig.check_training(ds_config, args.ds_config, micro, accum, world.size)
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
        ds_config = sized_for(ds_config, args.model, world)
        dsconfig.check_with_deepspeed(ds_config, args.ds_config)
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
    conversations, task_held_out = held_out.split(args, conversations)
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
    plan.evals = monitor.read_inputs(args, tokenizer, world, task_held_out)
    plan.resume_from = find_resume(plan)
    return plan


def _check_bias(model: str, spec: ModelSpec, rows: list[list[int]]) -> None:
    """--train-bias: every trained layer's down_proj has a bias in the base's weights (shard headers)."""
    from loki_dist.implant.artifacts.export import BaseShards

    biased = BaseShards.read(Path(model), spec, "--model").bias
    missing = [layer for layer, chosen in enumerate(rows) if chosen and layer not in biased]
    if missing:
        raise UserError(
            f"--train-bias: --model {model} has no down_proj bias in layers {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}; leave --train-bias out for a model without one"
        )


def _data_print(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for e in examples:
        digest.update(json.dumps([e.input_ids, e.labels]).encode())
    return digest.hexdigest()[:32]


def run_train(args: argparse.Namespace) -> None:
    """Plan (every rank checks every input; one agreed error before any work), then the recipe's
    lifecycle; exits with the recipe's status where it is not 0 (stopping.py)."""
    world = distributed.world_from_env()
    # a run that seems stuck: `kill -USR2 <pid>` prints where each of its threads is, and it goes on
    # (to the process's own stderr, file descriptor 2, whatever sys.stderr has become)
    faulthandler.register(STACKS_SIGNAL, file=sys.__stderr__, all_threads=True)
    plan = None
    try:
        with distributed.agreement(world):  # every rank checks; one agreed error before any work
            plan = plan_run(args, world)
    except BaseException:
        if plan is not None and plan.lock is not None:  # rank 0 planned, a peer did not (or never met it)
            plan.lock.release()
        raise
    recipe = TrainRecipe(plan)
    try:
        recipe.setup()
        status = recipe.train()
        if status == 0:
            recipe.save()
    except BaseException:
        recipe.cleanup(failed=True)
        raise
    recipe.cleanup()
    if status:
        sys.exit(status)
