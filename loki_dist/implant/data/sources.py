"""Which training data the flags name: `--data FILE` or `--dataset NAME[,NAME...]` (exactly one), and
what shapes them (`--dataset-dir`, `--mix-ratios`, `--max-samples`, `--chat-template`).

The one place that knows both readers: a file's rows (rows.py) and LLaMA-Factory's dataset_info.json
entries (dataset_info.py), so that neither has to know the other.
"""

from __future__ import annotations

import argparse

from loki_dist.core.errors import UserError
from loki_dist.implant.data import dataset_info
from loki_dist.implant.data.chat_templates import add_chat_template_argument
from loki_dist.implant.data.dataset_info import dataset_names, parse_ratios
from loki_dist.implant.data.rows import Conversation, read_rows, to_messages


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The training data flags: `--data FILE` or `--dataset NAMES` (exactly one), and what shapes them."""
    p.add_argument("--data", help="JSON/JSONL (alpaca or messages form) or a datasets dir; or --dataset")
    p.add_argument(
        "--dataset",
        help="LLaMA-Factory data set names in --dataset-dir's dataset_info.json, comma-separated; or --data",
    )
    p.add_argument("--dataset-dir", default="data", help="the directory holding dataset_info.json")
    p.add_argument(
        "--mix-ratios",
        help="sampling ratios of the --dataset names, comma-separated: a seeded mixture that stops when one "
        "data set runs out (default: the data sets one after another)",
    )
    p.add_argument("--max-samples", type=int, help="the first N rows of each data set (default: all)")
    add_chat_template_argument(p)


def check_data_flags(args: argparse.Namespace) -> None:
    """The data flags' own consistency, before any file is read."""
    if bool(args.data) == bool(args.dataset):
        raise UserError(
            "give one of --data FILE and --dataset NAME[,NAME...] (from --dataset-dir's dataset_info.json)"
            if not args.data
            else f"--data {args.data} and --dataset {args.dataset}: give one of them, not both"
        )
    if args.max_samples is not None and args.max_samples < 1:
        raise UserError(f"--max-samples {args.max_samples}: expected a positive integer")
    names = dataset_names(args.dataset) if args.dataset else []
    if args.mix_ratios is not None:
        if len(names) < 2:
            raise UserError(
                f"--mix-ratios {args.mix_ratios}: mixes several --dataset names, got {len(names)}"
            )
        parse_ratios(args.mix_ratios, len(names))


def read_conversations(args: argparse.Namespace) -> tuple[list[Conversation], str]:
    """Every sample the data flags name, as conversations, and the name of the data for messages."""
    if args.dataset:
        return dataset_info.conversations(args), f"--dataset {args.dataset}"
    rows = read_rows(args.data)[: args.max_samples]
    if not rows:
        raise UserError(f"--data {args.data}: the data set is empty")
    return [Conversation(to_messages(row, i), None, f"--data: row {i}") for i, row in enumerate(rows)], (
        f"--data {args.data}"
    )


def input_paths(args: argparse.Namespace) -> dict[str, str]:
    """The files the data flags read, by flag, for the check that no output overwrites them."""
    if args.data:
        return {"--data": args.data}
    return dataset_info.input_paths(args)
