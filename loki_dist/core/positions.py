"""The positions file: which rows of each layer's down_proj are trained.

Format (the reference implementation's, so the files released with the paper work as they are): a JSON
list of L lists of row indices. loki_dist writes each list sorted ascending and reads any order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loki_dist.core import checks, files
from loki_dist.core.errors import UserError, preview
from loki_dist.core.families import ModelSpec

Positions = list[list[int]]


def validate(positions: object, spec: ModelSpec, source: str = "positions") -> Positions:
    """Check against the model: exactly L lists, integer indices in [0, D), no duplicates."""
    if not isinstance(positions, list) or not all(isinstance(rows, list) for rows in positions):
        raise UserError(f"{source}: expected a JSON list of {spec.num_layers} lists of row indices")
    if len(positions) != spec.num_layers:
        raise UserError(
            f"{source}: has {len(positions)} layer lists but the model has {spec.num_layers} layers"
        )
    clean: Positions = []
    for layer, rows in enumerate(positions):
        for row in rows:
            if isinstance(row, bool) or not isinstance(row, int):
                raise UserError(f"{source}: layer {layer} has a non-integer index {preview(row)}")
            if not 0 <= row < spec.hidden_size:
                raise UserError(
                    f"{source}: layer {layer} has index {row}, outside [0, {spec.hidden_size}) "
                    f"(hidden_size of the model)"
                )
        if len(set(rows)) != len(rows):
            dup = next(r for r in rows if rows.count(r) > 1)
            raise UserError(f"{source}: layer {layer} lists index {dup} more than once")
        clean.append(sorted(rows))
    return clean


def load(path: str | Path, spec: ModelSpec) -> Positions:
    return validate(checks.read_json(path, "--positions"), spec, source=f"--positions {path}")


def save(positions: Positions, path: str | Path) -> None:
    """Write atomically (a reader never sees half a file), each layer sorted ascending."""
    text = json.dumps([sorted(int(r) for r in rows) for rows in positions])
    files.write_text(path, text + "\n")


def row_mask(rows: list[int], hidden_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean [D] vector: True for the rows that train."""
    mask = torch.zeros(hidden_size, dtype=torch.bool, device=device)
    mask[torch.as_tensor(rows, dtype=torch.long, device=device)] = True
    return mask
