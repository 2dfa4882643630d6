"""slurm/train.sbatch on a real two-node Slurm (tests/slurm_cluster.py).

One job on the two node daemons gets the pre-timeout signal mid-run: it must checkpoint, requeue itself,
resume as one world of size 2 again, and end bit-identical to one node running 2 processes without
interruption. That single comparison covers the world formed across nodes (c10d rendezvous through
NodeAddr), the signal path (batch shell -> srun -> training ranks) and the requeue. A bare `srun` of
loki-dist (no torchrun) must find rank 0 on its own and equal one process too.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, free_port, missing_component, run_cli
from slurm_cluster import Cluster, missing
from test_training import LONG_RUN, assert_equal_weights, make_data, train_args

from loki_dist.demo.tiny import save_tiny


@pytest.fixture(scope="module")
def cluster():
    why_not = missing()
    if why_not:
        missing_component(why_not)
    root = Path(tempfile.mkdtemp(prefix="loki_slurm_"))
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("slurm_train")
    positions = root / "positions.json"
    positions.write_text(json.dumps([[0, 3, 5, 17, 31], [], [1, 2, 10, 30]]))
    return {
        "root": root,
        "base": save_tiny(root / "base", "llama", seed=1, num_layers=3),
        "positions": positions,
        "data": make_data(root / "data.jsonl"),
    }


def _submit(
    cluster: Cluster, logs: Path, script_and_args: list, cpus: int = 1, env: dict | None = None
) -> str:
    """sbatch on both node daemons, one task (with `cpus` CPUs) per node, torchrun with 1 rank per node."""
    logs.mkdir(exist_ok=True)
    return cluster.submit(
        ["-N2", f"--cpus-per-task={cpus}", "--gpus-per-node=0", f"--output={logs}/%j.out",
         f"--error={logs}/%j.err", *[str(a) for a in script_and_args]],
        cwd=REPO,
        env={"PYTHON": sys.executable, "NPROC_PER_NODE": "1", "OMP_NUM_THREADS": "1",
             "RDZV_PORT": str(free_port()), **(env or {})},
    )  # fmt: skip


def _wait_completed(cluster: Cluster, job: str, logs: Path, timeout: float) -> None:
    deadline = time.time() + timeout
    while (state := cluster.job(job)["JobState"]) in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
        assert time.time() < deadline, f"job {job} still {state}\n{cluster.logs()}"
        time.sleep(0.5)
    output = "".join(p.read_text() for p in logs.glob(f"{job}.*"))
    assert state == "COMPLETED", f"job {job}: {state}\n{output}\n{cluster.logs()}"


def _submit_train(cluster: Cluster, setup, out: Path) -> str:
    return _submit(
        cluster, setup["root"] / "logs", ["slurm/train.sbatch", *train_args(setup, out)[1:], *LONG_RUN]
    )


def _log(logs: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in (logs / f"{job_id}.out", logs / f"{job_id}.err") if p.exists())


def test_two_node_job_checkpoints_on_signal_requeues_and_equals_one_node(cluster, setup):
    out = setup["root"] / "requeued"
    job = _submit_train(cluster, setup, out)
    deadline = time.time() + 120
    while not (out / "checkpoint-4" / "trainer_state.json").exists():
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), (
            _log(setup["root"] / "logs", job) + cluster.logs()
        )
        time.sleep(0.05)
    _stop_and_wait_for_the_requeued_run(cluster, job, setup["root"] / "logs")
    log = _log(setup["root"] / "logs", job)
    assert "requeueing job" in log and "resumed from" in log, log
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["global_batch"] == 4 and summary["start_step"] > 4

    one_node = setup["root"] / "one_node"
    run_cli([*train_args(setup, one_node), *LONG_RUN], nproc=2)
    assert_equal_weights(one_node, out)


def _stop_and_wait_for_the_requeued_run(cluster: Cluster, job: str, logs: Path) -> None:
    """What `#SBATCH --signal=B:USR1@600` does before the time limit, then wait until the job, requeued
    by its script, has run again to completion."""
    cluster.client(["scancel", "--signal=USR1", "--batch", job])
    deadline, failed_since, pending_since = time.time() + 240, None, None
    while True:
        info = cluster.job(job)
        if info.get("Restarts") == "1" and info["JobState"] == "COMPLETED":
            return
        # the first run ends with status 75 and may show FAILED for a moment before the requeue lands
        failed_since = (failed_since or time.time()) if info["JobState"] == "FAILED" else None
        if time.time() > deadline or (failed_since and time.time() - failed_since > 10):
            pytest.fail(f"job {job}: {info}\n{_log(logs, job)}\n{cluster.logs()}")
        # A requeued job waits for a begin time: start it sooner, but only once it has been PENDING for
        # 5 s. Starting it at once raced the node daemon's clean-up of the first run, and the second
        # run then failed at launch (NonZeroExitCode, RunTime 0, nothing in its log): seen twice.
        pending_since = (pending_since or time.time()) if info["JobState"] == "PENDING" else None
        if pending_since and time.time() - pending_since > 5:
            cluster.client(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=False)
        time.sleep(0.5)


def test_two_node_attribution_job_on_2_cpus_stops_requeues_and_equals_one_process(cluster, tmp_path):
    """slurm/attribute.sbatch across the two node daemons with --cpus-per-task=2: each rank may run on
    both CPUs of its node (srun is given the job's --cpus-per-task, which Slurm 22.05 no longer passes
    on; without it each node's task is bound to one core). The pre-timeout signal mid-run: every rank
    saves its partial statistics and exits 75, the job requeues itself, continues with --resume and
    writes the file one plain process writes, to the bit."""
    from mmlu_fixture import write_mmlu

    from loki_dist.attribution.stats import load_file

    model = save_tiny(tmp_path / "model", "llama", seed=0)
    data = write_mmlu(tmp_path / "mmlu", per_subject=20)
    args = ["--model", str(model), "--data", str(data), "--batch-size", "1"]
    single, sharded = tmp_path / "one.safetensors", tmp_path / "two_nodes.safetensors"
    meter = tmp_path / "meter"
    saves = ["--checkpoint-every", "0", "--checkpoint-minutes", "1e-9"]  # after every batch, by the clock
    job = _submit(cluster, tmp_path, ["slurm/attribute.sbatch", *args, *saves, "--output", sharded], cpus=2,
                  env={"LOKI_DIST_METER": str(meter)})  # fmt: skip
    deadline = time.time() + 120
    while not list(Path(f"{sharded}.partial").glob("rank*-step*.safetensors")):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), (
            _log(tmp_path, job) + cluster.logs()
        )
        time.sleep(0.02)
    _stop_and_wait_for_the_requeued_run(cluster, job, tmp_path)
    log = _log(tmp_path, job)
    assert "stopped by signal 10 after" in log and "requeueing job" in log, log
    assert "resuming after" in log, log
    assert [json.loads((meter / f"rank{r}.json").read_text())["cpus"] for r in (0, 1)] == [2, 2], log
    run_cli(["attribute", *args, "--output", str(single)])
    (one, meta_one), (two, meta_two) = load_file(single), load_file(sharded)
    assert one.keys() == two.keys() and all(torch.equal(one[name], two[name]) for name in one)
    assert {**meta_two, "world_size": "1"} == meta_one


def test_two_node_pipeline_job_runs_every_stage(cluster, tmp_path):
    """slurm/pipeline.sbatch: the pipeline in the batch shell, each distributed stage through srun +
    torchrun on both node daemons; the trained model equals the same pipeline run as one 2-rank job."""
    import yaml
    from mmlu_fixture import write_mmlu

    def config(out: Path) -> Path:
        path = tmp_path / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump({
            "output_dir": str(out), "model": str(save_tiny(tmp_path / "base", "llama", seed=0)),
            "attribute": {"data": str(write_mmlu(tmp_path / "mmlu", per_subject=2)), "per_subject": 2},
            "select": {"quota": 25},
            "train": {"data": str(make_data(tmp_path / "task.jsonl", n=8)), "max_steps": 4,
                      "micro_batch_size": 1, "gradient_accumulation": 1, "save_steps": 2},
        }))  # fmt: skip
        return path

    slurm_out, local_out = tmp_path / "slurm_run", tmp_path / "local_run"
    job = _submit(cluster, tmp_path, ["slurm/pipeline.sbatch", config(slurm_out)])
    _wait_completed(cluster, job, tmp_path, timeout=300)
    summary = json.loads((slurm_out / "train" / "train_summary.json").read_text())
    assert summary["world_size"] == 2
    local = yaml.safe_load(config(local_out).read_text())
    local["nproc"] = 2
    (tmp_path / "local.yaml").write_text(yaml.safe_dump(local))
    run_cli(["pipeline", "--config", str(tmp_path / "local.yaml")], timeout=600)
    assert json.loads((slurm_out / "positions.json").read_text()) == json.loads(
        (local_out / "positions.json").read_text()
    )
    assert_equal_weights(local_out / "train", slurm_out / "train")


def test_bare_srun_finds_rank_0_through_nodeaddr(cluster, monkeypatch):
    """The step's first node, n1, does not resolve: its NodeAddr is rank 0's address; a name that
    resolves is used as it is."""
    from loki_dist.core.distributed import rendezvous_env

    monkeypatch.setenv("SLURM_CONF", str(cluster.conf))
    task = {"SLURM_JOB_ID": "9", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"}
    env = {**task, "SLURM_STEP_NODELIST": "n[1-2]"}
    rendezvous_env(env)
    assert env["MASTER_ADDR"] == "127.0.0.2"
    env = {**task, "SLURM_STEP_NODELIST": "localhost", "SLURM_JOB_NODELIST": "n[1-2]"}
    rendezvous_env(env)
    assert env["MASTER_ADDR"] == "localhost"


def test_bare_srun_on_two_nodes_equals_one_process(cluster, tmp_path):
    """`srun --nodes=2 --ntasks=2 python -m loki_dist evaluate`, with no launcher and no MASTER_ADDR:
    the two tasks (one per node daemon) form one world and write what one process writes."""
    from mmlu_fixture import write_mmlu

    model = save_tiny(tmp_path / "model", "llama", seed=0)
    args = ["evaluate", "--model", str(model), "--data", str(write_mmlu(tmp_path / "mmlu", per_subject=3))]
    args += ["--batch-size", "2"]
    run_cli([*args, "--output", str(tmp_path / "one.json")])
    env = {k: v for k, v in cluster.env.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK")}
    # a shell's leftovers from an earlier one-process run: without RANK they are not a launcher's, and
    # each task must join as the rank srun says (this once failed CI as "rank < size. 1 vs 1")
    env.update(WORLD_SIZE="1", LOCAL_RANK="0")
    srun = ["srun", "--nodes=2", "--ntasks=2", "--cpus-per-task=1", "--gpus-per-node=0", "--label"]
    proc = subprocess.run(
        [*srun, sys.executable, "-m", "loki_dist", *args, "--output", str(tmp_path / "two.json")],
        cwd=REPO,
        env={**env, "OMP_NUM_THREADS": "1"},  # cwd=REPO: each task imports this loki_dist
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr + cluster.logs()
    # One machine: 127.0.0.1 would reach rank 0 as well, so the address used is checked as printed.
    # Rank 0 runs on n1, the first node; its name does not resolve, its NodeAddr is 127.0.0.2.
    assert re.search(
        r"^0: \+ srun rendezvous 127\.0\.0\.2:2\d{4}, 2 tasks on n\[1-2\]$", proc.stderr, re.M
    ), proc.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert {**two, "world_size": 1} == one
