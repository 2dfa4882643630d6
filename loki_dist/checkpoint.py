"""Row-level training checkpoints.

Only the selected rows ever change, so a checkpoint holds only them: their fp32 master values and Adam
moments ([k, F] per layer, in row order), the step (from which the data position and the learning rate
follow), and each rank's RNG state. The frozen 99% of the model is re-read from the base on resume, so it
cannot be lost or re-initialised, a checkpoint of a 70B run is a few GB instead of hundreds, and because
rows are stored whole (not as ZeRO partitions) a run can resume on a different number of ranks.

Layout of OUT/checkpoint-<step>/: rows.safetensors, trainer_state.json, rng_state_<rank>.pt. A checkpoint
is written under a temporary name and renamed when complete, so a killed run never leaves half of one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from loki_dist import distributed, export
from loki_dist.adapters import spec_from_dir
from loki_dist.errors import UserError
from loki_dist.rowstate import ADAM_STATE_KEYS, RowState

ROWS_FILE = "rows.safetensors"
STATE_FILE = "trainer_state.json"
QUANTITIES = ("master", *ADAM_STATE_KEYS)


def step_of(path: Path) -> int:
    return int(path.name.split("-")[1])


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in OUT, oldest first."""
    found = [p for p in out_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return sorted((p for p in found if (p / STATE_FILE).is_file()), key=step_of)


def save(out_dir: Path, step: int, states: list[RowState], trainer_state: dict, world, keep: int) -> Path:
    """Collective: every rank contributes its rows and RNG state; rank 0 writes and renames."""
    from safetensors.torch import save_file

    final = out_dir / f"checkpoint-{step}"
    staging = out_dir / f".checkpoint-{step}.partial"
    tensors = {}
    for state in states:
        k = state.rows.numel()
        tensors[f"layers.{state.layer}.rows"] = state.rows
        for what in QUANTITIES:
            tensors[f"layers.{state.layer}.{what}"] = state.gather(what).view(k, -1).float().cpu()
    if world.is_main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    distributed.barrier()
    torch.save(_rng_state(), staging / f"rng_state_{world.rank}.pt")
    if world.is_main:
        save_file(tensors, str(staging / ROWS_FILE))
        (staging / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
    distributed.barrier()
    if world.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
        for old in list_checkpoints(out_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def load(path: Path, states: list[RowState], prepare_optimizer: Callable[[int], None], rank: int) -> dict:
    """Write a checkpoint's rows into this rank's parts; returns its trainer state (step included).

    `prepare_optimizer(step)` must create the optimizer state the rows are written into.
    """
    from safetensors.torch import load_file

    trainer_state = json.loads((path / STATE_FILE).read_text())
    prepare_optimizer(trainer_state["step"])
    tensors = load_file(str(path / ROWS_FILE))
    for state in states:
        saved_rows = tensors[f"layers.{state.layer}.rows"]
        if not torch.equal(saved_rows, state.rows):
            raise UserError(f"{path}: layer {state.layer} was trained on other rows than --positions gives")
        for what in QUANTITIES:
            state.scatter(what, tensors[f"layers.{state.layer}.{what}"].view(-1))
        state.scatter("model", tensors[f"layers.{state.layer}.master"].view(-1))
    rng_file = path / f"rng_state_{rank}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


def _rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_implant(rows_file: Path, implant_path: Path, base_dir: Path, base_print: str) -> None:
    """The implant of a rows file: trained rows cast to the base model's down_proj dtype."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    spec = spec_from_dir(base_dir)
    tensors = load_file(str(rows_file))
    rows = {int(n.split(".")[1]): t for n, t in tensors.items() if n.endswith(".rows")}
    shard_of = _shard_index(base_dir)
    weights = {}
    for layer in rows:
        name = spec.down_proj_name(layer)
        with safe_open(str(shard_of[name]), framework="pt") as handle:
            dtype = handle.get_slice(name).get_dtype()
        weights[layer] = tensors[f"layers.{layer}.master"].to(_DTYPES[dtype])
    positions = [rows[layer].tolist() if layer in rows else [] for layer in range(spec.num_layers)]
    export.save_implant(implant_path, rows, weights, spec, base_print, positions)


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _shard_index(base_dir: Path) -> dict[str, Path]:
    from safetensors import safe_open

    index = {}
    for shard in export.weight_shards(base_dir):
        with safe_open(str(shard), framework="pt") as handle:
            index.update({name: shard for name in handle.keys()})  # noqa: SIM118
    return index


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, base_dir: str | Path | None = None) -> None:
    """A checkpoint -> a standard Hugging Face directory with implant.safetensors (see export.py)."""
    if not (checkpoint_dir / STATE_FILE).is_file():
        raise UserError(f"--checkpoint {checkpoint_dir}: not a complete loki_dist checkpoint")
    trainer_state = json.loads((checkpoint_dir / STATE_FILE).read_text())
    base = Path(base_dir or trainer_state["base_model"])
    base_print = export.fingerprint(base)
    if base_print != trainer_state["base_fingerprint"]:
        raise UserError(f"--base {base}: fingerprint {base_print} is not the run's base model's")
    implant_path = out_dir.parent / f".{out_dir.name}.{export.IMPLANT_NAME}"
    try:
        write_implant(checkpoint_dir / ROWS_FILE, implant_path, base, base_print)
        export.merge_into_base(base, implant_path, out_dir)
    finally:
        implant_path.unlink(missing_ok=True)
