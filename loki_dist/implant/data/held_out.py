"""The task's held-out set for the forgetting monitor, as LLaMA-Factory names it: `--val-size` (a share
or a count of the training samples, set aside) or `--eval-dataset NAME[,NAME...]` (dataset_info.json
entries of --dataset-dir), beside trainer/monitor.py's own `--eval-data FILE`.

A LLaMA-Factory recipe says `val_size: 0.1` or `eval_dataset: my_eval`; read as it says, those samples
are the task held out, scored at the run's first and last step and every --eval-steps
(trainer/monitor.py). The split is LLaMA-Factory's in kind, not in draw: a share is rounded up (as
`datasets`' train_test_split does), the held-out samples are drawn from a generator seeded with --seed,
so every rank and every resume sets aside the same ones, and the others train in their file order.
"""

from __future__ import annotations

import argparse
import math
import random

from loki_dist.core.errors import UserError
from loki_dist.implant.data import dataset_info
from loki_dist.implant.data.rows import Conversation


def add_held_out_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--val-size",
        type=float,
        metavar="SHARE_OR_COUNT",
        help="set aside this share (below 1) or number of the training samples as the held-out task set "
        "that --eval-data would give (LLaMA-Factory's val_size)",
    )
    p.add_argument(
        "--eval-dataset",
        metavar="NAME[,NAME...]",
        help="held-out task data by name in --dataset-dir's dataset_info.json, instead of --eval-data "
        "(LLaMA-Factory's eval_dataset)",
    )


def given(args: argparse.Namespace) -> list[str]:
    """The held-out task flags given, of --eval-data, --val-size and --eval-dataset."""
    named = {"--eval-data": args.eval_data, "--val-size": args.val_size, "--eval-dataset": args.eval_dataset}
    return [flag for flag, value in named.items() if value is not None]


def check_flags(args: argparse.Namespace) -> None:
    """One held-out task set at most, and a --val-size that leaves something either side."""
    flags = given(args)
    if len(flags) > 1:
        raise UserError(f"{' and '.join(flags)}: each names the held-out task set; give one of them")
    size = args.val_size
    if size is not None and not (math.isfinite(size) and size > 0 and (size < 1 or size.is_integer())):
        raise UserError(f"--val-size {size:g}: expected a share in (0, 1) or a whole number of samples")
    if args.eval_dataset is not None:
        dataset_info.dataset_names(args.eval_dataset)


def input_paths(args: argparse.Namespace) -> dict[str, str]:
    """The --eval-dataset files by flag, for the check that no output overwrites them."""
    if args.eval_dataset is None:
        return {}
    return dataset_info.input_paths(_eval_args(args), "--eval-dataset")


def split(
    args: argparse.Namespace, conversations: list[Conversation]
) -> tuple[list[Conversation], list[Conversation] | None]:
    """(the samples that train, the held-out task set or None): --val-size takes its share out of the
    training samples; --eval-dataset reads its entries (each cut to --max-samples, as --dataset's)."""
    if args.eval_dataset is not None:
        return conversations, dataset_info.conversations(_eval_args(args), "--eval-dataset")
    if args.val_size is None:
        return conversations, None
    count = math.ceil(args.val_size * len(conversations)) if args.val_size < 1 else int(args.val_size)
    if not 0 < count < len(conversations):
        raise UserError(
            f"--val-size {args.val_size:g}: sets aside {count} of the {len(conversations)} training samples; "
            "leave at least one on each side"
        )
    chosen = set(random.Random(args.seed).sample(range(len(conversations)), count))
    held = [c for i, c in enumerate(conversations) if i in chosen]
    return [c for i, c in enumerate(conversations) if i not in chosen], held


def _eval_args(args: argparse.Namespace) -> argparse.Namespace:
    """The flags as dataset_info reads them, naming the held-out data sets (concatenated, never mixed)."""
    return argparse.Namespace(**{**vars(args), "dataset": args.eval_dataset, "mix_ratios": None})
