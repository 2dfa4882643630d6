"""Start-up: what a command imports before it answers (issue 24.4).

torch, transformers and DeepSpeed take a second or two to import on a quiet machine and tens of seconds
on a loaded one (`forgetting` on two JSON files took 48.8 s there). So `--help`, `forgetting` and a
mistake refused before any work must not import what they do not use, and `select` nothing of a
model's libraries. Counted, not timed: each command runs as a real process and reports, as it exits,
which of those libraries are in sys.modules.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO
from test_selection import _save, _scores, _tensors

HEAVY = ("torch", "transformers", "deepspeed")
MODEL_LIBRARIES = ("transformers", "deepspeed")
# `python -m loki_dist ARGS`, reporting at exit (after the command's own sys.exit) what it imported
PROBE = """
import atexit, json, runpy, sys
atexit.register(lambda: print("IMPORTED " + json.dumps(sorted(m for m in {heavy} if m in sys.modules))))
sys.argv = ["loki-dist", *sys.argv[1:]]
runpy.run_module("loki_dist", run_name="__main__")
"""


def imported(args: list[str], cwd=REPO, expect: int = 0) -> set[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-c", PROBE.format(heavy=HEAVY), *args]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=cwd)
    assert proc.returncode == expect, proc.stderr[-2000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("IMPORTED "))
    return set(json.loads(line.removeprefix("IMPORTED ")))


def test_each_command_imports_only_what_it_uses(tmp_path):
    """--help and forgetting: none of the three; select, refusals before any work and building every
    command's flags: no model library."""
    assert imported(["--help"]) == set()
    for name, score in (("base", 50.0), ("tuned", 45.0)):
        (tmp_path / f"{name}.json").write_text(json.dumps({"scores": {"mmlu": score}}))
    args = ["forgetting", "--base", str(tmp_path / "base.json"), "--tuned", str(tmp_path / "tuned.json")]
    assert imported(args) == set()
    assert imported(["forgetting", "--base", str(tmp_path / "none.json"), "--tuned", "x"], expect=2) == set()
    attribution = tmp_path / "attribution.safetensors"
    _save(_tensors(_scores()), attribution, {"model_type": "llama"})
    out = tmp_path / "p.json"
    select = ["select", "--attribution", str(attribution), "--quota", "10", "--output", str(out)]
    assert not imported(select) & set(MODEL_LIBRARIES)
    assert out.is_file()
    (tmp_path / "bad.yaml").write_text("model: m\nlearnin_rate: 0.1\n")
    refusals = [
        ["train", "--config", str(tmp_path / "bad.yaml")],  # a key that is no flag
        ["train", "--model", str(tmp_path / "none"), "--positions", "p", "--data", "d", "--output-dir", "o"],
        ["evaluate", "--model", str(tmp_path / "none"), "--data", "d", "--output", "o.json"],
        ["train", "--epochs", "many"],  # argparse's own
    ]
    for args in refusals:
        assert not imported(args, expect=2) & set(MODEL_LIBRARIES), args
    # every command's flags (its --help, its --config keys) come without transformers or DeepSpeed
    code = "import json, sys; from loki_dist.cli import build_parser; build_parser(); "
    code += "print(json.dumps([*sys.modules]))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert not set(json.loads(proc.stdout)) & set(MODEL_LIBRARIES)
    assert not imported(["train", "--help"]) & set(MODEL_LIBRARIES)
