"""`loki-dist forgetting`: the paper's forgetting score of tuned models against their base.

    Avg = 100/N * sum_i (S_base_i - S_tuned_i) / S_base_i      over N benchmarks (higher = more forgetting)

A "benchmark" is one entry of a results file's `scores` map {name: value}: `loki-dist evaluate` writes
one per run (its --name; with --scores-per-subject also one per subject), and a hand-written file may
hold several (`{"scores": {"TriviaQA": 24.37, "GSM8K": 39.65}}`, or just the flat map). Several files
joined by commas are merged into one set of scores, so separate evaluate runs make one model's row. For a
benchmark listed in `lower_is_better` (perplexity) the relative change is (S_tuned - S_base) / S_base,
so that getting worse always counts as forgetting.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from loki_dist.core import checks, files
from loki_dist.core.errors import UserError, preview


def add_forgetting_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        required=True,
        help="results of the base model: a JSON file with `scores` {benchmark: value} (as `loki-dist "
        "evaluate` writes) or a flat {benchmark: value} map; join several files with commas to merge them",
    )
    p.add_argument(
        "--tuned",
        required=True,
        nargs="+",
        help="results of each tuned model (one argument per model, commas merge files as for --base)",
    )
    p.add_argument(
        "--labels", default=None, help="comma-separated names of the tuned models (default: file names)"
    )
    p.add_argument(
        "--benchmarks", default=None, help="comma-separated benchmarks to use (default: all of --base's)"
    )
    p.add_argument("--output", default=None, help="also write the table as JSON")


@dataclass(frozen=True)
class Scores:
    values: dict[str, float]
    lower_is_better: frozenset[str]


def read_scores(spec: str, flag: str) -> Scores:
    """Merge the `scores` of the comma-separated files in spec; a benchmark may appear only once."""
    values: dict[str, float] = {}
    lower: set[str] = set()
    for name in _spec_files(spec):
        data = checks.read_json(name, flag)
        scores = data.get("scores", data) if isinstance(data, dict) else None
        if not isinstance(scores, dict) or not scores:
            raise UserError(f"{flag} {name}: expected a `scores` map {{benchmark: number}}")
        for benchmark, value in scores.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(
                    f"{flag} {name}: score of {preview(benchmark)} is not a number ({preview(value)})"
                )
            if not math.isfinite(value):
                raise UserError(
                    f"{flag} {name}: score of {preview(benchmark)} is {value}; a score must be finite"
                )
            if benchmark in values:
                raise UserError(f"{flag} {spec}: benchmark {benchmark!r} appears in two files")
            values[benchmark] = float(value)
        lower.update(data.get("lower_is_better", []) if "scores" in data else [])
    return Scores(values, frozenset(lower))


def forgetting_score(base: Scores, tuned: Scores, benchmarks: list[str]) -> float:
    """Avg = 100/N * sum (S_base - S_tuned) / S_base, sign flipped for lower-is-better benchmarks."""
    total = 0.0
    for name in benchmarks:
        drop = (base.values[name] - tuned.values[name]) / base.values[name]
        total += -drop if name in base.lower_is_better else drop
    return 100 * total / len(benchmarks)


def forgetting_table(base: Scores, tuned: dict[str, Scores], benchmarks: list[str] | None = None) -> dict:
    """{benchmarks, rows: [{model, scores, forgetting}]}, the base first (forgetting 0)."""
    names = benchmarks or list(base.values)
    for label, scores in {"--base": base, **tuned}.items():
        missing = [n for n in names if n not in scores.values]
        if missing:
            raise UserError(f"{label}: no score for benchmark(s) {', '.join(missing)}")
    zero = [n for n in names if base.values[n] == 0]
    if zero:
        raise UserError(f"--base: score 0 for {', '.join(zero)}; the forgetting score divides by it")
    rows = [{"model": "base", "scores": {n: base.values[n] for n in names}, "forgetting": 0.0}]
    for label, scores in tuned.items():
        rows.append(
            {
                "model": label,
                "scores": {n: scores.values[n] for n in names},
                "forgetting": forgetting_score(base, scores, names),
            }
        )
    return {"benchmarks": names, "rows": rows}


def format_table(table: dict) -> str:
    names = table["benchmarks"]
    first = max(len("model"), *(len(r["model"]) for r in table["rows"]))
    widths = [max(8, len(n)) for n in names]
    header = "  ".join(
        ["model".ljust(first), *(n.rjust(w) for n, w in zip(names, widths, strict=True)), "Avg"]
    )
    lines = [header]
    for row in table["rows"]:
        cells = [f"{row['scores'][n]:.2f}".rjust(w) for n, w in zip(names, widths, strict=True)]
        lines.append("  ".join([row["model"].ljust(first), *cells, f"{row['forgetting']:.2f}%"]))
    return "\n".join(lines)


def _spec_files(spec: str) -> list[str]:
    return [part.strip() for part in spec.split(",") if part.strip()]


def run_forgetting(args: argparse.Namespace) -> None:
    if args.output:
        for flag, spec in [("--base", args.base), *(("--tuned", spec) for spec in args.tuned)]:
            for name in _spec_files(spec):
                checks.refuse_output_over_inputs("--output", args.output, {flag: name})
        checks.check_writable("--output", args.output)
    base = read_scores(args.base, "--base")
    labels = [s.strip() for s in args.labels.split(",")] if args.labels else None
    if labels is not None and len(labels) != len(args.tuned):
        raise UserError(f"--labels: {len(labels)} names for {len(args.tuned)} --tuned models")
    labels = labels or [Path(spec.split(",")[0]).stem for spec in args.tuned]
    if len(set(labels)) != len(labels):
        raise UserError(f"--labels: names must differ ({', '.join(labels)}); pass --labels")
    tuned = {label: read_scores(spec, "--tuned") for label, spec in zip(labels, args.tuned, strict=True)}
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()] if args.benchmarks else None
    table = forgetting_table(base, tuned, benchmarks)
    print(format_table(table))
    print("Avg = 100/N * sum (S_base - S_tuned) / S_base over the N benchmarks (higher = more forgetting)")
    if args.output:
        files.write_json(args.output, table)
