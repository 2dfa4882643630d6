"""bench/bench_selection.py (the selection study, issues 15, 25, 28) cannot rot: its --tiny run goes through
every part of the real study's code (attribute as a subprocess, for the arms and for the stability pool,
selection under both rules, rows through implant_rows and merge_rows, LoRA, full fine-tuning, every rate
of each grid with every seed, the measures, the fronts, the stability curve, the report) on a tiny model,
and what it writes is checked against properties the study relies on, not only for existence; the fronts'
comparison is also checked on fronts with a known answer."""

from __future__ import annotations

import importlib
import json
import math
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_selection import _brute

sys.path.insert(0, str(REPO / "bench"))
bench = importlib.import_module("bench_selection")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("selection")
    threads = torch.get_num_threads()
    try:
        result = bench.run_study(
            bench.parse_args(["--tiny", "--out", str(out), "--cache-dir", str(out / "cache"), "--seeds", "2"])
        )
    finally:
        torch.set_num_threads(threads)
    return out, result


def test_report_json_and_plot_are_written_and_agree(study):
    out, result = study
    saved = json.loads((out / "selection.json").read_text())
    assert [a["name"] for a in saved["arms"]] == [a["name"] for a in result["arms"]]
    assert len(saved["arms"]) == len(bench.ARMS) == 10
    for name in ("selection.png", "selection_stability.png"):
        assert (out / name).stat().st_size > 10_000
    text = (out / "selection.md").read_text()
    assert "Measured " in text and "at commit " in text
    assert "![fronts](selection.png)" in text and "![stability](selection_stability.png)" in text
    fronts, equal_skill = text.split("## At equal skill")
    rows = fronts.split("## Fronts")[1].splitlines()
    for arm in saved["arms"]:
        assert [r["lr"] for r in arm["rates"]] == sorted(bench.TINY_LRS[arm["kind"]])
        for rate in arm["rates"]:  # every rate of the grid, every seed, each measured
            assert [r["seed"] for r in rate["runs"]] == [0, 1] and all(
                r["lr"] == rate["lr"] for r in rate["runs"]
            )
            row = next(line for line in rows if line.startswith(f"| {arm['name']} | {rate['lr']:g} |"))
            assert _mean_sd([r["measures"]["prose_perplexity"] for r in rate["runs"]]) in row
        assert arm["runs"] == next(r["runs"] for r in arm["rates"] if r["lr"] == arm["lr"])
        row = next(line for line in equal_skill.splitlines() if line.startswith(f"| {arm['name']} |"))
        assert _mean_sd([r["measures"]["prose_perplexity"] for r in arm["runs"]]) in row
        assert f"| {arm['lr']:g} |" in row
        for run in arm["runs"]:
            m = run["measures"]
            assert 0 <= m["probes_kept"] <= 1 and m["prose_perplexity"] > 1 and m["mmlu_gold_logprob"] < 0
    assert saved["base"]["probes_kept"] == 1.0  # only the probes the base gets right are kept
    assert saved["probes_kept_by_base"] > 0
    # re-rendered from the JSON alone, the report is the run's own, word for word
    (out / "copy").mkdir()
    (out / "copy" / "selection.json").write_text(json.dumps(saved))
    bench.main(["--report-from", str(out / "copy" / "selection.json")])
    assert (out / "copy" / "selection.md").read_text() == text


def _mean_sd(values: list[float]) -> str:
    """Two seeds' mean ± sample sd, as the tables print them (computed here from the JSON's raw numbers)."""
    mean, spread = sum(values) / 2, abs(values[0] - values[1]) / math.sqrt(2)
    return f"{mean:.3f} ± {spread:.3f}"


def _all_runs(arm: dict) -> list[dict]:
    return [run for rate in arm["rates"] for run in rate["runs"]]


def test_rows_arms_leave_every_other_tensor_bit_identical(study):
    _, result = study
    rows_kinds = ("rows", "lowrank")  # LoKI*'s merged update lies in its rows too
    rows_runs = [r for a in result["arms"] if a["kind"] in rows_kinds for r in _all_runs(a)]
    assert len(rows_runs) == 8 * 2 * 2  # arms x rates x seeds
    assert all(r["frozen_moved"] == 0 for r in rows_runs)
    others = [r for a in result["arms"] if a["kind"] not in rows_kinds for r in _all_runs(a)]
    assert all(r["frozen_moved"] is None for r in others)


def test_arms_select_what_they_claim(study):
    out, result = study
    tensors, _ = bench.strategies.load_attribution(result["attribution"])
    by_name = {a.name: a for a in bench.ARMS}
    loki = bench.positions_for(by_name["LoKI q=10"], tensors, 0)
    draws = [bench.positions_for(by_name["random rows q=10"], tensors, seed) for seed in range(2)]
    for draw in draws:
        assert [len(r) for r in draw] == [len(r) for r in loki] == [4, 4]  # 10% of hidden 40, per layer
    assert draws[0] != draws[1]  # a new draw per seed
    for quota in (10, 25):  # by |score|: each prompt's k lowest |score|, counted (test_selection's reading)
        magnitude = bench.positions_for(by_name[f"LoKI magnitude q={quota}"], tensors, 0)
        assert magnitude == _brute(tensors["scores"], Fraction(quota), "layer_balanced", "magnitude")
    assert bench.positions_for(by_name["LoKI magnitude q=10"], tensors, 0) != loki
    highest = bench.positions_for(by_name["KVA highest q=10"], tensors, 0)
    assert [len(r) for r in highest] == [4, 4] and highest != loki
    assert sum(map(len, bench.positions_for(by_name["global lowest q=10"], tensors, 0))) == 8
    arms = {a["name"]: a for a in result["arms"]}
    assert arms["LoKI q=10"]["runs"][0]["trainable"] == 2 * 4 * 64  # layers x rows x intermediate
    assert arms["LoKI q=25"]["runs"][0]["trainable"] == 2 * 10 * 64
    assert arms["LoKI* q=30 r=8"]["runs"][0]["trainable"] == 2 * 8 * (12 + 64)  # layers x r x (k + F)
    lora = next(a for a in result["arms"] if a["kind"] == "lora")
    assert lora["name"] == f"LoRA down_proj r={result['lora_rank']}"
    assert lora["runs"][0]["trainable"] == result["lora_rank"] * 2 * (40 + 64)


def test_runs_stop_at_the_target_or_the_cap_and_the_table_takes_the_fastest_rate(study):
    _, result = study
    sizes = result["sizes"]
    runs = [r for a in result["arms"] for r in _all_runs(a)]
    for run in runs:
        accuracies = [acc for _, acc in run["curve"]]
        assert run["curve"][-1][0] == run["steps"]
        assert all(acc < sizes["target"] for acc in accuracies[:-1])  # it never ran past the target
        assert run["reached"] == (run["stopped"] == "target") == (accuracies[-1] >= sizes["target"])
        if run["stopped"] == "cap":
            assert run["steps"] == sizes["cap"]
    assert any(r["reached"] and r["steps"] > 0 for r in runs)  # the equal-skill stop did trigger
    for arm in result["arms"]:  # every seed at the target, fewest mean steps; else the best mean skill
        rates = arm["rates"]
        all_reached = [r for r in rates if all(run["reached"] for run in r["runs"])]
        steps = {r["lr"]: sum(run["steps"] for run in r["runs"]) for r in rates}
        skill = {r["lr"]: sum(run["held_out_accuracy"] for run in r["runs"]) for r in rates}
        if all_reached:
            assert arm["lr"] == min((steps[r["lr"]], r["lr"]) for r in all_reached)[1]
        else:
            assert arm["lr"] == min((-skill[r["lr"]], r["lr"]) for r in rates)[1]


def test_layer_balanced_highest_matches_a_brute_force_reading():
    """The arm's selection: per layer, the k rows most often among a sample's k highest scores (ties:
    higher score sum, then lower index)."""
    from loki_dist.attribution.stats import Stats
    from loki_dist.selection.strategies import layer_balanced

    n, layers, hidden, k = 6, 2, 20, 4
    scores = torch.randint(-3, 4, (n, layers, hidden), generator=torch.Generator().manual_seed(1)).float()
    stats = Stats(layers, hidden, True, capacity=n)
    stats.add(scores.double())
    picked = layer_balanced(stats.tensors(), Fraction(k * 100, hidden), highest=True)
    expected = []
    for layer in range(layers):
        count, total = [0] * hidden, [0.0] * hidden
        for sample in scores[:, layer].tolist():
            for j in sorted(range(hidden), key=lambda j: (-sample[j], j))[:k]:
                count[j] += 1
            for j in range(hidden):
                total[j] += sample[j]
        expected.append(sorted(sorted(range(hidden), key=lambda j: (-count[j], -total[j], j))[:k]))
    assert picked == expected


# ------------------------------------------------------------------------------------------------ fronts


def _arm(name: str, points: list[tuple[float, list[float], list[float]]]) -> dict:
    """An arm's result with rates given as (lr, held-out accuracies per seed, perplexities per seed)."""
    rates = [{"lr": lr, "runs": [{"held_out_accuracy": x / 100, "measures": {"prose_perplexity": y}}
                                 for x, y in zip(xs, ys, strict=True)]} for lr, xs, ys in points]  # fmt: skip
    return {"name": name, "kind": "rows", "rates": rates}


def test_fronts_compare_as_defined_on_known_fronts():
    """Perplexity (lower is better) fronts with a known answer: one dominates another everywhere both
    reach; two cross between two skill levels; a difference within the seeds' spread is said to be so;
    only the arm that reaches further is said to."""
    fronts = importlib.import_module("selection_fronts")

    def compare(a: dict, b: dict):
        points = [fronts.points(arm, "prose_perplexity", 1) for arm in (a, b)]
        return fronts.compare(*points, "prose_perplexity")

    low = _arm("A", [(1e-3, [50, 50], [10, 10]), (1e-2, [80, 80], [20, 20]), (3e-2, [95, 95], [30, 30])])
    high = _arm("B", [(1e-3, [50, 50], [12, 12]), (1e-2, [80, 80], [25, 25])])
    c = compare(low, high)
    assert c.levels == [50.0, 80.0] and fronts.relation(c) == ">"
    assert fronts.relation(compare(high, low)) == "<"
    said = fronts.sentence("A", "B", c)
    assert "A's front dominates B's at every skill both reach (up to 80.0%" in said
    assert (
        "beyond the seeds' spread at 2 of 2 levels" in said
        and "only A reaches above 80.0% (up to 95.0%)" in said
    )
    # a front is the best retention among the rates of at least that skill: A's slow rate keeps least
    crossing = _arm("A", [(1e-3, [50, 50], [10, 10]), (1e-2, [90, 90], [40, 40])])
    other = _arm("B", [(1e-3, [50, 50], [15, 15]), (1e-2, [90, 90], [30, 30])])
    c = compare(crossing, other)
    assert fronts.relation(c) == "x" and c.margins == [5.0, -10.0]
    assert "A better up to 50.0%, B better at 90.0%" in fronts.sentence("A", "B", c)
    noisy = _arm(
        "B", [(1e-3, [50, 50], [9, 13]), (1e-2, [80, 80], [21, 23])]
    )  # means 11 and 22, sds 2.8, 1.4
    assert compare(low, noisy).beyond == [False, True]


def test_the_fronts_matrix_follows_the_numbers(study):
    """Every cell of the report's perplexity matrix, recomputed here from the JSON's raw numbers: each
    front is the lowest mean perplexity among the rates of at least a given mean skill."""
    out, result = study
    text = (out / "selection.md").read_text()
    block = text.split("Fronts by prose ppl")[1].split("\n\n")[1].splitlines()[2:]
    names = [a["name"] for a in result["arms"]]

    def means(arm: dict) -> list[tuple[float, float]]:
        return [(sum(100 * r["held_out_accuracy"] for r in rate["runs"]) / len(rate["runs"]),
                 sum(r["measures"]["prose_perplexity"] for r in rate["runs"]) / len(rate["runs"]))
                for rate in arm["rates"]]  # fmt: skip

    for row, a in zip(block, result["arms"], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        for cell, b in zip(cells, result["arms"], strict=True):
            if a is b:
                continue
            pa, pb = means(a), means(b)
            top = min(max(x for x, _ in pa), max(x for x, _ in pb))
            signs = set()
            for level in {x for x, _ in pa + pb if x <= top}:
                fa = min(y for x, y in pa if x >= level)
                fb = min(y for x, y in pb if x >= level)
                signs.add((fb > fa) - (fb < fa))
            expected = "=" if signs <= {0} else ">" if signs <= {0, 1} else "<" if signs <= {0, -1} else "x"
            assert cell == expected, (a["name"], b["name"])
    assert len(names) == len(block)


# ----------------------------------------------------------------------------------------- stability


def test_the_stability_curve_is_measured_on_the_retention_free_pool(study):
    """The pool is toyworld's general questions that no measure reads (16 of 24); the curve's sizes stay
    below it; the arms' choice kept of the pool's what the two files' selections share; the report says
    select's verdicts."""
    from loki_dist.selection import strategies

    out, result = study
    stab = result["stability"]
    assert stab["pool_size"] == 16 and stab["arms_prompts"] == 12 and stab["sizes"] == [4, 8]
    assert [(c["rule"], c["quota"]) for c in stab["curves"]] == [
        (rule, q) for rule in ("signed", "magnitude") for q in (10, 25)
    ]
    arms, _ = strategies.load_attribution(result["attribution"])
    pool_file = next(
        p for p in (out / "cache").glob("attribution_*.safetensors") if p != Path(result["attribution"])
    )
    pool, _ = strategies.load_attribution(str(pool_file))
    assert int(pool["num_samples"]) == 16
    text = (out / "selection.md").read_text()
    for c in stab["curves"]:
        a, p = (
            strategies.select(t, Fraction(c["quota"]), "layer_balanced", rule=c["rule"]) for t in (arms, pool)
        )
        shared = sum(len(set(x) & set(y)) for x, y in zip(a, p, strict=True))
        assert c["arms_kept_of_pool"] == shared / sum(map(len, p))
        for d in (*c["nested"], *c["disjoint"]):
            assert 0 <= d["min"] <= d["mean"] <= d["max"] <= 1
        assert [d["n"] for d in c["disjoint"]] == [4, 8]
        assert c["select_arms"]["verdict"] in text


def test_prompts_that_agree_give_a_flat_curve_at_one(tmp_path):
    """Known answer: when every prompt scores the rows alike, every subset chooses the same rows, so the
    nested and disjoint overlaps are 1 at every size and select calls both files' choices settled."""
    from loki_dist.attribution.stats import Stats
    from loki_dist.core.files import save_tensors

    curve = importlib.import_module("selection_stability").curve
    one = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    paths = []
    for n in (20, 9):
        stats = Stats(3, 40, True, capacity=n)
        stats.add(one.expand(n, 3, 40).double())
        tensors = {k: v.long() if k.endswith("_hist") else v for k, v in stats.tensors().items()}
        paths.append(save_tensors(tmp_path / f"a{n}.safetensors", tensors))
    stab = curve(paths[0], paths[1], draws=2)
    assert stab["sizes"] == [4, 8, 10, 16]
    for c in stab["curves"]:
        assert all(d["min"] == 1.0 for d in (*c["nested"], *c["disjoint"]))
        assert c["arms_kept_of_pool"] == 1.0 and c["select_arms"]["settled"] and c["select_pool"]["settled"]


def test_a_study_continues_from_its_run_log_only_under_the_same_settings(study, tmp_path, capsys):
    """The study takes hours: a sitting that stops keeps its runs (runs.json), the next measures only
    what is missing. A run planted in the log is taken as it is under the same settings, and dropped
    when a setting changes (here the seeds)."""
    out, result = study
    log = json.loads((out / "runs.json").read_text())
    assert len(log["runs"]) == sum(len(r["runs"]) for a in result["arms"] for r in a["rates"])
    key = next(iter(log["runs"]))
    log["runs"][key]["held_out_accuracy"] = 12.345  # no run measures this: it can only come from the log
    del log["runs"][next(k for k in log["runs"] if k.startswith("full fine-tuning"))]  # one run missing
    (tmp_path / "runs.json").write_text(json.dumps(log))  # a sitting of its own (the module's study stays)
    threads, cache, out = torch.get_num_threads(), str(out / "cache"), tmp_path
    try:
        again = bench.run_study(
            bench.parse_args(["--tiny", "--out", str(out), "--cache-dir", cache, "--seeds", "2"])
        )
        printed = capsys.readouterr().out
        assert (
            f"{len(log['runs'])} runs reused" in printed
            and "--- 1 runs" in printed
            and "--- 2 runs" not in printed
        )
        runs = [run for a in again["arms"] for r in a["rates"] for run in r["runs"]]
        assert sum(run["held_out_accuracy"] == 12.345 for run in runs) == 1
        other = bench.run_study(
            bench.parse_args(["--tiny", "--out", str(out), "--cache-dir", cache, "--seeds", "1"])
        )
        assert "other settings: starting over" in capsys.readouterr().out
        assert all(
            run["held_out_accuracy"] != 12.345 for a in other["arms"] for r in a["rates"] for run in r["runs"]
        )
    finally:
        torch.set_num_threads(threads)
