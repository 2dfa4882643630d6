"""launch/ and slurm/: shellcheck, pass-through of loki-dist commands, and the Slurm wrapper's node logic.

The Slurm wrapper runs here against stand-ins for `srun` (one task per node, each with its own
SLURM_NODEID, as srun --ntasks-per-node=1 does) and `scontrol`, with a real torchrun c10d rendezvous
between the "nodes" on loopback.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, missing_component

SCRIPTS = sorted([*REPO.glob("launch/*.sh"), *REPO.glob("slurm/*.sh"), *REPO.glob("slurm/*.sbatch")])

FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit "$rc"
"""
# node names that do not resolve, as on the CI machine: the address must come from NodeAddr
FAKE_SCONTROL = """#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") printf 'zz-node-1\\nzz-node-2\\n' ;;
    "show node") echo "NodeName=$3 Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 NodeHostName=$3" ;;
    *) exit 1 ;;
esac
"""


def test_every_shell_script_passes_shellcheck():
    if shutil.which("shellcheck") is None:
        missing_component("shellcheck is not installed (.ci/run installs it with apt-get)")
    assert len(SCRIPTS) >= 7, SCRIPTS
    proc = subprocess.run(
        ["shellcheck", "-x", *[str(p.relative_to(REPO)) for p in SCRIPTS], ".ci/run"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def test_torchrun_wrapper_runs_the_command_on_every_rank():
    proc = subprocess.run(
        ["launch/torchrun.sh", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(NPROC_PER_NODE="2"),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert "+ " in proc.stderr and "--nproc_per_node 2 --standalone -m loki_dist --version" in proc.stderr
    assert proc.stdout.count("loki_dist 0.") == 2  # both ranks ran `loki-dist --version`


# The deepspeed and accelerate launchers take 10-20 s to start here, so these two check the command
# line through a stand-in that prints its arguments (both were run for real on 2 CPU ranks by hand:
# accelerate must not get --cpu, which silently runs one process; deepspeed needs --no_local_rank).
@pytest.mark.parametrize(
    ("script", "tool", "env", "expected"),
    [
        ("deepspeed.sh", "deepspeed", {"NUM_GPUS": "2", "HOSTFILE": "hosts"},
         "--no_local_rank --master_port 29500 --hostfile hosts --num_gpus 2 "
         "--module loki_dist train --x a\\ b"),
        ("accelerate.sh", "accelerate", {"NPROC_PER_NODE": "4", "NNODES": "2", "NODE_RANK": "1",
                                         "MASTER_ADDR": "node001"},
         "--num_machines 2 --num_processes 8 --machine_rank 1 --main_process_ip node001 "
         "--main_process_port 29500 -m loki_dist train --x a\\ b"),
    ],
)  # fmt: skip
def test_launcher_wrappers_pass_the_command_through_unchanged(tmp_path, script, tool, env, expected):
    stub = tmp_path / tool
    stub.write_text('#!/usr/bin/env bash\nprintf "%q " "$@"\n')
    stub.chmod(0o755)
    proc = subprocess.run(
        [f"launch/{script}", "train", "--x", "a b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=_env(PATH=f"{tmp_path}:{os.environ['PATH']}", **env),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"+ {tool} "), proc.stderr  # the command is printed first
    assert expected in proc.stdout, proc.stdout


GPU_VARIABLES = ("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE", "CUDA_VISIBLE_DEVICES")


def _stubs(where: Path, gpus: int, **tools: str) -> dict[str, str]:
    """Stand-ins for nvidia-smi (listing `gpus` GPUs) and `tools` (name -> script) first on PATH, and
    the environment without any variable that says how many processes to start."""
    for tool, script in {"nvidia-smi": f"seq 0 {gpus - 1} | sed 's/^/GPU /'", **tools}.items():
        (where / tool).write_text(f"#!/usr/bin/env bash\n{script}\n")
        (where / tool).chmod(0o755)
    return {k: v for k, v in _env(PATH=f"{where}:{os.environ['PATH']}").items() if k not in GPU_VARIABLES}


@pytest.mark.parametrize(("gpus", "extra", "processes", "said"), [
    (3, {}, 3, "not set: 3 processes per node, one per GPU"),
    (0, {}, 1, "not set and no GPU found: 1 process per node"),
    (0, {"CUDA_VISIBLE_DEVICES": "4,5"}, 2, "not set: 2 processes per node, one per GPU"),
    (8, {"CUDA_VISIBLE_DEVICES": ""}, 1, "not set and no GPU found: 1 process per node"),
    (8, {"SLURM_GPUS_ON_NODE": "4"}, 4, "not set: 4 processes per node, one per GPU Slurm gave this node"),
])  # fmt: skip
def test_without_nproc_per_node_the_wrappers_take_one_per_gpu_and_say_so(
    tmp_path, gpus, extra, processes, said
):
    """The GPUs Slurm gave the node, else those this process may use (CUDA_VISIBLE_DEVICES, as Slurm sets
    it per task), else those nvidia-smi lists, else 1."""
    env = {**_stubs(tmp_path, gpus, accelerate='printf "%q " "$@"'), **extra}
    proc = subprocess.run(["launch/accelerate.sh", "--version"], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"--num_processes {processes} " in proc.stdout
    assert f"accelerate.sh: NPROC_PER_NODE {said}" in proc.stderr


@pytest.mark.parametrize("template", ["attribute", "train"])
def test_sbatch_templates_count_the_gpus_where_slurm_does_not_say(tmp_path, template):
    """Where SLURM_GPUS_ON_NODE is unset (a site that allocates GPUs some other way), a template starts
    one rank per GPU found, not 1. The node's torchrun is a stand-in that prints its arguments."""
    env = _stubs(tmp_path, 4, python='printf "%q " "$@"')
    fake = _fake_bin(tmp_path, with_scontrol=True)
    env.update(PATH=f"{fake}:{env['PATH']}", PYTHON=str(tmp_path / "python"), SLURM_JOB_ID="77",
               SLURM_NNODES="2", SLURM_JOB_NODELIST="zz-node-[1-2]")  # fmt: skip
    proc = subprocess.run(["bash", f"slurm/{template}.sbatch", "--model", "m"], cwd=REPO, capture_output=True,
                          text=True, env=env, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("-m torch.distributed.run --nproc_per_node 4 --nnodes 2 ") == 2, proc.stdout


def test_shipped_ds_configs_match_their_purpose():
    import json

    configs = {p.stem: json.loads(p.read_text()) for p in (REPO / "ds_configs").glob("*.json")}
    assert set(configs) == {"zero3", "zero3_offload", "zero2", "zero3_infer"}
    for name, config in configs.items():
        assert config["bf16"]["enabled"] == "auto", name
        assert "optimizer" not in config, name  # loki_dist builds its own (row-masked decay)
    for name in ("zero3", "zero3_offload", "zero2"):
        zero = configs[name]["zero_optimization"]
        assert zero["overlap_comm"] and zero["contiguous_gradients"], name
    for name in ("zero3", "zero3_offload"):
        assert configs[name]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"], name
    offload = configs["zero3_offload"]["zero_optimization"]
    assert offload["offload_param"]["device"] == offload["offload_optimizer"]["device"] == "cpu"
    assert configs["zero3_infer"]["zero_optimization"]["stage"] == 3
    assert "gradient_clipping" not in configs["zero3_infer"]  # inference: nothing to train


def _fake_bin(tmp_path: Path, with_scontrol: bool) -> Path:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    if with_scontrol:
        (fake / "scontrol").write_text(FAKE_SCONTROL)
    for tool in fake.iterdir():
        tool.chmod(0o755)
    return fake


def test_slurm_wrapper_gives_each_node_its_id_and_finds_the_address_from_nodeaddr(tmp_path):
    """...and meets on a port of the job's own (launcher.slurm_port of the job id, as for step 15): a
    fixed one is shared by every job whose first node is the same machine, and a job that finds it
    taken joins the other job's c10d store."""
    from loki_dist.core.launcher import slurm_port

    fake = _fake_bin(tmp_path, with_scontrol=True)
    env = _env(
        PATH=f"{fake}:{os.environ['PATH']}",
        SLURM_JOB_ID="77",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="zz-node-[1-2]",
        NPROC_PER_NODE="1",
    )
    env.pop("RDZV_PORT", None)
    proc = subprocess.run(
        ["slurm/srun_torchrun.sh", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"rendezvous 127.0.0.1:{slurm_port(77, 15)}, 2 node(s), job 77, CPUs per node: 1" in proc.stderr
    assert len({slurm_port(job, 15) for job in range(77, 77 + 600)}) == 600  # jobs sharing a first node
    for node in (0, 1):  # expanded by each task's shell, not once by the batch shell
        assert f"--rdzv_id 77 --node_rank {node} -m loki_dist --version" in proc.stderr, proc.stderr
    assert proc.stdout.count("loki_dist ") == 2  # the two "nodes" met at the c10d rendezvous and ran


def test_slurm_wrapper_refuses_to_guess_without_scontrol(tmp_path):
    fake = _fake_bin(tmp_path, with_scontrol=False)
    for tool in ("bash", "basename", "dirname", "head", "grep", "cut", "getent"):
        if shutil.which(tool):
            (fake / tool).symlink_to(shutil.which(tool))
    env = _env(PATH=str(fake), SLURM_JOB_ID="77", SLURM_NNODES="2", SLURM_JOB_NODELIST="zz-node-[1-2]")
    proc = subprocess.run(
        ["slurm/srun_torchrun.sh", "train"], cwd=REPO, capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode != 0
    assert "scontrol not found" in proc.stderr and "RDZV_HOST" in proc.stderr
    assert "localhost" not in proc.stderr and "rendezvous" not in proc.stderr


# ------------------------------------------------------------------ bare srun: who am I, where is rank 0

# what srun sets in each task of a 2-task step on two nodes (seen on tests/slurm_cluster.py's cluster)
SRUN_TASK = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "3", "SLURM_PROCID": "1", "SLURM_LOCALID": "0",
             "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NODELIST": "zz-node-[1-2]",
             "SLURM_JOB_NODELIST": "zz-node-[1-2]"}  # fmt: skip
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def srun_task(monkeypatch):
    """The environment of one bare-srun task, with no launcher's variables."""
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in SRUN_TASK.items():
        monkeypatch.setenv(name, value)
    return monkeypatch


def test_srun_task_is_one_rank_of_the_step(srun_task):
    from loki_dist.core.distributed import World, world_from_env

    assert world_from_env() == World(rank=1, size=2, local_rank=0)
    # torchrun started inside an srun step (slurm/srun_torchrun.sh): its variables win
    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}.items():
        srun_task.setenv(name, value)
    assert world_from_env() == World(rank=5, size=8, local_rank=1)


def test_batch_shell_is_one_process(srun_task):
    """An sbatch script's own shell has SLURM_NTASKS and SLURM_PROCID, but no step: a plain command
    there is one process (taking SLURM_NTASKS as the world size made it wait for ranks never started)."""
    from loki_dist.core.distributed import World, rendezvous_env, world_from_env

    for name in ("SLURM_STEP_ID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_NODELIST"):
        srun_task.delenv(name)
    srun_task.setenv("SLURM_PROCID", "0")
    assert world_from_env() == World(rank=0, size=1, local_rank=0)
    env = dict(os.environ)
    rendezvous_env(env)
    assert env == dict(os.environ)


def test_srun_without_master_addr_or_scontrol_is_one_line_naming_what_to_set(srun_task, tmp_path):
    from loki_dist.core.distributed import rendezvous_env
    from loki_dist.core.errors import UserError

    srun_task.setenv("PATH", str(tmp_path))  # no scontrol on it
    with pytest.raises(UserError) as err:
        rendezvous_env(dict(os.environ))
    message = str(err.value)
    assert "\n" not in message and "scontrol is not found" in message
    assert "export MASTER_ADDR=" in message and "SLURM_STEP_NODELIST=zz-node-[1-2]" in message


def test_srun_port_is_the_users_or_one_per_job_step(srun_task, tmp_path):
    from loki_dist.core.distributed import rendezvous_env

    srun_task.setenv("PATH", str(tmp_path))  # MASTER_ADDR given: scontrol is not needed
    env = {**os.environ, "MASTER_ADDR": "10.0.0.7"}
    rendezvous_env(env)
    derived = int(env["MASTER_PORT"])
    assert env["MASTER_ADDR"] == "10.0.0.7" and 20000 <= derived < 30000  # below the ephemeral ports
    again = {**os.environ, "MASTER_ADDR": "10.0.0.7"}
    rendezvous_env(again)
    assert again["MASTER_PORT"] == str(derived)  # every task of the step derives the same port

    def port(job: int, step: int) -> str:
        env = {**os.environ, "MASTER_ADDR": "x", "SLURM_JOB_ID": str(job), "SLURM_STEP_ID": str(step)}
        rendezvous_env(env)
        return env["MASTER_PORT"]

    assert len({port(4242, step) for step in range(16)}) == 16  # concurrent steps of one job
    assert len({port(job, 0) for job in range(4242, 4242 + 600)}) == 600  # jobs sharing a first node
    users = {**os.environ, "MASTER_ADDR": "x", "MASTER_PORT": "31234"}
    rendezvous_env(users)
    assert users["MASTER_PORT"] == "31234"


@pytest.mark.parametrize(
    ("local_rank", "visible", "device"),
    [(0, 1, 0), (3, 1, 0), (0, 8, 0), (5, 8, 5), (2, 2, None), (7, 4, None)],
)
def test_gpu_of_a_task_is_its_own_or_a_one_line_error(local_rank, visible, device, monkeypatch):
    """srun --gpus-per-task=1 shows each task one GPU: device 0, whatever its local rank. With several
    visible, local rank i takes GPU i; a local rank past them would share a GPU: refused."""
    from loki_dist.core.distributed import device_index
    from loki_dist.core.errors import UserError

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", ",".join(str(i) for i in range(visible)))
    if device is not None:
        assert device_index(local_rank, visible) == device
        return
    with pytest.raises(UserError) as err:
        device_index(local_rank, visible)
    message = str(err.value)
    assert "\n" not in message and f"local rank {local_rank} but this process sees {visible} GPUs" in message
    assert "--gpus-per-task=1" in message


# --------------------------------------------------------- launcher variables that contradict each other

# env -> the one line. Each once went on as some guess (RANK=1 alone: a world of one with no rank 0; a
# rank waiting for peers never started) or ended in a traceback (int('one'), a KeyError on the node list).
BAD_LAUNCHER_ENV = {
    "RANK without WORLD_SIZE": ({"RANK": "1"}, "RANK=1 but no WORLD_SIZE: a launcher sets both"),
    "RANK past WORLD_SIZE": ({"RANK": "2", "WORLD_SIZE": "2"},
                             "RANK=2 with WORLD_SIZE=2: expected a rank below the world size"),
    "RANK not a number": ({"RANK": "one", "WORLD_SIZE": "2"}, "RANK=one: expected a non-negative integer"),
    "SLURM_PROCID not a number": ({**SRUN_TASK, "SLURM_PROCID": "1st"},
                                  "SLURM_PROCID=1st: expected a non-negative integer"),
    "a Slurm task count without a node list": (
        {k: v for k, v in SRUN_TASK.items() if not k.endswith("NODELIST")},
        "under srun with SLURM_STEP_NUM_TASKS=2 but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST"),
    "MASTER_PORT not a port": ({"RANK": "0", "WORLD_SIZE": "1", "MASTER_PORT": "http"},
                               "MASTER_PORT=http: expected a port number, 1 to 65535"),
}  # fmt: skip


def test_contradicting_launcher_variables_are_one_line_before_any_work(tiny_llama, tmp_path):
    """Real processes started as a launcher would (all at once: each is a fresh interpreter): exit status
    2, one line naming the variables, and no output directory made."""
    import json

    (tmp_path / "positions.json").write_text(json.dumps([[0, 3], [1]]))
    (tmp_path / "data.json").write_text(json.dumps([{"instruction": "Hi", "input": "", "output": "hi"}] * 4))
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    procs = {}
    for n, (case, (env, _)) in enumerate(BAD_LAUNCHER_ENV.items()):
        args = ["train", "--model", str(tiny_llama), "--positions", str(tmp_path / "positions.json"),
                "--data", str(tmp_path / "data.json"), "--output-dir", str(tmp_path / f"out{n}")]  # fmt: skip
        full = {**clean, "OMP_NUM_THREADS": "1", "LOKI_DIST_TIMEOUT_MINUTES": "0.1", **env}
        procs[case] = subprocess.Popen([sys.executable, "-m", "loki_dist", *args], cwd=REPO, env=full,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    for n, (case, proc) in enumerate(procs.items()):
        _, stderr = proc.communicate(timeout=180)
        lines = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
        needle = BAD_LAUNCHER_ENV[case][1]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (case, stderr[-3000:])
        assert lines[0].startswith("loki-dist train: error: "), (case, lines)
        assert not (tmp_path / f"out{n}").exists(), case


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but no RANK: a launcher sets both"),
        ({"RANK": "-1", "WORLD_SIZE": "2"}, "RANK=-1: expected a non-negative integer"),
        ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: expected a positive integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "2"}, "LOCAL_RANK=2 with WORLD_SIZE=2: expected a"),
        ({**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "2x"}, "SLURM_STEP_NUM_TASKS=2x: expected a positive integer"),
        ({**SRUN_TASK, "SLURM_PROCID": "2"}, "SLURM_PROCID=2 with SLURM_STEP_NUM_TASKS=2: expected a rank"),
        ({k: v for k, v in SRUN_TASK.items() if k != "SLURM_JOB_ID"} | {"MASTER_ADDR": "10.0.0.7"},
         "no SLURM_JOB_ID to derive a port from: export MASTER_PORT"),
    ],
)  # fmt: skip
def test_every_contradiction_of_the_launcher_variables_is_named(env, needle, monkeypatch):
    """The other contradictions, read in-process (the same function the processes above run)."""
    from loki_dist.core.distributed import world_from_env
    from loki_dist.core.errors import UserError

    for name in [*LAUNCHER_VARS, *(k for k in os.environ if k.startswith("SLURM_"))]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(UserError) as err:
        world_from_env()
    assert "\n" not in str(err.value) and needle in str(err.value)


def test_empty_launcher_variables_count_as_unset():
    """`export MASTER_ADDR=$HEAD` with HEAD unset: an empty MASTER_ADDR, MASTER_PORT, RANK or WORLD_SIZE
    is unset, as world_from_env reads it (torch took the empty value as given: a traceback)."""
    script = ("import torch.distributed as dist; from loki_dist.core import distributed\n"
              "distributed.init(distributed.world_from_env(), always=True)\n"
              "print(dist.get_world_size(), dist.get_rank()); distributed.shutdown()\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS and not k.startswith("SLURM_")}
    env.update({name: "" for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")})
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.split() == ["1", "0"], proc.stderr[-3000:]


def test_a_master_addr_that_does_not_resolve_is_one_line(monkeypatch):
    """torch retries a host name that does not resolve until the timeout (10 minutes for a typo)."""
    import socket

    from loki_dist.core import distributed
    from loki_dist.core.errors import UserError

    host = "no-such-host.invalid"  # a name reserved never to resolve
    try:
        socket.getaddrinfo(host, 1)
        pytest.skip(f"{host} resolves here")
    except socket.gaierror as err:
        if err.errno != socket.EAI_NONAME:
            pytest.skip(f"this resolver does not say that a name does not exist ({err})")
    for name in LAUNCHER_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MASTER_ADDR", host)
    monkeypatch.setenv("LOKI_DIST_TIMEOUT_MINUTES", "0.05")
    with pytest.raises(UserError) as err:
        distributed.init(distributed.World(rank=0, size=1, local_rank=0), always=True)
    assert str(err.value).startswith(f"MASTER_ADDR={host}: no such host (")


def test_torchrun_wrapper_turns_a_stop_signal_into_the_workers_75(tmp_path, tiny_llama):
    """SIGUSR1 to launch/torchrun.sh (as `#SBATCH --signal=B:USR1` delivers it to a batch shell running
    it) reaches both workers, which finish their step, save a checkpoint and exit with 75. torchrun
    reports that as it reports any failed worker, with 1; the wrapper exits with the workers' 75."""
    import json
    import signal
    import time

    (tmp_path / "positions.json").write_text(json.dumps([[0, 3], [1]]))
    rows = [{"instruction": f"Add {a} and 2.", "input": "", "output": f"{a + 2}"} for a in range(8)]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    out, log = tmp_path / "out", tmp_path / "log"
    args = ["train", "--model", str(tiny_llama), "--positions", str(tmp_path / "positions.json"),
            "--data", str(tmp_path / "data.json"), "--output-dir", str(out), "--max-steps", "100000",
            "--save-steps", "2"]  # fmt: skip
    with log.open("w") as handle:
        proc = subprocess.Popen(["launch/torchrun.sh", *args], cwd=REPO, env=_env(NPROC_PER_NODE="2"),
                                stdout=handle, stderr=handle)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not (out / "checkpoint-2" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGUSR1)
        proc.wait(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert proc.returncode == 75, text[-3000:]
    assert text.count("exitcode  : 75") == 2, text[-3000:]  # both workers stopped with 75
    step = int(text.split("stopped by signal 10 after step ")[1].split(":")[0])
    assert (out / f"checkpoint-{step}" / "trainer_state.json").is_file() and not (out / "final").exists()
