"""Process-group plumbing shared by every stage.

Who each process is, and where rank 0 listens, comes from the launcher's variables (launcher.py; every
stage takes World and world_from_env from here). NCCL on CUDA, gloo on CPU. srun may bind one GPU per
task, so the device is local rank only where this process sees that many GPUs (device 0 where it sees
exactly one). A rendezvous that fails is said as that, naming MASTER_ADDR and MASTER_PORT (a port
already taken on rank 0's host, or a rank 0 never reached), not as a peer that died.

Every wait on a peer is bounded. A rank whose peer has died learns it at once under gloo (the connection
closes); a peer that is alive but stuck, or one gone under NCCL, ends the wait after TIMEOUT_ENV minutes
(the process group's timeout, default DEFAULT_TIMEOUT_MINUTES, instead of torch's 30). Work is named by
`stage(...)`, so that a collective that fails says which stage it broke, in one line (CollectiveFailed).

What each rank's checks found is agreed by all of them (`agreement`), over a gloo group that lives and
dies with the process group. The collectives that move tensors (sums, gathers, streams to rank 0) are
collectives.py's.
"""

from __future__ import annotations

import os
import socket
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING

from loki_dist.core import metering, quiet
from loki_dist.core.errors import RankErrors, UserError, rank_list
from loki_dist.core.launcher import (  # noqa: F401 - every stage takes these from here
    World,
    env_count,
    ranks_per_node,
    rendezvous_env,
    world_from_env,
    world_or_one,
)

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist


def _torch():
    """torch, imported on first use: the commands that never need it (`--help`, `forgetting`, a mistake
    refused before any work) start in a fraction of the time without it (issue 24.4)."""
    import torch
    import torch.distributed  # noqa: F401  (torch.distributed as an attribute of torch from here on)

    return torch


def in_group() -> bool:
    """Whether this process has joined a process group. Before torch is imported it cannot have."""
    return "torch.distributed" in sys.modules and _torch().distributed.is_initialized()


def joined_world() -> World:
    """The world of the process group this process has joined (the Python API's: its caller's), or
    one process when it has joined none."""
    if not in_group():
        return World(rank=0, size=1, local_rank=0)
    dist = _torch().distributed
    return World(dist.get_rank(), dist.get_world_size(), env_count(os.environ, "LOCAL_RANK", 0) or 0)


def device_index(local_rank: int, visible: int) -> int:
    """The CUDA device of a process with this local rank that sees `visible` devices.

    One visible device is this process's own (srun --gpus-per-task=1, CUDA_VISIBLE_DEVICES per task);
    with several, local rank i takes device i. A local rank past the visible devices has no right
    answer (a modulo would put two ranks on one GPU when they share the list), so that is an error.
    """
    if visible == 1:
        return 0
    if 0 <= local_rank < visible:
        return local_rank
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    listed = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
    raise UserError(
        f"local rank {local_rank} but this process sees {visible} GPUs{listed}: start one process per "
        "GPU, or give each task its own GPU (srun --gpus-per-task=1)"
    )


def _device_ordinal(world: World) -> int:
    torch = _torch()
    if torch.cuda.is_available():
        return device_index(world.local_rank, torch.cuda.device_count())
    return world.local_rank


def device_for(world: World) -> torch.device:
    torch = _torch()
    if torch.cuda.is_available():
        index = _device_ordinal(world)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


TIMEOUT_ENV = "LOKI_DIST_TIMEOUT_MINUTES"
# Long enough for the longest legitimate wait between two collectives (a rank writing its share of a 70B
# export or checkpoint to a slow shared file system while its peers wait at the closing barrier), short
# enough that a stuck job ends well before torch's 30 minutes.
DEFAULT_TIMEOUT_MINUTES = 10.0


def timeout() -> timedelta:
    """How long any collective may wait for a peer: TIMEOUT_ENV minutes (fractions allowed)."""
    text = os.environ.get(TIMEOUT_ENV, "")
    try:
        minutes = float(text) if text else DEFAULT_TIMEOUT_MINUTES
    except ValueError:
        minutes = float("nan")
    # under a second, no rendezvous completes (torch's own timeouts count whole milliseconds)
    if not minutes >= 1 / 60 or minutes == float("inf"):
        raise UserError(f"{TIMEOUT_ENV}={text}: expected a number of minutes, at least 1/60 (a second)")
    return timedelta(minutes=minutes)


def init(world: World, always: bool = False, timeout_minutes: float | None = None) -> None:
    """Join the process group when there is more than one process (or `always`, as DeepSpeed wants).

    timeout_minutes: how long a collective may wait for a peer (default: `timeout()`).
    """
    if in_group() or (world.size == 1 and not always):
        return
    torch = _torch()
    limit = timeout() if timeout_minutes is None else timedelta(minutes=timeout_minutes)
    if world.size == 1:
        _default("MASTER_PORT", str(free_port()))
    else:
        rendezvous_env(os.environ)
    # torch reads who this process is from the environment: say the world that was derived (under a bare
    # srun, from SLURM_*), never a RANK/WORLD_SIZE/LOCAL_RANK left over from elsewhere in the environment
    srun_step = not os.environ.get("RANK")
    os.environ["RANK"] = str(world.rank)
    os.environ["WORLD_SIZE"] = str(world.size)
    # DeepSpeed takes LOCAL_RANK for the device ordinal: under srun with one GPU per task that is 0
    if srun_step or "LOCAL_RANK" not in os.environ:
        try:
            ordinal = _device_ordinal(world)
        except UserError:  # the agreement reports it: the rendezvous must complete for every rank first
            ordinal = world.local_rank
        os.environ["LOCAL_RANK"] = str(ordinal)
    _default("MASTER_ADDR", "127.0.0.1")
    _default("MASTER_PORT", "29500")
    _check_rendezvous_address(os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"])
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    # NCCL: a collective past the timeout tears the process down (its watchdog says which collective)
    # rather than leaving it blocked on the device; torchrun sets the same for its workers, srun does not
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    metering.count_collectives()
    try:
        torch.distributed.init_process_group(backend, timeout=limit)
    except torch.distributed.DistError as err:
        raise _rendezvous_failed(err, limit) from None


def _default(name: str, value: str) -> None:
    """Set a launcher variable that is unset or empty (an empty one means unset, as world_from_env reads
    it; torch would take it as given)."""
    if not os.environ.get(name):
        os.environ[name] = value


def _check_rendezvous_address(host: str, port: str) -> None:
    """MASTER_PORT a port number, and MASTER_ADDR a name that resolves: torch retries a name that does
    not until the timeout (minutes for a typo); a failure that may pass (EAI_AGAIN) is left to it."""
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise UserError(f"MASTER_PORT={port}: expected a port number, 1 to 65535")
    try:
        socket.getaddrinfo(host, int(port))
    except socket.gaierror as err:
        if err.errno == socket.EAI_NONAME:
            raise UserError(
                f"MASTER_ADDR={host}: no such host ({err.strerror}); expected rank 0's address"
            ) from None


def _rendezvous_failed(err: dist.DistError, limit: timedelta) -> Exception:
    """What a failed rendezvous means, named by MASTER_ADDR and MASTER_PORT (not "a peer rank died":
    no collective has run yet). Rank 0 listens on MASTER_PORT: a port already taken (another job, an
    earlier run not yet gone) is what torch's store reports as EADDRINUSE; the other ranks only see that
    rank 0 never answered."""
    where = f"MASTER_ADDR={os.environ['MASTER_ADDR']} MASTER_PORT={os.environ['MASTER_PORT']}"
    text = str(err).strip()
    if "EADDRINUSE" in text:
        return UserError(
            f"{where}: the port is already in use on this host, so rank 0 cannot listen on it for its "
            "peers: choose a free MASTER_PORT (the same for every rank)"
        )
    detail = text.splitlines()[0] if text else type(err).__name__
    return CollectiveFailed(
        f"joining the other ranks at {where} failed ({TIMEOUT_ENV}={limit.total_seconds() / 60:g}; are all "
        f"ranks started, with the same MASTER_ADDR and MASTER_PORT?): {detail.split('. ')[0]}"
    )


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group cleanly: without the barrier a rank sometimes aborts at exit.

    wait_for_peers=False on every failure path: peers may be gone, or waiting in another collective.
    Also where each rank writes its metering report (metering.py), with or without a process group.
    Calling it again, or without a process group, is harmless (the CLI calls it on every exit path).
    """
    global _agreement_group
    joined = in_group()
    metering.dump(_torch().distributed.get_rank() if joined else world_or_one().rank)
    if joined:
        dist = _torch().distributed
        if wait_for_peers:
            dist.barrier()
        _agreement_group = None
        dist.destroy_process_group()


def barrier() -> None:
    if in_group():
        _torch().distributed.barrier()


class CollectiveFailed(Exception):
    """A collective broke off in a named stage: a peer rank died, or stayed silent past the timeout.

    Not a bug of this rank, and nothing its traceback would explain: the CLI prints it as one line
    (with the rank) and exits 1. The peer's own log says why it went.
    """


# what gloo says when a peer has gone (its exceptions are plain RuntimeErrors); NCCL raises DistError
_PEER_GONE = (
    "Connection closed by peer",
    "Connection reset by peer",
    "Broken pipe",
    "Timed out waiting",
    "pair closure",
)


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Run a stage of a command; a collective that breaks off inside it ends it as CollectiveFailed,
    naming the stage (the innermost one where stages nest)."""
    try:
        yield
    except RuntimeError as err:
        text = str(err)
        if not (isinstance(err, _torch().distributed.DistError) or any(m in text for m in _PEER_GONE)):
            raise
        detail = text.strip().splitlines()[0] if text.strip() else type(err).__name__
        detail = detail.split("] ", 1)[1] if detail.startswith("[") and "] " in detail else detail
        minutes = timeout().total_seconds() / 60
        raise CollectiveFailed(
            f"{name}: a collective broke off, a peer rank died or stayed silent past the timeout "
            f"({TIMEOUT_ENV}={minutes:g}): {detail.split('. ')[0]}"
        ) from None


@contextmanager
def agreement(world: World, choose_device: bool = True) -> Iterator[None]:
    """Run work that every rank does (a command's checks, its share of an export), then agree on what
    each found (joining the process group).

    Every rank reaches the agreement whether its work succeeded or not, so a mistake that some ranks see
    (a file missing on one node) stops all of them, none waits for a peer that has left, and the error
    is printed once with the ranks it concerns (errors.RankErrors). The device is chosen here too, so
    an ambiguous GPU mapping is one of the checks (not with `choose_device=False`: the Python API runs
    in the caller's process, whose device is the caller's). A rank whose checks crashed (not a
    UserError) prints its traceback before the agreement and fails it like the others: no rank is left
    waiting.
    """
    found: tuple[str, str] | None = None
    try:
        if choose_device:
            device_for(world)
        yield
    except UserError as err:
        found = ("user", str(err))
    except Exception as err:
        traceback.print_exc()
        sys.stderr.flush()
        found = ("crash", f"{type(err).__name__}: {err}")
    outcomes = _all_gather_objects(world, found)
    failures = {rank: outcome for rank, outcome in enumerate(outcomes) if outcome is not None}
    if failures:
        raise RankErrors(failures, world.size)


def same_on_every_rank(world: World, value: object, what: str) -> None:
    """Raise the same RankErrors on every rank unless every rank holds the same small `value` (one
    gather over the agreement's group)."""
    values = _all_gather_objects(world, value)
    if any(v != values[0] for v in values):
        by_value: dict[str, list[int]] = {}
        for rank, v in enumerate(values):
            by_value.setdefault(repr(v), []).append(rank)
        found = "; ".join(f"{rank_list(ranks)}: {v}" for v, ranks in by_value.items())
        message = f"the ranks disagree on {what} ({found}): do they all see the same files?"
        raise RankErrors({rank: ("user", message) for rank in range(world.size)}, world.size)


_agreement_group: dist.ProcessGroup | None = None


def agreement_barrier() -> None:
    """Wait for every rank over the group `agreement` agrees on (gloo: no GPU needed, even where a
    rank's device could not be chosen)."""
    if in_group():
        _torch().distributed.barrier(group=_agreement_group)


def _all_gather_objects(world: World, value: object) -> list:
    """Every rank's small picklable value, in rank order, over gloo (no device needed, even under NCCL)."""
    global _agreement_group
    if world.size == 1:
        return [value]
    init(world)
    dist = _torch().distributed
    if dist.get_backend() != "gloo" and _agreement_group is None:
        _agreement_group = dist.new_group(backend="gloo", timeout=timeout())
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, value, group=_agreement_group)
    return gathered


def prepare_deepspeed(world: World) -> None:
    """Make DeepSpeed use the process group we set up, and skip its CPU shared-memory op.

    DeepSpeed always wants a process group (even for one process). On CPU its communication backend
    otherwise compiles a shared-memory all-reduce kernel at start-up (about 35 s on a fresh machine)
    that gloo training does not need.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    quiet.deprecated_collectives()  # DeepSpeed's calls of deprecated torch collectives, nothing else
    init(world, always=True)
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=_torch().distributed.get_backend())


def free_port() -> int:
    """A port free on this host now, for a single-node rendezvous (the launcher binds it next)."""

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
