"""`loki-dist attribute`: data-parallel KVA attribution, written as one attribution file.

The samples are cut into batches in data order first, then each rank scores a contiguous run of whole
batches (so every number is the same on any number of ranks, and its scores, sent in rank order, come
out in data order) and accumulates the statistics of stats.py. At the end the statistics are
summed into rank 0 a bounded piece at a time and rank 0 streams them, then every rank's scores, into the
file: no rank ever holds the whole sums or another rank's whole scores, and only rank 0 receives.
With `--ds-config` the model is ZeRO-3-sharded over the ranks for inference; ZeRO-3 gathers each
layer's parameters collectively, so then every rank makes exactly the same forward calls: shards are
padded with dummy batches and every batch with dummy samples (copies of its first prompt, which leave
its padded width as it is), whose scores are thrown away.

Partial statistics are checkpointed per rank every `--checkpoint-every` samples, one file per rank. A
rank removes its previous checkpoint only once every rank has written the new one, so `--resume`
always finds a step that all ranks share, even when a job was killed half-way through writing.
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

from loki_dist import __version__
from loki_dist.attribution.mmlu import add_question_arguments
from loki_dist.core import files, flags, sharding
from loki_dist.core.errors import UserError, require_at_least
from loki_dist.core.modeling import add_inference_arguments, check_weights, read_inference_config

log = logging.getLogger("loki_dist.attribute")

_KILL_ENV = "LOKI_DIST_TEST_KILL_AFTER_CHECKPOINT"  # tests only: SIGKILL self after this many checkpoints
CHUNK_BYTES = 64 << 20  # at the end, what a rank holds of the summed statistics or of another's scores
_CHUNK_ENV = "LOKI_DIST_TEST_CHUNK_BYTES"  # tests and benches only: a smaller CHUNK_BYTES, many pieces
# the layout of partial progress: progress of another layout (an older loki_dist) is refused on --resume
PROGRESS_FORMAT = "2"


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
        default=2.0,
        help="memory budget of one forward: packed rows (fast) or full-prompt copies (reference) (default 2)",
    )
    parser.add_argument("--save-scores", action="store_true", help="also store per-sample scores [N, L, D]")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=200,
        help="checkpoint partial statistics every N samples per rank (0: never)",
    )
    parser.add_argument("--checkpoint-dir", default=None, help="default: OUTPUT.partial")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoints in --checkpoint-dir"
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
    if args.chunk_memory_gb <= 0:
        raise UserError(f"--chunk-memory-gb {args.chunk_memory_gb}: must be positive")
    spec = spec_from_dir(args.model)
    check_weights(args.model, spec=spec)
    ds_config = read_inference_config(args.ds_config) if args.ds_config else None
    _check_outputs(args)
    return spec, ds_config


def _check_outputs(args: argparse.Namespace) -> None:
    """An attribution costs hours at 70B: neither a finished one nor a killed run's partial progress is
    discarded unless asked (--overwrite), and both places must be writable before the model loads."""
    output, partial = Path(args.output), Path(args.checkpoint_dir or f"{args.output}.partial")
    inputs = {"--model": args.model, "--data": args.data}
    files.refuse_output_over_inputs("--output", output, {**inputs, "--checkpoint-dir": args.checkpoint_dir})
    files.refuse_output_over_inputs("--checkpoint-dir", partial, inputs)
    files.check_writable("--output", output)
    files.check_writable("--checkpoint-dir", partial, directory=True)
    progress = partial.is_dir() and any(partial.glob("rank*-step*.safetensors"))
    if progress and not (args.resume or args.overwrite):
        raise UserError(
            f"{partial} holds the partial progress of an earlier run: pass --resume to continue it "
            "or --overwrite to discard it"
        )
    if output.exists() and not args.overwrite and not (args.resume and progress):
        raise UserError(f"--output {output}: already exists (pass --overwrite to replace it)")


def _check_progress(checkpoints: Checkpoints) -> None:
    """--resume: this rank's newest checkpoint must be of this very run, found before the model loads."""
    from safetensors import safe_open

    steps = checkpoints.steps()
    if not steps:
        return
    path = checkpoints._path(steps[-1])
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises several types for a damaged file
        raise UserError(f"--resume: {path} is unreadable ({err}); pass --overwrite instead") from None
    differs = [key for key, value in checkpoints.identity.items() if metadata.get(key) != value]
    if differs:
        raise UserError(
            f"--resume: the partial progress in {checkpoints.directory} was made with other settings "
            f"({', '.join(differs)}); pass --overwrite instead of --resume to discard it"
        )


# ------------------------------------------------------------------------------------------ checkpoints


class Checkpoints:
    """Per-rank partial statistics, `rank{r}-step{s}.safetensors`: one per rank between saves.

    A save writes the new step beside the old one and removes the old one only once every rank has
    written the new one (a barrier), so the second file lives only for the length of that commit
    and the ranks' newest steps never differ by more than one, which `restore` relies on.
    """

    def __init__(self, directory: Path, rank: int, identity: dict[str, str]):
        self.directory, self.rank, self.identity = directory, rank, identity

    def _path(self, step: int) -> Path:
        return self.directory / f"rank{self.rank}-step{step:09d}.safetensors"

    def steps(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        prefix = f"rank{self.rank}-step"
        return sorted(int(p.stem[len(prefix) :]) for p in self.directory.glob(f"{prefix}*.safetensors"))

    def save(self, stats, step: int) -> None:
        from loki_dist.core import metering
        from loki_dist.core.distributed import barrier
        from loki_dist.core.files import save_tensors_streaming

        with metering.phase("attribute_checkpoint"):
            tensors = stats.tensors()  # views: written as they are, never copied whole
            layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
            metadata = {**self.identity, "step": str(step)}
            save_tensors_streaming(self._path(step), layout, tensors.items(), metadata)
            barrier()  # every rank has `step` now, so older ones can go
            for old in self.steps():
                if old < step:
                    self._path(old).unlink(missing_ok=True)

    def restore(self, stats, world_size: int) -> int:
        """Load the newest step every rank has; returns the number of batches already done."""
        import torch

        from loki_dist.attribution.stats import load_file
        from loki_dist.core.distributed import all_gather_varlen

        mine = self.steps()
        latest = torch.tensor([mine[-1] if mine else 0], dtype=torch.int64)
        common = int(all_gather_varlen(latest, [1] * world_size).min())
        if common == 0:
            return 0
        if common not in mine:
            raise UserError(f"--resume: {self.directory} lacks step {common} for rank {self.rank}")
        tensors, metadata = load_file(self._path(common), flag="--resume")
        differs = [k for k, v in self.identity.items() if metadata.get(k) != v]
        if differs:
            raise UserError(
                f"--resume: the checkpoint in {self.directory} was made with different settings "
                f"({', '.join(differs)}); delete it or run without --resume"
            )
        stats.load(tensors)
        return common

    def clear(self, world_size: int) -> None:
        """Remove this rank's checkpoints, and what killed writers on this host left half-written; rank 0
        also those of ranks this run does not have (an earlier run on more ranks left them)."""
        from loki_dist.core.files import remove_stale_temporaries

        for step in self.steps():
            self._path(step).unlink(missing_ok=True)
        if self.rank == 0 and self.directory.is_dir():
            for path in self.directory.glob("rank*-step*.safetensors"):
                owner = path.name[len("rank") :].partition("-")[0]
                if owner.isdigit() and int(owner) >= world_size:
                    path.unlink(missing_ok=True)
        remove_stale_temporaries(self.directory)


# ------------------------------------------------------------------------------------------------- run


def run_attribute(args: argparse.Namespace) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from loki_dist.attribution import mmlu
    from loki_dist.core.distributed import agreement, stage, world_from_env
    from loki_dist.core.modeling import load_for_inference, load_tokenizer, torch_dtype

    world = world_from_env()
    with agreement(world):  # every rank checks; one agreed error before any work
        spec, ds_config = _validate(args)
        subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
        questions, shot_map = mmlu.load_questions(
            args.data, args.per_subject, args.shots, subjects, args.split, args.data_config
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
    checkpoints = Checkpoints(Path(args.checkpoint_dir or f"{args.output}.partial"), world.rank, identity)
    if args.resume:
        with agreement(world):  # the progress to resume is this run's, found before the model loads
            _check_progress(checkpoints)
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
        stats = _score_all(args, world, model, projections, prompts, checkpoints, dtype, device, ds_config)
    with stage(f"summing the statistics into {args.output}"):
        _finish(args, world, spec, stats, prompts, identity, checkpoints, ds_config is not None)
    if world.is_main:
        wall, n = time.perf_counter() - started, len(prompts.input_ids)
        log.info(
            f"wall time {wall:.1f} s for {n} samples on {world.size} rank(s): {wall / n:.3f} s/sample "
            f"-> {args.output}"
        )


def _chunk_size(args, model, prompts, dtype, spec) -> int:
    """Packed rows (`fast`) or full-prompt copies (`reference`) per forward: the same on every rank,
    from the longest prompt of the whole data set and --chunk-memory-gb (or --max-rows for `fast`)."""
    from loki_dist.attribution import kva

    if args.algorithm == "fast" and args.max_rows:
        return args.max_rows
    longest = max(len(ids) for ids in prompts.input_ids)
    if args.algorithm == "fast":
        per_item = kva.bytes_per_row(model.config, longest - 1, dtype)
    else:
        per_item = kva.bytes_per_copy(model.config, longest, dtype)
    most = args.batch_size * args.steps * (spec.num_layers if args.algorithm == "fast" else 1)
    return max(1, min(int(args.chunk_memory_gb * 2**30 // per_item), most))


def _score_all(args, world, model, projections, prompts, checkpoints, dtype, device, ds_config):
    from tqdm import tqdm

    from loki_dist.attribution import kva
    from loki_dist.attribution.stats import Stats
    from loki_dist.core.families import spec_from_config

    spec = spec_from_config(model.config)
    plan = Plan.make(len(prompts.input_ids), world.rank, world.size, args.batch_size)
    stats = Stats(spec.num_layers, spec.hidden_size, args.save_scores, capacity=plan.stop - plan.start)
    done = checkpoints.restore(stats, world.size) if args.resume else 0
    if not args.resume:
        checkpoints.clear(world.size)
    if done:
        log.info(
            f"resuming after {done} batches per rank ({int(stats.num_samples)} samples on rank {world.rank})"
        )
    chunk = _chunk_size(args, model, prompts, dtype, spec)
    shortest = min(prompts.input_ids, key=len)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    every = math.ceil(args.checkpoint_every / args.batch_size) if args.checkpoint_every else 0
    kills = int(os.environ.get(_KILL_ENV, "0"))
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
                scores = kva.fast_scores(model, projections, batch, args.steps, chunk)
            else:
                scores = kva.reference_scores(model, projections, batch, args.steps, chunk)
            stats.add(scores[: len(members)])
        scored += len(members)
        bar.update(len(members))
        bar.set_postfix_str(f"{(time.perf_counter() - started) / max(scored, 1):.3f} s/sample")
        if every and (index + 1) % every == 0 and index + 1 < plan.num_batches:
            checkpoints.save(stats, index + 1)
            kills -= 1
            if kills == 0:
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    return stats


def _finish(args, world, spec, stats, prompts, identity, checkpoints, zero3: bool) -> None:
    """Bring the statistics to rank 0, which writes the file as they arrive; then drop the checkpoints."""
    from loki_dist.core import metering
    from loki_dist.core.distributed import barrier, shutdown

    with metering.phase("attribute_finish"):
        _write_attribution(
            args, world, spec, stats, len(prompts.input_ids), _metadata(args, identity, prompts, zero3)
        )
        barrier()
        checkpoints.clear(world.size)
        barrier()  # every rank's files are gone before rank 0 looks at the directory
        if world.is_main and checkpoints.directory.is_dir() and not any(checkpoints.directory.iterdir()):
            checkpoints.directory.rmdir()
    shutdown()


def _write_attribution(args, world, spec, stats, num_samples: int, metadata: dict[str, str]) -> None:
    """Sum the ranks' statistics into rank 0 piece by piece, and stream them and the scores to the file.

    At 70B (L=80, D=8192, 2850 samples) the summed histograms are 1.6 GB and the scores 7.5 GB: no
    rank may hold either whole. The sums reach only rank 0, CHUNK_BYTES at a time, widened there to
    the file's int64; the scores travel point to point from each rank to rank 0, in rank (= data)
    order, while rank 0 appends them to the file. The other ranks receive nothing.
    """
    import torch

    from loki_dist.attribution.stats import HISTOGRAMS, file_layout
    from loki_dist.core.distributed import reduce_to_main, stream_to_main
    from loki_dist.core.files import save_tensors_streaming

    layout = file_layout(spec.num_layers, spec.hidden_size, num_samples, args.save_scores)
    tensors = stats.tensors()
    chunk = int(os.environ.get(_CHUNK_ENV, CHUNK_BYTES))

    def summed(names: tuple[str, ...]):
        parts = reduce_to_main([tensors[n] for n in names], layout[names[0]][0], chunk)
        return ((names[index], piece) for index, piece in parts)

    # the small sums first, kept on rank 0 for the summary (a piece is only valid until the next one)
    count = [p.clone() for _, p in summed(("num_samples",))]
    score_sum = _exact_score_sum(stats, world.size, chunk)

    def pieces():
        yield from (("num_samples", piece) for piece in count)
        if score_sum is not None:
            yield "score_sum", score_sum.view(-1)
        yield from summed(HISTOGRAMS)
        if args.save_scores:
            per_rank = sharding.block_sizes(num_samples, world.size, args.batch_size)
            sizes = [n * spec.num_layers * spec.hidden_size for n in per_rank]
            yield from (("scores", p) for p in stream_to_main(tensors["scores"], sizes, chunk))

    if not world.is_main:
        for _ in pieces():  # the collectives, in the same order as on rank 0
            pass
        return
    save_tensors_streaming(args.output, layout, pieces(), metadata)
    _summary(score_sum, int(torch.cat(count).item()), spec)


def _exact_score_sum(stats, world_size: int, chunk: int):
    """The score sum over all ranks on rank 0 (None elsewhere), the same to the bit on any number of
    ranks: a sum reduction would add the ranks' float64 sums in an order that depends on the world
    size, so each rank's sum and its rounding error go to rank 0 point to point, a piece at a time,
    and rank 0 adds them with stats.exact_add. Rank 0 holds two [L, D] float64 tensors (10 MB at 70B).
    """
    import torch

    from loki_dist.attribution.stats import exact_add
    from loki_dist.core.distributed import stream_to_main

    total, error = torch.zeros_like(stats.score_sum), torch.zeros_like(stats.score_sum)
    flat_total, flat_error, numel = total.view(-1), error.view(-1), total.numel()
    received = False
    for part, exact in ((stats.score_sum, True), (stats.score_sum_error, False)):
        at = 0  # every rank sends numel elements, in rank order, and no piece spans two ranks
        for piece in stream_to_main(part, [numel] * world_size, chunk):
            where = slice(at % numel, at % numel + piece.numel())
            if exact:
                exact_add(flat_total[where], flat_error[where], piece.double())
            else:
                flat_error[where] += piece
            at, received = at + piece.numel(), True
    return total + error if received else None


def _metadata(args, identity: dict[str, str], prompts, zero3: bool) -> dict[str, str]:
    metadata = {
        **identity,
        "format": "loki_dist attribution v1",
        "model": str(args.model),
        "algorithm": args.algorithm,
        "prompt": "mmlu single choice (DESIGN.md)",
        "chat_template": str(prompts.chat_template),
        "shots": str(args.shots),
        "per_subject": str(args.per_subject),
        "subjects": args.subjects or "all",
        "split": args.split,
        "data": str(args.data),
        "dtype": args.dtype,
        "zero3": str(zero3),
        "loki_dist_version": __version__,
    }
    for key in ("batch_size", "progress_format"):  # of the run, not of the result
        del metadata[key]
    return metadata


def _summary(score_sum, n: int, spec) -> None:
    mean = score_sum / max(n, 1)
    lines = [f"attribution: {n} samples"]
    for layer in range(spec.num_layers):
        row = mean[layer]
        lines.append(
            f"  layer {layer:3d}: mean score {row.mean().item():+.3e}  "
            f"(min {row.min().item():+.3e}, max {row.max().item():+.3e})"
        )
    log.info("\n".join(lines))
