"""`loki-dist estimate-memory`: the command line and the table of memory.py's per-GPU estimate.

The model config comes from `--preset` (memory.PRESETS) or `--model-config` (a config.json or a model
directory); the cluster and training setup from the other flags. The numbers are printed as a table, a
column per method, in GiB and in bytes, and with `--json` also written as bytes.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

from loki_dist.core import checks, files, flags
from loki_dist.core.errors import UserError
from loki_dist.core.flags import parse_quota
from loki_dist.planning.memory import (
    GIB,
    LORA_RANK,
    METHODS,
    PARTS,
    PRESETS,
    STAR_RANK,
    Architecture,
    Estimate,
    Setup,
    architecture,
    estimate,
    loki_rows_per_layer,
)

REQUIRED_KEYS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "vocab_size",
    "num_attention_heads",
)

METHOD_TITLES = {
    "loki_masked": "LoKI masked",
    "loki_compact": "LoKI compact",
    "loki_star": "LoKI* r={rank}",
    "full": "full FT",
    "lora": f"LoRA r={LORA_RANK}",
}


def add_estimate_memory_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model-config", help="a config.json, or a Hugging Face model directory holding one")
    source.add_argument("--preset", choices=sorted(PRESETS), help="a built-in config")
    parser.add_argument("--world-size", type=int, default=8, help="number of GPUs (ranks) in the job")
    parser.add_argument("--quota", default="10", help="LoKI: percent of rows per layer, in (0, 100]")
    parser.add_argument(
        "--lora-rank",
        type=int,
        default=STAR_RANK,
        metavar="R",
        help=f"LoKI*: the rank of the selected rows' update W_S0 + A B (train --lora-rank; default "
        f"{STAR_RANK}, the paper's)",
    )
    parser.add_argument("--zero", type=int, choices=(2, 3), default=3, help="DeepSpeed ZeRO stage")
    parser.add_argument(
        "--offload",
        action="store_true",
        help="CPU offload as in ds_configs/zero3_offload.json (ZeRO-2: optimizer and gradients only)",
    )
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence")
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="recompute each layer in backward"
    )
    flags.add_precision(parser, "precision", "bf16", "training precision (auto: bf16, as on GPUs)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the numbers (bytes) here")


def load_config(preset: str | None, model_config: str | None) -> tuple[dict, str]:
    """The config dict and a name for it, from --preset or --model-config (file or model directory)."""
    if preset:
        return PRESETS[preset], preset
    path = Path(model_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserError(f"--model-config {model_config}: no such config.json or model directory")
    config = checks.read_json(path, "--model-config")
    if not isinstance(config, dict):
        raise UserError(f"--model-config {path}: expected a JSON object of settings")
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise UserError(f"--model-config {path}: missing {', '.join(missing)}")
    return config, str(path)


def setup_from_args(args: argparse.Namespace) -> Setup:
    for flag in ("world_size", "micro_batch", "seq_len", "lora_rank"):
        value, name = getattr(args, flag), f"--{flag.replace('_', '-')}"
        if value < 1:
            raise UserError(f"{name} {value}: must be at least 1")
        if value > 2**53:  # the byte counts are floats: 10**400 tokens was an OverflowError
            raise UserError(f"{name}: a number of {len(str(value))} digits; expected at most 2**53")
    return Setup(
        world_size=args.world_size,
        zero=args.zero,
        offload=args.offload,
        micro_batch=args.micro_batch,
        seq_len=args.seq_len,
        gradient_checkpointing=args.gradient_checkpointing,
        precision="fp32" if flags.training_bf16(args.precision) is False else "bf16",
    )


def _params_text(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def _part_rows(setup: Setup) -> list[str]:
    return [*PARTS, "total", *(["cpu_offload"] if setup.offload else [])]


def _titles(rank: int) -> dict[str, str]:
    return {method: title.format(rank=rank) for method, title in METHOD_TITLES.items()}


def _grid(title: str, result: dict[str, Estimate], rows: list[str], cell, rank: int) -> list[str]:
    """One table: a row per part, a column per method; `cell` turns a number into text."""
    width = max(14, *(len(cell(getattr(e, part))) + 2 for e in result.values() for part in rows))
    header = f"{title:<20}" + "".join(f"{_titles(rank)[m]:>{width}}" for m in METHODS)
    lines = [header, "-" * len(header)]
    for part in rows:
        label = "CPU per rank" if part == "cpu_offload" else part.replace("_", " ")
        lines.append(f"{label:<20}" + "".join(f"{cell(getattr(result[m], part)):>{width}}" for m in METHODS))
    return lines


def format_table(
    name: str, arch: Architecture, quota: Fraction, setup: Setup, result: dict[str, Estimate], rank: int
) -> str:
    """The setup in three lines, then the per-GPU numbers in GiB and in bytes."""
    checkpointing = "gradient checkpointing" if setup.gradient_checkpointing else "no gradient checkpointing"
    rows = loki_rows_per_layer(arch.hidden_size, quota)
    offload = ", CPU offload" if setup.offload else ""
    lines = [
        f"{name}: {_params_text(arch.total_params)} parameters, L={arch.num_layers} D={arch.hidden_size} "
        f"F={arch.intermediate_size} vocab={arch.vocab_size}",
        f"ZeRO-{setup.zero}{offload}, {setup.world_size} GPUs, {setup.precision}, micro-batch "
        f"{setup.micro_batch} x {setup.seq_len} tokens, {checkpointing}",
        f"LoKI q={quota}: {rows} rows per layer; LoKI* r={rank}: A [{rows}, {rank}] and B [{rank}, "
        f"{arch.intermediate_size}] per layer",
        "",
        f"{'trainable params':<20}"
        + "".join(f"{_params_text(result[m].trainable_params):>14}" for m in METHODS),
        "",
    ]
    parts = _part_rows(setup)
    lines += _grid("per GPU (GiB)", result, parts, lambda value: f"{value / GIB:.2f}", rank)
    lines += ["", *_grid("per GPU (bytes)", result, parts, lambda value: f"{value:,}", rank)]
    return "\n".join(lines)


def run_estimate_memory(args: argparse.Namespace) -> None:
    config, name = load_config(args.preset, args.model_config)
    arch = architecture(config)
    quota = parse_quota(args.quota)
    setup = setup_from_args(args)
    if args.json:  # replaced atomically if it exists, as every results file is
        checks.refuse_output_over_inputs("--json", args.json, {"--model-config": args.model_config})
        checks.check_writable("--json", args.json)
    result = estimate(arch, quota, setup, args.lora_rank)
    print(format_table(name, arch, quota, setup, result, args.lora_rank))
    if args.json:
        numbers = {
            "model": name,
            "total_params": arch.total_params,
            "quota": str(quota),
            "rows_per_layer": loki_rows_per_layer(arch.hidden_size, quota),
            "lora_rank": args.lora_rank,
            "setup": asdict(setup),
            "bytes_per_gpu": {m: {**asdict(e), "total": e.total} for m, e in result.items()},
        }
        files.write_json(args.json, numbers, indent=2)
