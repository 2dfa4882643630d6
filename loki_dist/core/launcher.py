"""Who this process is: rank, world size and local rank as the launcher set them, and where rank 0 listens.

loki_dist is started the same way by torchrun, the deepspeed launcher, accelerate or a bare `srun`; all
of them describe the job through environment variables, so rank and world size are read from there and
nothing is hard-coded. Variables that contradict each other (a rank without a world size, a rank past
it, a value that is not a number) are a UserError naming them, before any work: a guess would start a
rank that waits for peers never started, or a run whose rank 0 is missing.

A bare `srun` says only who each task is (SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID), not where
rank 0 listens: without MASTER_ADDR the rendezvous host is the step's first node (task 0 runs there), as
`scontrol` names it, or its NodeAddr where that name does not resolve, and the port MASTER_PORT or one
derived from the job and step ids.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from loki_dist.core.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_count(env: Mapping[str, str], name: str, low: int) -> int | None:
    """A launcher's integer variable (None when unset): a rank, a size, a job id."""
    value = env.get(name)
    if value in (None, ""):
        return None
    try:
        number = int(value)
    except ValueError:
        number = None
    if number is None or number < low:
        raise UserError(f"{name}={value}: expected {'a positive' if low else 'a non-negative'} integer")
    return number


def _srun_step(env: Mapping[str, str]) -> bool:
    """A task of an srun step that no launcher of ours started (torchrun and co. set RANK).

    SLURM_STEP_NUM_TASKS, not SLURM_NTASKS: an sbatch script's own shell has SLURM_NTASKS (the job's
    task count) and SLURM_PROCID 0 too, and a plain command there is one process, not rank 0 of many.
    """
    return "RANK" not in env and bool(env.get("SLURM_STEP_NUM_TASKS"))


def world_from_env() -> World:
    """Rank and world size as the launcher set them (torchrun/deepspeed/accelerate first, then srun);
    variables that contradict each other are a UserError naming them (see the top)."""
    env = os.environ
    srun = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    rank_name, size_name, local_name = srun if _srun_step(env) else ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    rank, size = env_count(env, rank_name, 0), env_count(env, size_name, 1)
    local_rank = env_count(env, local_name, 0)
    if (rank is None) != (size is None):
        given, missing = (rank_name, size_name) if size is None else (size_name, rank_name)
        raise UserError(
            f"{given}={env[given]} but no {missing}: a launcher sets both; set both, or neither to run one "
            "process"
        )
    if rank is not None and rank >= size:
        raise UserError(f"{rank_name}={rank} with {size_name}={size}: expected a rank below the world size")
    if local_rank is not None and size is not None and local_rank >= size:
        raise UserError(
            f"{local_name}={local_rank} with {size_name}={size}: expected a local rank below the world size"
        )
    if size is not None and size > 1 and _srun_step(env):
        _check_srun_rendezvous(env)
    return World(rank=rank or 0, size=size or 1, local_rank=local_rank or 0)


def ranks_per_node(world: World) -> int:
    """How many of the job's ranks share this node, as the launcher says (torchrun's LOCAL_WORLD_SIZE,
    srun's SLURM_STEP_TASKS_PER_NODE such as "8(x4)"); the whole world where none says."""
    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    if not local and _srun_step(os.environ):
        local = os.environ.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
    return int(local) if local.isdigit() and 0 < int(local) <= world.size else world.size


def world_or_one() -> World:
    """world_from_env() for what is said on the way out: one process where the launcher's variables
    contradict each other (that is then the error being reported, and it must still be printed)."""
    try:
        return world_from_env()
    except UserError:
        return World(rank=0, size=1, local_rank=0)


def slurm_port(job_id: int, step_id: int) -> int:
    """A port every task of one srun step derives alike, distinct for the steps of a job (up to 16 at
    once) and spread over jobs; in 20000-29999, below Linux's ephemeral ports."""
    return 20000 + (job_id * 16 + step_id) % 10000


def _run_scontrol(*args: str) -> str:
    proc = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=60)
    return proc.stdout if proc.returncode == 0 else ""


def _first_node_address(nodelist: str) -> str:
    """The step's first node: its name where that resolves, else its NodeAddr (as srun_torchrun.sh)."""
    unset = f"under srun with SLURM_STEP_NODELIST={nodelist} but no MASTER_ADDR:"
    advice = "export MASTER_ADDR=<address of that list's first node> (and MASTER_PORT) for every task"
    if shutil.which("scontrol") is None:
        raise UserError(f"{unset} scontrol is not found to look up its first node; {advice}")
    names = _run_scontrol("show", "hostnames", nodelist).split()
    if not names:
        raise UserError(f"{unset} scontrol cannot expand that node list; {advice}")
    try:
        socket.getaddrinfo(names[0], None)
        return names[0]
    except OSError:
        pass
    for field in _run_scontrol("show", "node", names[0]).split():
        if field.startswith("NodeAddr=") and field != "NodeAddr=":
            return field.split("=", 1)[1]
    raise UserError(
        f"{unset} node {names[0]} does not resolve and scontrol shows no NodeAddr for it; {advice}"
    )


def _check_srun_rendezvous(env: Mapping[str, str]) -> None:
    """What rendezvous_env needs of a step of several tasks (checked with the rank variables, before any
    work): where rank 0 runs, given or a node list to find it in, and a port, given or derivable."""
    tasks = f"under srun with SLURM_STEP_NUM_TASKS={env['SLURM_STEP_NUM_TASKS']}"
    if not env.get("MASTER_ADDR") and not (env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")):
        raise UserError(
            f"{tasks} but neither SLURM_STEP_NODELIST nor SLURM_JOB_NODELIST: nothing says where rank 0 "
            "runs; export MASTER_ADDR=<its address> (and MASTER_PORT) for every task"
        )
    if not env.get("MASTER_PORT"):
        if env_count(env, "SLURM_JOB_ID", 0) is None:
            raise UserError(f"{tasks} but no SLURM_JOB_ID to derive a port from: export MASTER_PORT")
        env_count(env, "SLURM_STEP_ID", 0)


def rendezvous_env(env: MutableMapping[str, str]) -> None:
    """Under a bare srun, fill in MASTER_ADDR and MASTER_PORT where the user did not (see the top)."""
    if not _srun_step(env):
        return
    _check_srun_rendezvous(env)
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not env.get("MASTER_ADDR"):
        env["MASTER_ADDR"] = _first_node_address(nodes)
    if not env.get("MASTER_PORT"):
        env["MASTER_PORT"] = str(slurm_port(int(env["SLURM_JOB_ID"]), int(env.get("SLURM_STEP_ID") or 0)))
    if env.get("SLURM_PROCID") == "0":  # where a hung start looks first, as srun_torchrun.sh's line
        where = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
        on = f" on {nodes}" if nodes else ""
        print(f"+ srun rendezvous {where}, {env['SLURM_STEP_NUM_TASKS']} tasks{on}", file=sys.stderr)
