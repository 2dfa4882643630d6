"""`loki-dist forgetting`: the paper's formula against hand-computed values and its own tables."""

from __future__ import annotations

import json

import pytest
from conftest import assert_user_error

from loki_dist.evaluation.forgetting import Scores, forgetting_table

# docs/method.md's reference facts: paper Table 4 (Qwen2.5-0.5B-Instruct) and Table 2 (Llama-3.1-8B-Instruct)
TABLE4 = ("TriviaQA", "GSM8K", "HellaSwag", "WinoGrande", "HumanEval", "IFEval")
TABLE4_ROWS = {
    "base": [24.37, 39.65, 30.98, 44.20, 26.83, 33.39],
    "full FT": [4.65, 2.65, 0.00, 0.00, 0.00, 23.20],
    "DoRA": [19.30, 34.01, 22.21, 44.70, 25.22, 31.67],
    "LoKI q=30": [20.10, 37.60, 38.39, 43.96, 26.83, 32.25],
}
TABLE2_ROWS = {
    "base": [65.77, 84.46, 73.85, 62.98, 68.29, 79.76],
    "LoRA r=16": [64.63, 79.53, 46.81, 42.78, 60.37, 72.76],
    "LoKI q=10": [65.85, 84.99, 75.14, 61.33, 68.90, 77.54],
}


def _scores(values, names=TABLE4, lower=()) -> Scores:
    return Scores(dict(zip(names, values, strict=True)), frozenset(lower))


@pytest.mark.parametrize(
    "rows, expected",
    [(TABLE4_ROWS, {"full FT": 84.13, "DoRA": 12.23, "LoKI q=30": 0.46}),
     (TABLE2_ROWS, {"LoRA r=16": 16.11, "LoKI q=10": 0.34})],
)  # fmt: skip
def test_paper_rows(rows, expected):
    base, *tuned = rows
    table = forgetting_table(_scores(rows[base]), {k: _scores(rows[k]) for k in tuned})
    got = {row["model"]: row["forgetting"] for row in table["rows"][1:]}
    assert got == pytest.approx(expected, abs=0.01)
    assert table["rows"][0] == {"model": "base", "scores": _scores(rows[base]).values, "forgetting": 0.0}


def test_hand_computed_and_lower_is_better():
    base = _scores([50.0, 80.0, 10.0], ("a", "b", "ppl"), lower=("ppl",))
    tuned = _scores([40.0, 88.0, 12.0], ("a", "b", "ppl"))
    # a: (50-40)/50 = 0.2; b: (80-88)/80 = -0.1; ppl (lower is better): (12-10)/10 = 0.2 -> 100/3 * 0.3
    table = forgetting_table(base, {"t": tuned})
    assert table["rows"][1]["forgetting"] == pytest.approx(10.0)
    only = forgetting_table(base, {"t": tuned}, ["a"])
    assert only["benchmarks"] == ["a"] and only["rows"][1]["forgetting"] == pytest.approx(20.0)


def test_cli_merges_files_and_reads_evaluate_results(tmp_path, capsys):
    from loki_dist.cli import main

    def write(name, data):
        (tmp_path / name).write_text(json.dumps(data))
        return str(tmp_path / name)

    base = write("base.json", dict(zip(TABLE4[:3], TABLE4_ROWS["base"][:3], strict=True)))
    base_rest = write("base2.json", {"scores": dict(zip(TABLE4[3:], TABLE4_ROWS["base"][3:], strict=True))})
    dora = write("dora.json", dict(zip(TABLE4, TABLE4_ROWS["DoRA"], strict=True)))
    loki = write("loki.json", dict(zip(TABLE4, TABLE4_ROWS["LoKI q=30"], strict=True)))
    out = tmp_path / "table.json"
    main(["forgetting", "--base", f"{base},{base_rest}", "--tuned", dora, loki, "--output", str(out)])
    printed = capsys.readouterr().out
    assert "dora" in printed and "12.23%" in printed and "0.46%" in printed
    table = json.loads(out.read_text())
    assert [row["model"] for row in table["rows"]] == ["base", "dora", "loki"]
    # an evaluate results file: perplexity is lower-is-better
    ppl = write("ppl.json", {"scores": {"web": 10.0}, "lower_is_better": ["web"]})
    worse = write("worse.json", {"scores": {"web": 11.0}, "lower_is_better": ["web"]})
    main(["forgetting", "--base", ppl, "--tuned", worse, "--labels", "tuned"])
    assert "10.00%" in capsys.readouterr().out


def test_forgetting_user_errors(tmp_path, capsys):
    (tmp_path / "b.json").write_text(json.dumps({"x": 1.0, "y": 0.0}))
    (tmp_path / "t.json").write_text(json.dumps({"x": 1.0}))
    (tmp_path / "bad.json").write_text("{")
    b, t = str(tmp_path / "b.json"), str(tmp_path / "t.json")
    assert_user_error(["forgetting", "--base", b, "--tuned", t], capsys, "no score for benchmark(s) y")
    argv = ["forgetting", "--base", b, "--tuned", b, "--benchmarks", "y"]
    assert_user_error(argv, capsys, "score 0 for y")
    argv = ["forgetting", "--base", str(tmp_path / "bad.json"), "--tuned", t]
    assert_user_error(argv, capsys, "bad.json: not valid JSON (line 1")
    assert_user_error(["forgetting", "--base", f"{b},{t}", "--tuned", t], capsys, "appears in two files")
    assert_user_error(["forgetting", "--base", b, "--tuned", t, t], capsys, "names must differ")
