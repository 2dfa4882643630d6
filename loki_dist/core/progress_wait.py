"""Waits that end on silence, not on a clock: the long I/O phases of a job on a slow file system.

A collective waits for its peers at most the process group's timeout (LOKI_DIST_TIMEOUT_MINUTES, 10
by default). Writing one rank's share of a 70B export to NFS or Lustre at 100-200 MB/s per client can
take longer while every rank is alive and busy, and the agreement that closes the phase would then fail
(and discard) a finished export. So in such a phase each rank tells the others of its progress through
the process group's key-value store (a counter of bytes, bumped at most every REPORT_SECONDS), and a
rank that is done waits for the others there: until every rank is done, failing only once no rank has
made progress for the whole timeout (a peer died, or its file system stopped). The closing agreement
then finds every rank at it at once.

    with progress_wait.waiting(world, "export") as progress:
        for piece in my_share:
            write(piece)
            progress.advanced(len(piece))

A rank whose work fails counts as done too (the agreement that follows reports its error to all).
`keep_alive` is for a phase in which one rank does something that reports no progress of its own (a
download): a thread says it is alive while it lasts. Nothing here moves tensors: the store is the one
the ranks met through, and a single process waits for nobody.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from loki_dist.core.distributed import TIMEOUT_ENV, CollectiveFailed, World, timeout

REPORT_SECONDS = 1.0  # a rank adds its progress to the store at most this often
# tests only, "RANK:SECONDS": that rank sleeps each time it makes progress (one node's slow file system;
# a real one cannot be aimed at one rank of one machine)
SLOW_ENV = "LOKI_DIST_TEST_SLOW_PROGRESS"
POLL_SECONDS = 0.5  # how often a rank that is done looks at the others' progress
_uses = itertools.count()  # every rank enters the same waits in the same order: their keys agree


def _store():
    """The store of the default process group (every launcher's rendezvous leaves one behind)."""
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


class Progress:
    """One phase's progress counters in the store: bytes (or any unit) reported, ranks done."""

    def __init__(self, world: World, name: str):
        self.world, self.name = world, name
        key = f"loki_dist/progress/{next(_uses)}/{name}"
        self.total_key, self.done_key = f"{key}/progress", f"{key}/done"
        self.store = _store() if world.size > 1 else None
        self.pending, self.reported = 0, time.monotonic()
        who, _, seconds = os.environ.get(SLOW_ENV, "").partition(":")
        self.pause = float(seconds) if who == str(world.rank) else 0.0

    def advanced(self, amount: int = 1) -> None:
        """This rank made progress (bytes written): the others hear of it within REPORT_SECONDS."""
        if self.pause:
            time.sleep(self.pause)
        if self.store is None:
            return
        self.pending += max(int(amount), 1)
        if time.monotonic() - self.reported >= REPORT_SECONDS:
            self._report()

    def _report(self) -> None:
        self.store.add(self.total_key, self.pending)
        self.pending, self.reported = 0, time.monotonic()

    def wait_for_all(self) -> None:
        """Say this rank is done; return once every rank is, or raise CollectiveFailed once no rank has
        made progress for the timeout."""
        if self.store is None:
            return
        self._report()
        self.store.add(self.done_key, 1)
        limit = timeout().total_seconds()
        seen, since = -1, time.monotonic()
        while (done := self.store.add(self.done_key, 0)) < self.world.size:
            total = self.store.add(self.total_key, 0)
            if total != seen:
                seen, since = total, time.monotonic()
            elif time.monotonic() - since > limit:
                raise CollectiveFailed(
                    f"{self.name}: no rank made progress for {limit / 60:g} minutes ({TIMEOUT_ENV}), "
                    f"{done} of {self.world.size} ranks done: a peer died or its file system stopped"
                )
            time.sleep(POLL_SECONDS)

    @contextmanager
    def keep_alive(self) -> Iterator[None]:
        """While the body runs, report progress every REPORT_SECONDS from a thread: for work that is
        bounded by its own timeouts but reports nothing (a download) while the other ranks wait."""
        if self.store is None:
            yield
            return
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(REPORT_SECONDS):
                self.store.add(self.total_key, 1)

        thread = threading.Thread(target=beat, name="loki-dist-keep-alive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


@contextmanager
def waiting(world: World, name: str) -> Iterator[Progress]:
    """Run one rank's share of a long phase; at its end (also on failure) wait for the others by their
    progress (see the module's docstring). The process group must be joined already."""
    progress = Progress(world, name)
    try:
        yield progress
    finally:
        progress.wait_for_all()
