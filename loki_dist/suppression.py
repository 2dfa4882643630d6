"""`loki-dist suppress`: a copy of a model with chosen down_proj rows zeroed (the paper's Table 5a).

The cheapest check of whether attribution means anything on a model: zero, in every layer, the q% rows
most often ranked highest by the attribution (S-H), or lowest (S-L), or as many random rows, and measure
what each copy keeps (`loki-dist evaluate`, `loki-dist forgetting`). If attribution finds the rows that
matter, S-H loses far more than S-L, with random rows in between (in the paper at q=1, S-H loses 36% on
average, 25 points more than S-L).

The rows come from the selection code of `select` (strategies.select: the same rules and ties): S-L is
`select --strategy layer_balanced`, random is `select --strategy random` with the same seed, and S-H the
layer-balanced highest, per layer the k rows most often among a sample's k highest-ranked (it reads the
per-sample scores of `attribute --save-scores`: the histograms only bin the bottom ranks). `--positions`
zeroes the rows of any positions file instead (a global selection, a released file).

The copy is written as `apply` writes a merged model (export.export_model): the base's shards one at a
time, each down_proj rewritten with its rows zeroed and every other byte the base's, split over the
ranks under a launcher. It has no implant file (zeroed rows are no training); `suppression.json` beside
the weights says which rows were zeroed and how they were chosen.
"""

from __future__ import annotations

import argparse
import json
from fractions import Fraction
from pathlib import Path

import torch

from loki_dist import __version__
from loki_dist.core import distributed, flags
from loki_dist.core import positions as positions_file
from loki_dist.core.errors import UserError
from loki_dist.core.flags import parse_quota
from loki_dist.implant.artifacts.implant_file import RowSource
from loki_dist.selection.select import add_rule_argument
from loki_dist.selection.strategies import LAYER_HIGHEST

# --which -> the selection strategy that picks its rows
WHICH = {"lowest": "layer_balanced", "highest": LAYER_HIGHEST, "random": "random"}
RECORD = "suppression.json"


def add_suppress_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="the model to copy (a Hugging Face directory)")
    parser.add_argument("--output", required=True, help="directory for the copy with the rows zeroed")
    parser.add_argument("--attribution", help="attribution file of this model (`loki-dist attribute`)")
    parser.add_argument("--quota", help="percent of the rows of each layer to zero, in (0, 100]")
    parser.add_argument(
        "--which",
        choices=tuple(WHICH),
        help="the rows most often ranked lowest (S-L) or highest (S-H; needs `attribute --save-scores`), "
        "or random rows",
    )
    add_rule_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of --which random")
    parser.add_argument(
        "--positions", help="zero the rows of this positions file instead of --attribution/--which/--quota"
    )
    flags.add_overwrite(parser, "an existing --output")


def check_flags(args: argparse.Namespace) -> Fraction | None:
    """The flags agree with each other (the quota, or None with --positions); no file is read."""
    if args.positions is not None:
        chosen = {"--attribution": args.attribution, "--quota": args.quota, "--which": args.which}
        given = [flag for flag, value in chosen.items() if value is not None]
        if given:
            raise UserError(f"--positions names the rows itself; drop {', '.join(given)}")
        return None
    if args.which is None or args.quota is None:
        raise UserError("--which and --quota are required (or --positions FILE)")
    if args.attribution is None and args.which != "random":
        raise UserError(f"--which {args.which} needs --attribution (only --which random does without)")
    return parse_quota(args.quota)


def choose_rows(args: argparse.Namespace, quota: Fraction | None, spec) -> list[list[int]]:
    """The rows to zero in each layer, by the selection code of `select` (or from --positions)."""
    from loki_dist.selection.strategies import load_attribution, random_selection, select

    if args.positions is not None:
        return positions_file.load(args.positions, spec)
    strategy = WHICH[args.which]
    if args.attribution is None:
        return random_selection(spec.num_layers, spec.hidden_size, quota, args.seed)
    tensors, _ = load_attribution(args.attribution, args.model, quota, strategy, args.rule)
    return select(tensors, quota, strategy, args.seed, args.rule)


class ZeroRows(RowSource):
    """The chosen rows of each layer, all zero: what export_model writes into the copy."""

    label = "the rows to zero"

    def __init__(self, positions: list[list[int]], intermediate_size: int):
        self.positions, self.intermediate_size = positions, intermediate_size

    def layers(self) -> list[int]:
        return [layer for layer, rows in enumerate(self.positions) if rows]

    def rows(self, layer: int) -> torch.Tensor:
        return torch.tensor(self.positions[layer], dtype=torch.int64)

    def weight(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros(len(self.positions[layer]), self.intermediate_size, dtype=dtype)


def describe(args: argparse.Namespace) -> str:
    if args.positions is not None:
        return f"the rows of {args.positions}"
    if args.which == "random":
        return f"random rows (seed {args.seed}), quota {args.quota}%"
    rank = "|score|" if args.rule == "magnitude" else "score"
    return f"the rows most often ranked {args.which} by {rank}, quota {args.quota}% per layer"


def record(args: argparse.Namespace, positions: list[list[int]]) -> str:
    """suppression.json: how the rows were chosen, and which."""
    how = {"positions_file": args.positions} if args.positions is not None else {
        "attribution": args.attribution, "which": args.which, "rule": args.rule, "quota": args.quota,
        "seed": args.seed,
    }  # fmt: skip
    return json.dumps({"model": str(args.model), **how, "loki_dist_version": __version__,
                       "positions": positions}) + "\n"  # fmt: skip


def run_suppress(args: argparse.Namespace) -> None:
    from loki_dist.core.families import spec_from_dir
    from loki_dist.core.modeling import check_weights
    from loki_dist.implant.artifacts.export import check_output, export_model, run_collectively

    out, model = Path(args.output), Path(args.model)

    def suppress(world) -> None:
        with distributed.agreement(world):  # every rank checks and chooses; one agreed error, nothing written
            quota = check_flags(args)
            inputs = {"--model": model, "--attribution": args.attribution, "--positions": args.positions}
            check_output(out, args.overwrite, inputs)
            spec = spec_from_dir(model)
            check_weights(model, safetensors_only=True, spec=spec)  # the copy is made from its shards
            positions = choose_rows(args, quota, spec)
        if world.is_main:
            sizes = [len(rows) for rows in positions]
            print(
                f"zeroing {sum(sizes)} down_proj rows ({min(sizes)}-{max(sizes)} per layer): {describe(args)}"
            )
        rows = ZeroRows(positions, spec.intermediate_size)
        export_model(model, rows, out, world, None, notes={RECORD: record(args, positions)}, flag="--model")

    run_collectively(suppress, out)
