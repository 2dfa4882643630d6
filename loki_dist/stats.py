"""Per-node attribution statistics, the attribution file, and the per-rank partial checkpoints.

What is kept per sample is only what selection needs, so that attribution over any number of samples
and ranks is a sum: a histogram of each node's ascending rank (per layer, and over all L*D nodes for
the global ablations), the score sum (the tie-break), and optionally the per-sample scores. Sums
all-reduce exactly, so the file does not depend on the world size.

Ranks come from a stable sort of the float32 scores (the precision the optional `scores` tensor is
stored in), so a brute-force selection from the stored scores reproduces the histograms exactly, ties
included.
"""

from __future__ import annotations

from pathlib import Path

import torch

from loki_dist.errors import UserError

BINS = 100
# Beyond DESIGN.md's contract tensors: the same histogram over all L*D nodes, ascending and descending,
# so that `select --strategy global_lowest|global_highest` works without per-sample scores.
GLOBAL_LOW, GLOBAL_HIGH = "global_bottom_rank_hist", "global_top_rank_hist"


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


class Stats:
    """Running sums over the samples one rank has scored."""

    def __init__(self, num_layers: int, hidden: int, keep_scores: bool):
        self.shape = (num_layers, hidden)
        size = num_layers * hidden
        self.hist = torch.zeros(num_layers, hidden, BINS, dtype=torch.int64)
        self.global_low = torch.zeros(size, BINS, dtype=torch.int64)
        self.global_high = torch.zeros(size, BINS, dtype=torch.int64)
        self.score_sum = torch.zeros(num_layers, hidden, dtype=torch.float64)
        self.num_samples = torch.zeros(1, dtype=torch.int64)
        self.scores: list[torch.Tensor] | None = [] if keep_scores else None
        self._layer_bins, self._global_bins = bin_of_rank(hidden), bin_of_rank(size)

    def add(self, scores: torch.Tensor) -> None:
        """Count a batch of per-sample scores [B, L, D] (any float dtype)."""
        s32 = scores.detach().to("cpu", torch.float32)
        self.score_sum += s32.double().sum(0)
        self.num_samples += s32.shape[0]
        ones = torch.ones((), dtype=torch.int64)
        for sample in s32:
            self.hist.scatter_add_(
                2, self._layer_bins[ascending_ranks(sample)][..., None], ones.expand(*self.shape, 1)
            )
            flat = sample.reshape(-1)
            for hist, key in ((self.global_low, flat), (self.global_high, -flat)):
                hist.scatter_add_(
                    1, self._global_bins[ascending_ranks(key)][:, None], ones.expand(flat.numel(), 1)
                )
        if self.scores is not None:
            self.scores.extend(s32.unbind(0))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {
            "bottom_rank_hist": self.hist,
            GLOBAL_LOW: self.global_low.view(*self.shape, BINS),
            GLOBAL_HIGH: self.global_high.view(*self.shape, BINS),
            "score_sum": self.score_sum,
            "num_samples": self.num_samples,
        }
        if self.scores is not None:
            out["scores"] = torch.stack(self.scores) if self.scores else torch.zeros(0, *self.shape)
        return out

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.hist.copy_(tensors["bottom_rank_hist"])
        self.global_low.copy_(tensors[GLOBAL_LOW].reshape(-1, BINS))
        self.global_high.copy_(tensors[GLOBAL_HIGH].reshape(-1, BINS))
        self.score_sum.copy_(tensors["score_sum"])
        self.num_samples.copy_(tensors["num_samples"])
        if self.scores is not None:
            self.scores = list(tensors["scores"].unbind(0))


def load_file(
    path: str | Path, flag: str = "--attribution"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an attribution (or checkpoint) file; any damage is a UserError."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{flag} {path}: file not found")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several types for truncated/corrupted files
        raise UserError(f"{flag} {path}: not a readable safetensors file ({err})") from None
    return tensors, metadata
