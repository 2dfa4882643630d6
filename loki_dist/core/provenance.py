"""The line every measured table starts with: when, at which commit, on what machine, by which command.

A figure without its date, commit and machine cannot be told stale from current; the bench scripts and
the demo write this line themselves so that a table is never pasted without it. Outside a git checkout
(an installed package) the commit is the package's version.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def commit() -> str:
    """The checkout's short commit, with `+changes` when the measured code (the package, bench/*.py) differs
    from it (the tables themselves may differ: they are what a run rewrites)."""

    from loki_dist import __version__

    if not (REPO / ".git").exists():  # installed: REPO is site-packages, maybe inside someone's repository
        return f"loki-dist {__version__}"

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=REPO).stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "loki_dist", "bench/*.py")
    return head + ("+changes" if changed else "")


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cores} CPU cores, {memory:.0f} GiB, {device}; torch {torch.__version__}"


def measured(command: str, when: str | None = None, at: str | None = None, on: str | None = None) -> str:
    """The line for a run now, or (`when`, `at`, `on`) for one whose results a script re-renders."""
    when, at, on = when or datetime.date.today(), at or commit(), on or machine()
    return f"Measured {when} at commit {at} ({on}): `{command}`."
