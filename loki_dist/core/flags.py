"""Flags that several commands share, declared once so that their spelling, type and wording agree.

A flag that means one thing in two commands must read the same in both `--help`s; where its meaning
differs by command (what `--overwrite` replaces, the default `--max-seq-len`), the command says only that
part. Flags that travel as a group live beside what reads them: the question flags in attribution/mmlu.py,
the data flags in implant/data.py, the monitor's in implant/monitor.py. A value several commands read
alike is checked here once too (--seed, --quota).
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction

from loki_dist.core.errors import UserError

DTYPES = ("auto", "float32", "bfloat16", "float16")
PRECISIONS = ("bf16", "fp32")


def add_overwrite(parser: argparse.ArgumentParser, replaces: str) -> None:
    """Every command refuses to replace what a user has unless told to; `replaces` says what goes."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {replaces}")


def add_dtype(parser: argparse.ArgumentParser) -> None:
    """The dtype a model is loaded in for inference (training has --precision, which DeepSpeed settles)."""
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="model dtype (auto: bfloat16 on GPU, float32 on CPU)"
    )


def add_precision(parser: argparse.ArgumentParser, default: str | None) -> None:
    """Training precision; None lets the device decide (train), a plan for GPUs says bf16."""
    where = " (default: bf16 on GPUs, fp32 on CPU)" if default is None else ""
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default,
        help=f"bf16: bfloat16 weights and compute, the trained rows' master copy and Adam state in fp32; "
        f"fp32: all fp32{where}",
    )


def add_ds_config(parser: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """A DeepSpeed JSON config: a path, or the name of one shipped in ds_configs/ (dsconfig.resolve_path)."""
    parser.add_argument("--ds-config", default=default, help=f"DeepSpeed config {what}")


def add_max_seq_len(parser: argparse.ArgumentParser, default: int, longer: str) -> None:
    """Tokens per sequence; `longer` says what the command does with a longer one."""
    parser.add_argument("--max-seq-len", type=int, default=default, help=f"tokens per sequence; {longer}")


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed torch's generators take, with room for the offsets added to it (seed + epoch, seed + k):
    2**70 was 'Overflow when unpacking long long' from torch.Generator.manual_seed."""
    if not -(2**62) <= seed < 2**62:
        raise UserError(f"{flag} {seed}: expected an integer between -2**62 and 2**62")


def parse_quota(text: str) -> Fraction:
    """--quota of select, suppress, estimate-memory/time and the pipeline: percent of the rows of each
    layer, exact (0.1 is 1/10). Its range is checked on a float first: Fraction('1e999999999')
    computes 10**999999999 (minutes and gigabytes), a float of it is inf at once."""
    try:
        rough = float(Fraction(text)) if "/" in text else float(text)
        quota = Fraction(text) if 0 < rough <= 100 else None
    except (ValueError, ZeroDivisionError, OverflowError):
        rough = math.nan
    if math.isnan(rough):
        raise UserError(f"--quota {text}: not a number")
    if quota is None or not 0 < quota <= 100:
        raise UserError(f"--quota {text}: must be in (0, 100] (percent of the rows of each layer)")
    return quota
