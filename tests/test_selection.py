"""`select` against a brute-force reading of docs/method.md, on scores full of ties, under both rules (the
magnitude rule: the signed rule's reading applied to |score|, written out here)."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import pytest
import torch
from conftest import assert_user_error

from loki_dist.attribution.stats import Stats
from loki_dist.cli import main
from loki_dist.core.errors import UserError
from loki_dist.core.files import save_tensors
from loki_dist.selection.strategies import select

L, D, N = 3, 40, 7


def _scores(seed: int = 0) -> torch.Tensor:
    """Small integers: many exact ties within a sample, and tied counts and sums across samples."""
    return torch.randint(-3, 4, (N, L, D), generator=torch.Generator().manual_seed(seed)).float()


def _tensors(scores: torch.Tensor, keep_scores: bool = True) -> dict:
    """The statistics as a run keeps them: histograms in the narrow type (uint8 for 7 samples)."""
    stats = Stats(L, D, keep_scores, capacity=N)
    for chunk in scores.split(3):  # accumulated over several batches, as a run does
        stats.add(chunk.double())
    tensors = stats.tensors()
    assert tensors["bottom_rank_hist"].dtype == torch.uint8
    return tensors


def _save(tensors: dict, path, metadata: dict) -> None:
    """An attribution file as docs/method.md has it: histograms widened to int64."""
    widened = {n: t.long() if n.endswith("_hist") else t for n, t in tensors.items()}
    save_tensors(path, widened, metadata)


def _brute(scores: torch.Tensor, quota: Fraction, strategy: str, rule: str = "signed") -> list[list[int]]:
    """Plain Python from the text of docs/method.md: each sample's nodes ranked by score (signed) or by
    |score| (magnitude), ties to the lower index; counts tied: lower sum of what was ranked (higher for
    the highest-ranked variants), then lower index."""
    _, L, D = scores.shape  # any shape (test_suppression brings a real model's)
    s = [
        [[abs(v) if rule == "magnitude" else v for v in row] for row in sample] for sample in scores.tolist()
    ]
    if strategy in ("layer_balanced", "layer_balanced_highest"):
        sign = -1 if strategy == "layer_balanced_highest" else 1
        k = math.floor(quota * D / 100)
        picked = []
        for layer in range(L):
            count, total = [0] * D, [0.0] * D
            for sample in s:
                row = sample[layer]
                for j in sorted(range(D), key=lambda j: (sign * row[j], j))[:k]:
                    count[j] += 1
                for j in range(D):
                    total[j] += row[j]
            picked.append(sorted(sorted(range(D), key=lambda j: (-count[j], sign * total[j], j))[:k]))
        return picked
    highest = strategy == "global_highest"
    t = math.floor(quota * L * D / 100)
    nodes = [(layer, j) for layer in range(L) for j in range(D)]
    count = dict.fromkeys(nodes, 0)
    total = dict.fromkeys(nodes, 0.0)
    for sample in s:
        flat = {(layer, j): sample[layer][j] for layer, j in nodes}
        sign = -1 if highest else 1
        for node in sorted(nodes, key=lambda n: (sign * flat[n], n[0] * D + n[1]))[:t]:
            count[node] += 1
        for node in nodes:
            total[node] += flat[node]
    sign = -1 if highest else 1
    best = sorted(nodes, key=lambda n: (-count[n], sign * total[n], n[0] * D + n[1]))[:t]
    picked = [[] for _ in range(L)]
    for layer, j in best:
        picked[layer].append(j)
    return [sorted(rows) for rows in picked]


@pytest.mark.parametrize("rule", ["signed", "magnitude"])
@pytest.mark.parametrize("strategy", ["layer_balanced", "global_lowest", "global_highest"])
def test_select_equals_brute_force_with_ties(strategy, rule):
    """Scores in -3..3: ties within a sample, between +x and -x under |score|, and between counts."""
    scores = _scores()
    from_hist = _tensors(scores, keep_scores=False)
    with_scores = _tensors(scores)
    for quota in ("1", "5", "10", "33", "50", "99", "100", "2.5", "12.5", "37.75"):
        q = Fraction(quota)
        if math.floor(q * D / 100) == 0 and strategy == "layer_balanced":
            with pytest.raises(UserError, match="selects no row"):
                select(with_scores, q, strategy, rule=rule)
            continue
        expected = _brute(scores, q, strategy, rule)
        assert select(with_scores, q, strategy, rule=rule) == expected, (strategy, quota)
        if q.denominator == 1:  # integer quota: from the histograms alone
            assert select(from_hist, q, strategy, rule=rule) == expected, (strategy, quota)


def test_the_rules_choose_different_rows():
    """On scores with large negative entries the signed rule's lowest are those, the magnitude rule's
    the ones nearest zero: the rule is not a no-op on the data the tests use."""
    scores = _scores()
    tensors = _tensors(scores)
    signed, magnitude = (
        select(tensors, Fraction(10), "layer_balanced", rule=r) for r in ("signed", "magnitude")
    )
    assert signed != magnitude
    mean = scores.mean(0)
    for layer in range(L):
        assert mean[layer, magnitude[layer]].abs().mean() < mean[layer, signed[layer]].abs().mean()


@pytest.mark.parametrize("rule", ["signed", "magnitude"])
def test_layer_balanced_highest_equals_brute_force(rule):
    """`suppress --which highest` (and the study's "KVA highest" arm): from the per-sample scores."""
    scores, tensors = _scores(2), _tensors(_scores(2))
    for quota in ("5", "10", "50", "12.5"):
        q = Fraction(quota)
        expected = _brute(scores, q, "layer_balanced_highest", rule)
        assert select(tensors, q, "layer_balanced_highest", rule=rule) == expected, quota
    with pytest.raises(UserError, match="layer-balanced highest rows needs per-sample scores"):
        select(_tensors(scores, keep_scores=False), Fraction(10), "layer_balanced_highest", rule=rule)


def test_histogram_bins_count_bottom_k_for_every_integer_quota():
    scores = _scores(1)
    hist = _tensors(scores)["bottom_rank_hist"]
    assert hist.sum().item() == N * L * D
    for q in (1, 7, 50, 100):
        k = q * D // 100
        ranks = torch.tensor([[sorted(range(D), key=lambda j, r=row: (r[j], j)).index(j) for j in range(D)]
                              for sample in scores.tolist() for row in sample]).view(N, L, D)  # fmt: skip
        assert torch.equal(hist[..., :q].sum(-1), (ranks < k).sum(0))


def test_magnitude_histograms_and_sum_are_those_of_the_absolute_scores():
    """The file's v2 tensors are the v1 ones of |score|: Stats run on |scores| gives them, bit for bit."""
    from loki_dist.attribution.stats import MAGNITUDE, SIGNED

    scores = _scores(3)
    tensors, of_abs = _tensors(scores), _tensors(scores.abs())
    for field in ("layer", "global_low", "global_high", "sum"):
        magnitude, signed = getattr(MAGNITUDE, field), getattr(SIGNED, field)
        assert torch.equal(tensors[magnitude], of_abs[signed]), magnitude
    assert torch.equal(tensors["abs_score_sum"], scores.abs().double().sum(0))


def test_random_is_seeded_and_fills_every_layer():
    tensors = _tensors(_scores())
    a = select(tensors, Fraction(10), "random", seed=1)
    assert a == select(tensors, Fraction(10), "random", seed=1)
    assert a != select(tensors, Fraction(10), "random", seed=2)
    assert [len(rows) for rows in a] == [4] * L and all(rows == sorted(set(rows)) for rows in a)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def attribution(tmp_path):
    path = tmp_path / "attribution.safetensors"
    _save(_tensors(_scores()), path, {"model_type": "llama"})
    return path


def test_cli_writes_positions_summary_and_plot(attribution, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "positions.json", tmp_path / "sel.png"
    main(
        [
            "select",
            "--attribution",
            str(attribution),
            "--quota",
            "10",
            "--output",
            str(out),
            "--plot",
            str(png),
        ]
    )
    assert json.loads(out.read_text()) == _brute(_scores(), Fraction(10), "layer_balanced")
    printed = capsys.readouterr().out
    assert "layer   2:      4 rows  mean score" in printed
    assert png.stat().st_size > 1000 and f"wrote {png}" in printed


@pytest.mark.parametrize("strategy", ["layer_balanced", "global_lowest"])
def test_the_plot_shows_rows_per_layer_scores_and_stability(strategy):
    """What a user acts on, per layer: how many rows, the chosen rows' mean score against the layer's,
    and how stable the choice is (issue 24.7); without per-sample scores the panel says how to get them."""
    pytest.importorskip("matplotlib")
    from loki_dist.selection import plot, stability

    tensors = _tensors(_scores())
    positions = select(tensors, Fraction(10), strategy)
    scores = stability.Scores(tensors["scores"], (N, L, D), on_disk=False)
    figures = stability.measure(scores, positions, Fraction(10), strategy, "signed", resamples=5)
    rows, means, stable = plot.figure(positions, tensors, figures, "signed").axes
    assert [bar.get_height() for bar in rows.patches] == [len(r) for r in positions]
    chosen = [float(tensors["score_sum"][layer, r].mean() / N) for layer, r in enumerate(positions)]
    assert list(means.lines[1].get_ydata()) == pytest.approx(chosen)
    assert list(stable.lines[0].get_ydata()) == pytest.approx([100 * v for v in figures.halves_per_layer])
    assert list(stable.lines[1].get_ydata()) == pytest.approx([100 * v for v in figures.bootstrap_per_layer])
    assert figures.verdict()[:40] in stable.get_title().replace("\n", " ")
    bare = plot.figure(positions, tensors, None, "signed").axes[2]
    assert "attribute --save-scores" in bare.texts[0].get_text()


def test_select_reads_only_what_the_strategy_needs(attribution, tmp_path, capsys):
    """A 70B file holds 7.5 GB of scores and 3.1 GB of histograms (six of 0.5 GB): an integer quota reads
    the one histogram of its strategy and rule and the sums, and the scores are read only for a
    fractional quota (then no histogram). --resamples 0: without the stability figures, which read the
    scores a layer at a time (test_stability)."""
    from loki_dist.core import metering

    hist, sums, scores = L * D * 100 * 8, L * D * 8 + 8, N * L * D * 4
    for strategy, rule, quota, expected in (("layer_balanced", "signed", "10", hist + sums),
                                            ("global_highest", "signed", "10", hist + sums),
                                            ("layer_balanced", "signed", "12.5", sums + scores),
                                            ("layer_balanced", "magnitude", "10", hist + sums + L * D * 8),
                                            ("global_lowest", "magnitude", "12.5", sums + L * D * 8 + scores),
                                            ):  # fmt: skip
        before = metering.report()["totals"]["read"]
        argv = ["--attribution", str(attribution), "--quota", quota, "--strategy", strategy, "--rule", rule]
        main(["select", *argv, "--output", str(tmp_path / "p.json"), "--resamples", "0"])
        assert metering.report()["totals"]["read"] - before == expected, (strategy, rule)
        written = json.loads((tmp_path / "p.json").read_text())
        assert written == _brute(_scores(), Fraction(quota), strategy, rule)
    capsys.readouterr()


def _v1_file(tensors: dict, path) -> None:
    """An attribution file as loki_dist wrote it before format v2: no magnitude tensors."""
    from loki_dist.attribution.stats import MAGNITUDE

    dropped = {MAGNITUDE.layer, MAGNITUDE.global_low, MAGNITUDE.global_high, MAGNITUDE.sum}
    old = {n: t for n, t in tensors.items() if n not in dropped and not n.endswith("_error")}
    _save(old, path, {"format": "loki_dist attribution v1", "model_type": "llama"})


def test_a_v1_file_still_reads_and_the_magnitude_rule_then_needs_its_scores(tmp_path, capsys):
    """Format v1 (before the |score| statistics): every signed selection is as before; the magnitude
    rule works from the file's per-sample scores, with the |score| sum computed exactly as attribution
    keeps it; without scores it is one line saying to rerun attribute, and nothing is written."""
    scores = _scores()
    with_scores, without = tmp_path / "v1_scores.safetensors", tmp_path / "v1.safetensors"
    _v1_file(_tensors(scores), with_scores)
    _v1_file(_tensors(scores, keep_scores=False), without)
    out = tmp_path / "p.json"
    for path, strategy, rule, quota in ((without, "layer_balanced", "signed", "10"),
                                        (without, "global_highest", "signed", "5"),
                                        (with_scores, "layer_balanced", "magnitude", "10"),
                                        (with_scores, "global_lowest", "magnitude", "5"),
                                        (with_scores, "global_highest", "magnitude", "12.5")):  # fmt: skip
        argv = ["--attribution", str(path), "--quota", quota, "--strategy", strategy, "--rule", rule]
        main(["select", *argv, "--output", str(out)])
        assert json.loads(out.read_text()) == _brute(scores, Fraction(quota), strategy, rule)
    out.unlink()
    for strategy in ("layer_balanced", "global_lowest", "global_highest"):
        assert_user_error(
            ["select", "--attribution", str(without), "--quota", "10", "--strategy", strategy,
             "--rule", "magnitude", "--output", str(out)],
            capsys,
            "--rule magnitude needs the |score| statistics, which this attribution file predates",
        )  # fmt: skip
    assert not out.exists()


def test_bad_input_fails_in_one_line(attribution, tmp_path, capsys, tiny_llama):
    out = str(tmp_path / "p.json")
    base = ["select", "--output", out, "--attribution", str(attribution)]
    out_of_range = "must be in (0, 100]"
    for quota, needle in (("0", out_of_range), ("101", out_of_range), ("ten", "not a number"),
                          ("1", "selects no row"), ("1e999999999", out_of_range)):  # fmt: skip
        assert_user_error([*base, "--quota", quota], capsys, needle)
    # torch.Generator.manual_seed: 'Overflow when unpacking long long'
    argv = [*base, "--quota", "10", "--strategy", "random", "--seed", str(2**70)]
    assert_user_error(argv, capsys, f"--seed {2**70}: expected an integer between -2**62 and 2**62")
    assert_user_error(
        [*base, "--quota", "10", "--model", str(tiny_llama)], capsys, "made for 3 layers x 40 rows"
    )
    no_scores = tmp_path / "no_scores.safetensors"
    _save(_tensors(_scores(), keep_scores=False), no_scores, {})
    assert_user_error(
        ["select", "--output", out, "--attribution", str(no_scores), "--quota", "12.5"],
        capsys,
        "--save-scores",
    )
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(attribution.read_bytes()[:-100])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x13" * 64)
    for broken in (truncated, garbage, tmp_path / "missing.safetensors"):
        assert_user_error(
            ["select", "--output", out, "--attribution", str(broken), "--quota", "10"], capsys, str(broken)
        )
    assert not (tmp_path / "p.json").exists()
