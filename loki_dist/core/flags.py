"""Flags that several commands share, declared once so that their spelling, type and wording agree.

A flag that means one thing in two commands must read the same in both `--help`s; where its meaning
differs by command (what `--overwrite` replaces, the default `--max-seq-len`), the command says only that
part. Flags that travel as a group live beside what reads them: the question flags in attribution/mmlu.py,
the data flags in implant/data/sources.py, the monitor's in implant/trainer/monitor.py. A value several
commands read alike is checked here once too (--seed, --quota).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Mapping
from dataclasses import fields
from fractions import Fraction
from typing import Any, TypeVar

from loki_dist.core.errors import UserError

# One vocabulary of precisions for every command: each has the trainers' spelling (HF's and LLaMA-Factory's
# fp32, bf16) and torch's (float32, bfloat16), and each command takes either, under --precision or --dtype.
SPELLINGS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
_SHORT = {torch_name: short for short, torch_name in SPELLINGS.items()}
Settings = TypeVar("Settings")


def add_overwrite(parser: argparse.ArgumentParser, replaces: str) -> None:
    """Every command refuses to replace what a user has unless told to; `replaces` says what goes."""
    parser.add_argument("--overwrite", action="store_true", help=f"replace {replaces}")


def read_precision(text: str) -> str:
    """Either spelling of a precision, as its short name (float32 -> fp32)."""
    name = _SHORT.get(text, text)
    if name not in PRECISIONS:
        raise argparse.ArgumentTypeError(
            f"{text}: expected one of {', '.join(PRECISIONS)} (or torch's {', '.join(_SHORT)})"
        )
    return name


def torch_name(precision: str) -> str:
    """A precision as torch names its dtype (fp32 -> float32); auto stays auto."""
    return SPELLINGS.get(precision, precision)


def add_precision(parser: argparse.ArgumentParser, dest: str, default: str | None, meaning: str) -> None:
    """--precision and --dtype, one flag under two names in every command (train said one, the inference
    commands the other); `dest` is the name the command reads, `meaning` what the precision is for there."""
    names = ("--precision", "--dtype") if dest == "precision" else ("--dtype", "--precision")
    parser.add_argument(
        *names,
        dest=dest,
        type=read_precision,
        default=default,
        metavar="{auto,fp32,bf16,fp16}",
        help=f"{meaning} (fp32 or float32, bf16 or bfloat16, fp16 or float16)",
    )


def add_dtype(parser: argparse.ArgumentParser) -> None:
    """The precision a model is loaded in for inference."""
    add_precision(parser, "dtype", "auto", "model precision; auto: bf16 on GPU, fp32 on CPU")


def training_bf16(precision: str | None) -> bool | None:
    """Whether training runs in bf16; None (the device decides) where `precision` is unset or auto. fp16
    is refused: loki_dist trains in bf16 or fp32, as LLaMA-Factory's `fp16: true` is (llamafactory.py)."""
    if precision == "fp16":
        raise UserError("--precision fp16: loki_dist trains in bf16 or fp32")
    return None if precision in (None, "auto") else precision == "bf16"


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


def to_settings(cls: type[Settings], values: Mapping[str, Any], **given: Any) -> Settings:
    """A command's settings dataclass from its parsed flags (`vars(args)`, at the command's boundary), each
    field from the flag of the same name; `given`: the fields the command makes itself (a nested group of
    settings). A field without its flag is a KeyError: a bug of the command, never a user's mistake."""
    return cls(**{f.name: values[f.name] for f in fields(cls) if f.name not in given}, **given)
