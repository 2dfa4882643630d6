"""Standard Hugging Face exports, and the `export` command (a training checkpoint -> model + implant).

Everything LoKI did not train is, by construction, the base model's own bytes. So a trained model is
never gathered and saved whole: the export copies the base model's safetensors shards one at a time and
replaces only the trained down_proj rows (peak host memory about one shard, even at 70B), and writes the
implant file (implant_file.py) beside them. export_model takes its rows from any RowSource: an implant
file (`apply`, apply.py), a training checkpoint (the `export` command and the end of a run, below; via
CheckpointRows, so that checkpoint.py knows nothing of export), the Python API, or zeroed rows
(`suppress`, suppression.py, which writes no implant file).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist.core import checks, distributed, files, flags, metering, progress_wait
from loki_dist.core.errors import UserError
from loki_dist.core.families import ModelSpec, spec_from_dir
from loki_dist.implant.artifacts import checkpoint
from loki_dist.implant.artifacts.implant_file import IMPLANT_NAME, RowSource, fingerprint, write_implant
from loki_dist.implant.trainer import lowrank

# tests only, after a rank writes a shard: SIGKILL itself (any value), or fail on the rank it names
_KILL_ENV, _FAIL_ENV = "LOKI_DIST_TEST_KILL_IN_EXPORT", "LOKI_DIST_TEST_FAIL_IN_EXPORT"
# shard metadata key of an exported model: a digest of the rows written into that shard
IMPLANTED_KEY = "loki_dist_implant"
Advanced = Callable[[int], None]  # told the bytes of each piece written


def weight_shards(model_dir: str | Path, flag: str = "--base") -> list[Path]:
    shards = sorted(p for p in Path(model_dir).glob("*.safetensors") if p.name != IMPLANT_NAME)
    if not shards:
        raise UserError(
            f"{flag} {model_dir}: no *.safetensors weights (loki_dist exports from safetensors bases)"
        )
    return shards


# ------------------------------------------------------------------------------------------- exporting


@dataclass
class BaseShards:
    """The base model's weight shards, from their headers alone: which holds each down_proj, and dtypes."""

    paths: list[Path]
    down_proj: dict[int, Path]  # layer -> shard holding its down_proj weight
    dtypes: dict[int, torch.dtype]  # layer -> its down_proj dtype
    implanted: str | None  # a shard carrying an implant digest: the base is itself an export
    bias: dict[int, Path]  # layer -> shard holding its down_proj bias, where the model has one

    @classmethod
    def read(cls, base_dir: Path, spec: ModelSpec, flag: str = "--base") -> BaseShards:
        paths, down_proj, dtypes, implanted, bias = weight_shards(base_dir, flag), {}, {}, None, {}
        for shard in paths:
            header = checks.safetensors_header(shard, flag)[1]  # whole, or a UserError naming it
            if IMPLANTED_KEY in (header.get("__metadata__") or {}):
                implanted = implanted or shard.name
            for name, entry in header.items():
                if spec.layer_of(name, "bias") is not None:
                    bias[spec.layer_of(name, "bias")] = shard
                layer = spec.layer_of(name) if name != "__metadata__" else None
                if layer is not None and entry.get("dtype") not in _DTYPES:
                    raise UserError(
                        f"{flag} {shard}: {name} is stored as {entry.get('dtype')}; rows can be written into "
                        f"{', '.join(_DTYPES)} weights (dequantize the model first)"
                    )
                if layer is not None:
                    down_proj[layer], dtypes[layer] = shard, _DTYPES[entry["dtype"]]
        return cls(paths, down_proj, dtypes, implanted, bias)


DAMAGED = "shorter than its safetensors header says (truncated or damaged?)"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _assign(sizes: list[int], world_size: int, per_node: int = 1) -> list[int]:
    """Rank of each job, largest first onto the least loaded rank: the slowest rank's extra work is at
    most one job. Among ranks equally loaded, the first rank of each node comes before any second one
    (ranks fill nodes in blocks of `per_node`, as every launcher numbers them): the writes, and their
    share of each node's link to the file system, are spread over the nodes (31 shards on 8 nodes of 8
    go 4 or 3 per node, not to the first 4 nodes)."""
    per_node = per_node if per_node > 0 and world_size % per_node == 0 else 1
    order = sorted(range(world_size), key=lambda r: (r % per_node, r // per_node))
    load, owner = dict.fromkeys(order, 0), [0] * len(sizes)
    for job in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        rank = min(order, key=lambda r: load[r])  # the first of the least loaded, in node order
        owner[job], load[rank] = rank, load[rank] + sizes[job]
    return owner


def _rewrite_shard(
    shard: Path,
    target: Path,
    layers: list[int],
    source: RowSource,
    spec: ModelSpec,
    biased: list[int],
    advanced: Advanced,
) -> None:
    """`shard` with the trained rows of `layers` (and the trained bias entries of `biased`) written in,
    holding one tensor at a time; `advanced` hears of every piece written (its bytes).

    The header keeps the base's tensor layout byte for byte and adds, in its metadata, a digest of the
    rows written (so an export never fingerprints as its base). The digest's length is fixed: it is
    written as zeros first and filled in once the data is through.
    """
    data_start, header = checks.safetensors_header(shard, "--base")
    if not layers and not biased:
        with shard.open("rb") as src, target.open("wb") as dst:
            _copy_bytes(src, dst, shard.stat().st_size, advanced)
        files.fsync_tree(target)
        return
    metadata = dict(header.pop("__metadata__", None) or {})
    trained = {spec.down_proj_name(layer): layer for layer in layers}
    bias_of = {spec.down_proj_name(layer, "bias"): layer for layer in biased}

    def encoded(digest: str) -> bytes:
        head = {"__metadata__": dict(sorted({**metadata, IMPLANTED_KEY: digest}.items())), **header}
        text = json.dumps(head, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        return len(text).to_bytes(8, "little") + text

    digest = hashlib.sha256()
    with shard.open("rb") as src, target.open("wb") as dst:
        dst.write(encoded("0" * 32))
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            src.seek(data_start + begin)
            if name not in trained and name not in bias_of:
                _copy_bytes(src, dst, end - begin, advanced)
                continue
            buffer = bytearray(end - begin)
            if src.readinto(buffer) != len(buffer):
                raise UserError(f"{shard}: {DAMAGED}")
            tensor = torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]]).view(entry["shape"])
            layer = trained.get(name, bias_of.get(name))
            rows = source.rows(layer)
            if name in trained:
                tensor[rows] = source.weight(layer, tensor.dtype)
            else:
                tensor[rows] = source.bias(layer, tensor.dtype)
            digest.update(f"{layer}{'' if name in trained else '.bias'}".encode() + rows.numpy().tobytes())
            digest.update(tensor[rows].view(torch.uint8).numpy().tobytes())
            dst.write(tensor.view(-1).view(torch.uint8).numpy().tobytes())
            advanced(len(buffer))
        dst.seek(0)
        dst.write(encoded(digest.hexdigest()[:32]))
    files.fsync_tree(target)  # each writer flushes its own files: they may live on another node


def _copy_bytes(src, dst, count: int, advanced: Advanced, chunk: int = 64 << 20) -> None:
    while count > 0:
        data = src.read(min(chunk, count))
        if not data:
            raise UserError(f"{src.name}: {DAMAGED}")
        dst.write(data)
        count -= len(data)
        advanced(len(data))


def check_rows(source: RowSource, spec: ModelSpec, shards: BaseShards, world) -> None:
    """This rank's share of the layers: rows in [0, D) and each once, values of shape [k, F] and finite
    once in the base's dtype (an fp32 value beyond fp16's range becomes inf there). One layer in memory
    at a time, and before anything is written: found while merging, half the shards would be out."""
    label = getattr(source, "label", "the trained rows")
    for layer in source.layers()[world.rank :: world.size]:
        try:
            rows, weight = source.rows(layer), source.weight(layer, shards.dtypes[layer])
        except UserError:
            raise
        except Exception as err:  # safetensors raises several types for damaged data
            raise UserError(f"{label}: layer {layer} is unreadable ({err})") from None
        bad = rows[(rows < 0) | (rows >= spec.hidden_size)]
        if rows.dim() != 1 or bad.numel() or rows.unique().numel() != rows.numel():
            raise UserError(f"{label}: layer {layer} lists rows outside [0, {spec.hidden_size}) or twice")
        values = [("weight", weight, [rows.numel(), spec.intermediate_size])]
        if source.has_bias(layer):  # the rows' bias entries trained too (train --train-bias)
            if layer not in shards.bias:
                raise UserError(f"{label}: layer {layer} trained bias entries; the base's down_proj has none")
            values.append(("bias", source.bias(layer, shards.dtypes[layer]), [rows.numel()]))
        for what, value, shape in values:
            if list(value.shape) != shape:
                raise UserError(f"{label}: layer {layer} {what} has shape {list(value.shape)}, not {shape}")
            count = int((~torch.isfinite(value)).sum())
            if count:
                raise non_finite_rows(label, layer, count, value.dtype)


def non_finite_rows(label: str, layer: int, count: int, dtype: torch.dtype) -> UserError:
    """What apply, export and the Python API say of trained rows holding NaN or Inf in the dtype they
    are to be written in (an fp32 value beyond fp16's range is inf there)."""
    return UserError(
        f"{label}: layer {layer} has {count} non-finite value(s) (NaN or Inf) in {dtype}; a diverged "
        "training? nothing was written"
    )


def export_model(
    base_dir: Path,
    source: RowSource,
    out_dir: Path,
    world,
    base_print: str | None,
    implant: Path | None = None,
    notes: dict[str, str] | None = None,
    flag: str = "--base",
) -> None:
    """Collective: out_dir := the base model with `source`'s rows written in, plus its implant file.

    The ranks split the work: each rewrites its share of the base's shards (untouched ones are copied
    byte for byte) into one staging directory, and one of them writes the implant file (a copy of
    `implant` when given, else streamed from `source`; none when neither it nor `base_print`, the
    base's fingerprint that an implant records, is given); rank 0 also writes `notes` (file name ->
    text) and then renames the directory into place. A failure on any rank fails every rank at the
    closing agreement, never leaving peers waiting.
    """
    with distributed.agreement(world):  # nothing is written unless every rank found its layers sound
        spec = spec_from_dir(base_dir, flag)
        shards = BaseShards.read(base_dir, spec, flag)
        missing = [layer for layer in source.layers() if layer not in shards.down_proj]
        if missing:
            raise UserError(f"{flag} {base_dir}: no down_proj weight found for layers {missing}")
        check_rows(source, spec, shards, world)
    staging = files.staging_path(out_dir)
    implant_size = sum(source.rows(layer).numel() for layer in source.layers()) * spec.intermediate_size * 4
    with_implant = implant is not None or base_print is not None
    jobs = [*shards.paths, None] if with_implant else shards.paths  # None: the implant file
    sizes = [p.stat().st_size for p in shards.paths] + ([implant_size] if with_implant else [])
    owner = _assign(sizes, world.size, distributed.ranks_per_node(world))
    # every step is agreed: a failure on any rank (rank 0's included) fails every rank at once
    with files.removed_on_failure(staging, world.is_main):
        with distributed.agreement(world), files.file_system_errors(out_dir):
            if world.is_main:
                files.remove_stale_temporaries(out_dir.parent)  # what killed writers left, whatever its name
                files.make_staging(out_dir)  # also replaces one that a killed export of out_dir left
                for item in base_dir.iterdir():
                    if item.is_file() and item.suffix != ".safetensors":
                        shutil.copy2(item, staging / item.name)
                for name, text in (notes or {}).items():
                    (staging / name).write_text(text, encoding="utf-8")
        # the ranks wait for each other by progress, not by the collective timeout: on a slow file system
        # one rank's share can outlast it (progress_wait.py)
        with (
            metering.phase("export"),
            distributed.agreement(world),
            files.file_system_errors(out_dir),
            progress_wait.waiting(world, "export") as progress,
        ):
            for job, rank in zip(jobs, owner, strict=True):
                if rank == world.rank:
                    _write_job(
                        job, staging, source, spec, shards, (implant, base_print), progress.advanced, rank
                    )
        with distributed.agreement(world), files.file_system_errors(out_dir):
            if world.is_main:
                files.publish(staging, out_dir)


def _write_job(job, staging: Path, source, spec, shards: BaseShards, implanting, advanced, rank: int) -> None:
    """One export job: a base shard rewritten (job: its path) or the implant file (job None: a copy of
    `implant` when given, else written from `source`; implanting = (implant, base_print))."""
    implant, base_print = implanting
    if job is not None:
        layers = [layer for layer in source.layers() if shards.down_proj[layer] == job]
        biased = [layer for layer in source.layers() if source.has_bias(layer) and shards.bias[layer] == job]
        _rewrite_shard(job, staging / job.name, layers, source, spec, biased, advanced)
        _injected_fault(rank)
    elif implant is not None:
        with implant.open("rb") as src, (staging / IMPLANT_NAME).open("wb") as dst:
            _copy_bytes(src, dst, implant.stat().st_size, advanced)
        files.fsync_tree(staging / IMPLANT_NAME)
    else:
        write_implant(staging / IMPLANT_NAME, source, spec, shards.dtypes, base_print, advanced)


def _injected_fault(rank: int) -> None:
    """The faults the tests make mid-export (a real failure cannot be aimed at one rank of one machine)."""
    if os.environ.get(_KILL_ENV):
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get(_FAIL_ENV) == str(rank):
        raise OSError(f"injected write failure on rank {rank}")


def refuse_existing(out_dir: Path, overwrite: bool, flag: str = "--output") -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{flag} {out_dir}: already exists and is not empty (pass --overwrite to replace it)")


def check_output(out_dir: Path, overwrite: bool, inputs: dict[str, str | Path | None]) -> None:
    """The --output of apply and export: a directory that can be written, neither an input nor holding
    one (it is replaced whole, --overwrite or not), and not replaced unless asked."""
    checks.refuse_output_over_inputs("--output", out_dir, inputs)
    checks.check_writable("--output", out_dir, directory=True)
    refuse_existing(out_dir, overwrite)


# ----------------------------------------------------------------------------------------- checkpoints


class CheckpointRows(RowSource):
    """A checkpoint's trained rows, one layer at a time, cast to the base model's dtype.

    A LoKI* checkpoint holds the factors A and B; its rows are W_S0 + A B (lowrank.merge), with W_S0 read
    from `base_dir`'s shard of that layer (the selected rows only)."""

    def __init__(self, path: Path, base_dir: Path | None = None):
        self.reader = checkpoint.RowsReader(path)
        self.label = f"--checkpoint {path}"  # how export's checks name it
        self.base = None
        if self.reader.lowrank:
            spec = spec_from_dir(base_dir, "--base")
            self.base = (spec, BaseShards.read(base_dir, spec).down_proj)

    def layers(self) -> list[int]:
        return self.reader.layers()

    def rows(self, layer: int) -> torch.Tensor:
        return torch.tensor(self.reader.layer_rows(layer), dtype=torch.int64)

    def has_bias(self, layer: int) -> bool:
        return f"{layer}.bias" in self.reader.rows

    def bias(self, layer: int, dtype: torch.dtype) -> torch.Tensor | None:
        return self.reader.whole(f"{layer}.bias").reshape(-1).to(dtype) if self.has_bias(layer) else None

    def weight(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        # finite as saved; check_rows refuses what overflows the base's dtype, before any write
        if self.base is None:
            return self.reader.whole(str(layer)).to(dtype)
        spec, shards = self.base
        frozen = lowrank.base_rows(shards[layer], spec.down_proj_name(layer), self.reader.layer_rows(layer))
        return lowrank.merge(frozen, self.reader.whole(f"{layer}.A"), self.reader.whole(f"{layer}.B"), dtype)


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, world, base_dir: str | Path | None = None) -> None:
    """Collective: a checkpoint -> a standard Hugging Face directory with implant.safetensors."""
    why = checkpoint.damage(checkpoint_dir, rng=False) if checkpoint_dir.is_dir() else "not a directory"
    if why is not None:
        raise UserError(f"--checkpoint {checkpoint_dir}: not a loadable loki_dist checkpoint: {why}")
    trainer_state = json.loads((checkpoint_dir / checkpoint.STATE_FILE).read_text())
    base = Path(base_dir or trainer_state["base_model"])
    base_print = fingerprint(base)
    if base_print != trainer_state["base_fingerprint"]:
        raise UserError(f"--base {base}: fingerprint {base_print} is not the run's base model's")
    export_model(base, CheckpointRows(checkpoint_dir, base), out_dir, world, base_print)


def check_checkpoint(path: Path, base: str | None) -> Path:
    """A training checkpoint that export can read: its state, rows index and shard headers (the rows'
    values are check_rows' work). Returns the base model directory to export onto."""
    state_file = path / checkpoint.STATE_FILE
    if not state_file.is_file():
        raise UserError(f"--checkpoint {path}: not a complete loki_dist checkpoint (no {state_file.name})")
    state = checks.read_json(state_file, "--checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("base_model"), str):
        raise UserError(f"--checkpoint {state_file}: not the trainer state of a loki_dist run (damaged?)")
    if (path / checkpoint.INDEX_FILE).is_file():
        checks.read_json(path / checkpoint.INDEX_FILE, "--checkpoint")
    try:
        reader = checkpoint.RowsReader(path)
    except UserError:  # said as it is (a UserError is a ValueError too)
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"--checkpoint {path}: damaged rows index ({type(err).__name__}: {err})") from None
    for name in reader.shards:
        checks.safetensors_header(path / name, "--checkpoint")
    return Path(base or state["base_model"])


# ----------------------------------------------------------------------------------------------- CLI


def run_collectively(work: Callable[[object], None], out: Path) -> None:
    """Run `work(world)` as one process or, under a launcher, on every rank sharing the work."""
    world = distributed.world_from_env()
    distributed.init(world)
    try:
        work(world)
    except BaseException:
        distributed.shutdown(wait_for_peers=False)  # peers may never reach a barrier now
        raise
    distributed.shutdown()
    if world.is_main:
        print(f"wrote {out}")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-N directory of a training run")
    parser.add_argument("--output", required=True, help="directory for the Hugging Face model + implant")
    parser.add_argument("--base", help="base model directory (default: the one the run recorded)")
    flags.add_overwrite(parser, "an existing --output")


def run_export(args: argparse.Namespace) -> None:
    out, path = Path(args.output), Path(args.checkpoint)

    def export(world) -> None:
        with distributed.agreement(world):  # every rank checks; one agreed error before anything is written
            base = check_checkpoint(path, args.base)
            check_output(out, args.overwrite, {"--checkpoint": path, "--base": base})
            BaseShards.read(base, spec_from_dir(base, "--base"))  # whole shards, before fingerprinting
        export_checkpoint(path, out, world, args.base)

    run_collectively(export, out)
