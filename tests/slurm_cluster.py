"""A real two-node Slurm cluster on this machine, for the sbatch templates' tests.

Debian's slurmctld/slurmd 22.05 and munge, one slurm.conf under a temporary directory, two node daemons
(n1 on 127.0.0.2, n2 on 127.0.0.3: loopback only, never a private-range network). The daemons' ports
are free ones picked at start, so two clusters (two test runs on one machine) do not take each other's.
The node names do not resolve, which is what makes the templates take the rendezvous address from
NodeAddr. Tasks are bound to cores (task/affinity, TaskPluginParam=Cores), as on sites that bind by
default: a step's task runs on the CPUs its step was given, so an srun that does not pass on the job's
--cpus-per-task (Slurm >= 22.05 no longer inherits it) runs on one CPU. Every daemon is started here and
stopped here, by the pid it wrote.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}


def missing() -> str | None:
    """Why the cluster cannot run here (.ci/run installs the packages), or None when it can."""
    absent = [tool for tool in ("slurmctld", "slurmd", "sbatch", "munged") if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install {' '.join(PACKAGES)}, as .ci/run does)"
    return None


def _free_ports(count: int) -> list[int]:
    """Ports nothing listens on now, distinct (all held open until every one is chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _conf(root: Path, host: str) -> str:
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    nodes = "\n".join(
        f"NodeName={name} NodeAddr={addr} NodeHostname={host} Port={port} CPUs=2 State=UNKNOWN"
        for (name, addr), port in zip(NODES.items(), node_ports, strict=True)
    )
    # job ids differ between clusters too, so ports derived from them (a bare srun's MASTER_PORT) do
    first_job_id = random.randrange(1000, 1_000_000)
    return f"""ClusterName=lokitest
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
TaskPluginParam=Cores
SlurmdParameters=config_overrides
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
{nodes}
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
"""


class Cluster:
    """Start munged, slurmctld and two slurmd; `env` points Slurm's clients at this cluster."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.pid_files: list[Path] = []

    def start(self) -> None:
        root = self.root
        for sub in ("state", "spool/n1", "spool/n2"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(root, socket.gethostname()))
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge = root / "munged.pid"
        files = [
            f"--socket={root}/munge.sock",
            f"--log-file={root}/munged.log",
            f"--seed-file={root}/munge.seed",
        ]
        self._run(["munged", "--force", f"--key-file={key}", f"--pid-file={munge}", *files])
        self.pid_files.append(munge)
        self._run(["slurmctld", "-f", str(self.conf)])
        self.pid_files.append(root / "slurmctld.pid")
        for name in NODES:
            self._run(["slurmd", "-f", str(self.conf), "-N", name])
            self.pid_files.append(root / f"slurmd-{name}.pid")
        deadline = time.time() + 60
        while True:
            out = self.client(["sinfo", "-h", "-o", "%t %D"], check=False).stdout.split()
            if out[:2] == ["idle", "2"]:
                return
            if time.time() > deadline:
                raise RuntimeError(f"the nodes never became idle: {out}\n{self.logs()}")
            time.sleep(0.5)

    def _run(self, cmd: list[str]) -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}\n{self.logs()}")

    def client(self, cmd: list[str], check: bool = True, cwd=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr}")
        return proc

    def submit(self, args: list[str], cwd: Path, env: dict | None = None) -> str:
        proc = subprocess.run(
            ["sbatch", "--parsable", *args],
            capture_output=True,
            text=True,
            env={**self.env, **(env or {})},
            timeout=60,
            cwd=cwd,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        out = self.client(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(self, job_id: str, timeout: float = 300, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")):
        """Poll every half second (sbatch --wait notices a finished job only after up to 42 s)."""
        deadline = time.time() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.time() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def step_daemons(self) -> list[int]:
        """The slurmstepd processes of this cluster's jobs: they run in its directory, as slurmd does."""
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                comm, cwd = (entry / "comm").read_text().strip(), Path(os.readlink(entry / "cwd"))
            except OSError:  # gone meanwhile
                continue
            if comm == "slurmstepd" and cwd == self.root.resolve():
                pids.append(int(entry.name))
        return pids

    def stop(self) -> None:
        """Stop the daemons this object started, by the pids they wrote (all at once, then wait).

        First the step daemons finish: a job shows COMPLETED while its slurmstepd processes still
        report to their node daemon for a second or two, and one whose slurmd is gone retries for
        ever (seen: one left behind per run whose last test ended right after a bare srun).
        """
        deadline = time.time() + 30
        while (steps := self.step_daemons()) and time.time() < deadline:
            time.sleep(0.1)
        for pid in steps:  # still there after 30 s: stuck, and ours
            os.kill(pid, signal.SIGKILL)
        pids = []
        for pid_file in self.pid_files:
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
                pids.append(pid)
            except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
                continue
        deadline = time.time() + 15
        for pid in pids:
            while _alive(pid) and time.time() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
