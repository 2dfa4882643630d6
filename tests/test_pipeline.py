"""`loki-dist pipeline`: the stages from one YAML, skipped when current, rerun only where affected."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, assert_user_error, run_cli
from mmlu_fixture import write_mmlu
from test_training import make_data

from loki_dist.core.errors import UserError
from loki_dist.demo.tiny import save_tiny
from loki_dist.implant.trainer.stopping import DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE
from loki_dist.pipeline.run import StageEnded, run_stage


def _ran(stdout: str) -> list[str]:
    """Stages that ran (not skipped), in order."""
    return [
        line.split(":")[0].removeprefix("=== ")
        for line in stdout.splitlines()
        if line.startswith("=== ") and "skipped" not in line
    ]


def test_pipeline_runs_stops_resumes_skips_and_reruns_only_affected_stages(tmp_path):
    config = {
        "output_dir": str(tmp_path / "out"),
        "model": str(save_tiny(tmp_path / "base", "llama", seed=0)),
        "nproc": 1,
        "attribute": {"data": str(write_mmlu(tmp_path / "mmlu", per_subject=2)), "per_subject": 2},
        "select": {"quota": 25},
        "suppress": {"quota": 10, "which": "lowest", "rule": "magnitude"},  # the optional stage
        "train": {
            "data": str(make_data(tmp_path / "task.jsonl", n=8)),
            "ds_config": "none",
            "max_steps": 100,
            "micro_batch_size": 2,
            "save_steps": 4,
            "logging_steps": 50,
        },
    }
    path = tmp_path / "pipeline.yaml"
    out = Path(config["output_dir"])

    def run(changes: dict | None = None) -> tuple[list[str], str]:
        for section, values in (changes or {}).items():
            config[section].update(values)
        path.write_text(yaml.safe_dump(config))
        stdout = run_cli(["pipeline", "--config", str(path)], timeout=600).stdout
        return _ran(stdout), stdout

    # a stop signal to the pipeline reaches training: checkpoint, exit 75, and a rerun resumes it
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loki_dist", "pipeline", "--config", str(path)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (out / "train" / "checkpoint-4" / "trainer_state.json").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT_CODE and "stopped by signal" in log, log[-3000:]
    assert (
        _ran(log) == ["attribute", "select", "suppress", "train"] and not (out / "train" / "final").exists()
    )
    assert json.loads((out / "suppressed" / "suppression.json").read_text())["rule"] == "magnitude"
    ran, stdout = run()
    assert ran == ["train"] and "resumed from" in stdout
    assert (out / "train" / "final" / "implant.safetensors").is_file()
    record = json.loads((out / "positions.json.inputs.json").read_text())
    assert record["complete"] and str(out / "attribution.safetensors") in record["inputs"]["files"]

    assert run()[0] == []  # everything current
    assert run({"train": {"max_steps": 2}})[0] == ["train"]  # a train flag reruns train alone
    # quota 26 selects floor(26 * 32 / 100) = 8 rows, as 25 did: select reruns, its output is the same
    # file as before, and train, whose inputs are the files' contents, stays current
    assert run({"select": {"quota": 26}})[0] == ["select"]
    assert run({"select": {"quota": 50}})[0] == ["select", "train"]  # other rows: train reruns
    assert run({"suppress": {"which": "random"}})[0] == ["suppress"]  # replaces its output
    assert json.loads((out / "suppressed" / "suppression.json").read_text())["which"] == "random"
    assert len(json.loads((out / "positions.json").read_text())[0]) == 16  # 50% of hidden 32
    make_data(Path(config["train"]["data"]), n=8, seed=1)  # same file name, new content
    assert run()[0] == ["train"]


def test_pipeline_refuses_unknown_keys(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "x", "model": "m", "trian": {}}))
    assert_user_error(["pipeline", "--config", str(path)], capsys, "unknown keys ['trian']")


def test_example_configs_build_their_stages():
    from loki_dist.pipeline.stages import build_stages, load_config

    examples = sorted((REPO / "examples").glob("pipeline_*.yaml"))
    assert len(examples) >= 2
    for path in examples:
        stages = build_stages(load_config(str(path)))
        assert [s.name for s in stages] == ["attribute", "select", "train"]
        assert "--quota" in stages[1].argv and "--ds-config" in stages[2].argv


def test_a_diverged_train_stage_passes_its_exit_status_on():
    """train's status 3 (diverged: rerunning would diverge again) reaches the pipeline's caller as 3, not
    as the 2 of a failed stage; another stage's 3 is just a failure."""
    exits_3 = [sys.executable, "-c", "import sys; sys.exit(3)"]
    with pytest.raises(StageEnded) as ended:
        run_stage("train", [], launcher=exits_3)
    assert ended.value.code == DIVERGED_EXIT_CODE == 3 and "diverged" in str(ended.value)
    with pytest.raises(UserError, match="the select stage failed with exit status 3"):
        run_stage("select", [], launcher=exits_3)
