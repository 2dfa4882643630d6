"""One `train` at a time per output directory: a lock file naming the job that holds it.

Two runs into one directory would each prune, overwrite and export the other's checkpoints, and the last
to finish would silently win. So rank 0 takes OUT/.loki-dist-train.lock before it looks at the
directory's checkpoints, holds it for the whole job and removes it on every way out; a second run is
refused in one line before any work.

A run killed outright (SIGKILL, a node lost) cannot remove its lock. The lock records where its holder
runs (host, pid and that process's start time, so that a reused pid is not mistaken for it) and, under
Slurm, the job and its restart count. A lock is stale when its holder is gone from this host, or when
it was taken by an earlier run of this same Slurm job (a requeued job runs only once at a time). A lock
held from another host cannot be judged from here: the refusal says so and names the file to delete.

The lock file is written whole under a temporary name and then hard-linked into place, which fails if
the lock exists: two runs starting at once cannot both take it, also on NFS.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path

from loki_dist.core import files
from loki_dist.core.errors import UserError

LOCK_NAME = ".loki-dist-train.lock"


def _process_start(pid: int) -> str | None:
    """When `pid` started, in clock ticks since boot (Linux), or None where that cannot be read."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]  # field 22 of stat, counted after the command name


def _this_process() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_start": _process_start(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
    }


def holder_is_gone(holder: dict) -> bool | None:
    """True when the lock's holder has ended, False when it runs, None when this host cannot tell."""
    me = _this_process()
    same_job = holder.get("slurm_job") and holder["slurm_job"] == me["slurm_job"]
    if same_job and holder.get("slurm_restart") != me["slurm_restart"]:
        return True  # an earlier run of this job: Slurm ended it before requeueing
    if holder.get("host") != me["host"]:
        return None
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    return holder.get("pid_start") is not None and _process_start(pid) != holder["pid_start"]


class RunLock:
    """The lock of one output directory, held by this process once `acquire` returns."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.path = out_dir / LOCK_NAME
        self.created_dir = False
        self.text = json.dumps(_this_process()) + "\n"  # what this process writes, and finds on release

    @classmethod
    def acquire(cls, out_dir: Path) -> RunLock:
        """Take the lock of `out_dir` (created if missing), or raise UserError saying who holds it."""
        lock = cls(out_dir)
        lock.created_dir = not out_dir.exists()
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"--output-dir {out_dir}: cannot create it ({err.strerror})") from None
        try:
            for _ in range(3):  # a stale lock removed, or a holder that just released it: try again
                if lock._create():
                    return lock
                lock._judge_existing()
        except BaseException:
            lock._remove_created_dir()
            raise
        raise UserError(f"--output-dir {out_dir}: could not take {lock.path} (other runs keep taking it)")

    def _create(self) -> bool:
        temporary = files.temporary_name(self.path)
        try:
            temporary.write_text(self.text)
            files.fsync_tree(temporary)
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        except OSError as err:
            raise UserError(f"--output-dir {self.out_dir}: cannot write {self.path.name} ({err})") from None
        finally:
            temporary.unlink(missing_ok=True)

    def _judge_existing(self) -> None:
        """Remove the existing lock if its holder is gone; else raise UserError naming the holder."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return  # released meanwhile
        try:
            holder = json.loads(text)
            who = f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
        except (ValueError, TypeError, KeyError):
            raise UserError(
                f"--output-dir {self.out_dir}: {self.path} exists but is not a loki-dist lock; delete it "
                "if no train runs into this directory"
            ) from None
        gone = holder_is_gone(holder)
        if gone:
            print(
                f"loki-dist train: warning: {self.path}: its run ({who}) is gone; taking it", file=sys.stderr
            )
            self._break(text)
            return
        if gone is None:
            raise UserError(
                f"--output-dir {self.out_dir}: a loki-dist train on another host holds it ({who}); this "
                f"host cannot tell whether that run still lives: if it does not, delete {self.path}"
            )
        raise UserError(f"--output-dir {self.out_dir}: another loki-dist train is running into it ({who})")

    def _break(self, seen: str) -> None:
        """Remove a stale lock, unless another run replaced it since it was read."""
        moved = files.temporary_name(self.path)
        try:
            os.rename(self.path, moved)
        except FileNotFoundError:
            return
        if moved.read_text() != seen:  # a live lock taken meanwhile: put it back
            with contextlib.suppress(FileExistsError):
                os.link(moved, self.path)
        moved.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock (if it is still ours), and the output directory if the lock created it empty."""
        with contextlib.suppress(OSError):
            if self.path.read_text() == self.text:
                self.path.unlink()
        self._remove_created_dir()

    def _remove_created_dir(self) -> None:
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.out_dir.rmdir()  # only if empty: the run wrote nothing
