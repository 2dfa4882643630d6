"""Flags that several commands share, declared once so that their spelling, type and wording agree.

A flag that means one thing in two commands must read the same in both `--help`s; where its meaning
differs by command (what `--overwrite` replaces, the default `--max-seq-len`), the command says only that
part. Flags that travel as a group live beside what reads them: the question flags in attribution/mmlu.py,
the data flags in implant/data.py, the monitor's in implant/monitor.py.
"""

from __future__ import annotations

import argparse
import math

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


def steps_or_share(text: str) -> int | float:
    """A step count, or (as Hugging Face's TrainingArguments read `save_steps`, `logging_steps` and
    `warmup_steps`) a share in (0, 1) of the run's total steps: LLaMA-Factory recipes write
    `save_steps: 0.99999` for "once, at the end". A whole float (`2.0`) is the count 2."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value >= 0 and (value < 1 or value.is_integer()):
        return int(value) if value.is_integer() else value
    raise argparse.ArgumentTypeError(
        f"{text}: expected a whole number of steps, or a share of the run's steps in (0, 1)"
    )


def steps_of(value: int | float, total: int) -> int:
    """What steps_or_share gave, in steps of a run of `total`: a share is rounded up, as HF does."""
    return math.ceil(total * value) if isinstance(value, float) else value
