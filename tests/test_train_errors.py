"""Bad input to `loki-dist train`: one clear line, exit status 2, before any work, nothing overwritten."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
from conftest import assert_user_error, loki_dist_traceback, run_cli

from loki_dist.demo.tiny import save_tiny


def snapshot(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    base = save_tiny(root / "base", "llama", seed=0)
    good_positions = root / "positions.json"
    good_positions.write_text(json.dumps([[0, 1], [2]]))
    data = root / "data.json"
    data.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 4))
    bert = root / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(
        json.dumps({"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 32})
    )
    finished = root / "finished_run"
    (finished / "final").mkdir(parents=True)
    (finished / "final" / "model.safetensors").write_bytes(b"weights of a finished run")
    (finished / "checkpoint-3").mkdir()
    (finished / "checkpoint-3" / "trainer_state.json").write_text("{}")
    return {
        "root": root,
        "base": base,
        "positions": good_positions,
        "data": data,
        "bert": bert,
        "finished": finished,
    }


def write(root: Path, name: str, content) -> Path:
    path = root / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


CASES = {
    "positions with the wrong number of layers": (
        {"positions": [[0]]},
        "has 1 layer lists but the model has 2 layers",
    ),
    "an index >= D": ({"positions": [[0], [32]]}, "index 32, outside [0, 32)"),
    "a duplicate index": ({"positions": [[0, 5, 5], []]}, "lists index 5 more than once"),
    "an unsupported model type": (
        {"model": "bert"},
        "model type 'bert' is not supported; supported model types",
    ),
    "an empty data set": ({"data": ""}, "the data set is empty"),
    "a conversation with no assistant turn": (
        {"data": [{"messages": [{"role": "user", "content": "hello"}]}]},
        "row 0 has no assistant turn",
    ),
    "a missing file": ({"data": None}, "file or directory not found"),
    "an output directory holding a finished run": ({"out": "finished"}, "already holds a finished run"),
    "a ZeRO stage that is not a number": (
        {"ds": {"zero_optimization": {"stage": "abc"}}},
        'zero_optimization.stage "abc": expected 0, 1, 2 or 3',
    ),
    "a ZeRO stage out of range": ({"ds": {"zero_optimization": {"stage": 4}}}, "stage 4: expected 0, 1, 2"),
    "a DeepSpeed config that is not an object": ({"ds": [1, 2]}, "expected a JSON object of DeepSpeed"),
    # values of the wrong type: each a traceback once (after the process group formed, or in the sampler)
    "bf16 as a switch": ({"ds": {"bf16": True}}, 'bf16 true: expected an object such as {"enabled": "auto"}'),
    "a batch size as a string": (
        {"ds": {"train_micro_batch_size_per_gpu": "4"}},
        'train_micro_batch_size_per_gpu "4": expected a positive integer or "auto"',
    ),
    "zero_optimization as a number": (
        {"ds": {"zero_optimization": 3}},
        'zero_optimization 3: expected an object such as {"stage": 3}',
    ),
    "fractional accumulation steps": (
        {"ds": {"gradient_accumulation_steps": 2.5}},
        'gradient_accumulation_steps 2.5: expected a positive integer or "auto"',
    ),
    "a setting only DeepSpeed reads": (
        {"ds": {"zero_optimization": {"stage": 3, "offload_param": {"device": "gpu"}}}},
        "zero_optimization.offload_param.device \"gpu\": Input should be 'none', 'cpu' or 'nvme'",
    ),
    "a section only DeepSpeed reads, not an object": (
        {"ds": {"zero_optimization": {"stage": 2}, "activation_checkpointing": 3}},
        "activation_checkpointing 3: DeepSpeed cannot read it",
    ),
    "a train_batch_size that is not the product": (
        {"ds": {"train_batch_size": 64}},
        "train_batch_size 64 is not --micro-batch-size 1 x --gradient-accumulation 1 x 1 ranks = 1",
    ),
    "fp16, which train does not run": (
        {"ds": {"fp16": {"enabled": True}}},
        "fp16.enabled true: loki-dist train runs in bf16 or fp32 (--precision)",
    ),
    "steps_per_print 0": ({"ds": {"steps_per_print": 0}}, "steps_per_print 0: expected a positive integer"),
    "a DeepSpeed optimizer section": (
        {"ds": {"zero_optimization": {"stage": 3}, "optimizer": {"type": "AdamW"}}},
        "its `optimizer` section would be ignored",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_line(case, inputs, tmp_path, capsys):
    change, expected = CASES[case]
    model = inputs["bert"] if change.get("model") == "bert" else inputs["base"]
    positions = (
        write(tmp_path, "p.json", change["positions"]) if "positions" in change else inputs["positions"]
    )
    if "data" in change:
        data = (
            tmp_path / "missing.json" if change["data"] is None else write(tmp_path, "d.json", change["data"])
        )
    else:
        data = inputs["data"]
    out = inputs["finished"] if change.get("out") == "finished" else tmp_path / "out"
    out.mkdir(exist_ok=True)
    (out / "precious.txt").write_text("user file")
    before = snapshot(out)
    ds_config = write(tmp_path, "ds.json", change["ds"]) if "ds" in change else "none"
    argv = ["train", "--model", str(model), "--positions", str(positions), "--data", str(data),
            "--output-dir", str(out), "--ds-config", str(ds_config), "--max-steps", "1"]  # fmt: skip
    assert_user_error(argv, capsys, expected)
    assert snapshot(out) == before, "the output directory changed"


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"loki-dist {command}: error: ")]


def assert_clean_failure(proc, meter_dir: Path, ranks: int = 2, status: int = 2) -> None:
    """Every rank exited with `status` after leaving the process group; for a user error (2), no
    traceback came from loki_dist.

    torchrun lists the exit status of each child it saw fail (`exitcode : N`); a child it stopped
    because a peer had failed first is not listed. Each rank writes its metering report in
    distributed.shutdown, so one report per rank shows that every rank went through it.
    """
    assert proc.returncode != 0
    codes = [int(code) for code in re.findall(r"exitcode\s*:\s*(-?\d+)", proc.stderr)]
    assert codes and set(codes) == {status}, proc.stderr
    assert sorted(p.name for p in meter_dir.iterdir()) == [f"rank{r}.json" for r in range(ranks)]
    # torchrun itself reports a failed child with a traceback of its own; none may come from loki_dist
    assert loki_dist_traceback(proc.stderr) == (status != 2), proc.stderr


def test_same_mistake_on_every_rank_is_said_once(inputs, tmp_path):
    bad = write(tmp_path, "p.json", [[0], [99]])
    argv = ["train", "--model", str(inputs["base"]), "--positions", str(bad), "--data", str(inputs["data"]),
            "--output-dir", str(tmp_path / "out")]  # fmt: skip
    meter = tmp_path / "meter"
    proc = run_cli(argv, nproc=2, check=False, env={"LOKI_DIST_METER": str(meter)}, timeout=180)
    lines = error_lines(proc.stderr, "train")
    assert len(lines) == 1 and "index 99" in lines[0], proc.stderr  # said once,
    assert lines[0].startswith("loki-dist train: error: --positions "), lines  # with no rank prefix
    assert_clean_failure(proc, meter)
    assert not (tmp_path / "out").exists()


def test_agreed_errors_name_the_ranks_they_concern():
    from loki_dist.core.errors import RankErrors

    same = {rank: ("user", "--data d: bad") for rank in range(4)}
    assert RankErrors(same, 4).lines() == ["--data d: bad"]
    assert RankErrors({r: same[r] for r in (1, 2)}, 4).lines() == ["ranks 1-2: --data d: bad"]
    mixed = {0: ("user", "A"), 1: ("user", "A"), 2: ("user", "B"), 3: ("user", "A"), 5: ("user", "A")}
    assert RankErrors(mixed, 6).lines() == ["ranks 0-1,3,5: A", "rank 2: B"]
    crashed = RankErrors({0: ("crash", "ValueError: x"), 1: ("user", "A")}, 3)
    assert crashed.lines() == ["rank 0: crashed (ValueError: x; traceback above)", "rank 1: A"]
    assert crashed.crashed and not RankErrors(mixed, 6).crashed
