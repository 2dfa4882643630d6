"""Per-node attribution statistics, the attribution file, and the per-rank partial progress.

What is kept per sample is only what selection needs, so that attribution over any number of samples
and ranks is a sum: for each ranking rule (the signed score, and its magnitude |score|) a histogram of
each node's ascending rank (per layer, and over all L*D nodes ascending and descending for the global
ablations) and the sum of the ranked values (the tie-break), and optionally the per-sample scores. The
histograms are integer sums, so the file does not depend on the world size; each rank counts in the
narrowest type exact for its own samples and the sum over ranks is taken in int64, the file's type.
The sums are float64 sums kept with what their roundings lost (exact_add), so they too are the same
whatever the order, hence the ranks, the samples are added in.

Ranks come from a stable sort of the float32 scores (the precision the optional `scores` tensor is
stored in), so a brute-force selection from the stored scores reproduces the histograms exactly, ties
included.

Format versions (metadata "format"): v1 held the signed rule's tensors only; v2 (FORMAT) adds the
magnitude rule's (MAGNITUDE's names). A v1 file still reads: the magnitude rule then works from its
per-sample scores, if it kept them.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from loki_dist.core import metering
from loki_dist.core.errors import UserError

BINS = 100
FORMAT = "loki_dist attribution v2"
# Beyond DESIGN.md's contract tensors: the same histogram over all L*D nodes, ascending and descending,
# so that `select --strategy global_lowest|global_highest` works without per-sample scores.
GLOBAL_LOW, GLOBAL_HIGH = "global_bottom_rank_hist", "global_top_rank_hist"


@dataclass(frozen=True)
class RuleTensors:
    """The file's tensors for one ranking rule: the rank histograms ([L, D, BINS] each) and the sum of
    the ranked values ([L, D]) that breaks ties between equal counts."""

    layer: str  # ascending rank within the node's layer
    global_low: str  # ascending rank over all L*D nodes
    global_high: str  # descending rank over all L*D nodes
    sum: str


SIGNED = RuleTensors("bottom_rank_hist", GLOBAL_LOW, GLOBAL_HIGH, "score_sum")
MAGNITUDE = RuleTensors(
    "magnitude_bottom_rank_hist",
    "global_magnitude_bottom_rank_hist",
    "global_magnitude_top_rank_hist",
    "abs_score_sum",
)  # format v2
RULES = {"signed": SIGNED, "magnitude": MAGNITUDE}
HISTOGRAMS = tuple(
    name for rule in RULES.values() for name in (rule.layer, rule.global_low, rule.global_high)
)
SUMS = tuple(rule.sum for rule in RULES.values())


def rule_key(scores: torch.Tensor, rule: str) -> torch.Tensor:
    """What a rule ranks: the signed scores, or their magnitudes (exact in float32)."""
    return scores.abs() if rule == "magnitude" else scores


def bin_of_rank(n: int) -> torch.Tensor:
    """[n] -> b with k_b <= rank < k_{b+1}, k_q = floor(q*n/100); summing bins b < q counts rank < k_q."""
    bounds = torch.tensor([q * n // BINS for q in range(BINS + 1)])
    return torch.searchsorted(bounds, torch.arange(n), right=True) - 1


def ascending_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim: ascending, ties by lower index (stable sort)."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    return ranks


def in_bottom(scores: torch.Tensor, k: int, rule: str = "signed", highest: bool = False) -> torch.Tensor:
    """Whether each entry is among the k lowest (highest) along the last dim as the rule ranks them, ties
    to the lower index (ascending_ranks(key) < k): the per-sample indicator whose sums over samples are
    the selection counts. Found from the k-th value, a top-k rather than a full sort (three times faster
    on a 70B layer's 2850 x 8192 scores), then the first of the entries tied with it, by index."""
    key = -rule_key(scores, rule) if highest else rule_key(scores, rule)
    if k <= 0 or k >= key.shape[-1]:
        return torch.full(key.shape, k > 0, dtype=torch.bool)
    kth = torch.topk(key, k, dim=-1, largest=False, sorted=False).values.amax(-1, keepdim=True)
    below, tied = key < kth, key == kth
    return below | (tied & (tied.cumsum(-1) <= k - below.sum(-1, keepdim=True)))


def count_dtype(max_count: int) -> torch.dtype:
    """The narrowest integer type that holds every count up to `max_count` exactly.

    A bin counts samples, so it never exceeds the samples counted: a rank of a 70B run over 2850
    samples on 32 ranks needs one byte per bin where int64 would take eight.
    """
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if max_count <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def file_layout(num_layers: int, hidden: int, num_samples: int, with_scores: bool) -> dict:
    """The attribution file's tensors (DESIGN.md), name -> (dtype, shape), in the order written."""
    layout = {
        "num_samples": (torch.int64, (1,)),
        **{name: (torch.float64, (num_layers, hidden)) for name in SUMS},
        **{name: (torch.int64, (num_layers, hidden, BINS)) for name in HISTOGRAMS},
    }
    if with_scores:
        layout["scores"] = (torch.float32, (num_samples, num_layers, hidden))
    return layout


def exact_add(total: torch.Tensor, error: torch.Tensor, value: torch.Tensor) -> None:
    """total += value in place, and what that float64 addition rounded away added to `error` (Knuth's
    two-sum). total + error then holds the sum to about 2**-100 of itself, so its float64 rounding does
    not depend on the order of the values: a plain float64 sum of float32 scores does, as soon as a
    node's scores span more than ~2**29 / N (one score of 1e-12 beside sums of 1e-3 is enough).
    """
    rounded = total + value
    back = rounded - total
    error += (total - (rounded - back)) + (value - back)
    total.copy_(rounded)


class Stats:
    """Running sums over the (at most `capacity`) samples one rank scores.

    The histograms are kept in the narrowest integer type exact for `capacity` (count_dtype); the
    file widens them to int64 when the ranks' sums are written. Each sum has its rounding error beside
    it (`errors`, see exact_add). The per-sample scores, if kept, fill a buffer sized for `capacity`
    whose pages are only touched as samples arrive.
    """

    def __init__(self, num_layers: int, hidden: int, keep_scores: bool, capacity: int):
        self.shape, self.capacity = (num_layers, hidden), capacity
        dtype = count_dtype(capacity)
        self.hists = {name: torch.zeros(num_layers, hidden, BINS, dtype=dtype) for name in HISTOGRAMS}
        self.sums = {name: torch.zeros(num_layers, hidden, dtype=torch.float64) for name in SUMS}
        self.errors = {name: torch.zeros(num_layers, hidden, dtype=torch.float64) for name in SUMS}
        self.num_samples = torch.zeros(1, dtype=torch.int64)
        self._scores = torch.empty(capacity, num_layers, hidden) if keep_scores else None
        self._layer_bins, self._global_bins = bin_of_rank(hidden), bin_of_rank(num_layers * hidden)

    def add(self, scores: torch.Tensor) -> None:
        """Count a batch of per-sample scores [B, L, D] (any float dtype)."""
        s32 = scores.detach().to("cpu", torch.float32)
        done = int(self.num_samples)
        if done + s32.shape[0] > self.capacity:
            raise RuntimeError(f"Stats: {done} + {s32.shape[0]} samples exceed the capacity {self.capacity}")
        self.num_samples += s32.shape[0]
        one = torch.ones((), dtype=count_dtype(self.capacity))
        for sample in s32:
            for rule, names in RULES.items():
                key = rule_key(sample, rule)
                exact_add(self.sums[names.sum], self.errors[names.sum], key.double())
                self.hists[names.layer].scatter_add_(
                    2, self._layer_bins[ascending_ranks(key)][..., None], one.expand(*self.shape, 1)
                )
                flat = key.reshape(-1)
                for name, ranked in ((names.global_low, flat), (names.global_high, -flat)):
                    self.hists[name].view(-1, BINS).scatter_add_(
                        1, self._global_bins[ascending_ranks(ranked)][:, None], one.expand(flat.numel(), 1)
                    )
        if self._scores is not None:
            self._scores[done : done + s32.shape[0]] = s32

    def tensors(self) -> dict[str, torch.Tensor]:
        """Views of the running sums (histograms in their narrow type, each sum with its rounding error
        as `<sum>_error`); what a rank's partial progress holds."""
        out = {"num_samples": self.num_samples}
        for name in SUMS:
            out[name], out[f"{name}_error"] = self.sums[name], self.errors[name]
        out.update(self.hists)
        if self._scores is not None:
            out["scores"] = self._scores[: int(self.num_samples)]
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.tensors().items():
            if name != "scores":
                tensor.copy_(tensors[name])
        if self._scores is not None:
            self._scores[: int(self.num_samples)] = tensors["scores"]


def exact_sum(samples: torch.Tensor) -> torch.Tensor:
    """The float64 sum over dim 0, correctly rounded as Stats and the file keep it (exact_add): a reader
    of an older file computes a missing sum from its scores and gets the same bits."""
    total = torch.zeros(samples.shape[1:], dtype=torch.float64)
    error = torch.zeros_like(total)
    for sample in samples:
        exact_add(total, error, sample.double())
    return total + error


def load_file(
    path: str | Path, flag: str = "--attribution", pick: Callable[[list[str]], Collection[str]] | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an attribution (or partial progress) file; any damage is a UserError.

    `pick` chooses, from the names the file holds, the tensors to load (default: all), so that a
    reader leaves what it does not need on disk (a 70B file's scores are 7.5 GB).
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = list(handle.keys())
            chosen = set(names if pick is None else pick(names))
            tensors = {name: handle.get_tensor(name) for name in names if name in chosen}
    except Exception as err:  # safetensors raises several types for truncated/corrupted files
        raise UserError(f"{flag} {path}: not a readable safetensors file ({err})") from None
    metering.count("read", sum(t.nbytes for t in tensors.values()))
    return tensors, metadata
