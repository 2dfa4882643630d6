"""The selection study's stability curve (issue 25): how much the chosen rows depend on which prompts, and
how many, attribution used, on SmolLM2.

The pool: every MMLU dev question that no retention measure reads (demo/task.py,
retention_free_questions), attributed once with per-sample scores. For each number n of prompts, `draws`
seeded random subsets of n pool prompts choose rows (layer-balanced, under each rule and quota, through
loki_dist.selection.stability.choices: the selection's own counting, weighted), and the curve gives
- nested: the overlap of each subset's choice with the whole pool's. It is the paper's kind of figure
  (its reduced MMLU set, 2850 prompts, kept 97.57% of the choice of its full set, 14042), and it rises
  as n nears the pool for a trivial reason too: the subset is then most of the pool;
- disjoint: the overlap of the choices of two disjoint subsets of n prompts each (where 2n fits in the
  pool), which nothing shared inflates.
Beside them, `select`'s own figures (halves, bootstrap, the estimated change and its verdict) on the arms'
attribution file and on the pool's, and how much of the pool's choice the arms' choice kept.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import torch

from loki_dist.core import files
from loki_dist.selection import stability, strategies

QUOTAS = (10, 25)
RULES = ("signed", "magnitude")
SIZES = (4, 8, 16, 32, 57, 100, 150)


def _mask(positions: list[list[int]], shape: tuple[int, int]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    for layer, rows in enumerate(positions):
        mask[layer, rows] = True
    return mask


def _summary(n: int, values: torch.Tensor) -> dict:
    mean = float(values.mean())
    sd = float(values.std()) if len(values) > 1 else 0.0
    return {"n": n, "mean": mean, "sd": sd, "min": float(values.min()), "max": float(values.max())}


def _figures(tensors: dict, positions: list[list[int]], quota: Fraction, rule: str, seed: int) -> dict:
    """`select`'s stability figures for a file's choice (its scores in memory)."""
    scores = stability.Scores(tensors["scores"], tuple(tensors["scores"].shape), on_disk=False)
    return stability.measure(scores, positions, quota, "layer_balanced", rule, seed=seed).as_dict()


def curve(pool: Path, arms: Path, draws: int, seed: int = 0) -> dict:
    """The curves for every rule and quota, and `select`'s figures (module docstring)."""
    tensors, _ = strategies.load_attribution(str(pool))
    arm_tensors, _ = strategies.load_attribution(str(arms))
    total, num_layers, hidden = tensors["scores"].shape
    sizes = sorted({n for n in (*SIZES, total // 2) if 2 <= n < total})
    generator = torch.Generator().manual_seed(seed)
    rows: list[torch.Tensor] = []
    nested: dict[int, list[int]] = {n: [] for n in sizes}  # n -> the rows of `rows` that are its draws
    disjoint: dict[int, list[int]] = {n: [] for n in sizes if 2 * n <= total}  # their disjoint partners

    def subset(part: torch.Tensor) -> int:
        rows.append(torch.zeros(total, dtype=torch.int64).index_fill_(0, part, 1))
        return len(rows) - 1

    for n in sizes:
        for _ in range(draws):
            order = torch.randperm(total, generator=generator)
            nested[n].append(subset(order[:n]))
            if n in disjoint:
                disjoint[n].append(subset(order[n : 2 * n]))
    scores = stability.Scores(tensors["scores"], (total, num_layers, hidden), on_disk=False)
    curves = []
    for rule in RULES:
        for quota in QUOTAS:
            q = Fraction(quota)
            chosen = stability.choices(scores, torch.stack(rows), q, "layer_balanced", rule)
            pool_positions = strategies.select(tensors, q, "layer_balanced", rule=rule)
            arm_positions = strategies.select(arm_tensors, q, "layer_balanced", rule=rule)
            full = _mask(pool_positions, (num_layers, hidden))
            curves.append({
                "rule": rule, "quota": quota,
                "nested": [_summary(n, stability.overlaps(chosen[i], full)[1]) for n, i in nested.items()],
                "disjoint": [_summary(n, stability.overlaps(chosen[nested[n]], chosen[i])[1])
                             for n, i in disjoint.items()],
                "arms_kept_of_pool": float(stability.overlaps(_mask(arm_positions, full.shape), full)[1]),
                "select_arms": _figures(arm_tensors, arm_positions, q, rule, seed),
                "select_pool": _figures(tensors, pool_positions, q, rule, seed),
            })  # fmt: skip
    arms_prompts = int(arm_tensors["scores"].shape[0])
    return {"pool_size": total, "arms_prompts": arms_prompts, "sizes": sizes, "draws": draws, "seed": seed,
            "paper_overlap": stability.PAPER_OVERLAP, "curves": curves}  # fmt: skip


# --------------------------------------------------------------------------------------------- report


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def section(stab: dict, plot_name: str | None) -> list[str]:
    """The report's stability part: the table, the plot, and what the numbers say."""
    pool, paper = stab["pool_size"], f"{100 * stab['paper_overlap']:.2f}%"
    lines = [
        "## Is the choice stable? Overlap against the number of attribution prompts", "",
        f"Pool: the {pool} MMLU dev questions no retention measure reads, attributed once. For each n, "
        f"{stab['draws']} random subsets of n pool prompts (seed {stab['seed']}); nested: the overlap of "
        f"each subset's layer-balanced choice with the whole pool's (the paper's kind of figure: its reduced "
        f"set's choice kept {paper} of its full set's); disjoint: two disjoint subsets of n against each "
        "other. Mean ± sd (min) over the draws. How: the docstring of `bench/selection_stability.py`.", "",
        "| rule | q | " + " | ".join(f"n={n}" for n in stab["sizes"]) + " |",
        "|---|---|" + "---|" * len(stab["sizes"]),
    ]  # fmt: skip
    for c in stab["curves"]:
        disjoint = {d["n"]: d for d in c["disjoint"]}
        cells = []
        for d in c["nested"]:
            text = f"{_pct(d['mean'])} ± {100 * d['sd']:.1f} ({_pct(d['min'])})"
            if d["n"] in disjoint:
                text += f"; disjoint {_pct(disjoint[d['n']]['mean'])} ± {100 * disjoint[d['n']]['sd']:.1f}"
            cells.append(text)
        lines.append(f"| {c['rule']} | {c['quota']} | " + " | ".join(cells) + " |")
    lines.append("")
    if plot_name:
        lines += [f"![stability]({plot_name})", ""]
    return [*lines, "### What the curve shows", "", *_findings(stab), ""]


def _findings(stab: dict) -> list[str]:
    pool, arms, paper = stab["pool_size"], stab["arms_prompts"], stab["paper_overlap"]
    out, unsettled = [], []
    for c in stab["curves"]:
        s, p = c["select_arms"], c["select_pool"]
        reaching = [d["n"] for d in c["nested"] if d["mean"] >= paper]
        largest = c["disjoint"][-1] if c["disjoint"] else None
        text = (
            f"- **{c['rule']}, q={c['quota']}** (chance {_pct(s['chance'])}). `select` on the arms' {arms} "
            f"prompts: halves {_pct(s['halves'])}, bootstrap {_pct(s['bootstrap_mean'])}; {s['verdict']}. "
            f"The arms' choice kept {_pct(c['arms_kept_of_pool'])} of the pool's ({pool} prompts)."
        )
        if largest:
            text += f" Two disjoint sets of {largest['n']} prompts agree on {_pct(largest['mean'])}."
        if reaching:
            text += f" Nested subsets reach the paper's {100 * paper:.2f}% from n = {reaching[0]}."
        else:
            text += f" No nested subset below the pool's size reaches the paper's {100 * paper:.2f}%."
        text += f" On the whole pool `select` says: {p['verdict']}."
        out.append(text)
        if not s["settled"]:
            unsettled.append(f"{c['rule']} q={c['quota']}")
    if unsettled:
        out.append(
            f"- By `select`'s own rule {arms} prompts are too few for {', '.join(unsettled)}: the arms "
            f"can select from the {pool}-prompt pool instead (`--arms-attribution pool`)."
        )
    else:
        out.append(f"- By `select`'s own rule {arms} prompts settle every choice the arms train.")
    return out


def plot(stab: dict, path: Path, title: str) -> bool:
    """A panel per quota: overlap against prompts (log), nested (solid, min-max band) and disjoint
    (dashed) per rule; the arms' choice against the pool's, and select's 1 - estimate, at the arms' count;
    the paper's figure and chance as lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no stability plot: matplotlib is not installed", flush=True)
        return False
    fig, axes = plt.subplots(1, len(QUOTAS), figsize=(6 * len(QUOTAS), 4.6), squeeze=False)
    for axis, quota in zip(axes[0], QUOTAS, strict=True):
        for colour, c in zip(("C0", "C1"), [c for c in stab["curves"] if c["quota"] == quota], strict=True):
            ns = [d["n"] for d in c["nested"]]
            axis.plot(
                ns, [100 * d["mean"] for d in c["nested"]], "o-", c=colour, label=f"{c['rule']}: nested"
            )
            low, high = ([100 * d[k] for d in c["nested"]] for k in ("min", "max"))
            axis.fill_between(ns, low, high,
                              color=colour, alpha=0.15)  # fmt: skip
            axis.plot([d["n"] for d in c["disjoint"]], [100 * d["mean"] for d in c["disjoint"]], "s--",
                      c=colour, label=f"{c['rule']}: disjoint")  # fmt: skip
            axis.plot([stab["arms_prompts"]], [100 * c["arms_kept_of_pool"]], "*", ms=12, c=colour,
                      label=f"{c['rule']}: the arms' prompts vs the pool")  # fmt: skip
            axis.plot([stab["arms_prompts"]], [100 * (1 - c["select_arms"]["change"])], "x", ms=9, c=colour,
                      label=f"{c['rule']}: 1 - select's estimate")  # fmt: skip
        axis.axhline(100 * stab["paper_overlap"], c="k", lw=0.8, ls=":", label="paper (reduced vs full)")
        axis.axhline(quota, c="grey", lw=0.8, ls="-.", label="chance")
        axis.set(xscale="log", xlabel="attribution prompts", ylabel="overlap of the chosen rows (%)",
                 title=f"q = {quota}", ylim=(0, 102))  # fmt: skip
        axis.set_xticks(stab["sizes"], [str(n) for n in stab["sizes"]], minor=False)
        axis.minorticks_off()
        axis.grid(alpha=0.3)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{title}: stability of the layer-balanced choice")
    fig.tight_layout(rect=(0, 0.16, 1, 0.95))
    files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True
