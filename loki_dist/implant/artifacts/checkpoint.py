"""Row-level training checkpoints, written and read in shards so that no rank holds more than its share.

Only the selected rows ever change, so a checkpoint holds only them: their fp32 master values and Adam
moments, the step (from which the data position and the learning rate follow), and each rank's RNG
state. The frozen 99% of the model is re-read from the base on resume, so it cannot be lost or
re-initialised, and a checkpoint of a 70B run is a few GB instead of hundreds.

Each rank writes the part of the rows it owns (see trainer/rowstate.py: a contiguous range of each layer's
selected elements in flat order) to its own shard, so saving moves nothing between ranks; rank 0 then
writes a small index saying which shard holds which range. A resume, on any number of ranks, reads only
the ranges its own slices need (safetensors slices), so reading is spread over the ranks too.

Layout of OUT/checkpoint-<step>/: rows-<r>-of-<W>.safetensors (tensors layers.<l>.<quantity>, flat),
rows_index.json, trainer_state.json, rng_state_<rank>.safetensors (rngstate.py). Nothing in it is a
pickle: a resume reads tensors and JSON only, so a file planted in a checkpoint cannot run code. The
directory is filled under a staging name and renamed when complete, so a checkpoint is either whole or
absent. Checkpoints of loki_dist 0.1 (one rows.safetensors holding [k, F] tensors and layers.<l>.rows,
and rng_state_<rank>.pt) are read as one shard covering everything.

A LoKI* run (trainer/lowrank.py) stores its factors as rows are stored, each factor an entry of its own
(RowState.key): tensors layers.<l>.A.<quantity> and layers.<l>.B.<quantity> over A's and B's flat
elements, index entries "<l>.A" and "<l>.B" with their shapes, under the index format LOWRANK_FORMAT, so
that a reader that knows rows alone refuses it by name instead of taking factors for rows.

A checkpoint is only ever written finite: a rank that finds NaN or Inf in what it saves fails the save on
every rank (NonFinite) and nothing is published. A checkpoint damaged later (a full disk, a copy cut
short, a file that is not what we wrote) is recognised before any model loads by `damage`, which reads
the JSON files, the shards' headers and the small RNG files, so a resume can fall back to an older one.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from loki_dist.core import checks, collectives, distributed, files, metering
from loki_dist.core.errors import UserError
from loki_dist.implant.artifacts import rngstate
from loki_dist.implant.trainer.rowstate import ADAM_STATE_KEYS, RowState, Slice

STATE_FILE = "trainer_state.json"
INDEX_FILE = "rows_index.json"
LEGACY_ROWS_FILE = "rows.safetensors"
INDEX_FORMAT = "loki_dist.rows/2"
LOWRANK_FORMAT = "loki_dist.lowrank/1"  # LoKI*'s factors: entries <l>.A and <l>.B, with shapes
FORMATS = (INDEX_FORMAT, LOWRANK_FORMAT)
QUANTITIES = ("master", *ADAM_STATE_KEYS)
# beside the checkpoints in OUT: the model exported from the last one when a run finishes
FINAL_DIR = "final"


def _stored(state: RowState) -> dict[str, Slice]:
    """The quantities a checkpoint holds, by their tensor names in it (QUANTITIES, in that order)."""
    return {"master": state.master(), "exp_avg": state.exp_avg(), "exp_avg_sq": state.exp_avg_sq()}


def shard_name(rank: int, world_size: int) -> str:
    return f"rows-{rank:05d}-of-{world_size:05d}.safetensors"


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Every checkpoint-<step> directory in OUT, complete or not, oldest first."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit() and p.is_dir()]
    return sorted(found, key=step_of)


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in OUT, oldest first."""
    return [p for p in checkpoint_dirs(out_dir) if (p / STATE_FILE).is_file()]


class NonFinite(Exception):
    """What a save was given holds NaN or Inf (the message: where); nothing was published, so the newest
    checkpoint is an older, finite one."""


# ------------------------------------------------------------------------------------------------ save


def save(out_dir: Path, step: int, states: list[RowState], trainer_state: dict, world, keep: int) -> Path:
    """Collective: every rank writes its own rows and RNG state; rank 0 indexes, renames and prunes."""
    final = out_dir / f"checkpoint-{step}"
    staging = files.staging_path(final)
    with metering.phase("checkpoint_save"), files.removed_on_failure(staging, world.is_main):
        # every write is agreed: a full disk on any one rank ends them all with its line, none waits
        with distributed.agreement(world), files.file_system_errors(final):
            if world.is_main:
                files.make_staging(final)  # also removes what a run killed while saving left
        # this rank's non-empty slices (a replicated layout is written by rank 0 alone)
        mine = {s.key: (s, s.master().selected_range()) for s in states if s.owns_slice or world.is_main}
        mine = {key: (s, (b, e)) for key, (s, (b, e)) in mine.items() if e > b}
        layout = {f"layers.{key}.{what}": (torch.float32, (e - b,))
                  for key, (_, (b, e)) in mine.items() for what in QUANTITIES}  # fmt: skip
        pieces = (  # one layer's quantity in memory at a time
            (f"layers.{key}.{what}", stored.take().float())
            for key, (state, _) in mine.items()
            for what, stored in _stored(state).items()
        )
        ranges = {key: list(r) for key, (_, r) in mine.items()}
        non_finite: list[str] = []  # checked as the pieces stream by: no second pass over the rows
        with distributed.agreement(world):
            shard = staging / shard_name(world.rank, world.size)
            metadata = {"ranges": json.dumps(ranges)}
            files.save_tensors_streaming(shard, layout, _finite_or_noted(pieces, non_finite), metadata)
            rngstate.save(staging, world.rank, rngstate.capture())
        if collectives.agree_max(int(bool(non_finite))):
            raise NonFinite(non_finite[0] if non_finite else "on another rank")
        with distributed.agreement(world), files.file_system_errors(final):
            if world.is_main:
                files.write_json(staging / INDEX_FILE, _index(staging, states, world.size), indent=None)
                files.write_json(staging / STATE_FILE, {**trainer_state, "step": step}, indent=2)
                files.publish(staging, final)
                # a resume from an older checkpoint (the newer one damaged) leaves newer ones: the run
                # replaces them when it gets there, and prunes only what lies behind it
                behind = [p for p in list_checkpoints(out_dir) if step_of(p) <= step]
                for old in behind[:-keep] if keep > 0 else []:
                    shutil.rmtree(old, ignore_errors=True)
    return final


def _finite_or_noted(pieces, non_finite: list[str]):
    """Pass (name, tensor) pieces through, noting the name of the first one holding NaN or Inf."""
    for name, piece in pieces:
        if not non_finite and not bool(torch.isfinite(piece).all()):
            non_finite.append(name)
        yield name, piece


def _index(staging: Path, states: list[RowState], world_size: int) -> dict:
    """Which shard holds which range of each layer, from the shards' own headers; checks they tile."""
    from safetensors import safe_open

    shards = {}
    for rank in range(world_size):
        name = shard_name(rank, world_size)
        with safe_open(str(staging / name), framework="pt") as handle:
            shards[name] = json.loads(handle.metadata()["ranges"])
    layers = {s.key: {"rows": s.rows.tolist(), "length": s.num_selected} for s in states}
    lowrank = any(s.part in ("A", "B") for s in states)  # LoKI*'s factors (a row's bias entry is no factor)
    for s in states if lowrank else []:
        layers[s.key]["shape"] = s.shape
    for layer, entry in layers.items():
        pieces = sorted(r[layer] for r in shards.values() if layer in r)
        covered = 0
        for begin, end in pieces:
            if begin != covered:
                raise RuntimeError(f"checkpoint shards of layer {layer} leave a gap or overlap at {covered}")
            covered = end
        if covered != entry["length"]:
            raise RuntimeError(f"checkpoint shards of layer {layer} cover {covered} of {entry['length']}")
    return {"format": LOWRANK_FORMAT if lowrank else INDEX_FORMAT, "layers": layers, "shards": shards}


# ---------------------------------------------------------------------------------------- loadability


def damage(path: Path, rng: bool = True) -> str | None:
    """Why `path` cannot be resumed from (exported from, with rng=False), or None when it can.

    Read: trainer_state.json, rows_index.json, every shard's header (a few KB each, not the data) and
    each rank's RNG file (about 10 KB, checked to hold what we write). So it is cheap at any scale, runs
    before the model loads, and every rank (each checking every file) comes to the same answer.
    """
    try:
        state = _read_json(path / STATE_FILE)
        if not isinstance(state.get("step"), int):
            raise ValueError(f"{STATE_FILE} holds no step")
        if (path / INDEX_FILE).exists() or not (path / LEGACY_ROWS_FILE).exists():
            _check_shards(path)
        else:
            _read_header(path / LEGACY_ROWS_FILE)
        if rng:
            world_size = state.get("world_size")
            if type(world_size) is not int or world_size < 1:
                raise ValueError(f"{STATE_FILE} holds no world size")
            rngstate.check_all(path, world_size)
    except (ValueError, OSError) as err:
        return str(err)
    except (TypeError, KeyError, AttributeError, IndexError) as err:  # JSON of an unexpected shape
        return f"unexpected content ({type(err).__name__}: {err})"
    return None


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{file.name} is missing") from None
    except ValueError as err:
        raise ValueError(f"{file.name} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file.name} does not hold a JSON object")
    return value


def _read_header(file: Path) -> dict:
    """A safetensors file's header, after checking that the file is as long as the header says."""
    if not file.is_file():
        raise ValueError(f"{file.name} is missing")
    try:
        return checks.read_safetensors_header(file)[2]
    except checks.DamagedSafetensors as err:
        raise ValueError(f"{file.name}: {err}") from None


def _check_shards(path: Path) -> None:
    """The index parses, and every shard it lists exists, is whole, and holds what the index says."""
    index = _read_json(path / INDEX_FILE)
    if index.get("format") not in FORMATS:
        raise ValueError(f"{INDEX_FILE} has format {index.get('format')!r}, expected {' or '.join(FORMATS)}")
    try:
        lengths = {layer: int(entry["length"]) for layer, entry in index["layers"].items()}
        shards = {
            name: {layer: tuple(r) for layer, r in ranges.items()} for name, ranges in index["shards"].items()
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ValueError(f"{INDEX_FILE} does not describe layers and shards") from None
    covered = dict.fromkeys(lengths, 0)
    for name, ranges in sorted(shards.items()):
        header = _read_header(path / name)
        stored = json.loads((header.get("__metadata__") or {}).get("ranges", "null"))
        if {layer: tuple(r) for layer, r in (stored or {}).items()} != ranges:
            raise ValueError(f"{name} holds other ranges than {INDEX_FILE} lists")
        for layer, (begin, end) in ranges.items():
            for what in QUANTITIES:
                entry = header.get(f"layers.{layer}.{what}") or {}
                if entry.get("dtype") != "F32" or entry.get("shape") != [end - begin]:
                    raise ValueError(f"{name} lacks layers.{layer}.{what} [{end - begin}] (float32)")
    for layer, length in lengths.items():
        for begin, end in sorted(r[layer] for r in shards.values() if layer in r):
            if begin != covered[layer]:
                break
            covered[layer] = end
        if covered[layer] != length:
            raise ValueError(
                f"{INDEX_FILE}: the shards cover {covered[layer]} of layer {layer}'s {length} elements"
            )


# ------------------------------------------------------------------------------------------------ read


class RowsReader:
    """Ranges of each entry's selected sequence, read from whichever shards hold them (nothing else).

    Entries are named as the states that wrote them (RowState.key): "<layer>" for rows, "<layer>.A" and
    "<layer>.B" for LoKI*'s factors (`lowrank` then says so).
    """

    def __init__(self, path: Path):
        self.path = path
        if (path / INDEX_FILE).is_file():
            index = json.loads((path / INDEX_FILE).read_text())
            if index.get("format") not in FORMATS:
                raise UserError(
                    f"{path}: rows index format {index.get('format')!r}, expected {' or '.join(FORMATS)}"
                )
            self.lowrank = index["format"] == LOWRANK_FORMAT
            self.rows = {key: entry["rows"] for key, entry in index["layers"].items()}
            self.lengths = {key: entry["length"] for key, entry in index["layers"].items()}
            self.shapes = {key: entry["shape"] for key, entry in index["layers"].items() if "shape" in entry}
            self.shards = index["shards"]
        elif (path / LEGACY_ROWS_FILE).is_file():
            self.lowrank, self.shapes = False, {}
            self.rows, self.shards = self._legacy_layout(path / LEGACY_ROWS_FILE)
            self.lengths = {key: r[1] for key, r in self.shards[LEGACY_ROWS_FILE].items()}
        else:
            raise UserError(f"{path}: not a loki_dist checkpoint (no {INDEX_FILE} or {LEGACY_ROWS_FILE})")
        self._handles: dict[str, object] = {}

    def layers(self) -> list[int]:
        """The trained layers, in order."""
        return sorted({int(key.split(".")[0]) for key in self.rows})

    def layer_rows(self, layer: int) -> list[int]:
        """The down_proj rows `layer` trains (its factors' entries name the same rows)."""
        return self.rows[f"{layer}.A" if self.lowrank else str(layer)]

    def whole(self, key: str) -> torch.Tensor:
        """An entry's fp32 master, whole: [rows, row length] (a factor's shape, or the rows' [k, F])."""
        shape = self.shapes.get(key) or [len(self.rows[key]), -1]
        return self.read(key, "master", 0, self.lengths[key]).view(shape)

    @staticmethod
    def _legacy_layout(file: Path) -> tuple[dict[str, list[int]], dict[str, dict[str, list[int]]]]:
        from safetensors import safe_open

        rows, ranges = {}, {}
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                _, layer, what = name.split(".")
                if what == "rows":
                    rows[layer] = handle.get_tensor(name).tolist()
                elif what == "master":
                    k, row_len = handle.get_slice(name).get_shape()
                    ranges[layer] = [0, k * row_len]
        return rows, {file.name: ranges}

    def _handle(self, name: str):
        from safetensors import safe_open

        if name not in self._handles:
            try:
                self._handles[name] = safe_open(str(self.path / name), framework="pt")
            except Exception as err:  # safetensors raises several types for missing or damaged files
                raise UserError(f"{self.path / name}: unreadable checkpoint shard ({err})") from None
        return self._handles[name]

    def read(self, key: str, what: str, begin: int, end: int) -> torch.Tensor:
        """Elements [begin, end) of `what` over entry `key`'s selected sequence, as a flat fp32 tensor."""
        out = torch.empty(end - begin, dtype=torch.float32)
        filled = 0
        for name, ranges in self.shards.items():
            if key not in ranges:
                continue
            lo, hi = max(begin, ranges[key][0]), min(end, ranges[key][1])
            if lo >= hi:
                continue
            piece = self._slice(self._handle(name), f"layers.{key}.{what}", lo - ranges[key][0], hi - lo)
            out[lo - begin : hi - begin] = piece
            filled += hi - lo
        if filled != end - begin:
            raise UserError(f"{self.path}: layer {key} lacks elements {begin}..{end} of {what}")
        metering.count("read", out.numel() * out.element_size())
        return out

    @staticmethod
    def _slice(handle, name: str, offset: int, count: int) -> torch.Tensor:
        """count elements from flat offset of a stored tensor: 1-D (shards) or [k, F] (legacy)."""
        view = handle.get_slice(name)
        shape = view.get_shape()
        if len(shape) == 1:
            return view[offset : offset + count].float()
        row_len = shape[1]
        first, last = offset // row_len, (offset + count - 1) // row_len + 1
        rows = view[first:last].float().reshape(-1)
        start = offset - first * row_len
        return rows[start : start + count]


def load(path: Path, states: list[RowState], prepare_optimizer: Callable[[int], None], rank: int) -> dict:
    """Write a checkpoint's rows into this rank's slices; returns its trainer state (step included).

    `prepare_optimizer(step)` must create the optimizer state the rows are written into.
    """
    trainer_state = json.loads((path / STATE_FILE).read_text())
    reader = RowsReader(path)
    for state in states:
        if reader.rows.get(state.key) != state.rows.tolist():
            raise UserError(f"{path}: layer {state.layer} was trained on other rows than --positions gives")
        if reader.shapes.get(state.key, state.shape) != state.shape:
            raise UserError(
                f"{path}: layer {state.key} has shape {reader.shapes[state.key]}, not {state.shape}"
            )
    prepare_optimizer(trainer_state["step"])
    with metering.phase("resume"):
        for state in states:
            for what, stored in _stored(state).items():
                stored.put(reader.read(state.key, what, *stored.selected_range()))
            model = state.model()
            model.put(reader.read(state.key, "master", *model.selected_range()))
    rng_file = rngstate.find(path, rank)  # none for a rank beyond the saved run's world size
    if rng_file is not None:
        try:
            rngstate.restore(rngstate.read(rng_file))
        except rngstate.LegacyNotRead as err:
            print(f"loki-dist train: warning: rank {rank}: {err}", file=sys.stderr)
        except ValueError as err:  # damage() found it whole before the model loaded: changed since
            raise UserError(f"{path}: {err}") from None
    return trainer_state
