"""Is a selection stable? Would other prompts, or more of them, choose other rows? (issue 25, item 1)

A selection counts, per node, the samples in whose k lowest-ranked rows it lies (strategies.py). The
counts, and the tie-breaking sums, of any subset or resample of the samples are weighted sums of
per-sample terms (the weight: how many times a sample is in it), so they are exact functions of the
per-sample scores (`attribute --save-scores`), read here one layer (global strategies: one block of
samples) at a time: 93 MB at 70B over 2850 prompts, never the 7.5 GB whole. The file's histograms are
sums over every sample and cannot be split; two half-histograms kept in the file would give the halves
but not the bootstrap, at 0.5 GB per histogram and rule at 70B in every file, wanted or not.

The figures, for the positions written (k rows per layer, or T over all layers for a global strategy):
- overlap(A, B) of two choices: per layer |A_l & B_l| / max(|A_l|, |B_l|) (undefined where both are
  empty); overall |A & B| / max(|A|, |B|). For the layer-balanced strategy both sizes are k, so a
  layer's overlap is |A_l & B_l| / k and the overall one the mean over layers.
- halves: the overlap of the choices made from the samples at even positions of the data order and from
  those at odd positions. The data is ordered by subject, so each half holds about half of each subject.
- bootstrap: R resamples of the N samples, with replacement, drawn from torch.Generator seeded with
  --seed; the overlap of each resample's choice with the full data's (the positions written); their
  mean, and their 5th percentile (the ceil(R/20)-th smallest).
- chance: the overlap two independent, uniformly random choices have on average, k/D (global: T/(L*D)),
  with the sd of the halves' overlap under that null (a hypergeometric count per layer). Scores with no
  signal give exactly that null: the nodes are exchangeable, so each half's choice is uniform.

Would more prompts change the choice? By the bootstrap principle a resample's choice is to the full
data's as the full data's is to the choice unlimited prompts would make, so 1 - (bootstrap mean)
estimates the share of the chosen rows that unlimited prompts would change. The halves give a second
estimate: if that share falls as 1/sqrt(prompts) (the rows near the threshold are those whose count is
within noise of it, and the noise falls so), each half's choice, from N/2 prompts, differs from the
limit's in sqrt(2) times the share at N, and the two halves differ from each other in about twice that
(they mostly miss different rows), so the share at N is about (1 - halves) / (2 sqrt(2)). The larger of
the two estimates is reported. (On simulated scores, a per-node signal plus Gaussian noise at 30 to 480
prompts, the bootstrap's estimate came within 40% of the true change, mostly within 15%, the halves'
15-45% below it, and the true change fell by 3.3-4x over 16 times the prompts; test_stability keeps a
check of it.) It is read against the paper's own check: the choice from its reduced MMLU set (50
questions a subject, 2850 prompts) kept 97.57% of the full set's rows (14042 prompts), i.e. 2.43%
changed, which it took as settled. At or below 2.43%: settled. Above: more prompts would change the
choice, and under the same 1/sqrt law about N * (estimate / 2.43%)^2 prompts would bring the change to
the paper's level. When the halves agree no better than chance (within 3 sd of it) no count is
predicted: at N prompts the scores do not choose rows at this quota at all.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from fractions import Fraction

import torch

from loki_dist.core import metering
from loki_dist.core.errors import UserError
from loki_dist.selection.strategies import LAYER_HIGHEST, pick_rows

PAPER_OVERLAP = 0.9757  # the paper: its reduced MMLU set's choice against the full set's
LOW_PERCENT = 5
BLOCK_BYTES = 64 << 20  # global strategies: the samples read at once
DEFAULT_RESAMPLES = 50
NO_SCORES = (
    "stability: needs the per-sample scores, which this attribution file does not hold; rerun "
    "`loki-dist attribute` with --save-scores"
)


# -------------------------------------------------------------------------------------------- choices


class Scores:
    """The per-sample scores [N, L, D], in memory or in the file, read a layer or a block of samples at
    a time as float32 (what is read from disk is counted in metering)."""

    def __init__(self, source, shape: tuple[int, int, int], on_disk: bool):
        self.source, self.shape, self.on_disk = source, shape, on_disk

    def _read(self, piece) -> torch.Tensor:
        if self.on_disk:
            metering.count("read", piece.nbytes)
        return piece.float()

    def layer(self, layer: int) -> torch.Tensor:
        return self._read(self.source[:, layer])

    def samples(self, first: int, end: int) -> torch.Tensor:
        return self._read(self.source[first:end])


@contextlib.contextmanager
def open_scores(path: str, tensors: dict) -> Iterator[Scores | None]:
    """The attribution file's scores: the loaded tensor if the selection read it, else the file's, read
    lazily; None when the file has none. Their shape is checked against the file's statistics."""
    from safetensors import safe_open

    num_layers, hidden = tensors["score_sum"].shape
    expected = [int(tensors["num_samples"].reshape(-1)[0]), num_layers, hidden]
    if "scores" in tensors:
        yield Scores(tensors["scores"], tuple(expected), on_disk=False)
        return
    with safe_open(path, framework="pt") as handle:
        if "scores" not in handle.keys():  # noqa: SIM118 (a safe_open handle is no mapping)
            yield None
            return
        source = handle.get_slice("scores")
        if list(source.get_shape()) != expected:
            raise UserError(
                f"--attribution {path}: scores has shape {source.get_shape()}, expected {expected}"
            )
        yield Scores(source, tuple(expected), on_disk=True)


def resample_weights(num_samples: int, resamples: int, seed: int) -> torch.Tensor:
    """[2 + resamples, N] int64: how many times each sample is in the even half (row 0), the odd half
    (row 1), and each bootstrap resample (N draws with replacement, a seeded torch.Generator)."""
    positions = torch.arange(num_samples)
    halves = torch.stack([positions % 2 == 0, positions % 2 == 1]).long()
    drawn = torch.randint(
        num_samples, (resamples, num_samples), generator=torch.Generator().manual_seed(seed)
    )
    boot = torch.zeros(resamples, num_samples, dtype=torch.int64).scatter_add_(
        1, drawn, torch.ones_like(drawn)
    )
    return torch.cat([halves, boot])


def choices(scores: Scores, weights: torch.Tensor, quota: Fraction, strategy: str, rule: str) -> torch.Tensor:
    """[R, L, D] bool: the rows the strategy chooses from each weighting of the samples (a row of
    `weights`), with counts and tie sums weighted as strategies.py takes them over all samples, ties
    broken as there. Strategies: layer_balanced (and LAYER_HIGHEST), global_lowest, global_highest."""
    from loki_dist.attribution.stats import in_bottom, rule_key

    num_samples, num_layers, hidden = scores.shape
    highest = strategy in (LAYER_HIGHEST, "global_highest")
    counting, summing = weights.float(), weights.double()  # counts <= N < 2**24: exact in float32
    chosen = torch.zeros(len(weights), num_layers, hidden, dtype=torch.bool)

    def choose(into: torch.Tensor, counts: torch.Tensor, sums: torch.Tensor, k: int) -> None:
        into.scatter_(-1, pick_rows(counts, sums, k, low_sum_first=not highest), True)

    if strategy.startswith("global"):
        total = math.floor(quota * num_layers * hidden / 100)
        counts = torch.zeros(len(weights), num_layers * hidden)
        sums = torch.zeros(len(weights), num_layers * hidden, dtype=torch.float64)
        block = max(1, BLOCK_BYTES // (4 * num_layers * hidden))
        for first in range(0, num_samples, block):
            flat = scores.samples(first, first + block).reshape(-1, num_layers * hidden)
            end = first + len(flat)
            counts += counting[:, first:end] @ in_bottom(flat, total, rule, highest).float()
            sums += summing[:, first:end] @ rule_key(flat, rule).double()
        choose(chosen.view(len(weights), -1), counts, sums, total)
        return chosen
    k = math.floor(quota * hidden / 100)
    for layer in range(num_layers):
        x = scores.layer(layer)
        choose(chosen[:, layer], counting @ in_bottom(x, k, rule, highest).float(),
               summing @ rule_key(x, rule).double(), k)  # fmt: skip
    return chosen


def overlaps(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per layer [..., L] (NaN where both choices are empty) and overall [...] overlap of choices
    [..., L, D] (module docstring)."""
    shared, larger = (a & b).sum(-1), torch.maximum(a.sum(-1), b.sum(-1))
    per_layer = shared.double() / larger.double()  # 0/0: NaN
    overall = shared.sum(-1).double() / torch.maximum(a.sum((-2, -1)), b.sum((-2, -1))).clamp(min=1)
    return per_layer, overall


# -------------------------------------------------------------------------------------------- figures


@dataclass
class Stability:
    """The figures of one selection (module docstring); `bootstrap` holds each resample's overall
    overlap, so that the mean and the low percentile can be checked against it."""

    num_samples: int
    halves_sizes: tuple[int, int]
    halves: float
    halves_per_layer: list[float | None]
    resamples: int
    seed: int
    bootstrap: list[float]
    bootstrap_per_layer: list[float | None]
    chance: float
    chance_sd: float

    @property
    def bootstrap_mean(self) -> float | None:
        return math.fsum(self.bootstrap) / len(self.bootstrap) if self.bootstrap else None

    @property
    def bootstrap_low(self) -> float | None:
        """The 5th percentile: the ceil(5 R / 100)-th smallest overlap."""
        ordered = sorted(self.bootstrap)
        return ordered[math.ceil(LOW_PERCENT * len(ordered) / 100) - 1] if ordered else None

    @property
    def no_better_than_chance(self) -> bool:
        return self.halves <= self.chance + 3 * self.chance_sd

    @property
    def change(self) -> float:
        """The estimated share of the chosen rows that unlimited prompts would change."""
        from_halves = (1 - self.halves) / (2 * math.sqrt(2))
        return from_halves if self.bootstrap_mean is None else max(1 - self.bootstrap_mean, from_halves)

    @property
    def settled(self) -> bool:
        return not self.no_better_than_chance and self.change <= 1 - PAPER_OVERLAP + 1e-12

    def verdict(self) -> str:
        paper = f"the paper's reduced MMLU set changed {100 * (1 - PAPER_OVERLAP):.2f}% of its choice"
        if self.no_better_than_chance:
            return (f"the halves agree no better than two random choices (chance {_pct(self.chance)}): "
                    f"at {self.num_samples} prompts the scores do not choose these rows; more prompts may "
                    "change all of them")  # fmt: skip
        if self.settled:
            return (
                f"more prompts would change about {_pct(self.change)} of the chosen rows: settled ({paper})"
            )
        needed = math.ceil(self.num_samples * (self.change / (1 - PAPER_OVERLAP)) ** 2)
        return (f"more prompts would change about {_pct(self.change)} of the chosen rows ({paper}); about "
                f"{needed} prompts would bring that to the paper's level, if the change falls as "
                "1/sqrt(prompts)")  # fmt: skip

    def lines(self) -> list[str]:
        a, b = self.halves_sizes
        boot = f"; bootstrap: {self.resamples} resamples, seed {self.seed}" if self.resamples else ""
        out = [f"stability ({self.num_samples} samples; halves: even and odd positions, {a} + {b}{boot}):"]
        for layer, (half, mean) in enumerate(
            zip(self.halves_per_layer, self.bootstrap_per_layer, strict=True)
        ):
            text = f"  layer {layer:3d}: halves {_pct(half):>6}"
            out.append(text + (f"  bootstrap {_pct(mean):>6}" if self.resamples else ""))
        text = f"  overall:    halves {_pct(self.halves):>6}"
        if self.resamples:
            text += f"  bootstrap {_pct(self.bootstrap_mean):>6} (5th percentile {_pct(self.bootstrap_low)})"
        out += [text + f"  chance {_pct(self.chance)}", "  " + self.verdict()]
        return out

    def as_dict(self) -> dict:
        derived = ("bootstrap_mean", "bootstrap_low", "no_better_than_chance", "change", "settled")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}, "verdict": self.verdict()}


def _pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}%"


def _listed(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _null_sd(universe: int, size: int, groups: int) -> float:
    """The sd of the overall overlap of two independent uniform choices of `size` of `universe` nodes in
    each of `groups` groups: a hypergeometric count per group, over groups * size."""
    p = size / universe
    variance = groups * size * p * (1 - p) * (universe - size) / max(universe - 1, 1)
    return math.sqrt(variance) / (groups * size)


def measure(
    scores: Scores, positions: list[list[int]], quota: Fraction, strategy: str, rule: str,
    resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
) -> Stability:  # fmt: skip
    """The figures of `positions` (the choice of all N samples) under a strategy and rule."""
    num_samples, num_layers, hidden = scores.shape
    weights = resample_weights(num_samples, resamples, seed)
    chosen = choices(scores, weights, quota, strategy, rule)
    full = torch.zeros(num_layers, hidden, dtype=torch.bool)
    for layer, rows in enumerate(positions):
        full[layer, rows] = True
    halves_per_layer, halves = overlaps(chosen[0], chosen[1])
    boot_per_layer, boot = overlaps(chosen[2:], full.expand_as(chosen[2:]))
    if strategy.startswith("global"):
        size = math.floor(quota * num_layers * hidden / 100)
        chance, chance_sd = size / (num_layers * hidden), _null_sd(num_layers * hidden, size, 1)
    else:
        size = math.floor(quota * hidden / 100)
        chance, chance_sd = size / hidden, _null_sd(hidden, size, num_layers)
    return Stability(
        num_samples, (int(weights[0].sum()), int(weights[1].sum())), float(halves), _listed(halves_per_layer),
        resamples, seed, boot.tolist(),
        _listed(boot_per_layer.nanmean(0)) if resamples else [None] * num_layers, chance, chance_sd,
    )  # fmt: skip
