"""bench/bench_selection.py (the selection study, issue 15) cannot rot: its --tiny run goes through every
part of the real study's code (attribute as a subprocess, selection, rows through implant_rows and
merge_rows, LoRA, full fine-tuning, the rate sweep, the measures, the report) on a tiny model, and what it
writes is checked against properties the study relies on, not only for existence."""

from __future__ import annotations

import importlib
import json
import math
import sys
from fractions import Fraction

import pytest
import torch
from conftest import REPO

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
    assert len(saved["arms"]) == len(bench.ARMS)
    assert (out / "selection.png").stat().st_size > 10_000
    text = (out / "selection.md").read_text()
    assert "Measured " in text and "at commit " in text and "![trade-off](selection.png)" in text
    for arm in saved["arms"]:
        assert len(arm["runs"]) == 2 and [r["seed"] for r in arm["runs"]] == [0, 1]
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm['name']} |"))
        ppl = [r["measures"]["prose_perplexity"] for r in arm["runs"]]
        mean, spread = sum(ppl) / 2, abs(ppl[0] - ppl[1]) / math.sqrt(2)
        assert f"{mean:.3f} ± {spread:.3f}" in row  # the table is the JSON's raw numbers, summarised
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


def test_rows_arms_leave_every_other_tensor_bit_identical(study):
    _, result = study
    rows_kinds = ("rows", "lowrank")  # LoKI*'s merged update lies in its rows too
    rows_runs = [r for a in result["arms"] if a["kind"] in rows_kinds for r in [*a["runs"], *a["sweep"]]]
    assert len(rows_runs) >= 10 and any(a["kind"] == "lowrank" for a in result["arms"])
    assert all(r["frozen_moved"] == 0 for r in rows_runs)
    others = [r for a in result["arms"] if a["kind"] not in rows_kinds for r in a["runs"]]
    assert all(r["frozen_moved"] is None for r in others)


def test_arms_select_what_they_claim(study):
    out, result = study
    tensors, _ = bench.selection.load_attribution(result["attribution"])
    by_name = {a.name: a for a in bench.ARMS}
    loki = bench.positions_for(by_name["LoKI q=10"], tensors, 0)
    draws = [bench.positions_for(by_name["random rows q=10"], tensors, seed) for seed in range(2)]
    for draw in draws:
        assert [len(r) for r in draw] == [len(r) for r in loki] == [4, 4]  # 10% of hidden 40, per layer
    assert draws[0] != draws[1]  # a new draw per seed
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


def test_runs_stop_at_the_target_or_the_cap_and_the_sweep_picks_the_fastest(study):
    _, result = study
    sizes = result["sizes"]
    runs = [r for a in result["arms"] for r in [*a["runs"], *a["sweep"]]]
    for run in runs:
        accuracies = [acc for _, acc in run["curve"]]
        assert run["curve"][-1][0] == run["steps"]
        assert all(acc < sizes["target"] for acc in accuracies[:-1])  # it never ran past the target
        assert run["reached"] == (run["stopped"] == "target") == (accuracies[-1] >= sizes["target"])
        if run["stopped"] == "cap":
            assert run["steps"] == sizes["cap"]
    assert any(r["reached"] and r["steps"] > 0 for r in runs)  # the equal-skill stop did trigger
    for arm in result["arms"]:
        reached = [r for r in arm["sweep"] if r["reached"]]
        if reached:
            best = min(reached, key=lambda r: (r["steps"], r["lr"]))
            assert arm["lr"] == best["lr"] and arm["runs"][0] == {
                **best,
                "measures": arm["runs"][0]["measures"],
            }
            assert all(r["steps"] <= best["steps"] for r in arm["sweep"] if r["stopped"] == "beaten")
        assert all(r["lr"] == arm["lr"] for r in arm["runs"])


def test_layer_balanced_highest_matches_a_brute_force_reading():
    """The arm's selection: per layer, the k rows most often among a sample's k highest scores (ties:
    higher score sum, then lower index)."""
    from loki_dist.attribution.stats import Stats
    from loki_dist.selection import layer_balanced

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
