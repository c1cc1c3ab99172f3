"""A step at any batch size from traces at two batch sizes.

Two traces of one config at batch sizes a and b run the same code, so they record the same
allocations (numbered in order) and ops in the same order; only sizes differ. (Storages that die
together, e.g. an autograd node's saved tensors, can be freed in another order: `a`'s is kept.) Every size in this engine is an
affine function of the batch size (activations grow with it, weights and optimizer state do not),
as are FLOPs and bytes, so each event and op at batch n is interpolated (or extrapolated) from its
two values. A config whose sequence of events depends on the batch size (the traces do not line
up) raises TraceMismatch, and then each batch size needs its own trace. The sample grid does not
depend on the batch size: `b` may be traced without it, and `a`'s is used as it is.
"""

from __future__ import annotations

import dataclasses

from engine.plan.costs import OpCost
from engine.plan.step import StepTrace


class TraceMismatch(ValueError):
    """Two traces that do not record the same sequence of events."""


def _line(x_a: int, x_b: int, t: float) -> int:
    return max(0, round(x_a + (x_b - x_a) * t))


def at_batch(a: StepTrace, b: StepTrace, batch_size: int) -> StepTrace:
    """The trace of `a`'s config at `batch_size`, from `a` and `b` (same config, other batch sizes)."""
    if a.batch_size == b.batch_size:
        raise ValueError("at_batch needs traces at two different batch sizes")
    if batch_size == a.batch_size:
        return a
    sizes_a = {allocation: size for allocation, size in a.events if size > 0}
    sizes_b = {allocation: size for allocation, size in b.events if size > 0}
    step_events, step_ops = a.marks["grid"]
    if (a.marks["step"] != b.marks["step"] or a.marks["grid"] != b.marks["grid"]
            or any(allocation not in sizes_b for allocation, _ in a.events[:step_events])
            or not sizes_b.keys() <= sizes_a.keys()
            or any(oa.name != ob.name for oa, ob in zip(a.ops[:step_ops], b.ops))):
        raise TraceMismatch(f"the traces at batch {a.batch_size} and {b.batch_size} differ in their sequence of "
                            f"allocations or ops")
    t = (batch_size - a.batch_size) / (b.batch_size - a.batch_size)
    # What only `a` has (its sample grid, if `b` was traced without one) does not depend on the batch.
    sizes = {allocation: _line(size, sizes_b.get(allocation, size), t) for allocation, size in sizes_a.items()}
    # `a`'s order of events: frees that happen at the same moment can come in another order in `b`.
    events = [(allocation, sizes[allocation] if size > 0 else -sizes[allocation]) for allocation, size in a.events]
    ops = [dataclasses.replace(op_a, cost=OpCost(_line(op_a.cost.flops, op_b.cost.flops, t),
                                                 _line(op_a.cost.bytes, op_b.cost.bytes, t),
                                                 _line(op_a.cost.launches, op_b.cost.launches, t), op_a.cost.unit))
           for op_a, op_b in zip(a.ops, b.ops)] + a.ops[len(b.ops):]
    return dataclasses.replace(a, batch_size=batch_size, events=events, ops=ops)
