"""The roofline floor of a traced step on a GPU: per op, the slower of its compute time (FLOPs over
the rate of the unit that runs them) and its memory time (bytes over the bandwidth), summed.

No version of the step runs much faster than its floor on that GPU: launch overhead, occupancy,
caches and synchronisations only add to it. The floor is a prediction from datasheet rates
(engine.plan.gpus), not a timing.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from engine.plan.gpus import GPU

STEP_PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class Cost:
    flops: int = 0
    bytes: int = 0
    launches: int = 0
    ops: int = 0
    compute_s: float = 0.0  # FLOPs at the units' rates, as if nothing waited on memory
    memory_s: float = 0.0  # bytes at the bandwidth, as if nothing waited on compute
    floor_s: float = 0.0  # per op, the slower of the two

    def add(self, flops: int, nbytes: int, launches: int, compute_s: float, memory_s: float) -> None:
        self.flops += flops
        self.bytes += nbytes
        self.launches += launches
        self.ops += 1
        self.compute_s += compute_s
        self.memory_s += memory_s
        self.floor_s += max(compute_s, memory_s)


@dataclass
class Roofline:
    gpu: str
    step: Cost  # the training step: data, forward, backward, optimizer
    grid: Cost  # one sample grid
    phases: dict[str, Cost]
    by_op: dict[str, Cost] = field(default_factory=dict)  # op name -> cost (step)
    by_chain: dict[str, Cost] = field(default_factory=dict)  # "phase: region / module" -> cost (step)


def chain_of(op) -> str:
    """Where an op comes from, forward and backward together: the module that ran it (for the ops
    of a backward, the module whose forward made their autograd node), else the named range it ran
    in (e.g. the style energy) or its autograd node, else its phase."""
    if op.owner and not op.owner.endswith("Backward0") and not op.owner.endswith("Backward"):
        return op.owner
    return " / ".join(part for part in (op.phase, op.region, op.owner) if part)


def roofline(trace, gpu: GPU) -> Roofline:
    """The floor of the step and of the grid of `trace` (an engine.plan.step.StepTrace) on `gpu`."""
    step, grid = Cost(), Cost()
    phases: dict[str, Cost] = defaultdict(Cost)
    by_op: dict[str, Cost] = defaultdict(Cost)
    by_chain: dict[str, Cost] = defaultdict(Cost)
    first, last = trace.marks["step"][1], trace.marks["end"][1]
    for op in trace.ops[first:last]:
        cost = op.cost
        compute_s = cost.flops / gpu.rates[cost.unit]
        memory_s = cost.bytes / gpu.bandwidth
        figures = (cost.flops, cost.bytes, cost.launches, compute_s, memory_s)
        phases[op.phase].add(*figures)
        if op.phase in STEP_PHASES:
            step.add(*figures)
            by_op[op.name].add(*figures)
            by_chain[chain_of(op)].add(*figures)
        else:
            grid.add(*figures)
    return Roofline(gpu.name, step, grid, dict(phases), dict(by_op), dict(by_chain))
