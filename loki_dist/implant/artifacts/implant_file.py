"""The implant file: the trained down_proj rows of a run and their indices, like a PEFT adapter.

A training run (or the Python API) writes one beside its exported model; `apply` merges it into the base
model it was trained on. This module holds the format (IMPLANT_NAME, IMPLANT_FORMAT, its metadata),
the fingerprint that ties an implant to its base model, RowSource (trained rows by layer, whatever
keeps them) with ImplantRows (an implant file read one layer at a time), writing an implant file, and
the check that one fits a base model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from loki_dist import __version__
from loki_dist.core import checks, files
from loki_dist.core.errors import UserError
from loki_dist.core.families import ModelSpec

IMPLANT_NAME = "implant.safetensors"
IMPLANT_FORMAT = "loki_dist.implant/1"
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
            data_start, raw, header = checks.read_safetensors_header(shard)
        except (OSError, checks.DamagedSafetensors) as err:
            raise UserError(f"{shard}: {err}") from None
        digest.update(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        with shard.open("rb") as handle:
            for name in sorted(entries):
                begin, end = entries[name]["data_offsets"]
                handle.seek(data_start + begin)
                digest.update(handle.read(min(4096, end - begin)))
    return digest.hexdigest()[:32]


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

    def has_bias(self, layer: int) -> bool:
        """Whether the rows' bias entries trained too (`train --train-bias`)."""
        return False

    def bias(self, layer: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Their trained bias entries, [k] in `dtype`; None where the bias did not train."""
        return None


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
            len(p) != 3 or p[0] != "layers" or not p[1].isdigit() or p[2] not in ("rows", "weight", "bias")
            for p in parts
        ):
            raise UserError(
                f"--implant {self.path}: holds tensors other than layers.<l>.rows/.weight/.bias; damaged?"
            )
        self._layers = sorted({int(p[1]) for p in parts})
        self._biased = {int(p[1]) for p in parts if p[2] == "bias"}
        self.label = f"--implant {self.path}"

    def layers(self) -> list[int]:
        return self._layers

    def rows(self, layer: int) -> torch.Tensor:
        return self.handle.get_tensor(f"layers.{layer}.rows")

    def weight(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        return self.handle.get_tensor(f"layers.{layer}.weight").to(dtype)

    def has_bias(self, layer: int) -> bool:
        return layer in self._biased

    def bias(self, layer: int, dtype: torch.dtype) -> torch.Tensor | None:
        return self.handle.get_tensor(f"layers.{layer}.bias").to(dtype) if self.has_bias(layer) else None


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
    path: Path,
    source: RowSource,
    spec: ModelSpec,
    dtypes: dict[int, torch.dtype],
    base_print: str,
    advanced: Callable[[int], None] | None = None,
):
    """The implant file of `source`: per trained layer its rows (int64 [k]) and weight ([k, F], the base
    model's dtype), and their bias entries ([k]) where those trained, streamed one layer at a time;
    `advanced` hears of each piece written (its bytes)."""
    layers = source.layers()
    rows = {layer: source.rows(layer) for layer in layers}
    positions = [rows[layer].tolist() if layer in rows else [] for layer in range(spec.num_layers)]
    layout = {}
    for layer in layers:
        layout[f"layers.{layer}.rows"] = (torch.int64, (len(rows[layer]),))
        layout[f"layers.{layer}.weight"] = (dtypes[layer], (len(rows[layer]), spec.intermediate_size))
        if source.has_bias(layer):
            layout[f"layers.{layer}.bias"] = (dtypes[layer], (len(rows[layer]),))

    def pieces() -> Iterator[tuple[str, torch.Tensor]]:  # one layer in memory at a time
        for layer in layers:
            named = [("rows", rows[layer]), ("weight", source.weight(layer, dtypes[layer]))]
            if source.has_bias(layer):
                named.append(("bias", source.bias(layer, dtypes[layer])))
            for name, value in named:
                yield f"layers.{layer}.{name}", value
                if advanced is not None:  # asked for the next piece: this one is written
                    advanced(value.numel() * value.element_size())

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
