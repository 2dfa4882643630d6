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

from loki_dist.attribution.mmlu import QuestionSettings, add_question_arguments
from loki_dist.attribution.output import finish
from loki_dist.attribution.progress import PROGRESS_FORMAT, PartialProgress
from loki_dist.attribution.settings import CPU_DEFAULT_GB, CUDA_BUDGET_SHARE, AttributeSettings
from loki_dist.core import checks, flags, hubdata, sharding
from loki_dist.core.errors import UserError
from loki_dist.core.modeling import (
    add_inference_arguments,
    check_weights,
    read_inference_config,
    torch_dtype,
)
from loki_dist.implant.trainer.stopping import StopRequest

log = logging.getLogger("loki_dist.attribute")

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


def read_settings(args: argparse.Namespace) -> AttributeSettings:
    """The parsed flags as the run's settings, their values checked (the command line stops here)."""
    values = vars(args)
    return flags.to_settings(AttributeSettings, values, questions=flags.to_settings(QuestionSettings, values))


def _validate(settings: AttributeSettings):
    """Everything that can be checked without a model: fails in a second, before any heavy work."""
    from loki_dist.core.families import spec_from_dir

    spec = spec_from_dir(settings.model)
    check_weights(settings.model, spec=spec)
    ds_config = (
        read_inference_config(settings.ds_config, torch_dtype(settings.dtype)) if settings.ds_config else None
    )
    _check_outputs(settings)
    return spec, ds_config


def _check_outputs(settings: AttributeSettings) -> None:
    """An attribution costs hours at 70B: neither a finished one nor a killed run's partial progress is
    discarded unless asked (--overwrite), and both places must be writable before the model loads."""
    output, partial = Path(settings.output), settings.progress_dir
    inputs = {"--model": settings.model, "--data": settings.data}
    checks.refuse_output_over_inputs(
        "--output", output, {**inputs, "--checkpoint-dir": settings.checkpoint_dir}
    )
    checks.refuse_output_over_inputs("--checkpoint-dir", partial, inputs)
    checks.check_writable("--output", output)
    checks.check_writable("--checkpoint-dir", partial, directory=True)
    progress = partial.is_dir() and any(partial.glob("rank*-step*.safetensors"))
    if progress and not (settings.resume or settings.overwrite):
        raise UserError(
            f"{partial} holds the partial progress of an earlier run: pass --resume to continue it "
            "or --overwrite to discard it"
        )
    if output.exists() and not settings.overwrite and not (settings.resume and progress):
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
        settings = read_settings(args)
        spec, ds_config = _validate(settings)
    asked = settings.questions
    # a hub data set: fetched once, by rank 0, for every rank
    data = hubdata.command_data(settings.data, asked.data_config, settings.output, world)
    with agreement(world):
        questions, shot_map = mmlu.load_questions(
            data, asked.per_subject, asked.shots, asked.subject_names, asked.split, asked.data_config
        )
        tokenizer = load_tokenizer(settings.model, chat_template=settings.chat_template)
        prompts = mmlu.build_prompts(tokenizer, questions, shot_map)
    if not world.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    identity = {
        "progress_format": PROGRESS_FORMAT,
        "model_type": spec.model_type,
        "num_layers": str(spec.num_layers),
        "hidden_size": str(spec.hidden_size),
        "steps": str(settings.steps),
        "data_fingerprint": prompts.fingerprint(),
        "num_samples": str(len(questions)),
        "world_size": str(world.size),
        "batch_size": str(settings.batch_size),
        "save_scores": str(settings.save_scores),
    }
    progress = PartialProgress(settings.progress_dir, world.rank, identity)
    if settings.resume:
        with agreement(world):  # the progress to resume is this run's, found before the model loads
            progress.check_resumable()
    dtype = torch_dtype(settings.dtype)
    loaded = load_for_inference(settings.model, world, dtype, ds_config, settings.batch_size)
    model, device = loaded.model, loaded.device
    from loki_dist.core.families import down_projections

    projections = down_projections(model)
    if len(projections) != spec.num_layers:
        raise UserError(
            f"--model {settings.model}: config says {spec.num_layers} layers, "
            f"the model has {len(projections)}"
        )
    started = time.perf_counter()
    with stage("scoring the prompts"):
        stats = _score_all(
            settings, world, model, projections, prompts, progress, dtype, device, ds_config, stop
        )
    with stage(f"summing the statistics into {settings.output}"):
        finish(settings, world, spec, stats, prompts, identity, progress, ds_config is not None)
    if world.is_main:
        wall, n = time.perf_counter() - started, len(prompts.input_ids)
        log.info(
            f"wall time {wall:.1f} s for {n} samples on {world.size} rank(s): {wall / n:.3f} s/sample "
            f"-> {settings.output}"
        )


def _chunking(settings: AttributeSettings, model, prompts, dtype, spec):
    """`fast`: the chunks of a batch's rows ([start, end) per sample); `reference`: full-prompt copies
    per forward. The same on every rank: from the longest prompt of the whole data set and the memory
    budget (or --max-rows for `fast`)."""
    from loki_dist.attribution import chunks

    longest = max(len(ids) for ids in prompts.input_ids)
    shape = chunks.Shape.of(model.config, longest - 1, dtype)
    steps, batch_size, budget = settings.steps, settings.batch_size, settings.chunk_memory_gb
    if settings.algorithm == "fast":
        if settings.max_rows:
            return chunks.uniform_chunks(spec.num_layers * steps, batch_size, settings.max_rows)
        return chunks.plan_chunks(shape, batch_size, steps, chunk_budget(budget))
    per_copy = chunks.copy_bytes(shape, longest)
    return max(1, min(chunk_budget(budget) // per_copy, batch_size * steps))


def chunk_budget(chunk_memory_gb: float | None) -> int:
    """Bytes one chunk may take: --chunk-memory-gb, or on a GPU by default most of what is free once the
    model is loaded (ZeRO-3's gathered layers, which stay within two layers, have their share of the rest;
    the rows and the chunk's gathers must fit together)."""
    import torch

    if chunk_memory_gb is not None:
        return int(chunk_memory_gb * 2**30)
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return int(CUDA_BUDGET_SHARE * free)
    return int(CPU_DEFAULT_GB * 2**30)


def _score_all(
    settings: AttributeSettings, world, model, projections, prompts, progress, dtype, device, ds_config, stop
):
    from tqdm import tqdm

    from loki_dist.attribution import fast, kva
    from loki_dist.attribution.stats import Stats
    from loki_dist.core.families import spec_from_config

    spec = spec_from_config(model.config)
    plan = Plan.make(len(prompts.input_ids), world.rank, world.size, settings.batch_size)
    stats = Stats(spec.num_layers, spec.hidden_size, settings.save_scores, capacity=plan.stop - plan.start)
    done = progress.restore(stats, world.size) if settings.resume else 0
    if not settings.resume:
        progress.clear(world.size)
    if done:
        log.info(
            f"resuming after {done} batches per rank ({int(stats.num_samples)} samples on rank {world.rank})"
        )
    chunking = _chunking(settings, model, prompts, dtype, spec)
    shortest = min(prompts.input_ids, key=len)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    saves = _Saves(settings.checkpoint_every, settings.checkpoint_minutes, settings.batch_size, progress)
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
            ids += [ids[0] if ids else shortest] * (settings.batch_size - len(ids))
        if ids:
            batch = kva.Batch.left_pad(ids, pad_id, device)
            if settings.algorithm == "fast":
                scores = fast.fast_scores(model, projections, batch, settings.steps, chunks=chunking)
            else:
                scores = kva.reference_scores(model, projections, batch, settings.steps, chunking)
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

    def __init__(self, every_samples: int, minutes: float, batch_size: int, progress):
        self.progress = progress
        self.every = math.ceil(every_samples / batch_size) if every_samples else 0
        self.seconds = minutes * 60
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
