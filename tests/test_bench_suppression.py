"""bench/bench_suppression.py's code path on a tiny model: every arm made by `loki-dist suppress`, measured,
and reported; the report is what its JSON says."""

from __future__ import annotations

import json
import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))

import bench_suppression as bench  # noqa: E402


def test_tiny_suppression_study_reports_every_arm(tmp_path):
    report = tmp_path / "suppression.md"
    bench.main(["--tiny", "--out", str(tmp_path / "work"), "--cache-dir", str(tmp_path / "cache"),
                "--markdown", str(report), "--quotas", "25"])  # fmt: skip
    results = json.loads(report.with_suffix(".json").read_text())
    text = report.read_text()
    assert list(results["quotas"]) == ["25"]
    for quota in results["quotas"].values():
        assert set(quota) == {label for label, _, _ in bench.ARMS} | {"random rows"}
        assert len(quota["random rows"]) == bench.DRAWS
        for label, _, _ in bench.ARMS:
            assert f"| {label} | " in text
            assert bench._cells(quota[label]) in text
    # a copy is the base with rows zeroed: its measures differ from the base's
    lowest = results["quotas"]["25"][bench.ARMS[0][0]]
    assert lowest["prose_perplexity"] != results["base"]["prose_perplexity"]
