"""Process-group plumbing shared by every stage.

loki_dist is started the same way by torchrun, the deepspeed launcher, accelerate or a bare `srun`; all
of them describe the job through environment variables, so rank and world size are read from there and
nothing is hard-coded: NCCL on CUDA, gloo on CPU.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from loki_dist import metering


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def world_from_env() -> World:
    """Rank and world size as the launcher set them (torchrun/deepspeed/accelerate first, then srun)."""
    return World(
        rank=_env_int("RANK", "SLURM_PROCID", default=0),
        size=_env_int("WORLD_SIZE", "SLURM_NTASKS", default=1),
        local_rank=_env_int("LOCAL_RANK", "SLURM_LOCALID", default=0),
    )


def device_for(world: World) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def init(world: World, always: bool = False, timeout_minutes: int = 30) -> None:
    """Join the process group when there is more than one process (or `always`, as DeepSpeed wants)."""
    if dist.is_initialized() or (world.size == 1 and not always):
        return
    if world.size == 1:
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("RANK", str(world.rank))
    os.environ.setdefault("WORLD_SIZE", str(world.size))
    os.environ.setdefault("LOCAL_RANK", str(world.local_rank))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    metering.count_collectives()
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))


def shutdown(wait_for_peers: bool = True) -> None:
    """Leave the process group cleanly: without the barrier a rank sometimes aborts at exit.

    Also where each rank writes its metering report (metering.py), with or without a process group.
    """
    metering.dump(dist.get_rank() if dist.is_initialized() else world_from_env().rank)
    if dist.is_initialized():
        if wait_for_peers:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _on_wire(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor where the backend can move it: NCCL takes only CUDA tensors, gloo takes CPU ones.

    Callers keep statistics and flags on the CPU (the model may live anywhere), so every collective
    here goes through this and hands its result back on the caller's device.
    """
    if dist.get_backend() == "nccl":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (and returned), on whatever device `tensor` lives."""
    if dist.is_initialized():
        wire = _on_wire(tensor)
        dist.all_reduce(wire, op=dist.ReduceOp.SUM)
        if wire is not tensor:
            tensor.copy_(wire)
    return tensor


def agree_max(value: int) -> int:
    """The largest of every rank's value (the value itself without a process group)."""
    if not dist.is_initialized():
        return value
    tensor = _on_wire(torch.tensor([value], dtype=torch.int64))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def raise_if_any_failed(failure: BaseException | None, what: str) -> None:
    """Collective, reached by every rank after its share of `what`, failed or not: if any rank failed,
    every rank raises (the failed ones their own error, the others one naming the first failed rank and
    its message, as a UserError when that was a user mistake). Nobody is left waiting for a peer that
    has given up."""
    from loki_dist.errors import UserError

    mine = None if failure is None else (isinstance(failure, UserError), str(failure))
    reports = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, mine)
    if failure is not None:
        raise failure
    for rank, report in enumerate(reports):
        if report is not None:
            user_mistake, message = report
            raise (UserError if user_mistake else RuntimeError)(f"{what} failed on rank {rank}: {message}")


def all_gather_varlen(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate 1-D tensors of known, rank-dependent lengths in rank order on every rank.

    The lengths are passed in (every rank can compute them) so that no extra round trip is needed. The
    result lives on `local`'s device.
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    padded = _on_wire(torch.zeros(max(sizes), dtype=local.dtype, device=local.device))
    padded[: local.numel()] = local
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([chunk[:n] for chunk, n in zip(gathered, sizes, strict=True)]).to(local.device)


def _settled(wire: torch.Tensor) -> torch.Tensor:
    """Wait until the device is done with `wire`: a rank that only sends would otherwise queue every
    chunk of a stream on the device at once, and the bound of one chunk in flight would not hold."""
    if wire.is_cuda:
        torch.cuda.current_stream(wire.device).synchronize()
    return wire


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _staging(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """One buffer where the backend moves data, and one on the CPU (the same buffer under gloo).

    Streams reuse these for every piece, so what a rank holds stays one piece however many pass
    through it and however long a consumer keeps a reference to the last one.
    """
    host = torch.empty(numel, dtype=dtype)
    wire = _on_wire(host) if dist.is_initialized() else host
    return wire, host


def _pieces(numel: int, chunk_bytes: int, dtype: torch.dtype) -> tuple[int, range]:
    """Elements per piece, and where each piece starts."""
    step = max(1, min(numel, chunk_bytes // torch.empty((), dtype=dtype).element_size()))
    return step, range(0, numel, step)


def reduce_to_main(
    tensors: list[torch.Tensor], dtype: torch.dtype, chunk_bytes: int
) -> Iterator[tuple[int, torch.Tensor]]:
    """The sum over ranks of each tensor in turn, cast to `dtype`, handed to rank 0 in flat pieces
    (index of the tensor, piece) on the CPU.

    No rank holds more than its own tensors plus one piece of at most `chunk_bytes`, and only rank 0
    receives: a reduction to one rank delivers the sum, not every rank's copy, so rank 0 takes in the
    size of the result whatever the world size. Every rank must drain the iterator (each piece is a
    collective); the other ranks get nothing from it. A piece is valid until the next one is asked
    for. Casting per piece lets callers count in a narrow type and still sum exactly in a wide one.
    """
    flats = [tensor.reshape(-1) for tensor in tensors]
    step, _ = _pieces(max((flat.numel() for flat in flats), default=0), chunk_bytes, dtype)
    wire, host = _staging(step, dtype)
    several = dist.is_initialized() and dist.get_world_size() > 1
    for index, flat in enumerate(flats):
        for start in range(0, flat.numel(), step):
            summed = wire[: min(step, flat.numel() - start)]
            summed.copy_(flat[start : start + summed.numel()])  # widened where the backend sums
            if several:
                dist.reduce(summed, dst=0, op=dist.ReduceOp.SUM)
                _settled(summed)
                if _rank() != 0:
                    continue
            yield index, host[: summed.numel()].copy_(summed) if host is not wire else summed


def stream_to_main(local: torch.Tensor, sizes: list[int], chunk_bytes: int) -> Iterator[torch.Tensor]:
    """Every rank's 1-D `local` (lengths `sizes`, known to all) in rank order, handed to rank 0 in
    pieces of at most `chunk_bytes`; point to point, so no other rank receives anything.

    Rank 0 holds one piece of another rank's data at a time (a piece is valid until the next one is
    asked for); the other ranks send theirs and get nothing from the iterator, which they must drain.
    """
    local = local.reshape(-1)
    if _rank() == 0:
        yield from local.split(_pieces(local.numel(), chunk_bytes, local.dtype)[0])
    if len(sizes) == 1:
        return
    step, _ = _pieces(max(sizes), chunk_bytes, local.dtype)
    wire, host = _staging(step, local.dtype)
    for source, size in enumerate(sizes[1:], start=1):
        if _rank() not in (0, source):
            continue
        for start in range(0, size, step):
            part = wire[: min(step, size - start)]
            if _rank() == source:
                dist.send(part.copy_(local[start : start + part.numel()]), dst=0)
                _settled(part)  # sent before the buffer is refilled
                continue
            dist.recv(part, src=source)
            yield host[: part.numel()].copy_(part) if host is not wire else part


def prepare_deepspeed(world: World) -> None:
    """Make DeepSpeed use the process group we set up, and skip its CPU shared-memory op.

    DeepSpeed always wants a process group (even for one process). On CPU its communication backend
    otherwise compiles a shared-memory all-reduce kernel at start-up (about 35 s on a fresh machine)
    that gloo training does not need.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    init(world, always=True)
    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist.get_backend())


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
