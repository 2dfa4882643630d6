"""A figure in README is the one its results file holds: quoted tables are the file's own lines, a
results file is what its JSON re-renders to, and the study's numbers quoted in prose are in its report.
Nothing here reruns a measurement; it catches a table edited by hand or left behind by a rerun."""

from __future__ import annotations

import json
import re

import pytest
from conftest import REPO

from loki_dist.demo import demo

README = (REPO / "README.md").read_text()
QUOTED = re.compile(r"from \[`(bench/[\w/.-]+\.md)`\]")


def _quoted_blocks() -> list[tuple[str, list[str]]]:
    """(results file, README lines quoted from it): the provenance line and the table's rows that follow
    a `from [`bench/X.md`]` reference, up to the next paragraph that is neither."""
    blocks, lines = [], README.splitlines()
    for index, line in enumerate(lines):
        for name in QUOTED.findall(line):
            quoted, following = [], iter(lines[index + 1 :])
            for text in following:
                if text.startswith(("Measured ", "|")):
                    quoted.append(text)
                elif text.strip() and quoted:
                    break
            blocks.append((name, quoted))
    return blocks


def test_readme_quotes_each_results_file_line_for_line():
    blocks = _quoted_blocks()
    tables = {"bench/demo_toy/results.md", "bench/demo_smollm2/results.md"}
    assert {name for name, _ in blocks} >= {*tables, "bench/demo_smollm2/one_seed/results.md"}
    for name, quoted in blocks:
        source = (REPO / name).read_text().splitlines()
        assert quoted[0].startswith("Measured "), name
        assert name not in tables or sum(q.startswith("| ") for q in quoted) >= 6, name
        for line in quoted:
            assert line in source, f"README quotes a line that {name} does not hold: {line[:80]}"


@pytest.mark.parametrize(
    ("folder", "seeds"), [("demo_toy", 3), ("demo_smollm2", 3), ("demo_smollm2/one_seed", 1)]
)
def test_demo_results_file_is_what_its_json_renders(folder, seeds):
    folder = REPO / "bench" / folder
    result = json.loads((folder / "results.json").read_text())
    assert result["settings"]["seeds"] == seeds and all(len(a["runs"]) in (1, seeds) for a in result["arms"])
    assert demo.markdown(result, "trade_off.png") == (folder / "results.md").read_text()
    assert (folder / "trade_off.png").stat().st_size > 10_000


def _pairs(text: str) -> list[tuple[str, str]]:
    return re.findall(r"(-?\d+\.\d+) ± (\d+\.\d+)", text)


def _rounds_to(exact: str, quoted: str) -> bool:
    """`quoted` is `exact` rounded to the digits `quoted` shows."""
    digits = len(quoted.split(".")[1])
    return abs(float(exact) - float(quoted)) <= 0.5 * 10**-digits + 1e-9


def test_study_figures_quoted_in_prose_are_in_its_report():
    section = README[README.index("### What the evidence says") : README.index("### Demo results")]
    report = _pairs((REPO / "bench" / "selection.md").read_text())
    quoted = _pairs(section)
    assert len(quoted) >= 6
    for mean, spread in quoted:
        assert any(_rounds_to(m, mean) and _rounds_to(s, spread) for m, s in report), (
            f"README's evidence section quotes {mean} ± {spread}, which no figure of bench/selection.md "
            "rounds to"
        )


def test_study_report_is_what_its_json_renders(tmp_path):
    import importlib
    import shutil
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    bench = importlib.import_module("bench_selection")
    shutil.copy(REPO / "bench" / "selection.json", tmp_path / "selection.json")
    bench.main(["--report-from", str(tmp_path / "selection.json")])
    assert (tmp_path / "selection.md").read_text() == (REPO / "bench" / "selection.md").read_text()
