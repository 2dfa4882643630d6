"""How `loki-dist train` (and `attribute`) end early: on a stop signal (requeue) or on divergence, and
their exit statuses.

Requeue: SIGUSR1 or SIGTERM (Slurm's warning before the time limit, a preemption, `kill`) does not stop
a step half-way. The step in progress finishes, every rank agrees on the stop at the step boundary, a
checkpoint is saved, and the process exits with REQUEUE_EXIT_CODE; the next run with the same command
resumes from that checkpoint (`--resume auto`, which skips, with a warning, checkpoints that
`checkpoint.damage` finds damaged).

Divergence: a NaN or Inf loss or gradient norm on any rank, agreed at the same step boundary (in the
same one-element collective as the stop), or a NaN or Inf in the rows a checkpoint would save, ends the
run with DIVERGED_EXIT_CODE before anything of that step is saved: the newest checkpoint stays the last
good one, and final/ is never written from a diverged state.
"""

from __future__ import annotations

import signal

import torch

from loki_dist.core import collectives, distributed

# sysexits' EX_TEMPFAIL, "try again later": stopped on a signal after saving a checkpoint. Distinct from
# 0 (finished), 1 (crash) and 2 (user error) so that a job script can tell "requeue me" from the rest.
REQUEUE_EXIT_CODE = 75
# the loss, gradient norm or trained rows became NaN or Inf: retrying as it is will not help (lower the
# learning rate or weight decay); the newest checkpoint is from before the divergence
DIVERGED_EXIT_CODE = 3
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STACKS_SIGNAL = signal.SIGUSR2


class StopRequest:
    """Turns SIGUSR1/SIGTERM into a request to stop at the next step boundary, agreed by all ranks.

    The handler only records the signal: stopping inside a step would leave ranks in different
    collectives. `agreed` runs at every step boundary; with several ranks it all-reduces two flags, this
    rank's stop request and one more of the caller's (training: its step diverged; attribution: a save
    of the partial statistics is due by its clock), in one small collective, negligible next to a ZeRO
    step, so that a signal, a NaN or a clock that only some ranks saw acts on all of them at the same
    step. `loki-dist train` and `loki-dist attribute` both stop this way.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._record)

    def _record(self, signum: int, frame) -> None:
        self.received = signum

    def agreed(self, world: distributed.World, device: torch.device, flag: bool) -> tuple[bool, int]:
        """(whether any rank was asked to stop, on how many ranks `flag` is set)"""
        if world.size == 1:
            return self.received is not None, int(flag)
        flags = torch.tensor([float(self.received is not None), float(flag)], device=device)
        stop, bad = collectives.all_reduce_sum(flags).tolist()
        return stop > 0, int(bad)
