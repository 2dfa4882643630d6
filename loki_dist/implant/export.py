"""Implant files and standard Hugging Face exports.

Everything LoKI did not train is, by construction, the base model's own bytes. So a trained model is
never gathered and saved whole: the export copies the base model's safetensors shards one at a time and
replaces only the trained down_proj rows (peak host memory about one shard, even at 70B). The implant
file holds just those rows and their indices, like a PEFT adapter; `apply` merges it into the base.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist import __version__
from loki_dist.core import distributed, files, flags, metering
from loki_dist.core.errors import UserError
from loki_dist.core.families import ModelSpec, spec_from_dir

# tests only, after a rank writes a shard: SIGKILL itself (any value), or fail on the rank it names
_KILL_ENV, _FAIL_ENV = "LOKI_DIST_TEST_KILL_IN_EXPORT", "LOKI_DIST_TEST_FAIL_IN_EXPORT"
IMPLANT_NAME = "implant.safetensors"
IMPLANT_FORMAT = "loki_dist.implant/1"
# shard metadata key of an exported model: a digest of the rows written into that shard
IMPLANTED_KEY = "loki_dist_implant"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}


def fingerprint(model_dir: str | Path) -> str:
    """A fast identity of a base model: its config, every shard's header and each tensor's first 4 KiB.

    Reading 140 GB to hash a 70B model would take minutes on every run; this reads a few MB and still
    tells apart two checkpoints of one architecture (different weights differ in their first bytes).
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = json.loads((model_dir / "config.json").read_text())
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(stable, sort_keys=True).encode())
    for shard in sorted(model_dir.glob("*.safetensors")):
        if shard.name == IMPLANT_NAME:
            continue
        try:
            data_start, raw, header = files.read_safetensors_header(shard)
        except (OSError, files.DamagedSafetensors) as err:
            raise UserError(f"{shard}: {err}") from None
        digest.update(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        with shard.open("rb") as handle:
            for name in sorted(entries):
                begin, end = entries[name]["data_offsets"]
                handle.seek(data_start + begin)
                digest.update(handle.read(min(4096, end - begin)))
    return digest.hexdigest()[:32]


def weight_shards(model_dir: str | Path, flag: str = "--base") -> list[Path]:
    shards = sorted(p for p in Path(model_dir).glob("*.safetensors") if p.name != IMPLANT_NAME)
    if not shards:
        raise UserError(
            f"{flag} {model_dir}: no *.safetensors weights (loki_dist exports from safetensors bases)"
        )
    return shards


# ----------------------------------------------------------------------------------------- row sources


class RowSource:
    """Trained rows by layer, wherever they are kept: an implant file or a training checkpoint.

    An export asks for one layer at a time, so a source never needs to hold all rows at once.
    """

    def layers(self) -> list[int]:
        raise NotImplementedError

    def rows(self, layer: int) -> torch.Tensor:
        """The down_proj rows trained in `layer`, int64 [k]."""
        raise NotImplementedError

    def weight(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        """Their trained values, [k, F] in `dtype`."""
        raise NotImplementedError


class ImplantRows(RowSource):
    """An implant file, read one layer at a time."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"--implant {self.path}: file not found")
        try:
            self.handle = safe_open(str(self.path), framework="pt")
            self.metadata = self.handle.metadata() or {}
            names = list(self.handle.keys())
        except Exception as err:  # safetensors raises several types for truncated/corrupted files
            raise UserError(f"--implant {self.path}: not a readable safetensors file ({err})") from None
        if self.metadata.get("format") != IMPLANT_FORMAT:
            raise UserError(
                f"--implant {self.path}: not a loki_dist implant file "
                f"(format {self.metadata.get('format')!r})"
            )
        parts = [name.split(".") for name in names]
        if any(
            len(p) != 3 or p[0] != "layers" or not p[1].isdigit() or p[2] not in ("rows", "weight")
            for p in parts
        ):
            raise UserError(
                f"--implant {self.path}: holds tensors other than layers.<l>.rows/.weight; damaged?"
            )
        self._layers = sorted({int(p[1]) for p in parts})
        self.label = f"--implant {self.path}"

    def layers(self) -> list[int]:
        return self._layers

    def rows(self, layer: int) -> torch.Tensor:
        return self.handle.get_tensor(f"layers.{layer}.rows")

    def weight(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        return self.handle.get_tensor(f"layers.{layer}.weight").to(dtype)


def implant_metadata(spec: ModelSpec, base_fingerprint: str, positions: list[list[int]]) -> dict[str, str]:
    return {
        "format": IMPLANT_FORMAT,
        "base_fingerprint": base_fingerprint,
        "model_type": spec.model_type,
        "num_layers": str(spec.num_layers),
        "hidden_size": str(spec.hidden_size),
        "intermediate_size": str(spec.intermediate_size),
        "quota": f"{100.0 * max(len(r) for r in positions) / spec.hidden_size:g}",
        "positions": json.dumps(positions),
        "loki_dist_version": __version__,
    }


def write_implant(
    path: Path, source: RowSource, spec: ModelSpec, dtypes: dict[int, torch.dtype], base_print: str
):
    """The implant file of `source`: per trained layer its rows (int64 [k]) and weight ([k, F], the base
    model's dtype), streamed one layer at a time."""
    layers = source.layers()
    rows = {layer: source.rows(layer) for layer in layers}
    positions = [rows[layer].tolist() if layer in rows else [] for layer in range(spec.num_layers)]
    layout = {}
    for layer in layers:
        layout[f"layers.{layer}.rows"] = (torch.int64, (len(rows[layer]),))
        layout[f"layers.{layer}.weight"] = (dtypes[layer], (len(rows[layer]), spec.intermediate_size))

    def pieces() -> Iterator[tuple[str, torch.Tensor]]:  # one layer in memory at a time
        for layer in layers:
            yield f"layers.{layer}.rows", rows[layer]
            yield f"layers.{layer}.weight", source.weight(layer, dtypes[layer])

    files.save_tensors_streaming(path, layout, pieces(), implant_metadata(spec, base_print, positions))


def check_implant_fits(metadata: dict[str, str], spec: ModelSpec, base_print: str, base_dir) -> None:
    shape = (spec.model_type, spec.num_layers, spec.hidden_size, spec.intermediate_size)
    implant_shape = (
        metadata.get("model_type"),
        *(int(metadata.get(k, -1)) for k in ("num_layers", "hidden_size", "intermediate_size")),
    )
    if implant_shape != shape:
        raise UserError(
            f"--base {base_dir}: model (type, layers, hidden, intermediate) {shape} does not match the "
            f"implant's {implant_shape}"
        )
    if metadata.get("base_fingerprint") != base_print:
        raise UserError(
            f"--base {base_dir}: fingerprint {base_print} differs from the implant's base "
            f"{metadata.get('base_fingerprint')}; the implant was trained on another model"
        )


# ------------------------------------------------------------------------------------------- exporting


@dataclass
class BaseShards:
    """The base model's weight shards, from their headers alone: which holds each down_proj, and dtypes."""

    paths: list[Path]
    down_proj: dict[int, Path]  # layer -> shard holding its down_proj weight
    dtypes: dict[int, torch.dtype]  # layer -> its down_proj dtype
    implanted: str | None  # a shard carrying an implant digest: the base is itself an export

    @classmethod
    def read(cls, base_dir: Path, spec: ModelSpec) -> BaseShards:
        paths, down_proj, dtypes, implanted = weight_shards(base_dir), {}, {}, None
        for shard in paths:
            header = files.safetensors_header(shard, "--base")[1]  # whole, or a UserError naming it
            if IMPLANTED_KEY in (header.get("__metadata__") or {}):
                implanted = implanted or shard.name
            for name, entry in header.items():
                layer = spec.layer_of(name) if name != "__metadata__" else None
                if layer is not None and entry.get("dtype") not in _DTYPES:
                    raise UserError(
                        f"--base {shard}: {name} is stored as {entry.get('dtype')}; rows can be written into "
                        f"{', '.join(_DTYPES)} weights (dequantize the model first)"
                    )
                if layer is not None:
                    down_proj[layer], dtypes[layer] = shard, _DTYPES[entry["dtype"]]
        return cls(paths, down_proj, dtypes, implanted)


DAMAGED = "shorter than its safetensors header says (truncated or damaged?)"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _assign(sizes: list[int], world_size: int) -> list[int]:
    """Rank of each job, largest first onto the least loaded rank: the slowest rank's extra work is at
    most one job, so nobody waits in the closing collective for longer than one shard takes."""
    load, owner = [0] * world_size, [0] * len(sizes)
    for job in sorted(range(len(sizes)), key=lambda j: (-sizes[j], j)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[job], load[rank] = rank, load[rank] + sizes[job]
    return owner


def _rewrite_shard(shard: Path, target: Path, layers: list[int], source: RowSource, spec: ModelSpec) -> None:
    """`shard` with the trained rows of `layers` written in, holding one tensor at a time.

    The header keeps the base's tensor layout byte for byte and adds, in its metadata, a digest of the
    rows written (so an export never fingerprints as its base). The digest's length is fixed: it is
    written as zeros first and filled in once the data is through.
    """
    data_start, header = files.safetensors_header(shard, "--base")
    if not layers:
        shutil.copyfile(shard, target)
        files.fsync_tree(target)
        return
    metadata = dict(header.pop("__metadata__", None) or {})
    trained = {spec.down_proj_name(layer): layer for layer in layers}

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
            if name not in trained:
                _copy_bytes(src, dst, end - begin)
                continue
            buffer = bytearray(end - begin)
            if src.readinto(buffer) != len(buffer):
                raise UserError(f"{shard}: {DAMAGED}")
            weight = torch.frombuffer(buffer, dtype=_DTYPES[entry["dtype"]])
            weight = weight.view(entry["shape"])
            rows = source.rows(trained[name])
            weight[rows] = source.weight(trained[name], weight.dtype)
            digest.update(str(trained[name]).encode() + rows.numpy().tobytes())
            digest.update(weight[rows].view(torch.uint8).numpy().tobytes())
            dst.write(weight.view(-1).view(torch.uint8).numpy().tobytes())
        dst.seek(0)
        dst.write(encoded(digest.hexdigest()[:32]))
    files.fsync_tree(target)  # each writer flushes its own files: they may live on another node


def _copy_bytes(src, dst, count: int, chunk: int = 64 << 20) -> None:
    while count > 0:
        data = src.read(min(chunk, count))
        if not data:
            raise UserError(f"{src.name}: {DAMAGED}")
        dst.write(data)
        count -= len(data)


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
        if tuple(weight.shape) != (rows.numel(), spec.intermediate_size):
            raise UserError(
                f"{label}: layer {layer} weight has shape {list(weight.shape)}, expected "
                f"[{rows.numel()}, {spec.intermediate_size}]"
            )
        finite = torch.isfinite(weight)
        if not finite.all():
            raise UserError(
                f"{label}: layer {layer} has {int((~finite).sum())} non-finite value(s) (NaN or Inf) in "
                f"{weight.dtype}; a diverged training? nothing was written"
            )


def export_model(
    base_dir: Path, source: RowSource, out_dir: Path, world, base_print: str, implant: Path | None = None
) -> None:
    """Collective: out_dir := the base model with `source`'s rows written in, plus its implant file.

    The ranks split the work: each rewrites its share of the base's shards (untouched ones are copied
    byte for byte) into one staging directory, and one of them writes the implant file (a copy of
    `implant` when given, else streamed from `source`); rank 0 then renames the directory into place.
    A failure on any rank fails every rank at the closing agreement, never leaving peers waiting.
    """
    with distributed.agreement(world):  # nothing is written unless every rank found its layers sound
        spec = spec_from_dir(base_dir, "--base")
        shards = BaseShards.read(base_dir, spec)
        missing = [layer for layer in source.layers() if layer not in shards.down_proj]
        if missing:
            raise UserError(f"--base {base_dir}: no down_proj weight found for layers {missing}")
        check_rows(source, spec, shards, world)
    staging = files.staging_path(out_dir)
    implant_size = sum(source.rows(layer).numel() for layer in source.layers()) * spec.intermediate_size * 4
    jobs = [*shards.paths, None]  # None: the implant file
    owner = _assign([p.stat().st_size for p in shards.paths] + [implant_size], world.size)
    # every step is agreed: a failure on any rank (rank 0's included) fails every rank at once
    with files.removed_on_failure(staging, world.is_main):
        with distributed.agreement(world), files.file_system_errors(staging):
            if world.is_main:
                files.remove_stale_temporaries(out_dir.parent)  # what killed writers left, whatever its name
                files.make_staging(out_dir)  # also replaces one that a killed export of out_dir left
                for item in base_dir.iterdir():
                    if item.is_file() and item.suffix != ".safetensors":
                        shutil.copy2(item, staging / item.name)
        with metering.phase("export"), distributed.agreement(world), files.file_system_errors(staging):
            for job, rank in zip(jobs, owner, strict=True):
                if rank != world.rank:
                    continue
                if job is None:
                    if implant is not None:
                        shutil.copyfile(implant, staging / IMPLANT_NAME)
                    else:
                        write_implant(staging / IMPLANT_NAME, source, spec, shards.dtypes, base_print)
                    continue
                layers = [layer for layer in source.layers() if shards.down_proj[layer] == job]
                _rewrite_shard(job, staging / job.name, layers, source, spec)
                _injected_fault(world.rank)
        with distributed.agreement(world), files.file_system_errors(out_dir):
            if world.is_main:
                files.publish(staging, out_dir)


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
    files.refuse_output_over_inputs("--output", out_dir, inputs)
    files.check_writable("--output", out_dir, directory=True)
    refuse_existing(out_dir, overwrite)


# ----------------------------------------------------------------------------------------------- CLI


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base model directory the implant was trained on")
    parser.add_argument("--implant", required=True, help="implant.safetensors from a training run")
    parser.add_argument("--output", required=True, help="directory for the merged Hugging Face model")
    flags.add_overwrite(parser, "an existing --output")


def apply_implant(base_dir: Path, implant: Path, out_dir: Path, world, overwrite: bool = False) -> None:
    """Collective: out_dir := base_dir with the implant merged in (and the implant file beside it)."""
    with distributed.agreement(world):  # every rank checks; one agreed error before anything is written
        check_output(out_dir, overwrite, {"--base": base_dir, "--implant": implant})
        source = ImplantRows(implant)
        spec = spec_from_dir(base_dir, "--base")
        implanted = BaseShards.read(base_dir, spec).implanted
        if implanted:  # an export: a second implant would stack two trainings on rows chosen for one
            raise UserError(
                f"--base {base_dir}: {implanted} already carries a loki_dist implant; apply it to the "
                "original base model instead"
            )
        base_print = fingerprint(base_dir)
        check_implant_fits(source.metadata, spec, base_print, base_dir)
    export_model(base_dir, source, out_dir, world, base_print, implant=implant)


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


def run_apply(args: argparse.Namespace) -> None:
    out = Path(args.output)
    run_collectively(
        lambda world: apply_implant(Path(args.base), Path(args.implant), out, world, args.overwrite), out
    )
