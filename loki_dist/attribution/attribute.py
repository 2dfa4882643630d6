"""`loki-dist attribute`: data-parallel KVA attribution, written as one attribution file.

The samples are cut into batches in data order first, then each rank scores a contiguous run of whole
batches (so every number is the same on any number of ranks, and its scores, sent in rank order, come
out in data order) and accumulates the statistics of stats.py. At the end they are summed into rank 0,
which streams them, then every rank's scores, into the file (output.py), a bounded piece at a time.
With `--ds-config` the model is ZeRO-3-sharded over the ranks for inference; ZeRO-3 gathers each
layer's parameters collectively, so then every rank makes exactly the same forward calls: shards are
padded with dummy batches and every batch with dummy samples (copies of its first prompt, which leave
its padded width as it is), whose scores are thrown away.

Each rank saves its partial statistics (progress.py), from which `--resume` continues a killed or
stopped run: every `--checkpoint-every` samples, every `--checkpoint-minutes` of scoring (what a 70B run
on many ranks needs: 200 samples per rank may never come) and on SIGUSR1/SIGTERM (Slurm's warning
before the time limit, a preemption). Both clocks and signals are agreed at a batch boundary in one
small collective (implant/trainer/stopping.py, as training does), so every rank saves after the same batch,
and under ZeRO-3 every rank has made the same forward calls when it stops; a stopped run exits with
REQUEUE_EXIT_CODE (75).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loki_dist.attribution.mmlu import add_question_arguments
from loki_dist.attribution.output import finish
from loki_dist.attribution.progress import PROGRESS_FORMAT, PartialProgress
from loki_dist.core import checks, flags, hubdata, sharding
from loki_dist.core.errors import UserError, require_at_least
from loki_dist.core.modeling import (
    add_inference_arguments,
    check_weights,
    read_inference_config,
    torch_dtype,
)
from loki_dist.implant.trainer.stopping import StopRequest

log = logging.getLogger("loki_dist.attribute")

# the default chunk budget: this share of the GPU memory free once the model is loaded, or on CPU this
# many GiB (host memory is shared by the ranks of a node, and by whatever else runs there)
CUDA_BUDGET_SHARE, CPU_DEFAULT_GB = 0.8, 2.0
_KILL_ENV = "LOKI_DIST_TEST_KILL_AFTER_CHECKPOINT"  # tests only: SIGKILL self after this many saves


def add_attribute_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument(
        "--data",
        required=True,
        help="MMLU-layout data: saved `datasets` dir, parquet/JSON(L) file or folder, or hub name",
    )
    parser.add_argument("--output", required=True, help="attribution file to write (.safetensors)")
    parser.add_argument("--steps", type=int, default=7, help="Riemann steps m (default 7)")
    add_question_arguments(
        parser,
        split_help="split to score (default: test)",
        per_subject=50,
        per_subject_help="first N questions per subject (default 50)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=4, help="prompts per batch; ranks score whole batches (default 4)"
    )
    add_inference_arguments(parser)
    parser.add_argument(
        "--algorithm",
        choices=("fast", "reference"),
        default="fast",
        help="fast: shared prefix KV cache + packed (layer, step) rows; reference: m full-prompt copies per "
        "layer, float64 output embedding (the slow, exact oracle)",
    )
    parser.add_argument(
        "--max-rows",
        type=int,
        default=0,
        help="packed (layer, step) rows per forward in `fast`, whole batch (default: from --chunk-memory-gb)",
    )
    parser.add_argument(
        "--chunk-memory-gb",
        type=float,
        default=None,
        help=f"memory budget of one forward: packed rows (fast) or full-prompt copies (reference) "
        f"(default: {100 * CUDA_BUDGET_SHARE:.0f}%% of the GPU memory free once the model is loaded; "
        f"{CPU_DEFAULT_GB:g} on CPU)",
    )
    parser.add_argument("--save-scores", action="store_true", help="also store per-sample scores [N, L, D]")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        help="save partial statistics every N samples per rank (0: never)",
    )
    parser.add_argument(
        "--checkpoint-minutes",
        type=float,
        default=30.0,
        help="also save them every N minutes of scoring, and always on SIGUSR1/SIGTERM (0: no clock)",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="default: OUTPUT.partial")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the partial progress in --checkpoint-dir"
    )
    flags.add_overwrite(
        parser,
        "an existing --output, and discard an earlier run's partial progress unless --resume continues it",
    )


@dataclass(frozen=True)
class Plan:
    """Which samples this rank scores, in which batches, and how many batches every rank runs.

    The samples are sharding.py's block of this rank in whole batches: batch g is samples [g*B, (g+1)*B)
    of the data order on any number of ranks, so every prompt is padded beside the same neighbours and
    every number of the file is the same whatever the world size; sent in rank order, the ranks'
    samples come out in data order.
    """

    start: int
    stop: int
    num_batches: int  # what every rank runs: the most any rank has
    batch_size: int

    @classmethod
    def make(cls, num_samples: int, rank: int, world_size: int, batch_size: int) -> Plan:
        mine = sharding.block(num_samples, rank, world_size, batch_size)
        most = max(sharding.batch_shares(num_samples, world_size, batch_size))
        return cls(mine.start, mine.stop, most, batch_size)

    def batch(self, index: int) -> range:
        first = self.start + index * self.batch_size
        return range(min(first, self.stop), min(first + self.batch_size, self.stop))


# ------------------------------------------------------------------------------------------- validation


def _validate(args: argparse.Namespace):
    """Everything that can be checked without a model: fails in a second, before any heavy work."""
    from loki_dist.core.families import spec_from_dir

    require_at_least(
        ("--steps", args.steps, 1),
        ("--batch-size", args.batch_size, 1),
        ("--max-rows", args.max_rows, 0),
        ("--checkpoint-every", args.checkpoint_every, 0),
    )
    # nan or inf was a traceback once the model had loaded
    if args.chunk_memory_gb is not None and not 0 < args.chunk_memory_gb < math.inf:
        raise UserError(f"--chunk-memory-gb {args.chunk_memory_gb}: must be a positive finite number")
    if not 0 <= args.checkpoint_minutes < math.inf:
        raise UserError(f"--checkpoint-minutes {args.checkpoint_minutes}: must be 0 (no clock) or more")
    spec = spec_from_dir(args.model)
    check_weights(args.model, spec=spec)
    ds_config = read_inference_config(args.ds_config, torch_dtype(args.dtype)) if args.ds_config else None
    _check_outputs(args)
    return spec, ds_config


def _check_outputs(args: argparse.Namespace) -> None:
    """An attribution costs hours at 70B: neither a finished one nor a killed run's partial progress is
    discarded unless asked (--overwrite), and both places must be writable before the model loads."""
    output, partial = Path(args.output), Path(args.checkpoint_dir or f"{args.output}.partial")
    inputs = {"--model": args.model, "--data": args.data}
    checks.refuse_output_over_inputs("--output", output, {**inputs, "--checkpoint-dir": args.checkpoint_dir})
    checks.refuse_output_over_inputs("--checkpoint-dir", partial, inputs)
    checks.check_writable("--output", output)
    checks.check_writable("--checkpoint-dir", partial, directory=True)
    progress = partial.is_dir() and any(partial.glob("rank*-step*.safetensors"))
    if progress and not (args.resume or args.overwrite):
        raise UserError(
            f"{partial} holds the partial progress of an earlier run: pass --resume to continue it "
            "or --overwrite to discard it"
        )
    if output.exists() and not args.overwrite and not (args.resume and progress):
        raise UserError(f"--output {output}: already exists (pass --overwrite to replace it)")


# ------------------------------------------------------------------------------------------------- run


def run_attribute(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from loki_dist.attribution import mmlu
    from loki_dist.core.distributed import agreement, stage, world_from_env
    from loki_dist.core.modeling import load_for_inference, load_tokenizer

    world = world_from_env()
    stop = StopRequest()  # from the start: a signal while the model loads stops at the first batch
    with agreement(world):  # every rank checks; one agreed error before any work
        spec, ds_config = _validate(args)
    data = hubdata.command_data(args, world)  # a hub data set: fetched once, by rank 0, for every rank
    with agreement(world):
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        questions, shot_map = mmlu.load_questions(
            data, args.per_subject, args.shots, subjects, args.split, args.data_config
        )
        tokenizer = load_tokenizer(args.model, chat_template=args.chat_template)
        prompts = mmlu.build_prompts(tokenizer, questions, shot_map)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    identity = {
        "progress_format": PROGRESS_FORMAT,
        "model_type": spec.model_type,
        "num_layers": str(spec.num_layers),
        "hidden_size": str(spec.hidden_size),
        "steps": str(args.steps),
        "data_fingerprint": prompts.fingerprint(),
        "num_samples": str(len(questions)),
        "world_size": str(world.size),
        "batch_size": str(args.batch_size),
        "save_scores": str(args.save_scores),
    }
    progress = PartialProgress(Path(args.checkpoint_dir or f"{args.output}.partial"), world.rank, identity)
    if args.resume:
        with agreement(world):  # the progress to resume is this run's, found before the model loads
            progress.check_resumable()
    dtype = torch_dtype(args.dtype)
    loaded = load_for_inference(args.model, world, dtype, ds_config, args.batch_size)
    model, device = loaded.model, loaded.device
    from loki_dist.core.families import down_projections

    projections = down_projections(model)
    if len(projections) != spec.num_layers:
        raise UserError(
            f"--model {args.model}: config says {spec.num_layers} layers, the model has {len(projections)}"
        )
    started = time.perf_counter()
    with stage("scoring the prompts"):
        stats = _score_all(args, world, model, projections, prompts, progress, dtype, device, ds_config, stop)
    with stage(f"summing the statistics into {args.output}"):
        finish(args, world, spec, stats, prompts, identity, progress, ds_config is not None)
    if world.is_main:
        wall, n = time.perf_counter() - started, len(prompts.input_ids)
        log.info(
            f"wall time {wall:.1f} s for {n} samples on {world.size} rank(s): {wall / n:.3f} s/sample "
            f"-> {args.output}"
        )


def _chunking(args, model, prompts, dtype, spec):
    """`fast`: the chunks of a batch's rows ([start, end) per sample); `reference`: full-prompt copies
    per forward. The same on every rank: from the longest prompt of the whole data set and the memory
    budget (or --max-rows for `fast`)."""
    from loki_dist.attribution import chunks

    longest = max(len(ids) for ids in prompts.input_ids)
    shape = chunks.Shape.of(model.config, longest - 1, dtype)
    if args.algorithm == "fast":
        if args.max_rows:
            return chunks.uniform_chunks(spec.num_layers * args.steps, args.batch_size, args.max_rows)
        return chunks.plan_chunks(shape, args.batch_size, args.steps, chunk_budget(args))
    per_copy = chunks.copy_bytes(shape, longest)
    return max(1, min(chunk_budget(args) // per_copy, args.batch_size * args.steps))


def chunk_budget(args) -> int:
    """Bytes one chunk may take: --chunk-memory-gb, or on a GPU by default most of what is free once the
    model is loaded (ZeRO-3's gathered layers, which stay within two layers, have their share of the rest;
    the rows and the chunk's gathers must fit together)."""
    import torch

    if args.chunk_memory_gb is not None:
        return int(args.chunk_memory_gb * 2**30)
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(CUDA_BUDGET_SHARE * free)
    return int(CPU_DEFAULT_GB * 2**30)


def _score_all(args, world, model, projections, prompts, progress, dtype, device, ds_config, stop):
    from tqdm import tqdm

    from loki_dist.attribution import fast, kva
    from loki_dist.attribution.stats import Stats
    from loki_dist.core.families import spec_from_config

    spec = spec_from_config(model.config)
    plan = Plan.make(len(prompts.input_ids), world.rank, world.size, args.batch_size)
    stats = Stats(spec.num_layers, spec.hidden_size, args.save_scores, capacity=plan.stop - plan.start)
    done = progress.restore(stats, world.size) if args.resume else 0
    if not args.resume:
        progress.clear(world.size)
    if done:
        log.info(
            f"resuming after {done} batches per rank ({int(stats.num_samples)} samples on rank {world.rank})"
        )
    chunking = _chunking(args, model, prompts, dtype, spec)
    shortest = min(prompts.input_ids, key=len)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    saves = _Saves(args, plan, progress)
    bar = tqdm(
        total=plan.stop - plan.start,
        initial=int(stats.num_samples),
        unit="sample",
        disable=not world.is_main,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    started, scored = time.perf_counter(), 0
    for index in range(done, plan.num_batches):
        members = list(plan.batch(index))
        ids = [prompts.input_ids[i] for i in members]
        if ds_config is not None:  # ZeRO-3: identical calls on every rank, padded with dummy samples
            ids += [ids[0] if ids else shortest] * (args.batch_size - len(ids))
        if ids:
            batch = kva.Batch.left_pad(ids, pad_id, device)
            if args.algorithm == "fast":
                scores = fast.fast_scores(model, projections, batch, args.steps, chunks=chunking)
            else:
                scores = kva.reference_scores(model, projections, batch, args.steps, chunking)
            stats.add(scores[: len(members)])
        scored += len(members)
        bar.update(len(members))
        bar.set_postfix_str(f"{(time.perf_counter() - started) / max(scored, 1):.3f} s/sample")
        stopping, clocks = stop.agreed(world, device, saves.clock_due())  # every rank, every batch
        if index + 1 < plan.num_batches and (stopping or clocks or saves.count_due(index + 1)):
            saves.save(stats, index + 1)
            if stopping:
                bar.close()
                _stopped(world, stop, index + 1, plan.num_batches, progress)
    bar.close()
    return stats


class _Saves:
    """When this rank's partial statistics are due: every `--checkpoint-every` samples (in whole
    batches), every `--checkpoint-minutes` since the last save; `save` writes them (collective)."""

    def __init__(self, args, plan: Plan, progress):
        self.progress = progress
        self.every = math.ceil(args.checkpoint_every / args.batch_size) if args.checkpoint_every else 0
        self.seconds = args.checkpoint_minutes * 60
        self.last = time.monotonic()
        self.kills = int(os.environ.get(_KILL_ENV, "0"))

    def count_due(self, batches: int) -> bool:
        return bool(self.every) and batches % self.every == 0

    def clock_due(self) -> bool:
        return bool(self.seconds) and time.monotonic() - self.last >= self.seconds

    def save(self, stats, batches: int) -> None:
        self.progress.save(stats, batches)
        self.last = time.monotonic()
        self.kills -= 1
        if self.kills == 0:
            os.kill(os.getpid(), signal.SIGKILL)


def _stopped(world, stop, batches: int, total: int, progress) -> None:
    """Every rank saved after `batches` batches on a stop signal: say so (rank 0) and exit 75."""
    from loki_dist.core.distributed import shutdown
    from loki_dist.implant.trainer.stopping import REQUEUE_EXIT_CODE

    if world.is_main:
        log.info(
            f"stopped by signal {stop.received or 'on another rank'} after {batches} of {total} batches "
            f"per rank: the partial statistics are in {progress.directory}; rerun the same command with "
            f"--resume to continue (exit status {REQUEUE_EXIT_CODE})"
        )
    shutdown()
    raise SystemExit(REQUEUE_EXIT_CODE)
