"""The selection study's report parts shared by its two result formats: the sentences at equal skill, and
the whole report of a run from before the fronts (2026-11-30: a rate sweep with seed 0, then the other
seeds at the fastest rate; arms hold `sweep` and `runs` instead of `rates`). The committed
bench/selection.md is such a run, and tests/test_readme_figures.py checks that it re-renders from its
JSON word for word: markdown_sweep keeps that true until the study is rerun, and can go with that run.
"""

from __future__ import annotations

from loki_dist.core import provenance
from loki_dist.demo.report import COLUMNS, summarise, table_section, values_of
from loki_dist.demo.task import HELD_OUT_PHRASINGS, TRAIN_PHRASINGS


def sweep_table(result: dict) -> str:
    lines = ["| arm | rate | steps | stopped | held-out acc (%) |", "|---|---|---|---|---|"]
    for arm in result["arms"]:
        for run in arm["sweep"]:
            chosen = " (chosen)" if run["lr"] == arm["lr"] else ""
            lines.append(f"| {arm['name']} | {run['lr']:g}{chosen} | {run['steps']} | {run['stopped']} | "
                         f"{100 * run['held_out_accuracy']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def grid_edges(result: dict) -> list[str]:
    """Arms whose chosen rate is the largest of their grid: a larger rate might have reached the target
    sooner still (and, by the same token, have damaged more), so their row of the table is at the edge of
    what the sweep explored."""
    edges = [a["name"] for a in result["arms"] if a["lr"] == max(r["lr"] for r in a["sweep"])]
    if not edges:
        return []
    return [f"Chosen at the largest rate of the grid (the sweep may not have found the fastest): "
            f"{', '.join(edges)}.", ""]  # fmt: skip


def comparisons(result: dict) -> list[str]:
    """Plain sentences: each arm against random rows, per retention measure, and whether the difference
    of means exceeds the seeds' spread (the larger of the two sds); with 3 seeds, no more is claimed."""
    by_name = {arm["name"]: arm for arm in result["arms"]}
    control = by_name.get("random rows q=10")
    if control is None:
        return []
    sentences = []
    for arm in result["arms"]:
        if arm is control:
            continue
        parts = []
        for key, heading, scale, fmt in COLUMNS[2:]:
            (a, da), (b, db) = (
                summarise([scale * v for v in values_of(x["runs"], key)]) for x in (arm, control)
            )
            beyond = abs(a - b) > max(da, db)
            parts.append(f"{heading} {fmt.format(a)} vs {fmt.format(b)} "
                         f"({'beyond' if beyond else 'within'} the seeds' spread)")  # fmt: skip
        sentences.append(f"- {arm['name']} against random rows: " + "; ".join(parts) + ".")
    return sentences


def markdown_sweep(result: dict, command: str, plot_name: str | None) -> str:
    """The report as it was before the fronts, word for word."""
    sizes = result["sizes"]
    lines = [
        "# Selection study: does KVA's choice of rows matter, at equal task skill?",
        "",
        provenance.measured(command, result.get("date"), result.get("commit"), result.get("machine"))
        + f" The whole run took {result['total_seconds'] / 60:.1f} min.",
        "",
        f"Model: {result['model']}. Task: toyworld's pets, {sizes['people']} invented people, trained on "
        f"{len(TRAIN_PHRASINGS)} phrasings, skill measured on {len(HELD_OUT_PHRASINGS)} held-out phrasings; "
        f"each run stops at {100 * sizes['target']:.0f}% held-out accuracy (checked every "
        f"{sizes['eval_every']} steps) or {sizes['cap']} steps; batch {sizes['batch_size']}; "
        f"{sizes['seeds']} seeds. How and why: the docstring of `bench/bench_selection.py`.",
        "",
        f"Retention: prose perplexity ({len(result['prose_docs'])} explanations x {sizes['prose_tokens']} "
        f"tokens), MMLU gold log-prob ({sizes['mmlu_questions']} dev questions), facts kept "
        f"({result['probes_kept_by_base']} of {result['probes_written']} probes the base completes "
        "correctly). Mean ± sd over seeds.",
        "",
        *table_section(result, plot_name, "Runs that hit the cap"),
    ]
    lines += [
        "Learning-rate sweep (seed 0; the fastest to the target is chosen):",
        "",
        sweep_table(result),
        "",
        *grid_edges(result),
    ]
    lines += ["## What it shows", "", *comparisons(result), ""]
    lines += [
        "## What it cannot show",
        "",
        "One 135M model and one small synthetic task (8 clan-to-pet facts asked about invented people): "
        "the paper's claim is about an 8B model and real tasks, where the answer may differ. Three seeds "
        "give a rough spread, not a significance test. The rate sweep picks the fastest rate, not the "
        "least damaging one; another rule could reorder the arms.",
        "",
    ]
    return "\n".join(lines)
