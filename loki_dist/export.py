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
import shutil
import struct
from pathlib import Path

import torch

from loki_dist import __version__, files
from loki_dist.adapters import ModelSpec, spec_from_dir
from loki_dist.errors import UserError

IMPLANT_NAME = "implant.safetensors"
IMPLANT_FORMAT = "loki_dist.implant/1"
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "architectures"}


def _safetensors_header(path: Path) -> tuple[int, bytes]:
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, handle.read(length)


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
        data_start, header = _safetensors_header(shard)
        digest.update(header)
        entries = {k: v for k, v in json.loads(header).items() if k != "__metadata__"}
        with shard.open("rb") as handle:
            for name in sorted(entries):
                begin, end = entries[name]["data_offsets"]
                handle.seek(data_start + begin)
                digest.update(handle.read(min(4096, end - begin)))
    return digest.hexdigest()[:32]


def weight_shards(model_dir: str | Path) -> list[Path]:
    shards = sorted(p for p in Path(model_dir).glob("*.safetensors") if p.name != IMPLANT_NAME)
    if not shards:
        raise UserError(f"{model_dir}: no *.safetensors weights (loki_dist exports from safetensors bases)")
    return shards


# --------------------------------------------------------------------------------------- implant files


def save_implant(
    path: str | Path,
    rows: dict[int, torch.Tensor],
    weights: dict[int, torch.Tensor],
    spec: ModelSpec,
    base_fingerprint: str,
    positions: list[list[int]],
) -> None:
    """Write rows[l] (int64 [k]) and weights[l] ([k, F], base dtype) for every trained layer."""
    tensors = {}
    for layer in sorted(rows):
        tensors[f"layers.{layer}.rows"] = rows[layer].to(torch.int64).contiguous()
        tensors[f"layers.{layer}.weight"] = weights[layer].contiguous()
    metadata = {
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
    files.save_tensors(path, tensors, metadata)


def load_implant(path: str | Path) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--implant {path}: file not found")
    rows, weights = {}, {}
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != IMPLANT_FORMAT:
            raise UserError(
                f"--implant {path}: not a loki_dist implant file (format {metadata.get('format')!r})"
            )
        for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            _, layer, kind = name.split(".")
            (rows if kind == "rows" else weights)[int(layer)] = handle.get_tensor(name)
    return rows, weights, metadata


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


# ------------------------------------------------------------------------------------------- merging


def merge_into_base(base_dir: str | Path, implant_path: str | Path, out_dir: str | Path) -> None:
    """out_dir := base model with the implant's rows written into its down_proj weights, shard by shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    base_dir, out_dir = Path(base_dir), Path(out_dir)
    spec = spec_from_dir(base_dir)
    rows, weights, metadata = load_implant(implant_path)
    check_implant_fits(metadata, spec, fingerprint(base_dir), base_dir)
    shards = weight_shards(base_dir)

    def write(tmp: Path) -> None:
        tmp.mkdir()
        for item in base_dir.iterdir():
            if item.is_file() and item.suffix != ".safetensors":
                shutil.copy2(item, tmp / item.name)
        pending = set(rows)
        for shard in shards:
            with safe_open(str(shard), framework="pt") as handle:
                shard_meta = handle.metadata()
                tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
            for name, tensor in tensors.items():
                layer = spec.layer_of(name)
                if layer in pending:
                    tensor[rows[layer]] = weights[layer].to(tensor.dtype)
                    pending.discard(layer)
            save_file(tensors, str(tmp / shard.name), metadata=shard_meta)
            del tensors
        if pending:
            raise UserError(f"--base {base_dir}: no down_proj weight found for layers {sorted(pending)}")
        shutil.copy2(implant_path, tmp / IMPLANT_NAME)

    files.atomic_write(out_dir, write)


def refuse_existing(out_dir: Path, overwrite: bool, flag: str = "--output") -> None:
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise UserError(f"{flag} {out_dir}: already exists and is not empty (pass --overwrite to replace it)")


# ----------------------------------------------------------------------------------------------- CLI


def add_apply_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", required=True, help="the base model directory the implant was trained on")
    parser.add_argument("--implant", required=True, help="implant.safetensors from a training run")
    parser.add_argument("--output", required=True, help="directory for the merged Hugging Face model")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run_apply(args: argparse.Namespace) -> None:
    out = Path(args.output)
    refuse_existing(out, args.overwrite)
    merge_into_base(args.base, args.implant, out)
    print(f"wrote {out}")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="a checkpoint-N directory of a training run")
    parser.add_argument("--output", required=True, help="directory for the Hugging Face model + implant")
    parser.add_argument("--base", help="base model directory (default: the one the run recorded)")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")


def run_export(args: argparse.Namespace) -> None:
    from loki_dist import checkpoint

    out = Path(args.output)
    refuse_existing(out, args.overwrite)
    checkpoint.export_checkpoint(Path(args.checkpoint), out, base_dir=args.base)
    print(f"wrote {out}")
