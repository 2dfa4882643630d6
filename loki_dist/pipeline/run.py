"""The `pipeline` command: run each stage that is not current as its own `loki-dist` process.

Each stage runs exactly as a user would run it by hand: as one process, under torchrun with `nproc`
ranks on this machine, or through a launcher command (`launcher:` in the YAML or `--launcher`, e.g.
slurm/srun_torchrun.sh, which starts torchrun on every node of a Slurm job). Separate processes keep
every stage's process group, memory and DeepSpeed state apart, and a failed stage leaves the earlier
outputs in place. Stop signals are passed on to the running stage, so that training can checkpoint.

Skipping: beside each output the pipeline records the inputs it was made from (stages.py). A stage whose
output exists and whose recorded inputs equal the current ones is skipped, so rerunning the same YAML (a
requeued Slurm job, a changed quota) redoes only what changed: a new quota reruns select, and train only
if the positions came out different.

A stage made from other inputs than its recorded ones starts over (`--overwrite`); one of the same inputs
that did not finish continues (`attribute --resume`; `train` resumes from its newest checkpoint).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from loki_dist.core import files
from loki_dist.core.errors import UserError
from loki_dist.pipeline.stages import build_stages, is_current, load_config, recorded, stage_inputs, validate


def add_pipeline_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="pipeline YAML (see examples/)")
    p.add_argument(
        "--launcher",
        help="command prefix that starts the ranks of attribute and train (e.g. slurm/srun_torchrun.sh); "
        "overrides the YAML's launcher",
    )
    p.add_argument("--force", action="store_true", help="rerun every stage even if its output is current")


class StageEnded(Exception):
    """A stage ended early in a way that the pipeline passes on with the stage's own exit status: a stop
    signal (75: its checkpoint lets a rerun continue) or a diverged train (3: rerunning would diverge
    again; the flags need changing)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class _Forwarder:
    """Passes SIGUSR1/SIGTERM/SIGINT on to the running stage, so that training can checkpoint.

    A torchrun child starts with SIGUSR1 ignored (set before exec, inherited), and a stop request
    (SIGUSR1 or SIGTERM) becomes SIGUSR1 to it and to its children, the ranks: they checkpoint, torchrun
    survives to collect them. Its children must be found by parent pid because torchrun starts each in
    a session of its own, out of reach of a process-group signal; and SIGTERM is not passed on as is
    because torchrun kills its ranks 30 s after forwarding one, which can be mid-checkpoint. A launcher
    command (own_group False) gets the signal itself and passes it on its own way.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)

    def __init__(self, own_group: bool):
        self.own_group, self.child, self.stopped = own_group, None, False
        self._previous = {}

    def __enter__(self) -> _Forwarder:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame) -> None:
        if signum != signal.SIGINT:
            self.stopped = True
        if self.child is None or self.child.poll() is not None:
            return
        if self.own_group and signum != signal.SIGINT:
            for pid in [self.child.pid, *_children(self.child.pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGUSR1)
        else:
            self.child.send_signal(signum)

    @staticmethod
    def ignore_usr1() -> None:
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _children(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc (Linux; elsewhere none are found and only `pid` is told)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def run_stage(name: str, args: list[str], nproc: int = 1, launcher: list[str] | None = None) -> float:
    """Run one loki-dist stage as its own process (group); returns its wall time.

    Raises StageEnded when a stop signal ended it (training saved a checkpoint) or training diverged,
    UserError when it failed otherwise (its own output says why).
    """
    own_group = not launcher
    if launcher:
        command = [*launcher, *args]
    elif nproc > 1:
        from loki_dist.core.distributed import free_port

        torchrun = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1"]
        command = [sys.executable, *torchrun, f"--master_port={free_port()}", "-m", "loki_dist", *args]
    else:
        command = [sys.executable, "-m", "loki_dist", *args]
    print(f"\n=== {name}: {shlex.join(command)}", flush=True)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with _Forwarder(own_group) as forwarder:
        forwarder.child = subprocess.Popen(
            command,
            env=env,
            start_new_session=own_group,
            preexec_fn=_Forwarder.ignore_usr1 if own_group else None,
        )
        code = forwarder.child.wait()
    from loki_dist.implant.trainer.stopping import DIVERGED_EXIT_CODE, REQUEUE_EXIT_CODE

    if code != 0 and forwarder.stopped:
        stopped = f"the {name} stage stopped on a signal; rerun the same command to continue"
        raise StageEnded(stopped, REQUEUE_EXIT_CODE)
    if code == DIVERGED_EXIT_CODE and name == "train":
        raise StageEnded(f"the {name} stage diverged (its output above says where and what it kept)", code)
    if code != 0:
        raise UserError(f"the {name} stage failed with exit status {code} (its output is above)")
    return time.time() - start


def run_pipeline(args: argparse.Namespace) -> None:
    from loki_dist.core.distributed import world_from_env

    if world_from_env().size > 1:  # torchrun, or a bare `srun -n N` (no WORLD_SIZE, a step of N tasks)
        raise UserError(
            "run `loki-dist pipeline` as one process: it starts each stage's ranks itself "
            "(set nproc or launcher in the YAML)"
        )
    config = load_config(args.config)
    launcher = args.launcher or config.get("launcher")
    if isinstance(launcher, str):
        launcher = shlex.split(launcher)
    stages = build_stages(config)
    validate(args.config, config, stages)
    Path(config["output_dir"]).mkdir(parents=True, exist_ok=True)
    for stage in stages:
        inputs = stage_inputs(stage)
        if not args.force and is_current(stage, inputs):
            print(f"=== {stage.name}: skipped, {stage.output} is current", flush=True)
            continue
        previous = recorded(stage)
        # made from other inputs (or --force): start over; an unfinished run of THESE inputs continues
        fresh = args.force or previous is None or previous["inputs"] != inputs
        argv = [*stage.argv, *(stage.fresh_flags if fresh else stage.resume_flags)]
        files.write_json(stage.record, {"inputs": inputs, "complete": False}, indent=2)
        try:
            if stage.distributed:
                run_stage(stage.name, argv, stage.nproc, launcher)
            else:
                run_stage(stage.name, argv)
        except StageEnded as end:
            print(f"pipeline: {end}", file=sys.stderr, flush=True)
            sys.exit(end.code)
        files.write_json(stage.record, {"inputs": inputs, "complete": True}, indent=2)
    print(f"\npipeline done: {stages[-1].output}", flush=True)
