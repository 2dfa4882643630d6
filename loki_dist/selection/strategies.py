"""How `loki-dist select` chooses rows from an attribution file (docs/method.md, method step 2): the
strategies, the rules, their ties, and the attribution file read and checked for them.

Layer-balanced with quota q: every layer keeps k = floor(q*D/100) rows, the ones most often among the
k lowest-ranked nodes of a sample. The global ablations count per-sample bottom-T / top-T over all L*D
nodes at once, T = floor(L*D*q/100). For an integer q the counts are read off the rank histograms; a
fractional q needs the per-sample scores (`attribute --save-scores`). `random` is the control that
tells whether attribution earns its cost.

The rule says what a sample ranks: `signed` (the default, the reference implementation's) its signed
scores, lowest first; `magnitude` their magnitudes |score|, so that "lowest" means "least effect on the
prediction either way" (issue 28: on SmolLM2 the signed-lowest rows are large negative contributions
the model cannot lose, the |score|-lowest the most harmless). Ties between equal counts go to the lower
sum of the ranked values over the samples (the score sum, or the |score| sum; the higher sum for the
highest-ranked variants), then to the lower index: the same order a single sample's ranking uses, so
that on one sample a selection is that sample's own ranking.
"""

from __future__ import annotations

import math
from fractions import Fraction

from loki_dist.core.errors import UserError

STRATEGIES = ("layer_balanced", "global_lowest", "global_highest", "random")
RULES = ("signed", "magnitude")
# not a `select` choice: the selection study's "KVA highest" arm and `suppress --which highest`
LAYER_HIGHEST = "layer_balanced_highest"


# ----------------------------------------------------------------------------------------------- counts


def pick_rows(count, tie_sum, k: int, low_sum_first: bool = True):
    """Indices of the k highest counts (last dim); ties: lower (or higher) tie sum, then lower index."""
    import torch

    by_sum = torch.sort(tie_sum if low_sum_first else -tie_sum, stable=True).indices
    return by_sum.gather(-1, torch.sort(-count.gather(-1, by_sum), stable=True).indices)[..., :k]


def bottom_counts_from_scores(scores, k: int, descending: bool = False, rule: str = "signed"):
    """Per node, the samples in which it is among the k lowest (highest) along the last dim, ranked by
    the rule (stats.rule_key), with the ties the histograms have."""
    from loki_dist.attribution.stats import in_bottom

    return in_bottom(scores, k, rule, descending).sum(0)


def tie_sums(tensors: dict, rule: str):
    """[L, D] float64 sums of what the rule ranks: the file's, or, for a file older than the magnitude
    rule's tensors, computed from its scores exactly as attribution would have kept them."""
    from loki_dist.attribution.stats import RULES as RULE_TENSORS
    from loki_dist.attribution.stats import exact_sum, rule_key

    name = RULE_TENSORS[rule].sum
    if name in tensors:
        return tensors[name]
    return exact_sum(rule_key(tensors["scores"].float(), rule))


def layer_balanced(
    tensors: dict, quota: Fraction, highest: bool = False, rule: str = "signed"
) -> list[list[int]]:
    """k rows per layer, the most often among a sample's k lowest-ranked (docs/method.md, step 2).

    highest: the most often among the k *highest*-ranked instead (ties: higher sum, then lower
    index), the paper's "most important rows" contrast, which the selection study (bench/) trains as an
    arm and `suppress --which highest` zeroes. It reads the per-sample scores (`attribute
    --save-scores`): the histograms bin ascending ranks at the bottom quotas' edges, which do not fall
    on the top k's edge.
    """
    import torch

    num_layers, hidden = tensors["score_sum"].shape
    k = math.floor(quota * hidden / 100)
    name = _histogram("layer_balanced", rule)
    if highest or quota.denominator != 1 or name not in tensors:
        if "scores" not in tensors:
            raise UserError(_needs_scores_why(quota, LAYER_HIGHEST if highest else "layer_balanced", rule))
        scores = tensors["scores"].float()  # a layer at a time: the ranks of all are 2 x 15 GB at 70B
        count = torch.stack(
            [bottom_counts_from_scores(scores[:, layer], k, highest, rule) for layer in range(num_layers)]
        )
    else:
        count = tensors[name][..., : int(quota)].sum(-1)
    sums = tie_sums(tensors, rule)
    return [
        sorted(pick_rows(count[layer], sums[layer], k, low_sum_first=not highest).tolist())
        for layer in range(num_layers)
    ]


def global_selection(tensors: dict, quota: Fraction, highest: bool, rule: str = "signed") -> list[list[int]]:
    num_layers, hidden = tensors["score_sum"].shape
    total = math.floor(quota * num_layers * hidden / 100)
    name = _histogram("global_highest" if highest else "global_lowest", rule)
    if quota.denominator == 1 and name in tensors:
        count = tensors[name][..., : int(quota)].sum(-1).reshape(-1)
    else:
        scores = tensors["scores"].float().reshape(tensors["scores"].shape[0], -1)
        count = bottom_counts_from_scores(scores, total, descending=highest, rule=rule)
    chosen = pick_rows(count, tie_sums(tensors, rule).reshape(-1), total, low_sum_first=not highest)
    positions: list[list[int]] = [[] for _ in range(num_layers)]
    for flat in sorted(chosen.tolist()):
        positions[flat // hidden].append(flat % hidden)
    return positions


def random_selection(num_layers: int, hidden: int, quota: Fraction, seed: int) -> list[list[int]]:
    import torch

    k = math.floor(quota * hidden / 100)
    generator = torch.Generator().manual_seed(seed)
    return [sorted(torch.randperm(hidden, generator=generator)[:k].tolist()) for _ in range(num_layers)]


# ------------------------------------------------------------------------------------------ file checks


def _histogram(strategy: str, rule: str) -> str | None:
    """The file's histogram that counts a strategy's nodes under a rule (None: none does)."""
    from loki_dist.attribution.stats import RULES as RULE_TENSORS

    names = RULE_TENSORS[rule]
    strategies = {"layer_balanced": names.layer, "global_lowest": names.global_low}
    return {**strategies, "global_highest": names.global_high}.get(strategy)


def _needs_scores(quota: Fraction, strategy: str, rule: str, names) -> bool:
    """A fractional quota reads the scores; so does a strategy whose histogram the file lacks (the
    layer-balanced highest has none; an older file lacks the magnitude rule's and may lack the global
    ones)."""
    if strategy == "random":
        return False
    return quota.denominator != 1 or _histogram(strategy, rule) not in names


def _needs_scores_why(quota: Fraction, strategy: str, rule: str) -> str:
    """One line saying what asked for the scores, and what to do."""
    if quota.denominator != 1:
        why = "a fractional --quota"
    elif strategy == LAYER_HIGHEST:
        why = "selecting the layer-balanced highest rows"
    elif rule == "magnitude":
        return (
            "--rule magnitude needs the |score| statistics, which this attribution file predates (format "
            "v1), or its per-sample scores; rerun `loki-dist attribute`"
        )
    else:
        why = f"--strategy {strategy} with this file"
    return f"{why} needs per-sample scores; rerun `loki-dist attribute` with --save-scores"


def _reads(quota: Fraction, strategy: str, rule: str):
    """The tensors a selection reads from the file: the rest (scores: 7.5 GB at 70B, the other
    histograms 0.5 GB each) stays on disk."""
    from loki_dist.attribution.stats import RULES as RULE_TENSORS

    def pick(names: list[str]) -> set[str]:
        chosen = {"score_sum", "num_samples", RULE_TENSORS[rule].sum}
        if _needs_scores(quota, strategy, rule, names):
            chosen.add("scores")
        elif strategy != "random":
            chosen.add(_histogram(strategy, rule))
        return chosen

    return pick


def load_attribution(
    path: str,
    model: str | None = None,
    quota: Fraction | None = None,
    strategy: str | None = None,
    rule: str = "signed",
) -> tuple[dict, dict]:
    """Tensors and metadata, with every shape checked against each other (and --model if given).

    With a quota and strategy, only what that selection reads is loaded.
    """
    from loki_dist.attribution.stats import BINS, HISTOGRAMS, SUMS, load_file

    pick = _reads(quota, strategy, rule) if quota is not None and strategy is not None else None
    held: set[str] = set()

    def chosen(names: list[str]):
        held.update(names)
        return names if pick is None else pick(names)

    tensors, metadata = load_file(path, pick=chosen)
    missing = [n for n in ("bottom_rank_hist", "score_sum", "num_samples") if n not in held]
    if missing:
        raise UserError(
            f"--attribution {path}: lacks tensor(s) {', '.join(missing)}; not an attribution file"
        )
    if tensors["score_sum"].dim() != 2:
        raise UserError(
            f"--attribution {path}: score_sum must be [L, D], got {list(tensors['score_sum'].shape)}"
        )
    num_layers, hidden = tensors["score_sum"].shape
    expected = {
        **{name: [num_layers, hidden, BINS] for name in HISTOGRAMS},
        **{name: [num_layers, hidden] for name in SUMS},
    }
    n = int(tensors["num_samples"].reshape(-1)[0])
    if "scores" in tensors:
        expected["scores"] = [n, num_layers, hidden]
    for name, shape in expected.items():
        if name in tensors and list(tensors[name].shape) != shape:
            raise UserError(
                f"--attribution {path}: {name} has shape {list(tensors[name].shape)}, expected {shape}"
            )
    if model is not None:
        from loki_dist.core.families import spec_from_dir

        spec = spec_from_dir(model)
        if (spec.num_layers, spec.hidden_size) != (num_layers, hidden):
            raise UserError(
                f"--attribution {path}: made for {num_layers} layers x {hidden} rows, but --model {model} "
                f"has {spec.num_layers} layers x hidden_size {spec.hidden_size}"
            )
    return tensors, metadata


def select(
    tensors: dict, quota: Fraction, strategy: str, seed: int = 0, rule: str = "signed"
) -> list[list[int]]:
    """The positions for a strategy (or LAYER_HIGHEST) under a rule; the UserErrors name what is
    missing for the quota asked."""
    num_layers, hidden = tensors["score_sum"].shape
    per_layer = math.floor(quota * hidden / 100)
    total = math.floor(quota * num_layers * hidden / 100)
    if (total if strategy.startswith("global") else per_layer) == 0:
        raise UserError(f"--quota {float(quota):g}: selects no row at hidden_size {hidden}; raise it")
    if strategy == "random":
        return random_selection(num_layers, hidden, quota, seed)
    if _needs_scores(quota, strategy, rule, tensors) and "scores" not in tensors:
        raise UserError(_needs_scores_why(quota, strategy, rule))
    if strategy in ("layer_balanced", LAYER_HIGHEST):
        return layer_balanced(tensors, quota, highest=strategy == LAYER_HIGHEST, rule=rule)
    return global_selection(tensors, quota, highest=strategy == "global_highest", rule=rule)
