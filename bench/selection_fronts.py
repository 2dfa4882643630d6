"""The selection study's fronts (issues 25.2, 28.2): retention against held-out task skill over each arm's
learning rates, and which arm's front is better where, computed from the numbers.

An arm's points are its rates: at each rate the mean and sample sd over seeds of the held-out accuracy
(x) and of a retention measure (y). Its front at a skill level x is the best mean retention among the
rates whose mean skill is at least x: what the arm can keep while learning at least that much, with the
rate chosen for it. It is a step function of x, defined up to the arm's highest mean skill. Two fronts
are compared at every level where either has a point, up to the lower of their highest skills (above it
only one arm reaches): A dominates B when A's front is at least as good at every such level and better
at one; otherwise the levels split into runs where one is better, and the fronts cross between runs. A
difference counts as beyond the seeds' spread where it exceeds the larger sd of the two points behind it.
Rows arms share one rate grid, so they are also compared rate by rate (not at equal skill: each rate's
skill differs by arm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from loki_dist.core import files
from loki_dist.demo.report import COLUMNS, summarise, values_of

MEASURES = COLUMNS[2:]  # key, heading, scale, format: the three retention measures
LOWER_IS_BETTER = {"prose_perplexity"}
CONTROL = "random rows q=10"


@dataclass(frozen=True)
class Point:
    lr: float
    x: float  # held-out accuracy (%), mean over seeds
    dx: float
    y: float  # the measure (scaled), mean over seeds; NaN when a seed's model has none (diverged)
    dy: float


def points(arm: dict, key: str, scale: float) -> list[Point]:
    out = []
    for rate in arm["rates"]:
        (x, dx), (y, dy) = (
            summarise([s * v for v in values_of(rate["runs"], k)])
            for k, s in (("held_out_accuracy", 100), (key, scale))
        )
        out.append(Point(rate["lr"], x, dx, y, dy))
    return out


def _better(a: float, b: float, key: str) -> float:
    """How much better a is than b (positive: a better), NaN counting as worst."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else (-math.inf if math.isnan(a) else math.inf)
    return b - a if key in LOWER_IS_BETTER else a - b


def best_at(front: list[Point], level: float, key: str) -> Point | None:
    """The front at a skill level: the point of best retention among those of mean skill >= level."""
    reaching = [p for p in front if p.x >= level]
    if not reaching:
        return None
    best = reaching[0]
    for p in reaching[1:]:
        if _better(p.y, best.y, key) > 0:
            best = p
    return best


@dataclass
class Comparison:
    levels: list[float]  # the skill levels compared, ascending
    margins: list[float]  # A's front better than B's by (positive: A better), per level
    beyond: list[bool]  # the margin exceeds the larger sd of the two points behind it
    top_a: float
    top_b: float


def compare(a: list[Point], b: list[Point], key: str) -> Comparison:
    top_a, top_b = max(p.x for p in a), max(p.x for p in b)
    levels = sorted({p.x for p in (*a, *b) if p.x <= min(top_a, top_b)})
    margins, beyond = [], []
    for level in levels:
        pa, pb = best_at(a, level, key), best_at(b, level, key)
        margin = _better(pa.y, pb.y, key)
        margins.append(margin)
        beyond.append(abs(margin) > max(pa.dy, pb.dy) if math.isfinite(margin) else True)
    return Comparison(levels, margins, beyond, top_a, top_b)


def _runs(c: Comparison) -> list[tuple[int, float, float]]:
    """Maximal runs of levels with the same sign of margin: (sign, first level, last level)."""
    out: list[tuple[int, float, float]] = []
    for level, margin in zip(c.levels, c.margins, strict=True):
        sign = (margin > 0) - (margin < 0)
        if out and out[-1][0] == sign:
            out[-1] = (sign, out[-1][1], level)
        else:
            out.append((sign, level, level))
    return out


def relation(c: Comparison) -> str:
    """'>' A's front dominates, '<' B's does, 'x' they cross, '=' equal at every level compared."""
    signs = {(m > 0) - (m < 0) for m in c.margins}
    if signs <= {0}:
        return "="
    return ">" if signs <= {0, 1} else "<" if signs <= {0, -1} else "x"


def sentence(name_a: str, name_b: str, c: Comparison) -> str:
    """What the comparison says, in words, with the skill levels where it changes."""
    top = min(c.top_a, c.top_b)
    spread = f"beyond the seeds' spread at {sum(c.beyond)} of {len(c.levels)} levels"
    kind = relation(c)
    if kind == "=":
        text = f"{name_a} and {name_b} keep the same at every skill both reach (up to {top:.1f}%)"
    elif kind in "><":
        winner, loser = (name_a, name_b) if kind == ">" else (name_b, name_a)
        text = f"{winner}'s front dominates {loser}'s at every skill both reach (up to {top:.1f}%; {spread})"
    else:
        parts = []
        for index, (sign, lo, hi) in enumerate(_runs(c)):
            where = (
                f"up to {hi:.1f}%" if index == 0 else f"at {lo:.1f}%" if lo == hi else f"{lo:.1f}-{hi:.1f}%"
            )
            parts.append(f"{name_a if sign > 0 else name_b if sign < 0 else 'neither'} better {where}")
        text = f"{name_a} and {name_b} cross (skill levels as held-out accuracy): " + ", ".join(parts)
        text += f" ({spread})"
    if abs(c.top_a - c.top_b) > 1e-9:
        reach = name_a if c.top_a > c.top_b else name_b
        text += f"; only {reach} reaches above {top:.1f}% (up to {max(c.top_a, c.top_b):.1f}%)"
    return text


def by_rate(a: dict, b: dict, key: str, scale: float) -> tuple[int, int, int]:
    """Rate by rate (a shared grid): (rates compared, where a's mean retention is better, of those beyond
    the seeds' spread)."""
    pb = {p.lr: p for p in points(b, key, scale)}
    shared = [(p, pb[p.lr]) for p in points(a, key, scale) if p.lr in pb]
    better = [(p, q) for p, q in shared if _better(p.y, q.y, key) > 0]
    return len(shared), len(better), sum(abs(p.y - q.y) > max(p.dy, q.dy) for p, q in better)


# --------------------------------------------------------------------------------------------- report


def section(result: dict, plot_name: str | None) -> list[str]:
    """The report's fronts: the per-rate table, the plot, the dominance matrix and the sentences."""
    arms = result["arms"]
    lines = [
        "## Fronts: retention against held-out task skill over the rates",
        "",
        "Each arm at every rate of its grid, every seed measured; mean ± sd over seeds. How fronts are "
        "compared: the docstring of `bench/selection_fronts.py`.",
        "",
        rate_table(result),
        "",
    ]
    if plot_name:
        lines += [f"![fronts]({plot_name})", ""]
    names = [a["name"] for a in arms]
    for key, heading, scale, _ in MEASURES:
        fronts = {a["name"]: points(a, key, scale) for a in arms}
        lines += [f"Fronts by {heading} (row against column: `>` the row's front dominates, `<` the "
                  "column's, `x` they cross, `=` equal):", "",
                  "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]  # fmt: skip
        for a in names:
            cells = ["·" if a == b else relation(compare(fronts[a], fronts[b], key)) for b in names]
            lines.append(f"| {a} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines + ["### What the fronts show", "", *conclusions(result), ""]


def _pairs(arms: list[dict]) -> list[tuple[dict, dict]]:
    """The comparisons the study is for: every arm against random rows; LoKI by |score| against LoKI
    (signed) at the same quota; LoKI against full fine-tuning."""
    by_name = {a["name"]: a for a in arms}
    pairs = [(a, by_name[CONTROL]) for a in arms if CONTROL in by_name and a["name"] != CONTROL]
    for arm in arms:
        if arm.get("rule") == "magnitude" and arm["strategy"] == "layer_balanced":
            signed = f"LoKI q={arm['quota']}"
            pairs += [(arm, by_name[signed])] if signed in by_name else []
    full = next((a for a in arms if a["kind"] == "full"), None)
    return pairs + [(by_name[n], full) for n in ("LoKI q=10", "LoKI q=25") if n in by_name and full]


def conclusions(result: dict) -> list[str]:
    out = []
    for a, b in _pairs(result["arms"]):
        parts = []
        for key, heading, scale, _ in MEASURES:
            parts.append(f"{heading}: " + sentence(a["name"], b["name"], compare(
                points(a, key, scale), points(b, key, scale), key)))  # fmt: skip
        if a["kind"] == b["kind"] == "rows":
            counts = [(h, *by_rate(a, b, k, s)) for k, h, s, _ in MEASURES]
            rated = [
                f"{h} at {better} of {n} rates ({beyond} beyond the spread)"
                for h, n, better, beyond in counts
            ]
            parts.append(f"rate by rate, {a['name']} keeps more " + "; ".join(rated))
        out.append(f"- **{a['name']} against {b['name']}.** " + ". ".join(parts) + ".")
    return out


def rate_table(result: dict) -> str:
    head = ["arm", "rate", "reached target", "steps", "held-out task acc (%)", *[m[1] for m in MEASURES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm in result["arms"]:
        for rate in arm["rates"]:
            runs = rate["runs"]
            cells = [arm["name"], f"{rate['lr']:g}", f"{sum(r['reached'] for r in runs)}/{len(runs)}"]
            for key, _, scale, fmt in (("steps", "", 1, "{:.1f}"), ("held_out_accuracy", "", 100, "{:.1f}"),
                                       *MEASURES):  # fmt: skip
                mean, sd = summarise([scale * v for v in values_of(runs, key)])
                cells.append(f"{fmt.format(mean)} ± {fmt.format(sd)}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict, path: Path, title: str) -> bool:
    """One panel per retention measure: each arm's rates as points (mean ± sd over seeds, both axes),
    joined in order of rate; the base as a star."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no fronts plot: matplotlib is not installed", flush=True)
        return False
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(5.5 * len(MEASURES), 5))
    base = result["base"]
    for axis, (key, heading, scale, _) in zip(axes, MEASURES, strict=True):
        axis.scatter([100 * base["held_out_accuracy"]], [scale * base[key]], marker="*", s=160, c="k",
                     label="base", zorder=3)  # fmt: skip
        for index, arm in enumerate(result["arms"]):
            front = sorted(points(arm, key, scale), key=lambda p: p.lr)
            axis.errorbar([p.x for p in front], [p.y for p in front], xerr=[p.dx for p in front],
                          yerr=[p.dy for p in front], fmt="osD^vP*Xh<>"[index % 11] + "-", ms=5, capsize=2,
                          lw=1, label=arm["name"])  # fmt: skip
        if key in LOWER_IS_BETTER:
            axis.set_yscale("log")
        axis.set_xlabel("held-out task accuracy (%)")
        axis.set_ylabel(f"{heading}, {'lower' if key in LOWER_IS_BETTER else 'higher'} is better")
        axis.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(5, len(labels)), fontsize=9, frameon=False)
    fig.suptitle(f"{title}: fronts over the learning rates, mean ± sd over seeds")
    fig.tight_layout(rect=(0, 0.14, 1, 0.95))
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True
