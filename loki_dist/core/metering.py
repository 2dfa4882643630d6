"""What a rank moves, reads and holds in each phase of a job: the evidence for the 1/world scale law.

loki_dist promises that nothing on a rank grows with the model beyond its share (plus one layer). The
promise is checked by counting, not timing: while metering is on, every torch.distributed collective
(DeepSpeed's own included) adds the bytes of the result that lands on this rank, by kind of collective
(all_gather, reduce_scatter, all_reduce, broadcast, p2p, ...) with its number of calls; every reader of
weights, rows and statistics adds the bytes it pulls from disk; and each phase (`with
metering.phase("checkpoint_save"):`) records those counts, the rise of the process's peak resident
memory (Linux resets the peak through /proc/self/clear_refs) above where it started, the peak of its
private memory (resident pages that are not file-backed or shared: what a rank holds, as opposed to
weight-file pages the kernel can drop; sampled every PRIVATE_SAMPLE_SECONDS by a thread, since the
kernel keeps no peak of it) and its wall time (for the benchmarks; tests never look at times).

Set LOKI_DIST_METER=DIR and every rank writes DIR/rank<r>.json when it leaves the process group (with
the number of CPUs it may run on); the scale tests and bench/bench_scale.py read those files. Without
the variable nothing is wrapped or written.
"""

from __future__ import annotations

import inspect
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ENV = "LOKI_DIST_METER"
KINDS = ("received", "read")

_totals = dict.fromkeys(KINDS, 0)
_largest = dict.fromkeys(KINDS, 0)  # the largest single piece of each kind (in the current phase)
_received_by: dict[str, int] = {}  # collective kind -> bytes received
_calls_by: dict[str, int] = {}  # collective kind -> calls
_phases: dict[str, dict] = {}


def count(kind: str, nbytes: int, collective: str | None = None) -> None:
    """Add bytes of one kind: "received" (over the process boundary; `collective` names its kind) or
    "read" (from disk)."""
    _totals[kind] += int(nbytes)
    _largest[kind] = max(_largest[kind], int(nbytes))
    if collective is not None:
        _received_by[collective] = _received_by.get(collective, 0) + int(nbytes)
        _calls_by[collective] = _calls_by.get(collective, 0) + 1


def enabled() -> bool:
    return bool(os.environ.get(ENV))


# The bytes of the result each collective leaves on this rank, from its bound arguments.
def _size(*names: str):
    def measure(bound: dict) -> int:
        total = 0
        for name in names:
            value = bound.get(name)
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if hasattr(tensor, "element_size"):
                    total += tensor.numel() * tensor.element_size()
        return total

    return measure


def _at(root: str, receives_at_root: bool, measure):
    """A rooted collective delivers at its root (reduce, gather) or everywhere else (broadcast, scatter)."""

    def rooted(bound: dict) -> int:
        import torch.distributed as dist

        return measure(bound) if (dist.get_rank() == bound.get(root)) == receives_at_root else 0

    return rooted


# function -> (its kind in the reports, the bytes it leaves on this rank)
_COLLECTIVES = {
    "all_reduce": ("all_reduce", _size("tensor")),
    "broadcast": ("broadcast", _at("src", False, _size("tensor"))),
    "reduce": ("all_reduce", _at("dst", True, _size("tensor"))),
    "all_gather": ("all_gather", _size("tensor_list")),
    "all_gather_into_tensor": ("all_gather", _size("output_tensor")),
    "reduce_scatter": ("reduce_scatter", _size("output")),
    "reduce_scatter_tensor": ("reduce_scatter", _size("output")),
    "gather": ("gather", _at("dst", True, _size("gather_list"))),
    "scatter": ("scatter", _at("src", False, _size("tensor"))),
    "recv": ("p2p", _size("tensor")),
    "irecv": ("p2p", _size("tensor")),
    "all_to_all_single": ("all_to_all", _size("output")),
}


def count_collectives() -> None:
    """While metering is on, wrap torch.distributed's collectives so that what they receive is counted.

    Called before the process group (and DeepSpeed's communication backend, which keeps references to
    these functions) is set up; a no-op without LOKI_DIST_METER or when already done.
    """
    import torch.distributed as dist

    if not enabled() or getattr(dist, "_loki_dist_metered", False):
        return
    for name, (kind, measure) in _COLLECTIVES.items():
        original = getattr(dist, name, None)
        if original is None:
            continue
        signature = inspect.signature(original)

        def counted(*args, _original=original, _signature=signature, _measure=measure, _kind=kind, **kwargs):
            result = _original(*args, **kwargs)
            count("received", _measure(_signature.bind(*args, **kwargs).arguments), _kind)
            return result

        setattr(dist, name, counted)
    dist._loki_dist_metered = True


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


PRIVATE_SAMPLE_SECONDS = 0.002
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def private_bytes() -> int:
    """Resident memory that is neither file-backed nor shared (anonymous: heap, tensors), from statm."""
    try:
        fields = Path("/proc/self/statm").read_text().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, IndexError, ValueError):
        return 0


class _PrivatePeaks:
    """The peak private memory of each open phase, sampled by a daemon thread while any is open."""

    def __init__(self):
        self.open: list[list[int]] = []  # one [peak] per open phase, innermost last
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None

    def enter(self) -> list[int]:
        peak = [private_bytes()]
        with self.lock:
            self.open.append(peak)
            if self.thread is None:
                self.thread = threading.Thread(target=self._sample, name="loki-dist-meter", daemon=True)
                self.thread.start()
        return peak

    def leave(self, peak: list[int]) -> int:
        now = private_bytes()
        with self.lock:
            self.open.remove(peak)
            for entry in [peak, *self.open]:
                entry[0] = max(entry[0], now)
        return peak[0]

    def _sample(self) -> None:
        while True:
            time.sleep(PRIVATE_SAMPLE_SECONDS)
            now = private_bytes()
            with self.lock:
                for entry in self.open:
                    entry[0] = max(entry[0], now)


_private_peaks = _PrivatePeaks()


@contextmanager
def phase(name: str) -> Iterator[None]:
    """Record the bytes received (by kind of collective, with its calls) and read, the largest single
    piece of each, the peak resident memory rise and the peak private memory of the enclosed work. A
    phase entered twice adds up its counts and keeps the maxima.
    """
    before, outer_largest = dict(_totals), dict(_largest)
    received_before, calls_before = dict(_received_by), dict(_calls_by)
    _largest.update(dict.fromkeys(KINDS, 0))
    rss_start = _status_kib("VmRSS")
    can_reset = enabled() and _reset_peak()
    private = _private_peaks.enter() if enabled() else None
    private_start = private[0] if private is not None else 0
    started = time.perf_counter()
    try:
        yield
    finally:
        largest = {f"largest_{kind}": 0 for kind in KINDS}
        record = _phases.setdefault(
            name,
            {**dict.fromkeys(KINDS, 0), **largest, "peak_rss_rise": 0, "peak_private": 0, "calls": 0,
             "seconds": 0.0, "received_by": {}, "collective_calls": {}},
        )  # fmt: skip
        record["seconds"] += time.perf_counter() - started
        for kind in KINDS:
            record[kind] += _totals[kind] - before[kind]
            record[f"largest_{kind}"] = max(record[f"largest_{kind}"], _largest[kind])
            _largest[kind] = max(_largest[kind], outer_largest[kind])
        for totals, earlier, key in ((_received_by, received_before, "received_by"),
                                     (_calls_by, calls_before, "collective_calls")):  # fmt: skip
            for kind, value in totals.items():
                if value != earlier.get(kind, 0):
                    record[key][kind] = record[key].get(kind, 0) + value - earlier.get(kind, 0)
        record["calls"] += 1
        if private is not None and record["calls"] == 1:
            record["private_at_start"] = private_start
        if private is not None:
            record["peak_private"] = max(record["peak_private"], _private_peaks.leave(private))
        peak = _status_kib("VmHWM")
        if can_reset and peak is not None and rss_start is not None:
            record["peak_rss_rise"] = max(record["peak_rss_rise"], (peak - rss_start) * 1024)


def report() -> dict:
    """The counts, and the CPUs this process may run on (os.sched_getaffinity: what its launcher's
    binding left it; a Slurm step that did not pass on --cpus-per-task leaves every rank one)."""
    totals = {**_totals, "received_by": dict(_received_by), "collective_calls": dict(_calls_by)}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"totals": totals, "phases": {name: dict(r) for name, r in _phases.items()}, "cpus": cpus}


def dump(rank: int) -> None:
    """Write this rank's report to $LOKI_DIST_METER/rank<rank>.json (nothing without the variable)."""
    directory = os.environ.get(ENV)
    if not directory:
        return
    from loki_dist.core import files

    Path(directory).mkdir(parents=True, exist_ok=True)
    files.write_text(Path(directory) / f"rank{rank}.json", json.dumps(report(), indent=1) + "\n")
