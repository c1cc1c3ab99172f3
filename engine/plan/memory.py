"""Peak memory of a traced step: its allocations and frees replayed as the training loop repeats them.

The loop runs the step again and again, with a sample grid now and then. What a GPU reserves
after a while is what this sequence reserves:

    setup (weights, EMA, optimizer state, data) -> step -> step -> grid -> step

where the repeated steps are the traced step's allocations that it also frees (not what it frees of
the setup, e.g. the previous batch, nor what it returns). On CUDA every allocation goes through
the caching allocator model (engine.plan.allocator): `allocated` is its blocks, `reserved` its
segments; with a capacity (the memory a budget leaves for tensors) the model empties its cache
when a segment does not fit, as the real allocator does before it gives up, and reports whether it
ran out of memory. On the CPU (how tests compare with the CPU allocator) both are the exact live
bytes.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from engine.plan.allocator import CachingAllocatorModel, OutOfMemory

CATEGORIES = ("parameters", "ema", "optimizer", "gradients", "data", "activations")


@dataclass
class MemoryPrediction:
    peak_allocated: int  # what torch.cuda.max_memory_allocated() would report
    peak_reserved: int  # torch.cuda.max_memory_reserved()
    peak_live: int  # the largest sum of live tensor bytes (unrounded)
    peak_phase: str  # the phase in which allocated memory peaks
    reserved_phase: str  # the phase in which reserved memory peaks
    breakdown: dict[str, int]  # category -> bytes live at the allocated peak
    phase_peaks: dict[str, int]  # phase -> the largest allocated bytes seen during it
    segments: int  # cudaMalloc calls
    steps_reserved: int  # peak reserved of setup -> step -> step, before any sample grid
    out_of_memory: bool = False  # under the capacity replayed with: the allocator would have failed


class _ExactAllocator:
    """What the CPU allocator books: each tensor's own bytes, nothing cached."""

    def __init__(self, capacity: int | None = None):
        self.capacity = capacity
        self.allocated = self.peak_allocated = self.segments = 0

    def malloc(self, nbytes: int) -> int:
        if self.capacity is not None and self.allocated + nbytes > self.capacity:
            raise OutOfMemory(f"{nbytes} more bytes do not fit: {self.allocated} of {self.capacity} allocated")
        self.allocated += nbytes
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        return nbytes

    def free(self, nbytes: int) -> None:
        self.allocated -= nbytes

    @property
    def reserved(self) -> int:
        return self.allocated

    @property
    def peak_reserved(self) -> int:
        return self.peak_allocated


def training_sequence(trace) -> list[tuple[tuple[int, int], int, str]]:
    """[((allocation id, copy), ±bytes, phase)] of setup -> step -> step -> grid -> step (module doc)."""
    step, grid, end = trace.marks["step"][0], trace.marks["grid"][0], trace.marks["end"][0]
    events = list(zip(trace.events, trace.event_phases))
    allocated_in_step = {a for (a, n), _ in events[step:grid] if n > 0}
    freed_in_step = {a for (a, n), _ in events[step:grid] if n < 0}
    repeated = allocated_in_step & freed_in_step

    def part(span, copy, only=None):
        return [((a, copy), n, phase) for (a, n), phase in events[span[0]:span[1]] if only is None or a in only]

    return (part((0, step), 0) + part((step, grid), 0) + part((step, grid), 1, repeated)
            + part((grid, end), 0) + part((step, grid), 2, repeated))


def replay(trace, cuda: bool, capacity: int | None = None) -> MemoryPrediction:
    """Replay `trace` (an engine.plan.step.StepTrace) through the caching allocator model (`cuda`,
    under `capacity` bytes when given) or exact bookkeeping, and report the peaks and what is live
    at the allocated peak."""
    allocator = CachingAllocatorModel(capacity) if cuda else _ExactAllocator(capacity)
    blocks: dict[tuple[int, int], object] = {}
    live_sizes: dict[tuple[int, int], int] = {}
    by_category: dict[str, int] = defaultdict(int)
    phase_peaks: dict[str, int] = defaultdict(int)
    live = peak_live = 0
    peak_allocated = peak_reserved = -1
    peak_phase = reserved_phase = ""
    breakdown: dict[str, int] = {}
    sequence = training_sequence(trace)
    before_grid = next((i for i, (_, _, phase) in enumerate(sequence) if phase == "sample grid"), len(sequence))
    steps_reserved = 0
    for index, (key, nbytes, phase) in enumerate(sequence):
        if index == before_grid:
            steps_reserved = allocator.peak_reserved
        category = trace.categories.get(key[0], "activations")
        if nbytes > 0:
            try:
                block = allocator.malloc(nbytes)
            except OutOfMemory:
                return MemoryPrediction(allocator.peak_allocated, allocator.peak_reserved, peak_live, phase,
                                        phase, {c: by_category.get(c, 0) for c in CATEGORIES}, dict(phase_peaks),
                                        allocator.segments, steps_reserved, out_of_memory=True)
            blocks[key] = block
            size = block.size if cuda else nbytes
            live_sizes[key] = size
            by_category[category] += size
            live += nbytes
        else:
            allocator.free(blocks.pop(key))
            by_category[category] -= live_sizes.pop(key)
            live += nbytes
        peak_live = max(peak_live, live)
        phase_peaks[phase] = max(phase_peaks[phase], allocator.allocated)
        if allocator.allocated > peak_allocated:
            peak_allocated, peak_phase = allocator.allocated, phase
            breakdown = dict(by_category)
        if allocator.reserved > peak_reserved:
            peak_reserved, reserved_phase = allocator.reserved, phase
    if before_grid == len(sequence):
        steps_reserved = allocator.peak_reserved
    return MemoryPrediction(peak_allocated, peak_reserved, peak_live, peak_phase, reserved_phase,
                            {c: breakdown.get(c, 0) for c in CATEGORIES}, dict(phase_peaks), allocator.segments,
                            steps_reserved)
