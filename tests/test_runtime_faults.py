"""`loki-dist train` when things go wrong at run time: a second run into the same directory, a diverging
run, a damaged checkpoint, a peer rank that dies or hangs. Real processes and files throughout; each run
is a tiny model for a few steps (the long runs are killed as soon as they have shown what is tested)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, assert_user_error, cli_command, free_port, loki_dist_traceback, run_cli
from safetensors.torch import load_file

from loki_dist.implant.artifacts.checkpoint import INDEX_FILE, shard_name
from loki_dist.implant.trainer.runlock import LOCK_NAME
from loki_dist.implant.trainer.stopping import DIVERGED_EXIT_CODE, STACKS_SIGNAL

POSITIONS = [[0, 3, 5], [1, 2]]
# ever larger weight decay blows the trained rows up: the first makes them overflow a few steps in (the
# loss turns NaN), the second within one step (the rows are Inf before the loss could show it)
BLOW_UP_SLOWLY = ["--learning-rate", "1e-3", "--weight-decay", "1e20", "--warmup-ratio", "0"]
# the decay factor 1 - lr * wd = -1e39 is beyond float32: the rows are inf after the first update
BLOW_UP_AT_ONCE = ["--learning-rate", "10", "--weight-decay", "1e38", "--warmup-ratio", "0"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("faults")
    positions = root / "positions.json"
    positions.write_text(json.dumps(POSITIONS))
    data = root / "data.jsonl"
    rows = [{"instruction": f"What is {a} plus {b}?", "input": "", "output": f"{a + b}"}
            for a in range(6) for b in range(4)]  # fmt: skip
    data.write_text("\n".join(json.dumps(r) for r in rows))
    return {"root": root, "base": tiny_llama, "positions": positions, "data": data}


def train_args(inputs, out: Path, *extra: str) -> list[str]:
    return ["train", "--model", str(inputs["base"]), "--positions", str(inputs["positions"]),
            "--data", str(inputs["data"]), "--output-dir", str(out), *extra]  # fmt: skip


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`loki-dist ARGS` in the background, its output going to `log` (a pipe nobody reads would fill)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with log.open("w") as handle:
        return subprocess.Popen(cli_command(args), cwd=REPO, env=full_env, stdout=handle, stderr=handle)


def wait_for(path: Path, *procs: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert all(p.poll() is None for p in procs), f"a run ended before {path} appeared"
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("loki-dist train: error: ")]


def all_finite(checkpoint: Path) -> bool:
    return all(
        bool(torch.isfinite(t).all()) for s in checkpoint.glob("rows-*") for t in load_file(s).values()
    )


# ------------------------------------------------------------------------------------------ the run lock


def test_second_run_into_one_directory_is_refused_and_a_killed_runs_lock_is_not(inputs, tmp_path):
    out = tmp_path / "out"
    first_args = train_args(inputs, out, "--ds-config", "none", "--max-steps", "100000", "--save-steps", "0")
    first = start(first_args, tmp_path / "first.log")
    try:
        wait_for(out / LOCK_NAME, first)
        second = run_cli(train_args(inputs, out, "--ds-config", "none", "--max-steps", "2"), check=False)
        assert first.poll() is None, "the first run ended before the second was refused"
        assert second.returncode == 2, second.stderr
        lines = error_lines(second.stderr)
        assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"another loki-dist train is running into it (pid {first.pid} on " in lines[0], lines
    finally:
        first.kill()  # SIGKILL: the lock stays behind
        first.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == first.pid
    assert not (out / "final").exists()
    third = run_cli(train_args(inputs, out, "--ds-config", "none", "--max-steps", "2", "--overwrite"))
    assert f"(pid {first.pid} on " in third.stderr and "is gone; taking it" in third.stderr, third.stderr
    assert "done: " in third.stdout and (out / "final" / "implant.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()  # released on the way out


def test_lock_held_elsewhere_is_refused_naming_the_file_and_an_earlier_slurm_run_is_stale(
    tmp_path, monkeypatch
):
    """A lock from another host cannot be judged here: refused, naming the file to delete. One taken by
    an earlier run of this same Slurm job (the job was requeued) or by a process whose pid has since been
    reused is stale and taken over. A file that is not a lock is refused."""
    from loki_dist.core.errors import UserError
    from loki_dist.implant.trainer.runlock import RunLock, _process_start

    lock = tmp_path / LOCK_NAME
    elsewhere = {"host": "node-far-away", "pid": 4242, "started": "yesterday", "pid_start": "1",
                 "slurm_job": "77", "slurm_restart": "0"}  # fmt: skip
    lock.write_text(json.dumps(elsewhere))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(UserError) as err:
        RunLock.acquire(tmp_path)
    assert "on another host" in str(err.value) and f"delete {lock}" in str(err.value)
    assert json.loads(lock.read_text()) == elsewhere  # left alone

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    taken = RunLock.acquire(tmp_path)
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taken.release()
    assert not lock.exists()

    reused = {**elsewhere, "host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None}
    reused["pid_start"] = str(int(_process_start(os.getpid())) - 1)  # our pid, another process's start
    lock.write_text(json.dumps(reused))
    RunLock.acquire(tmp_path).release()
    assert not lock.exists()

    lock.write_text("not json")
    with pytest.raises(UserError, match="exists but is not a loki-dist lock"):
        RunLock.acquire(tmp_path)


# ----------------------------------------------------------------------------------------------- divergence


def assert_diverged(proc: subprocess.CompletedProcess, out: Path) -> int:
    """Exit status DIVERGED_EXIT_CODE with one line naming the step; every checkpoint left is from before
    that step and finite; no final/, no partial checkpoint. Returns the step."""
    assert proc.returncode == DIVERGED_EXIT_CODE, proc.stderr[-3000:]
    lines = error_lines(proc.stderr)
    assert len(lines) == 1 and "training diverged at step " in lines[0], proc.stderr[-3000:]
    assert not loki_dist_traceback(proc.stderr), proc.stderr[-3000:]
    step = int(lines[0].split("training diverged at step ")[1].split(":")[0])
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert all(s < step for s in saved), (step, saved)
    assert all(all_finite(out / f"checkpoint-{s}") for s in saved)
    assert (
        not (out / "final").exists() and not list(out.glob(".*partial*")) and not (out / LOCK_NAME).exists()
    )
    return step


def test_loss_turning_nan_stops_before_saving_and_keeps_the_last_good_checkpoint(inputs, tmp_path):
    out = tmp_path / "out"
    args = train_args(inputs, out, "--ds-config", "none", "--max-steps", "8", "--save-steps", "2")
    proc = run_cli([*args, *BLOW_UP_SLOWLY, "--logging-steps", "1"], check=False)
    step = assert_diverged(proc, out)
    assert 2 < step < 8 and (out / "checkpoint-2").is_dir(), step  # a checkpoint before, no end reached
    logged = [line for line in proc.stdout.splitlines() if line.startswith(f"step {step}: ")]
    assert logged and "loss=nan" in logged[0], proc.stdout  # the step it names is the first bad one
    assert f"{out / 'checkpoint-2'} is the newest checkpoint" in error_lines(proc.stderr)[0]


def test_rows_turning_inf_within_a_step_are_never_saved(inputs, tmp_path):
    """The loss of step 1 is computed before its update, so only the rows show it: the save refuses."""
    out = tmp_path / "out"
    args = train_args(inputs, out, "--ds-config", "none", "--max-steps", "2", "--save-steps", "1")
    proc = run_cli([*args, *BLOW_UP_AT_ONCE], check=False)
    assert assert_diverged(proc, out) == 1
    assert "NaN or Inf" in error_lines(proc.stderr)[0] and not list(out.glob("checkpoint-*"))


def test_diverging_zero3_ranks_agree_and_the_torchrun_wrapper_exits_with_their_status(inputs, tmp_path):
    """2 ranks, ZeRO-3, under launch/torchrun.sh: both ranks stop at the same step with status 3, which
    the wrapper passes on (torchrun itself says 1 for any failed worker)."""
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "NPROC_PER_NODE": "2"}
    args = train_args(inputs, out, "--max-steps", "8", "--save-steps", "2", *BLOW_UP_SLOWLY)
    proc = subprocess.run(["launch/torchrun.sh", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    step = assert_diverged(proc, out)
    assert "non-finite on 2 of 2 ranks" in error_lines(proc.stderr)[0]
    assert proc.stderr.count(f"exitcode  : {DIVERGED_EXIT_CODE}") == 2, proc.stderr[-3000:]  # both ranks
    assert step > 2 and len(list((out / "checkpoint-2").glob("rows-*-of-00002.safetensors"))) == 2


# ------------------------------------------------------------------------------------ damaged checkpoints


@pytest.fixture(scope="module")
def uninterrupted(inputs) -> Path:
    """4 steps in one process, a checkpoint after each: what every resume below must reproduce."""
    out = inputs["root"] / "uninterrupted"
    run_cli(train_args(inputs, out, "--ds-config", "none", "--max-steps", "4", "--save-steps", "1",
                       "--save-total-limit", "4"))  # fmt: skip
    return out


def test_resume_falls_back_past_damaged_checkpoints_to_the_same_bits(inputs, uninterrupted, tmp_path):
    out = tmp_path / "out"
    for step in (1, 2, 3):
        (out / f"checkpoint-{step}").mkdir(parents=True)
        for item in (uninterrupted / f"checkpoint-{step}").iterdir():
            (out / item.parent.name / item.name).write_bytes(item.read_bytes())
    shard = out / "checkpoint-3" / shard_name(0, 1)
    shard.write_bytes(shard.read_bytes()[:-100])  # cut short, as by a full disk
    (out / "checkpoint-2" / INDEX_FILE).write_text('{"format": "loki_dist.rows/2", "lay')
    args = train_args(inputs, out, "--ds-config", "none", "--max-steps", "4", "--save-steps", "1",
                      "--save-total-limit", "4")  # fmt: skip
    proc = run_cli(args)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("loki-dist train: warning: ")]
    assert len(warnings) == 2, proc.stderr
    assert f"{out / 'checkpoint-3'} ({shard.name}: truncated or damaged safetensors file (" in warnings[0]
    assert f"{out / 'checkpoint-2'} ({INDEX_FILE} is not valid JSON" in warnings[1]
    assert f"resumed from {out / 'checkpoint-1'} at step 1" in proc.stdout
    for name in ("model.safetensors", "implant.safetensors"):
        assert (out / "final" / name).read_bytes() == (uninterrupted / "final" / name).read_bytes(), name


def test_no_loadable_checkpoint_is_one_line_before_any_work(inputs, uninterrupted, tmp_path, capsys):
    """Every checkpoint damaged: train refuses (with or without --resume naming one), and so does export
    of one whose shard is cut short; nothing in the directory changes."""
    out = tmp_path / "out"
    for step in (2, 3):
        shutil.copytree(uninterrupted / f"checkpoint-{step}", out / f"checkpoint-{step}")
    (out / "checkpoint-2" / "rng_state_0.safetensors").unlink()  # resuming needs it, exporting does not
    shard = out / "checkpoint-3" / shard_name(0, 1)
    shard.write_bytes(shard.read_bytes()[:7])  # not even a whole header length
    (out / "checkpoint-4").mkdir()  # a copy cut short before its state was written
    before = sorted(p.name for p in out.rglob("*"))
    argv = train_args(inputs, out, "--ds-config", "none", "--max-steps", "4")
    assert_user_error(argv, capsys, "no checkpoint in it can be resumed from")
    assert_user_error(
        [*argv, "--resume", str(out / "checkpoint-2")], capsys, "rng_state_0.safetensors is missing"
    )
    export = ["export", "--checkpoint", str(out / "checkpoint-3"), "--output", str(tmp_path / "exported")]
    assert_user_error(
        export,
        capsys,
        f"{shard}: truncated or damaged safetensors file (7 bytes, cut short inside its header)",
    )
    assert sorted(p.name for p in out.rglob("*")) == before and not (tmp_path / "exported").exists()


# ------------------------------------------------------------------------------------------ a Ctrl-C

# `python -m loki_dist` and what pip's `loki-dist` script runs (pyproject.toml's entry point)
ENTRY_POINTS = {
    "-m": ["-m", "loki_dist"],
    "script": ["-c", "import sys; from loki_dist.__main__ import run; sys.exit(run())"],
}


def _sigint_default() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_ctrl_c_while_starting_is_130_without_a_traceback(entry, inputs, tmp_path):
    """SIGINT at several moments of start-up: torch, transformers and DeepSpeed still importing (seconds),
    then the planning. Each is exit status 130 with nothing on stderr but the start-up's own lines: no
    traceback, no error (and never signal 2, which CPython's `-m` runner turned some into)."""
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"loki-dist": "loki_dist.__main__:run"}
    args = train_args(inputs, tmp_path / "out", "--max-steps", "100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for delay in (0.2, 1, 3):
        # as from a terminal's foreground: SIGINT at its default, even where pytest itself runs as a
        # background job, whose SIGINT is ignored and would be inherited (loki_dist keeps that choice)
        proc = subprocess.Popen([sys.executable, *ENTRY_POINTS[entry], *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_sigint_default)  # fmt: skip
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
        said = [line for line in stderr.splitlines() if "Traceback" in line or "error" in line.lower()]
        assert proc.returncode == 130 and not said, (delay, proc.returncode, stderr[-3000:])


FINALIZER_INTERRUPTED = """
import sys, time
from loki_dist.core import exits
exits.install()
exits.running()
class Slow:
    def __del__(self):  # a library's object collected while the run goes on
        print("finalizing", flush=True)
        time.sleep(3)
try:
    Slow()
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_during_a_finalizer_still_interrupts_the_run():
    """Python drops an exception raised in a `__del__` ("Exception ignored in ..."): a Ctrl-C that came
    while a library's object was being collected was lost and training went on (seen in CI). The
    interrupt is delivered again, and the run ends with 130, without the "Exception ignored" lines."""
    proc = subprocess.Popen([sys.executable, "-c", FINALIZER_INTERRUPTED], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_sigint_default)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "finalizing"
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and "interrupted" in out, (proc.returncode, out, err)
    assert "Exception ignored" not in err, err


# ------------------------------------------------------------------------------------------ a peer gone


def bare_ranks(args: list[str], logs: Path, **env: str) -> list[subprocess.Popen]:
    """Two ranks started as a bare `srun` would (no launcher watching over them); logs/rank<r>.log."""
    logs.mkdir()
    env = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), **env}
    return [
        start(args, logs / f"rank{r}.log", env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
        for r in range(2)
    ]


def test_a_killed_rank_ends_its_peer_at_once_naming_the_stage(inputs, tmp_path):
    out, logs = tmp_path / "out", tmp_path / "logs"
    ranks = bare_ranks(train_args(inputs, out, "--max-steps", "100000", "--save-steps", "2"), logs)
    try:
        wait_for(out / "checkpoint-2" / "trainer_state.json", *ranks)
        ranks[0].send_signal(STACKS_SIGNAL)  # where is it? (it goes on training)
        while "(most recent call first)" not in (logs / "rank0.log").read_text():
            assert ranks[0].poll() is None
            time.sleep(0.05)
        ranks[1].kill()
        killed = time.time()
        ranks[0].wait(timeout=120)
        waited = time.time() - killed
    finally:
        for rank in ranks:
            rank.kill()
            rank.wait()
    log = (logs / "rank0.log").read_text()
    assert ranks[0].returncode == 1 and "Traceback" not in log, log[-3000:]
    lines = error_lines(log)
    # The kill lands in a step or in a checkpoint save (one every 2 steps): either is named.
    stage = r"loki-dist train: error: rank 0: (step \d+|saving checkpoint-\d+): a collective broke off"
    assert len(lines) == 1 and re.match(stage, lines[0]), log[-3000:]
    assert re.search(r'recipe\.py", line \d+ in train\n', log)  # the stack it printed shows the loop
    assert waited < 60, f"rank 0 waited {waited:.0f} s for its dead peer"  # measured: well under 1 s


def test_a_master_port_in_use_is_said_as_that_not_as_a_dead_peer(inputs, tmp_path):
    """Rank 0 cannot listen on a MASTER_PORT that another socket holds (bound here, as another job's
    would be): it says so, naming the address and port, exit status 2. Rank 1 never reaches a rank 0 and
    says that, naming the same, once the timeout is up. Neither blames a peer that died."""
    logs = tmp_path / "logs"
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]
        args = train_args(inputs, tmp_path / "out", "--max-steps", "1")
        ranks = bare_ranks(args, logs, MASTER_PORT=str(port), LOKI_DIST_TIMEOUT_MINUTES="0.05")
        try:
            for rank in ranks:
                rank.wait(timeout=120)
        finally:
            for rank in ranks:
                rank.kill()
                rank.wait()
    where = f"MASTER_ADDR=127.0.0.1 MASTER_PORT={port}"
    said = [(logs / f"rank{r}.log").read_text() for r in range(2)]
    assert ranks[0].returncode == 2 and error_lines(said[0]) == [
        f"loki-dist train: error: rank 0: {where}: the port is already in use on this host, so rank 0 "
        "cannot listen on it for its peers: choose a free MASTER_PORT (the same for every rank)"
    ], said[0][-3000:]
    lines = error_lines(said[1])
    assert ranks[1].returncode == 1 and len(lines) == 1, said[1][-3000:]
    assert lines[0].startswith(f"loki-dist train: error: rank 1: joining the other ranks at {where} failed")
    assert not any("peer rank died" in log or loki_dist_traceback(log) for log in said), said
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("minutes", ["1e-9", "0.001"])
def test_a_timeout_under_a_second_is_refused(minutes, monkeypatch):
    """No rendezvous completes in less (torch counts whole milliseconds: 1e-9 minutes was 0 ms)."""
    from loki_dist.core import distributed
    from loki_dist.core.errors import UserError

    monkeypatch.setenv(distributed.TIMEOUT_ENV, minutes)
    with pytest.raises(UserError) as err:
        distributed.timeout()
    assert (
        str(err.value)
        == f"LOKI_DIST_TIMEOUT_MINUTES={minutes}: expected a number of minutes, at least 1/60 (a second)"
    )


STUCK_PEER = """
import os, signal, sys, time, torch
from loki_dist.core import collectives, distributed
world = distributed.world_from_env()
distributed.init(world)
collectives.all_reduce_sum(torch.ones(1))
if world.rank == 1:
    os.kill(os.getpid(), signal.SIGSTOP)  # alive, holding its connections, silent
with distributed.stage("the stage under test"):
    collectives.all_reduce_sum(torch.ones(1))
"""


def test_a_silent_peer_ends_the_wait_after_the_timeout_naming_the_stage(tmp_path):
    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": port, "LOKI_DIST_TIMEOUT_MINUTES": "0.05"}  # fmt: skip
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", STUCK_PEER],
            cwd=REPO,
            text=True,
            stderr=subprocess.PIPE,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
        )  # fmt: skip
        for r in range(2)
    ]
    try:
        _, stderr = ranks[0].communicate(timeout=120)
    finally:
        ranks[1].kill()
        ranks[1].communicate()
    assert ranks[0].returncode != 0
    last = stderr.strip().splitlines()[-1]
    assert "CollectiveFailed: the stage under test: a collective broke off" in last, stderr
    assert "LOKI_DIST_TIMEOUT_MINUTES=0.05" in last and "Timed out waiting 3000ms" in last, stderr
