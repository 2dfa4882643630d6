"""The `export` command: a training checkpoint -> a standard Hugging Face model and its implant file.

It sits on top of both checkpoint.py (the rows a run saved) and export.py (writing any rows into a
base model's shards), so that neither of those two needs the other: checkpoints know nothing of export,
and export knows only `RowSource`, whichever store the rows come from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from loki_dist.core import distributed, files, flags
from loki_dist.core.errors import UserError
from loki_dist.core.families import spec_from_dir
from loki_dist.implant import checkpoint
from loki_dist.implant.export import (
    BaseShards,
    RowSource,
    check_output,
    export_model,
    fingerprint,
    run_collectively,
)


class CheckpointRows(RowSource):
    """A checkpoint's trained rows, one layer at a time, cast to the base model's dtype."""

    def __init__(self, path: Path):
        self.reader = checkpoint.RowsReader(path)
        self.label = f"--checkpoint {path}"  # how export's checks name it

    def layers(self) -> list[int]:
        return sorted(self.reader.rows)

    def rows(self, layer: int) -> torch.Tensor:
        return torch.tensor(self.reader.rows[layer], dtype=torch.int64)

    def weight(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        k = len(self.reader.rows[layer])
        # finite as saved; export.check_rows refuses what overflows the base's dtype, before any write
        return self.reader.read(layer, "master", 0, self.reader.lengths[layer]).view(k, -1).to(dtype)


def export_checkpoint(checkpoint_dir: Path, out_dir: Path, world, base_dir: str | Path | None = None) -> None:
    """Collective: a checkpoint -> a standard Hugging Face directory with implant.safetensors (export.py)."""
    why = checkpoint.damage(checkpoint_dir, rng=False) if checkpoint_dir.is_dir() else "not a directory"
    if why is not None:
        raise UserError(f"--checkpoint {checkpoint_dir}: not a loadable loki_dist checkpoint: {why}")
    trainer_state = json.loads((checkpoint_dir / checkpoint.STATE_FILE).read_text())
    base = Path(base_dir or trainer_state["base_model"])
    base_print = fingerprint(base)
    if base_print != trainer_state["base_fingerprint"]:
        raise UserError(f"--base {base}: fingerprint {base_print} is not the run's base model's")
    export_model(base, CheckpointRows(checkpoint_dir), out_dir, world, base_print)


def check_checkpoint(path: Path, base: str | None) -> Path:
    """A training checkpoint that export can read: its state, rows index and shard headers (the rows'
    values are check_rows' work). Returns the base model directory to export onto."""
    state_file = path / checkpoint.STATE_FILE
    if not state_file.is_file():
        raise UserError(f"--checkpoint {path}: not a complete loki_dist checkpoint (no {state_file.name})")
    state = files.read_json(state_file, "--checkpoint")
    if not isinstance(state, dict) or not isinstance(state.get("base_model"), str):
        raise UserError(f"--checkpoint {state_file}: not the trainer state of a loki_dist run (damaged?)")
    if (path / checkpoint.INDEX_FILE).is_file():
        files.read_json(path / checkpoint.INDEX_FILE, "--checkpoint")
    try:
        reader = checkpoint.RowsReader(path)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"--checkpoint {path}: damaged rows index ({type(err).__name__}: {err})") from None
    for name in reader.shards:
        files.safetensors_header(path / name, "--checkpoint")
    return Path(base or state["base_model"])


# ----------------------------------------------------------------------------------------------- CLI


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
