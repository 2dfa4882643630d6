"""The table and the trade-off plot of a comparison at equal task skill: the demo's and the study's.

A result holds `base` (the base model's measures) and `arms`, each with its `name`, its rate `lr` and its
`runs` (one per seed, methods.RunResult as a dict with its `measures`). The table gives each measure
as mean ± sample sd over the seeds, so a difference can be read against the spread; both are computed
from the raw numbers the result holds, so a report re-rendered from its JSON is the run's own.
"""

from __future__ import annotations

import math
from pathlib import Path

from loki_dist.core import files

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
    """Task skill against each retention measure, one marker per arm with the seeds' spread as error
    bars, the base as a star; a legend instead of labels beside the points (close points overlap)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed", flush=True)
        return False
    measures = [c for c in COLUMNS if c[0] in ("prose_perplexity", "mmlu_gold_logprob", "probes_kept")]
    fig, axes = plt.subplots(1, len(measures), figsize=(5 * len(measures), 4.6))
    markers = "osD^vP*Xh<>"
    base = result["base"]
    for axis, (key, heading, scale, _) in zip(axes, measures, strict=True):
        axis.scatter([100 * base["held_out_accuracy"]], [scale * base[key]], marker="*", s=160, c="k",
                     label="base", zorder=3)  # fmt: skip
        for index, arm in enumerate(result["arms"]):
            xs = [100 * v for v in values_of(arm["runs"], "held_out_accuracy")]
            ys = [scale * v for v in values_of(arm["runs"], key)]
            (x, dx), (y, dy) = summarise(xs), summarise(ys)
            axis.errorbar([x], [y], xerr=[dx], yerr=[dy], fmt=markers[index % len(markers)], ms=7,
                          capsize=3, label=arm["name"])  # fmt: skip
        if key == "prose_perplexity":  # a ruined arm reaches 1e4: linear, every other arm sits on the axis
            axis.set_yscale("log")
        axis.set_xlabel("held-out task accuracy (%)")
        axis.set_ylabel(f"{heading}, {'lower' if key == 'prose_perplexity' else 'higher'} is better")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(f"{title}: task skill vs retention, mean ± sd over seeds")
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


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
