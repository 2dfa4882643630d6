"""The table and the trade-off plot of a comparison at equal task skill: the demo's and the study's.

A result holds `base` (the base model's measures) and `arms`, each with its `name`, its rate `lr` and its
`runs` (one per seed, methods.RunResult as a dict with its `measures`). The table gives each measure
as mean ± sample sd over the seeds, so a difference can be read against the spread; both are computed
from the raw numbers the result holds, so a report re-rendered from its JSON is the run's own.
"""

from __future__ import annotations

import math
from pathlib import Path

from loki_dist.core import provenance

COLUMNS = (  # key, heading, scale, format
    ("steps", "steps", 1, "{:.1f}"),
    ("held_out_accuracy", "held-out task acc (%)", 100, "{:.1f}"),
    ("prose_perplexity", "prose ppl", 1, "{:.3f}"),
    ("mmlu_gold_logprob", "MMLU gold log-prob", 1, "{:.4f}"),
    ("probes_kept", "facts kept (%)", 100, "{:.1f}"),
)


def values_of(runs: list[dict], key: str) -> list[float]:
    return [r[key] if key in r else r["measures"][key] for r in runs]


def summarise(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value); a NaN (a measure with nothing to read, as
    the facts kept when the base knows none) makes both NaN rather than an error."""
    mean = math.fsum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def table(result: dict) -> str:
    head = ["arm", "rate", "trainable", "reached target", *[c[1] for c in COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = result["base"]
    cells = ["base", "-", "0", "-", "0", f"{100 * base['held_out_accuracy']:.1f}"]
    cells += [fmt.format(scale * base[key]) for key, _, scale, fmt in COLUMNS[2:]]
    lines.append("| " + " | ".join(cells) + " |")
    for arm in result["arms"]:
        runs = arm["runs"]
        cells = [arm["name"], f"{arm['lr']:g}", f"{runs[0]['trainable']:,}",
                 f"{sum(r['reached'] for r in runs)}/{len(runs)}"]  # fmt: skip
        for key, _, scale, fmt in COLUMNS:
            mean, spread = summarise([scale * v for v in values_of(runs, key)])
            cells.append(f"{fmt.format(mean)} ± {fmt.format(spread)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> bool:
    """The trade-off figure (trade_off_figure) as a PNG; False, with a line, where matplotlib is missing."""
    from loki_dist.core import plotting
    from loki_dist.core.errors import UserError

    try:
        fig = trade_off_figure(result, title)
    except UserError:
        print("no plot: matplotlib is not installed", flush=True)
        return False
    plotting.save(fig, path, dpi=110)
    return True


# measure -> is a lower value better
_MEASURES = {"prose_perplexity": True, "mmlu_gold_logprob": False, "probes_kept": False}
CLUSTER_GAP = 2.5  # an arm this many times farther from the base than the next-nearest is out of the close-up


def trade_off_figure(result: dict, title: str):
    """Task skill against each retention measure, one marker per arm with the seeds' spread as error
    bars, the base as a star; a legend instead of labels beside the points (close points overlap).

    Top row, every arm. An arm that ruins a measure (LoRA's perplexity in the thousands) puts every other
    arm and the base into one corner, where LoKI and random rows, the comparison the demo is for, cannot
    be told apart; so the bottom row is that corner on its own: the arms near the base (close_up), the
    base's value a line. Linear axes and plain tick labels everywhere (no 10^x, no offset to add).
    """
    from matplotlib.ticker import ScalarFormatter

    from loki_dist.core import plotting

    plt = plotting.pyplot("--plot")
    measures = [c for c in COLUMNS if c[0] in _MEASURES]
    fig, axes = plt.subplots(2, len(measures), figsize=(5 * len(measures), 8.6), squeeze=False)
    markers, base = "osD^vP*Xh<>", result["base"]
    for column, (key, heading, scale, _) in enumerate(measures):
        points = [_point(arm, key, scale) for arm in result["arms"]]
        near = close_up([y for _, _, y, _ in points], scale * base[key])
        for row, axis in enumerate(axes[:, column]):
            shown = range(len(points)) if row == 0 else near
            if row == 0:
                axis.scatter([100 * base["held_out_accuracy"]], [scale * base[key]], marker="*", s=160, c="k",
                             label="base", zorder=3)  # fmt: skip
            else:
                axis.axhline(scale * base[key], color="k", ls="--", lw=1, label="base")
            for index in shown:
                (x, dx, y, dy), name = points[index], result["arms"][index]["name"]
                axis.errorbar([x], [y], xerr=[dx], yerr=[dy], fmt=markers[index % len(markers)], ms=7,
                              capsize=3, label=name, color=f"C{index}")  # fmt: skip
            for ticks in (axis.xaxis, axis.yaxis):
                ticks.set_major_formatter(ScalarFormatter(useOffset=False))
                ticks.get_major_formatter().set_scientific(False)
            better = "lower" if _MEASURES[key] else "higher"
            axis.set(xlabel="held-out task accuracy (%)", ylabel=f"{heading}, {better} is better")
            left_out = [result["arms"][i]["name"] for i in range(len(points)) if i not in near]
            if row == 1:
                axis.set_title("close-up" + (f" (not shown: {', '.join(left_out)})" if left_out else ""),
                               fontsize=9)  # fmt: skip
            axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(f"{title}: task skill vs retention, mean ± sd over seeds")
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    return fig


def _point(arm: dict, key: str, scale: float) -> tuple[float, float, float, float]:
    """(x, x's sd, y, y's sd) of an arm: held-out accuracy in percent against the measure."""
    (x, dx) = summarise([100 * v for v in values_of(arm["runs"], "held_out_accuracy")])
    (y, dy) = summarise([scale * v for v in values_of(arm["runs"], key)])
    return x, dx, y, dy


def close_up(values: list[float], base: float) -> list[int]:
    """The arms (indices) near the base on one measure: sorted by distance from the base, the arms
    before the widest gap, where the next arm is CLUSTER_GAP or more times as far (all of them where
    no gap is that wide)."""
    order = sorted(range(len(values)), key=lambda i: abs(values[i] - base))
    distances = [max(abs(values[i] - base), 1e-12) for i in order]
    gaps = [(distances[n] / distances[n - 1], n) for n in range(1, len(distances))]
    widest = max(gaps, default=(0.0, len(order)))
    return sorted(order[: widest[1]] if widest[0] >= CLUSTER_GAP else order)


def table_section(result: dict, plot_name: str | None, unreached: str) -> list[str]:
    """A report's middle: the table, the plot, and the runs that did not reach the target (`unreached`
    is the sentence's start), as markdown lines."""
    missed = [
        f"{a['name']} (seed {r['seed']})" for a in result["arms"] for r in a["runs"] if not r["reached"]
    ]
    lines = [table(result), ""]
    if plot_name:
        lines += [f"![trade-off]({plot_name})", ""]
    return [*lines, f"{unreached}: " + (", ".join(missed) if missed else "none") + ".", ""]


def markdown(result: dict, plot_name: str | None) -> str:
    """The demo's report (results.md): provenance, what ran, the table, the plot, runs that missed."""
    s = result["settings"]
    rates = ", ".join(f"{kind} {lr:g}" for kind, lr in result["learning_rates"].items())
    lines = [
        f"# loki-dist demo, {result['setup']} setup",
        "",
        provenance.measured(result["command"], result["date"], result["commit"], result["machine"])
        + f" The whole run took {result['total_seconds'] / 60:.1f} min.",
        "",
        f"Model: {result['model']}. Task: each of {s['people']} invented people's pet, trained on two "
        f"phrasings, skill measured on two held-out ones; each run stops at {100 * s['target']:.0f}% "
        f"held-out accuracy (checked every {s['eval_every']} steps) or {s['task_steps']} steps; batch "
        f"{s['batch_size']}; rows: --quota {s['quota']:g}; rates {rates}; {s['seeds']} seed(s), mean ± sd. "
        f"Retention: {result['general_sizes']}.",
        "",
        *table_section(result, plot_name, "Runs that did not reach the target"),
    ]
    return "\n".join(lines)
