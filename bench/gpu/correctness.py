"""Part 1 of bench/gpu_check.py: is loki_dist right on the device, not only on the CPU?

`pytest -m gpu tests/test_gpu.py` in one worker: ZeRO-3 bf16 training (split and masked rows, with CPU
offload too, SIGKILL and resume), the ZeRO-3 loader, attribution `fast` against `reference`, `attribute`
and `evaluate` against CPU references, and every collective on device and CPU tensors. A pytest plugin
records each test as it ends, and the tests record the figures they measure, so a run cut short by the
budget keeps what it checked (tests/gpu_launch.py starts the tests' processes at once, most valuable first).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .common import REPO, child_env, run_child, worker_args


class _Recorder:
    """pytest plugin: one JSON line per test phase as it ends, so a run cut short keeps what it did."""

    def __init__(self, path: Path):
        self.path = path

    def pytest_runtest_logreport(self, report) -> None:
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        elif report.failed:
            message = report.longreprtext.strip().splitlines()[-1]
        entry = {"test": report.nodeid.split("::", 1)[-1], "when": report.when, "outcome": report.outcome,
                 "seconds": report.duration, "message": message[:400]}  # fmt: skip
        with self.path.open("a") as handle:
            handle.write(json.dumps(entry) + "\n")


def worker(opts) -> None:
    """In the child: the `gpu` tests, each recorded to --result as it ends (the figures too, by the tests)."""
    import pytest

    os.environ["LOKI_GPU_FIGURES"] = str(opts.result)
    os.environ["LOKI_GPU_TEST_DEVICE"] = opts.device
    args = [str(REPO / "tests" / "test_gpu.py"), "-m", "gpu", "-v", "-p", "no:cacheprovider"]
    sys.exit(pytest.main(args, plugins=[_Recorder(opts.result)]))


def run(opts, seconds: float, work: Path) -> dict:
    """The part as gpu.json holds it: each test's outcome, seconds and message, and the tests' figures."""
    lines = work / "correctness.jsonl"
    started = time.perf_counter()
    status = run_child(
        worker_args(opts, "correctness", lines), seconds, opts.logs / "correctness.log", child_env(opts)
    )
    tests, figures = {}, {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    for line in lines.read_text().splitlines() if lines.exists() else []:
        entry = json.loads(line)
        if "name" in entry:
            figures[entry["name"]] = entry["value"]
            continue
        test = tests.setdefault(entry["test"], {"outcome": "passed", "seconds": 0.0, "message": ""})
        test["seconds"] += entry["seconds"]
        if rank[entry["outcome"]] > rank[test["outcome"]]:
            test.update(outcome=entry["outcome"], message=entry["message"])
    counts = {o: sum(t["outcome"] == o for t in tests.values()) for o in ("passed", "failed", "skipped")}
    summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no test ran"
    if status not in ("ok", "failed (exit 1)"):  # exit 1 is pytest's "some tests failed", shown above
        summary += f"; pytest {status}"
    return {"status": summary, "seconds": time.perf_counter() - started, "tests": tests, "figures": figures}
