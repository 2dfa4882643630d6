"""`select`'s stability figures (issue 25, item 1) on cases with a known answer: halves that are the same
samples agree fully; halves of scores with no signal agree as two random choices do, a hypergeometric
overlap derived here; every figure equals a brute-force reading of its definition (test_selection's
plain-Python selection run on the samples of each half and each resample); and the estimated change
follows the true one where the choice from unlimited prompts is known."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from conftest import REPO, assert_user_error
from test_selection import _brute, _save

from loki_dist.attribution.stats import Stats
from loki_dist.cli import main
from loki_dist.selection.stability import NO_SCORES, Scores, measure, overlaps, resample_weights

STRATEGIES = ("layer_balanced", "global_lowest", "global_highest")


def _file(scores: torch.Tensor, path, keep_scores: bool = True):
    """An attribution file of these per-sample scores, as `attribute --save-scores` writes it."""
    stats = Stats(scores.shape[1], scores.shape[2], keep_scores, capacity=len(scores))
    stats.add(scores.double())
    _save(stats.tensors(), path, {"model_type": "llama"})
    return path


def _select(path, tmp_path, *flags: str) -> dict:
    """`loki-dist select` with --report; the report it wrote."""
    report = tmp_path / "report.json"
    main(["select", "--attribution", str(path), "--output", str(tmp_path / "p.json"), "--report", str(report),
          *flags])  # fmt: skip
    return json.loads(report.read_text())


def _overlap(a: list[list[int]], b: list[list[int]]) -> tuple[list[float | None], float]:
    """The definition, in plain Python: per layer |A & B| / max(|A|, |B|), overall over all layers."""
    per_layer = [
        len(set(x) & set(y)) / max(len(x), len(y)) if x or y else None for x, y in zip(a, b, strict=True)
    ]
    shared = sum(len(set(x) & set(y)) for x, y in zip(a, b, strict=True))
    return per_layer, shared / max(sum(map(len, a)), sum(map(len, b)))


@pytest.mark.parametrize("rule", ["signed", "magnitude"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_identical_halves_choose_identical_rows(strategy, rule, tmp_path, capsys):
    """Every sample twice, side by side: the even and odd halves hold the same samples, so they choose
    the same rows, and the overlap is 1 in every layer that has any."""
    once = torch.randn(9, 4, 50, generator=torch.Generator().manual_seed(0))
    path = _file(once.repeat_interleave(2, dim=0), tmp_path / "a.safetensors")
    report = _select(path, tmp_path, "--quota", "10", "--strategy", strategy, "--rule", rule)
    figures = report["stability"]
    assert figures["halves_sizes"] == [9, 9] and figures["halves"] == 1.0
    assert all(v in (1.0, None) for v in figures["halves_per_layer"]) and 1.0 in figures["halves_per_layer"]
    assert figures["settled"] is (figures["change"] <= 0.0243)
    assert "halves 100.0%" in capsys.readouterr().out


def _hypergeometric(universe: int, size: int) -> tuple[float, float]:
    """Mean and variance of |A & B| for two independent uniform `size`-subsets of `universe` nodes, from
    the distribution itself: P(|A & B| = i) = C(size, i) C(universe - size, size - i) / C(universe, size)."""
    total = math.comb(universe, size)
    p = [math.comb(size, i) * math.comb(universe - size, size - i) / total for i in range(size + 1)]
    mean = sum(i * pi for i, pi in enumerate(p))
    return mean, sum((i - mean) ** 2 * pi for i, pi in enumerate(p))


@pytest.fixture(scope="module")
def no_signal(tmp_path_factory):
    """40 samples of scores with no signal, 32 layers x 200 rows (one file for every strategy and rule)."""
    scores = torch.randn(40, 32, 200, generator=torch.Generator().manual_seed(1))
    return _file(scores, tmp_path_factory.mktemp("no_signal") / "a.safetensors")


@pytest.mark.parametrize("rule", ["signed", "magnitude"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_independent_halves_agree_as_two_random_choices(strategy, rule, no_signal, tmp_path, capsys):
    """Scores with no signal (independent, identically distributed per node and sample): the nodes are
    exchangeable, so each half's choice is a uniform random subset, independent of the other half's.
    Per layer |A & B| is hypergeometric (layer-balanced: k = 20 of D = 200 in each of 32 layers; global:
    T = 640 of the 6400 nodes at once), so the overall overlap has mean 0.1 and the sd derived below; the
    halves' figure lies within 4 sd of it, and select says that it is chance."""
    layers, hidden = 32, 200
    report = _select(no_signal, tmp_path, "--quota", "10",
                     "--strategy", strategy, "--rule", rule, "--resamples", "5")  # fmt: skip
    if strategy == "layer_balanced":
        mean, variance = _hypergeometric(hidden, 20)
        size, groups = 20, layers
    else:
        mean, variance = _hypergeometric(layers * hidden, 640)
        size, groups = 640, 1
    expected, sd = groups * mean / (groups * size), math.sqrt(groups * variance) / (groups * size)
    figures = report["stability"]
    assert expected == pytest.approx(0.1) and sd < 0.012
    assert figures["chance"] == pytest.approx(expected) and figures["chance_sd"] == pytest.approx(sd)
    assert abs(figures["halves"] - expected) <= 4 * sd, figures["halves"]
    assert figures["no_better_than_chance"] and not figures["settled"]
    assert "the halves agree no better than two random choices (chance 10.0%)" in capsys.readouterr().out


@pytest.mark.parametrize("rule", ["signed", "magnitude"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_figure_equals_a_brute_force_reading(strategy, rule, tmp_path, capsys):
    """Scores in -3..3 (ties everywhere), 7 samples (halves of 4 and 3), a fractional quota too: each
    half's and each resample's choice made by the plain-Python selection on those samples (a resample's
    sample repeated as often as it was drawn), and the overlaps by their definition."""
    scores = torch.randint(-3, 4, (7, 3, 40), generator=torch.Generator().manual_seed(2)).float()
    path = _file(scores, tmp_path / "a.safetensors")
    for quota in ("10", "12.5"):
        report = _select(path, tmp_path, "--quota", quota, "--strategy", strategy, "--rule", rule,
                         "--resamples", "20", "--seed", "3")  # fmt: skip
        figures, q = report["stability"], Fraction(quota)
        full = _brute(scores, q, strategy, rule)
        assert json.loads((tmp_path / "p.json").read_text()) == full
        per_layer, overall = _overlap(
            _brute(scores[0::2], q, strategy, rule), _brute(scores[1::2], q, strategy, rule)
        )
        assert figures["halves_sizes"] == [4, 3]
        assert (figures["halves_per_layer"], figures["halves"]) == (per_layer, overall)
        weights = resample_weights(7, 20, 3)[2:]
        boot = [
            _overlap(_brute(scores.repeat_interleave(w, dim=0), q, strategy, rule), full) for w in weights
        ]
        assert figures["bootstrap"] == [o for _, o in boot]
        assert figures["bootstrap_mean"] == pytest.approx(math.fsum(o for _, o in boot) / 20, abs=1e-12)
        assert figures["bootstrap_low"] == sorted(o for _, o in boot)[0]  # the ceil(20 / 20) = 1st smallest
        for layer, got in enumerate(figures["bootstrap_per_layer"]):
            values = [p[layer] for p, _ in boot if p[layer] is not None]
            assert got == (pytest.approx(math.fsum(values) / len(values), abs=1e-12) if values else None)
    capsys.readouterr()


def test_resample_weights_are_halves_then_seeded_draws():
    weights = resample_weights(7, 30, seed=5)
    assert weights[0].tolist() == [1, 0, 1, 0, 1, 0, 1] and weights[1].tolist() == [0, 1, 0, 1, 0, 1, 0]
    assert (weights[2:].sum(1) == 7).all() and (weights[2:] >= 0).all()
    assert len({tuple(w) for w in weights[2:].tolist()}) > 25  # resamples, not one draw repeated
    assert torch.equal(weights, resample_weights(7, 30, seed=5))
    assert not torch.equal(weights, resample_weights(7, 30, seed=6))


def test_the_estimated_change_follows_the_true_one():
    """Per-node signal plus noise: the choice from unlimited prompts is the k lowest signals, so the true
    share of the chosen rows that more prompts would change is known. The estimate is within a factor 2
    of it (seeded; on these scores it is within 15%), the choice is not called settled, and the prompts it
    says would settle it are more than were used. With (almost) no noise, the choice is settled."""
    generator = torch.Generator().manual_seed(4)
    layers, hidden, k, n = 4, 400, 40, 60
    signal = torch.randn(layers, hidden, generator=generator)
    limit = torch.zeros(layers, hidden, dtype=torch.bool)
    for layer in range(layers):
        limit[layer, signal[layer].argsort()[:k]] = True
    for noise, settled in ((1.0, False), (0.01, True)):
        true, estimated = [], []
        for seed in range(3):
            scores = signal + noise * torch.randn(n, layers, hidden, generator=generator)
            positions = _brute_fast(scores, k)
            chosen = torch.zeros(layers, hidden, dtype=torch.bool)
            for layer, rows in enumerate(positions):
                chosen[layer, rows] = True
            figures = measure(Scores(scores, (n, layers, hidden), False), positions, Fraction(10),
                              "layer_balanced", "signed", resamples=30, seed=seed)  # fmt: skip
            true.append(1 - float(overlaps(chosen, limit)[1]))
            estimated.append(figures.change)
            assert figures.settled is settled, (noise, figures.verdict())
        if settled:
            assert max(true) == 0 and max(estimated) < 0.01
        else:
            assert 0.5 < sum(estimated) / sum(true) < 2, (estimated, true)
            assert "prompts would bring that to the paper's level" in figures.verdict()


def _brute_fast(scores: torch.Tensor, k: int) -> list[list[int]]:
    """The layer-balanced signed choice (docs/method.md) on continuous scores, where no ties occur: the k
    nodes most often among a sample's k lowest, by a sort per sample (the test's sizes make the plain
    Python of test_selection slow)."""
    counts = (scores.argsort(-1).argsort(-1) < k).sum(0)
    sums = scores.double().sum(0)
    return [sorted(sorted(range(len(c)), key=lambda j, c=c, s=s: (-int(c[j]), float(s[j]), j))[:k])
            for c, s in zip(counts, sums, strict=True)]  # fmt: skip


def test_select_says_in_one_line_when_there_are_no_figures(tmp_path, capsys):
    """No per-sample scores: one line saying what gives them, the positions still written, the report's
    figures null with that reason. --resamples 0: nothing is read or said."""
    scores = torch.randn(6, 2, 40, generator=torch.Generator().manual_seed(5))
    path = _file(scores, tmp_path / "a.safetensors", keep_scores=False)
    report = _select(path, tmp_path, "--quota", "10")
    assert report["stability"] is None and report["stability_note"] == NO_SCORES
    out = capsys.readouterr().out
    assert out.count("stability") == 1 and NO_SCORES in out and "--save-scores" in NO_SCORES
    assert json.loads((tmp_path / "p.json").read_text()) == _brute(scores, Fraction(10), "layer_balanced")
    with_scores = _file(scores, tmp_path / "b.safetensors")
    report = _select(with_scores, tmp_path, "--quota", "10", "--resamples", "0")
    assert report["stability"] is None and "stability" not in capsys.readouterr().out.replace("report", "")
    report = _select(with_scores, tmp_path, "--quota", "10", "--strategy", "random")
    assert report["stability"] is None and "random rows" in report["stability_note"]


def test_stability_reads_the_scores_a_layer_at_a_time(tmp_path):
    """At 70B the scores are 7.5 GB: the figures read them from the file one layer ([N, D]) at a time,
    each once, and the selection itself still reads no scores for an integer quota. In a process of its
    own, so that its metering holds this run's pieces alone."""
    n, layers, hidden = 8, 3, 40
    path = _file(
        torch.randn(n, layers, hidden, generator=torch.Generator().manual_seed(6)), tmp_path / "a.st"
    )
    script = (
        "import json, sys\nfrom loki_dist.cli import main\nfrom loki_dist.core import metering\n"
        "main(sys.argv[1:])\nprint(json.dumps(metering.report()))"
    )
    argv = ["select", "--attribution", str(path), "--quota", "10", "--output", str(tmp_path / "p.json")]
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True, text=True, cwd=REPO,
                          timeout=120, check=True)  # fmt: skip
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["phases"]["select_stability"]["largest_read"] == n * hidden * 4
    assert report["phases"]["select_stability"]["read"] == n * layers * hidden * 4
    hist, sums = layers * hidden * 100 * 8, layers * hidden * 8 + 8
    assert report["totals"]["read"] == hist + sums + n * layers * hidden * 4


def test_bad_flags_fail_in_one_line_before_any_work(tmp_path, capsys):
    path = _file(torch.randn(4, 2, 40, generator=torch.Generator().manual_seed(7)), tmp_path / "a.st")
    out = tmp_path / "p.json"
    base = ["select", "--attribution", str(path), "--quota", "10", "--output", str(out)]
    assert_user_error([*base, "--resamples", "-1"], capsys, "--resamples -1: expected a count in [0, 10000]")
    assert_user_error([*base, "--resamples", "100000000"], capsys, "--resamples 100000000: expected a count")
    assert_user_error([*base, "--report", str(out)], capsys, "is also --output")
    assert_user_error([*base, "--report", str(path)], capsys, "would destroy that input")
    assert not out.exists() and path.stat().st_size > 0
