"""A model of PyTorch's CUDA caching allocator, replayed over a step's allocations and frees.

What `torch.cuda.memory_allocated()` and `memory_reserved()` would report is not the sum of the live
tensors: the caching allocator rounds requests, carves them out of segments it got from cudaMalloc,
and keeps freed blocks cached for reuse, so reserved memory includes the fragmentation between live
blocks. This model follows c10/cuda/CUDACachingAllocator.cpp with its default settings (no
PYTORCH_CUDA_ALLOC_CONF, one stream):

    rounding   every request is rounded up to a multiple of 512 B (512 B at least)
    pools      requests up to 1 MiB come from the small pool, larger ones from the large pool
    segments   a request that no cached block fits gets a new segment: 2 MiB for the small pool,
               20 MiB for large requests under 10 MiB, else the request rounded up to 2 MiB
    best fit   the smallest cached block of the pool that is large enough (lowest address on ties)
    split      the block is split when what remains is >= 512 B (small pool) or > 1 MiB (large
               pool); the request takes the lower part, the rest stays cached
    merge      a freed block merges with free neighbours of its segment
    release    segments go back to the driver only when a new one does not fit under `capacity`
               (the device's memory): then every cached segment that is wholly free is released
               and the cudaMalloc retried, and if it still does not fit, OutOfMemory. Without a
               capacity the model reports what an unlimited device would reserve.

`allocated` counts whole blocks, as the allocator's statistics do: a request that takes an unsplit
block (e.g. 11 MiB + 1 B from a 12 MiB segment) counts the block's size.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MIN_BLOCK = 512
SMALL_REQUEST = 1 << 20  # up to this: small pool
SMALL_SEGMENT = 2 << 20
MIN_LARGE_ALLOC = 10 << 20  # large requests under this get a LARGE_SEGMENT
LARGE_SEGMENT = 20 << 20
ROUND_LARGE = 2 << 20


def round_request(nbytes: int) -> int:
    """A request's size as the allocator books it: a multiple of 512 B, at least 512 B."""
    return max(MIN_BLOCK, -(-nbytes // MIN_BLOCK) * MIN_BLOCK)


def segment_size(request: int) -> int:
    """Bytes cudaMalloc'ed for a new segment that must hold `request` (already rounded)."""
    if request <= SMALL_REQUEST:
        return SMALL_SEGMENT
    if request < MIN_LARGE_ALLOC:
        return LARGE_SEGMENT
    return -(-request // ROUND_LARGE) * ROUND_LARGE


class OutOfMemory(RuntimeError):
    """A request that no cached block holds and no new segment fits under the capacity."""


@dataclass(eq=False)
class Block:
    """A contiguous piece of a segment, allocated or cached."""

    address: int
    size: int
    small: bool  # which pool its segment belongs to
    free: bool = True
    prev: Block | None = field(default=None, repr=False)
    next: Block | None = field(default=None, repr=False)


class CachingAllocatorModel:
    """malloc / free over the model described in the module doc, with running and peak totals."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        # Cached (free) blocks per pool, sorted by (size, address): bisect finds the best fit.
        self._pools: dict[bool, list[tuple[int, int, Block]]] = {True: [], False: []}
        self._next_address = 0
        self.allocated = 0
        self.reserved = 0
        self.peak_allocated = 0
        self.peak_reserved = 0
        self.segments = 0
        self.releases = 0  # times the cache was emptied to make room

    def malloc(self, nbytes: int) -> Block:
        size = round_request(nbytes)
        small = size <= SMALL_REQUEST
        pool = self._pools[small]
        position = bisect.bisect_left(pool, (size, -1))
        if position < len(pool):
            _, _, block = pool.pop(position)
        else:
            block = self._new_segment(segment_size(size), small)
        remaining = block.size - size
        if (remaining >= MIN_BLOCK) if small else (remaining > SMALL_REQUEST):
            rest = Block(block.address + size, remaining, small, prev=block, next=block.next)
            if block.next is not None:
                block.next.prev = rest
            block.next = rest
            block.size = size
            self._cache(rest)
        block.free = False
        self.allocated += block.size
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return block

    def free(self, block: Block) -> None:
        if block.free:
            raise ValueError("block freed twice")
        self.allocated -= block.size
        block.free = True
        for neighbour in (block.prev, block.next):
            if neighbour is not None and neighbour.free:
                self._uncache(neighbour)
                self._merge(block, neighbour)
        self._cache(block)

    def _new_segment(self, size: int, small: bool) -> Block:
        if self.capacity is not None and self.reserved + size > self.capacity:
            self._release_free_segments()
            if self.reserved + size > self.capacity:
                raise OutOfMemory(f"{size} more bytes do not fit: {self.reserved} of {self.capacity} reserved, "
                                  f"{self.allocated} allocated")
        block = Block(self._next_address, size, small)
        self._next_address += size
        self.reserved += size
        self.peak_reserved = max(self.peak_reserved, self.reserved)
        self.segments += 1
        return block

    def _release_free_segments(self) -> None:
        for small, pool in self._pools.items():
            whole = [entry for entry in pool if entry[2].prev is None and entry[2].next is None]
            for entry in whole:
                self.reserved -= entry[0]
            self._pools[small] = [entry for entry in pool if entry[2].prev is not None or entry[2].next is not None]
        self.releases += 1

    @staticmethod
    def _merge(block: Block, neighbour: Block) -> None:
        """Absorb a free neighbour (either side) into `block`."""
        if neighbour is block.prev:
            block.address = neighbour.address
            block.prev = neighbour.prev
            if block.prev is not None:
                block.prev.next = block
        else:
            block.next = neighbour.next
            if block.next is not None:
                block.next.prev = block
        block.size += neighbour.size

    def _cache(self, block: Block) -> None:
        bisect.insort(self._pools[block.small], (block.size, block.address, block))

    def _uncache(self, block: Block) -> None:
        pool = self._pools[block.small]
        pool.pop(bisect.bisect_left(pool, (block.size, block.address)))
