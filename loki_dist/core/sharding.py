"""Splitting data across ranks: one contiguous block of items per rank, in rank order.

Attribution, evaluation and the training monitor split their samples this one way, so that per-sample
results sent in rank order come out in data order, whatever the world size. A block is a run of whole
batches (batch g is items [g*B, (g+1)*B) on any number of ranks, so an item is batched beside the same
neighbours everywhere), the first ranks getting one batch more.
"""

from __future__ import annotations

import math


def batch_shares(num_items: int, world_size: int, batch_size: int = 1) -> list[int]:
    """Whole batches per rank, in rank order."""
    base, extra = divmod(math.ceil(num_items / batch_size), world_size)
    return [base + (r < extra) for r in range(world_size)]


def block(num_items: int, rank: int, world_size: int, batch_size: int = 1) -> range:
    """The items of rank `rank`: its contiguous block (blocks in rank order are the data order)."""
    shares = batch_shares(num_items, world_size, batch_size)
    first = sum(shares[:rank]) * batch_size
    return range(min(first, num_items), min(first + shares[rank] * batch_size, num_items))


def block_sizes(num_items: int, world_size: int, batch_size: int = 1) -> list[int]:
    """Items per rank, in rank order: what every rank knows of the others' blocks without asking."""
    return [len(block(num_items, rank, world_size, batch_size)) for rank in range(world_size)]


def my_block(num_items: int, world) -> range:
    """This rank's block of `num_items` items, one at a time (`world`: a distributed.World)."""
    return block(num_items, world.rank, world.size)
