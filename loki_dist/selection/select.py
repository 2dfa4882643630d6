"""`loki-dist select`: turn an attribution file into a positions file (docs/method.md, method step 2).

The command only: its flags, the checks made before any work, and what it writes and prints (the
positions, a summary per layer, the stability lines, --report's JSON, --plot). The choice of rows is
strategies.py's, its stability stability.py's and the drawing plot.py's; none of them imports this, so
the engine can be used (`suppress`, the selection study in bench/) without the command line.
"""

from __future__ import annotations

import argparse
from fractions import Fraction
from pathlib import Path

from loki_dist.core import checks, files, flags, metering, plotting
from loki_dist.core.errors import UserError
from loki_dist.core.flags import parse_quota
from loki_dist.selection.stability import (
    DEFAULT_RESAMPLES,
    NO_SCORES,
    Stability,
    measure,
    open_scores,
)
from loki_dist.selection.strategies import (
    RULES,
    STRATEGIES,
    load_attribution,
    random_selection,
    select,
)


def add_select_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--attribution", help="attribution file written by `loki-dist attribute`")
    parser.add_argument(
        "--quota",
        required=True,
        type=str,
        help="percent of rows per layer, in (0, 100]; fractional needs per-sample scores",
    )
    parser.add_argument("--output", required=True, help="positions file to write (JSON list of L lists)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="layer_balanced")
    add_rule_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of --strategy random and of the bootstrap")
    parser.add_argument(
        "--model",
        default=None,
        help="check the attribution file against this model (or give its shapes to random)",
    )
    parser.add_argument(
        "--plot",
        default=None,
        help="also draw, per layer, the rows chosen, their mean score and how stable the choice is (PNG, "
        "needs matplotlib)",
    )
    add_stability_arguments(parser)


def add_rule_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rule",
        choices=RULES,
        default="signed",
        help="rank each sample's rows by signed score or by magnitude |score| (lowest first)",
    )


def add_stability_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--resamples",
        type=int,
        default=DEFAULT_RESAMPLES,
        help="bootstrap resamples for the stability figures (from the per-sample scores, attribute "
        "--save-scores; seeded with --seed); 0: no stability figures",
    )
    parser.add_argument("--report", default=None, help="also write the selection and its stability as JSON")


# the bootstrap's weights are [resamples, samples] int64: 228 MB at 10,000 resamples of 2,850 prompts, and a
# 5th percentile needs no more than a few hundred
MAX_RESAMPLES = 10_000


# ------------------------------------------------------------------------------------------------- run


def run_select(args: argparse.Namespace) -> None:
    from loki_dist.core import positions as positions_file

    quota = parse_quota(args.quota)
    flags.check_seed(args.seed)
    check_outputs(args)
    check_stability_arguments(args)
    if args.plot:
        if not args.plot.lower().endswith(".png"):
            raise UserError(f"--plot {args.plot}: expected a .png file name")
        plotting.pyplot("--plot")  # missing matplotlib is reported before any work
    if args.attribution is None:
        if args.strategy != "random" or args.model is None:
            raise UserError("--attribution is required (only --strategy random can do with --model alone)")
        from loki_dist.core.families import spec_from_dir

        spec = spec_from_dir(args.model)
        positions = random_selection(spec.num_layers, spec.hidden_size, quota, args.seed)
        tensors = None
    else:
        tensors, _ = load_attribution(args.attribution, args.model, quota, args.strategy, args.rule)
        positions = select(tensors, quota, args.strategy, args.seed, args.rule)
    positions_file.save(positions, args.output)
    by = " by |score|" if args.rule == "magnitude" and args.strategy != "random" else ""
    print(summary(positions, tensors, args.strategy + by, quota))
    print(f"wrote {args.output}")
    figures = report_stability(args, tensors, positions, quota)
    if args.plot:
        from loki_dist.selection import plot

        plot.plot(positions, tensors, figures, args.rule, args.plot)
        print(f"wrote {args.plot}")


def check_outputs(args: argparse.Namespace) -> None:
    """--output (and --plot) can be written and would not write over an input. An existing positions file
    is replaced (atomically): a selection takes seconds to redo, unlike what it is made from."""
    inputs = {"--attribution": args.attribution, "--model": args.model}
    for flag, path in (("--output", args.output), ("--plot", args.plot)):
        if path is not None:
            checks.refuse_output_over_inputs(flag, path, inputs)
            checks.check_writable(flag, path)


def check_stability_arguments(args: argparse.Namespace) -> None:
    """Before any work: a usable count, and a --report that writes over no input and no other output."""
    if not 0 <= args.resamples <= MAX_RESAMPLES:
        raise UserError(
            f"--resamples {args.resamples}: expected a count in [0, {MAX_RESAMPLES}] (0: no stability "
            "figures)"
        )
    if args.report is None:
        return
    for flag in ("--output", "--plot"):
        other = getattr(args, flag[2:])
        if other is not None and Path(other).resolve() == Path(args.report).resolve():
            raise UserError(f"--report {args.report}: is also {flag}; give the report a name of its own")
    checks.refuse_output_over_inputs("--report", args.report, {"--attribution": args.attribution,
                                                               "--model": args.model})  # fmt: skip
    checks.check_writable("--report", args.report)


def summary(positions: list[list[int]], tensors: dict | None, strategy: str, quota: Fraction) -> str:
    lines = [f"{strategy} selection, quota {float(quota):g}%: {sum(map(len, positions))} rows"]
    mean = None
    if tensors is not None:
        mean = tensors["score_sum"] / max(int(tensors["num_samples"].reshape(-1)[0]), 1)
    for layer, rows in enumerate(positions):
        text = f"  layer {layer:3d}: {len(rows):6d} rows"
        if mean is not None:
            chosen = mean[layer, rows].mean().item() if rows else float("nan")
            text += f"  mean score {chosen:+.3e} (layer mean {mean[layer].mean().item():+.3e})"
        lines.append(text)
    return "\n".join(lines)


def report_stability(
    args: argparse.Namespace, tensors: dict | None, positions: list[list[int]], quota: Fraction
) -> Stability | None:
    """`select`'s stability lines (or the one line saying why there are none), and --report's JSON;
    returns the figures (None where there are none), for --plot."""
    figures, note = None, None
    if tensors is None or args.strategy == "random":
        note = "random rows: no attribution whose stability to measure"
    elif args.resamples == 0:
        note = "stability figures not asked for (--resamples 0)"
    elif int(tensors["num_samples"].reshape(-1)[0]) < 2:
        note = "stability: needs at least 2 samples"
    else:
        with open_scores(args.attribution, tensors) as scores, metering.phase("select_stability"):
            if scores is None:
                note = NO_SCORES
            else:
                figures = measure(
                    scores, positions, quota, args.strategy, args.rule, args.resamples, args.seed
                )
    if figures is not None:
        print("\n".join(figures.lines()))
    elif args.strategy != "random" and args.resamples:
        print(note)
    if args.report:
        files.write_json(args.report, {
            "attribution": args.attribution, "positions": args.output, "quota": str(quota),
            "strategy": args.strategy, "rule": args.rule, "rows_per_layer": [len(r) for r in positions],
            "stability": None if figures is None else figures.as_dict(), "stability_note": note,
        })  # fmt: skip
        print(f"wrote {args.report}")
    return figures
