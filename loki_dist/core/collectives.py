"""Collectives that move tensors between ranks: sums, a maximum, gathers, and streams to rank 0.

Each works with a process group or without one (one process: the value itself), and on whatever device
the caller's tensor lives: NCCL moves only CUDA tensors and gloo only CPU ones, so every collective goes
through `_on_wire` and hands its result back on the caller's device. The streams (`reduce_to_main`,
`stream_to_main`) hand rank 0 the result in pieces of at most `chunk_bytes`, so that no rank holds more
than its own tensors and one piece: what lets rank 0 write statistics and scores larger than its memory.

The process group itself (joining it, leaving it, its timeout, naming a stage whose collective broke off)
and the agreement of every rank on what went wrong are distributed.py's.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist


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
