"""`select --plot`: what a user acts on after a selection, one panel each.

A heat map of layers x rows (which rows were chosen, and every row's mean score) read as noise: the
rows of a layer have no order, so neighbouring columns say nothing, and a few outlying scores took the
colours. What a user decides from a selection is per layer: how many rows each layer trains (a global
strategy may pile them into a few layers), whether the chosen rows are the low-scoring ones the rule
meant, and whether the choice would hold with other prompts. So, per layer:

1. rows chosen;
2. the mean attribution score of the chosen rows beside the layer's mean (the signed scores, or |score|
   under `--rule magnitude`), where the file holds scores;
3. the stability figures (stability.py): the overlap of the choices made from the two halves of the
   prompts and, on average, from the bootstrap resamples, against the overlap two random choices
   have (chance) and the paper's own 97.57%; or, without per-sample scores, a line saying how to get
   them.
"""

from __future__ import annotations

import textwrap

from loki_dist.core import plotting
from loki_dist.selection import stability


def figure(positions: list[list[int]], tensors: dict | None, figures: stability.Stability | None, rule: str):
    """The figure (matplotlib), its three panels in one column (see the top)."""
    plt = plotting.pyplot("--plot")
    layers = list(range(len(positions)))
    fig, (rows, scores, stable) = plt.subplots(3, 1, figsize=(9, 9.5), sharex=True)
    counts = [len(chosen) for chosen in positions]
    rows.bar(layers, counts, color="tab:blue")
    rows.set(ylabel="rows chosen", title=f"rows chosen per layer ({sum(counts)} in all)")
    if tensors is not None:
        key = "abs_score_sum" if rule == "magnitude" and "abs_score_sum" in tensors else "score_sum"
        mean = tensors[key].double() / max(int(tensors["num_samples"].reshape(-1)[0]), 1)
        chosen = [mean[layer, r].mean().item() if r else float("nan") for layer, r in enumerate(positions)]
        scores.plot(layers, mean.mean(dim=1).tolist(), "o-", color="0.5", label="all rows of the layer")
        scores.plot(layers, chosen, "o-", color="tab:blue", label="the chosen rows")
        scores.axhline(0, color="0.8", lw=0.8)
        scores.legend(fontsize=8)
        what = "|score|" if key == "abs_score_sum" else "score"
        scores.set(ylabel=f"mean {what}", title=f"mean attribution {what} per layer")
        scores.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3), useOffset=False)
    else:
        _note(scores, "random rows: no attribution scores")
    if figures is not None:
        stable.plot(layers, _percent(figures.halves_per_layer), "o-", label="two halves of the prompts")
        if figures.resamples:
            stable.plot(layers, _percent(figures.bootstrap_per_layer), "s-", label="bootstrap (mean)")
        stable.axhline(100 * figures.chance, color="tab:red", ls="--", label="two random choices")
        stable.axhline(100 * stability.PAPER_OVERLAP, color="0.3", ls=":", label="the paper's check (97.57%)")
        verdict = textwrap.fill(figures.verdict(), 110)
        stable.set_ylim(0, 102)
        stable.set_title(f"overlap of the choices, per layer\n{verdict}", fontsize=9)
        stable.legend(fontsize=8, loc="lower right")
    else:
        _note(stable, "stability: needs the per-sample scores (attribute --save-scores) and --resamples > 0")
    stable.set(xlabel="layer", ylabel="overlap (%)")
    stable.set_xticks(layers if len(layers) <= 40 else layers[:: max(1, len(layers) // 20)])
    fig.tight_layout()
    return fig


def plot(positions, tensors, figures, rule: str, path: str) -> None:
    plotting.save(figure(positions, tensors, figures, rule), path)


def _percent(values: list[float | None]) -> list[float]:
    return [float("nan") if v is None else 100 * v for v in values]


def _note(axis, text: str) -> None:
    axis.text(0.5, 0.5, text, ha="center", va="center", transform=axis.transAxes, color="0.4")
    axis.set_yticks([])
