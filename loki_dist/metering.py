"""What a rank moves, reads and holds in each phase of a job: the evidence for the 1/world scale law.

loki_dist promises that nothing on a rank grows with the model beyond its share (plus one layer). The
promise is checked by counting, not timing: every collective helper in `distributed.py` adds the bytes
that reach this rank, every reader of rows and statistics adds the bytes it pulls from disk, and each
phase (`with metering.phase("checkpoint_save"):`) records those counts and the rise of the process's
peak resident memory (Linux resets the peak through /proc/self/clear_refs) above where it started.

Set LOKI_DIST_METER=DIR and every rank writes DIR/rank<r>.json when it leaves the process group; the
scale tests and bench/bench_scale.py read those files. Without the variable nothing is written and the
counting costs a few integer additions per collective.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "LOKI_DIST_METER"
KINDS = ("received", "read")

_totals = dict.fromkeys(KINDS, 0)
_phases: dict[str, dict[str, int]] = {}


def count(kind: str, nbytes: int) -> None:
    """Add bytes of one kind: "received" (over the process boundary) or "read" (from disk)."""
    _totals[kind] += int(nbytes)


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Record the bytes received and read, and the peak resident memory rise, of the enclosed work.

    A phase entered twice adds up its counts and keeps the larger memory rise.
    """
    before = dict(_totals)
    rss_start = _status_kib("VmRSS")
    can_reset = os.environ.get(ENV) is not None and _reset_peak()
    try:
        yield
    finally:
        record = _phases.setdefault(name, {**dict.fromkeys(KINDS, 0), "peak_rss_rise": 0, "calls": 0})
        for kind in KINDS:
            record[kind] += _totals[kind] - before[kind]
        record["calls"] += 1
        peak = _status_kib("VmHWM")
        if can_reset and peak is not None and rss_start is not None:
            record["peak_rss_rise"] = max(record["peak_rss_rise"], (peak - rss_start) * 1024)


def report() -> dict:
    return {"totals": dict(_totals), "phases": {name: dict(r) for name, r in _phases.items()}}


def dump(rank: int) -> None:
    """Write this rank's report to $LOKI_DIST_METER/rank<rank>.json (nothing without the variable)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    from loki_dist import files

    Path(directory).mkdir(parents=True, exist_ok=True)
    files.write_text(Path(directory) / f"rank{rank}.json", json.dumps(report(), indent=1) + "\n")
