"""A plan as a terminal table and as JSON (`engine-plan --json`)."""

from __future__ import annotations

from engine.plan.memory import CATEGORIES
from engine.plan.planner import CUDA_CONTEXT, HEADROOM, LIBRARY_WORKSPACES, BatchPlan, Plan
from engine.plan.roofline import Cost

GIB = 2**30
TOP = 12  # rows of the floor's breakdown


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def _si(n: float, unit: str) -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= factor:
            return f"{n / factor:.3g} {prefix}{unit}"
    return f"{n:.3g} {unit}"


def _cost(cost: Cost) -> dict:
    return {"flops": cost.flops, "bytes": cost.bytes, "launches": cost.launches, "ops": cost.ops,
            "compute_s": cost.compute_s, "memory_s": cost.memory_s, "floor_s": cost.floor_s}


def _top(costs: dict[str, Cost], total: float, key: str = "floor_s", count: int | None = TOP) -> list[dict]:
    """The `count` costliest entries (all: None) by `key` ("floor_s" or "bytes"), each with its share
    of `total`."""
    ranked = sorted(costs.items(), key=lambda item: -getattr(item[1], key))[:count]
    return [{"name": name, "share_of_floor": cost.floor_s / total if total else 0.0, **_cost(cost)}
            for name, cost in ranked]


def batch_json(plan: Plan, batch: BatchPlan) -> dict:
    memory, roofline = batch.memory, batch.roofline
    step = roofline.step
    effective = batch.batch_size * batch.grad_accum
    return {
        "batch_size": batch.batch_size, "grad_accum": batch.grad_accum,
        "memory": {"peak_allocated": memory.peak_allocated, "peak_reserved": memory.peak_reserved,
                   "peak_live_tensors": memory.peak_live, "peak_phase": memory.peak_phase,
                   "reserved_phase": memory.reserved_phase, "steps_reserved": memory.steps_reserved,
                   "at_peak": memory.breakdown,
                   "phase_peaks": memory.phase_peaks, "segments": memory.segments,
                   "on_device": batch.on_device, "fits": batch.fits,
                   "free": plan.budget - batch.on_device},
        "step": {**_cost(step), "flops_per_sample": step.flops / effective},
        "phases": {name: _cost(cost) for name, cost in roofline.phases.items()},
        "grid": _cost(roofline.grid),
        "floor_by_op": _top(roofline.by_op, step.floor_s, count=None),
        "floor_by_chain": _top(roofline.by_chain, step.floor_s),
        "traffic_by_chain": _top(roofline.by_chain, step.floor_s, key="bytes"),
    }


def plan_json(plan: Plan, config_path: str = "") -> dict:
    gpu = plan.gpu
    configured = plan.configured
    return {
        "config": config_path, "method": plan.config.method.name,
        "gpu": {"name": gpu.name, "title": gpu.title, "bandwidth": gpu.bandwidth, "rates": gpu.rates,
                "compute_capability": list(gpu.compute_capability)},
        "budget": plan.budget,
        "assumptions": {"cuda_context": CUDA_CONTEXT, "library_workspaces": LIBRARY_WORKSPACES,
                        "headroom": HEADROOM},
        "resident": plan.resident,
        "attention_backends": plan.attention_backends,
        "host_syncs_per_step": plan.step_syncs,
        "triton_kernels": sorted({launch.kernel for launch in plan.launches}),
        "batches": [batch_json(plan, b) for b in plan.batches],
        "largest_batch_with_headroom": plan.largest_batch,
        "levers": [{"name": lever.name, "overrides": lever.overrides, "note": lever.note,
                    "plan": batch_json(plan, lever.plan) if lever.plan else None} for lever in plan.levers],
        "fits": configured.fits,
        "plan_seconds": plan.seconds,
    }


def plan_text(plan: Plan, config_path: str = "") -> str:
    gpu = plan.gpu
    configured = plan.configured
    lines = [f"engine-plan {config_path}: method {plan.config.method.name}, on {gpu.title}, budget {_gib(plan.budget)} GiB"]
    resident = plan.resident
    lines.append("resident: " + ", ".join(f"{name} {resident[name] / 2**20:.0f} MiB"
                                          for name in ("parameters", "gradients", "optimizer", "ema", "data")))
    columns = plan.batches
    header = f"{'':<34}" + "".join(f"{'batch ' + str(b.batch_size):>14}" for b in columns)
    lines += ["", "memory (GiB)" + header[12:]]

    def row(label, values):
        lines.append(f"  {label:<32}" + "".join(f"{v:>14}" for v in values))

    for category in CATEGORIES:
        row(f"{category} at the peak", [_gib(b.memory.breakdown[category]) for b in columns])
    row("peak allocated", [_gib(b.memory.peak_allocated) for b in columns])
    row("  in phase", [b.memory.peak_phase for b in columns])
    row("peak reserved, no memory limit", [_gib(b.memory.peak_reserved) for b in columns])
    row("  in phase", [b.memory.reserved_phase for b in columns])
    row("  before the first sample grid", [_gib(b.memory.steps_reserved) for b in columns])
    row("on the device within the budget", [_gib(b.on_device) for b in columns])
    row(f"fits {_gib(plan.budget)} GiB", [("yes" if b.fits else "NO") + f" ({_gib(plan.budget - b.on_device)})"
                                         for b in columns])
    lines += ["", "per step" + header[8:]]
    row("FLOPs", [_si(b.roofline.step.flops, "") for b in columns])
    row("FLOPs per sample", [_si(b.roofline.step.flops / (b.batch_size * b.grad_accum), "") for b in columns])
    row("bytes moved", [_si(b.roofline.step.bytes, "B") for b in columns])
    row("kernel launches", [str(b.roofline.step.launches) for b in columns])
    row(f"floor on {gpu.name} (s)", [f"{b.roofline.step.floor_s:.3f}" for b in columns])
    row("  compute / memory alone (s)", [f"{b.roofline.step.compute_s:.2f}/{b.roofline.step.memory_s:.2f}"
                                         for b in columns])
    grid = configured.roofline.grid
    if grid.ops:
        lines.append(f"  sample grid ({plan.grid_images} pictures): {_si(grid.flops, 'FLOP')}, "
                     f"{_si(grid.bytes, 'B')}, {grid.launches} launches, floor {grid.floor_s:.3f} s")
    lines.append(f"  host syncs per step: {plan.step_syncs}")
    if plan.attention_backends:
        lines.append("  attention (SDPA backend: calls): "
                     + ", ".join(f"{k} {v}" for k, v in sorted(plan.attention_backends.items())))
    lines += ["", f"largest batch with {_gib(HEADROOM)} GiB free: "
              + (str(plan.largest_batch) if plan.largest_batch else "none (even batch 1 does not fit)")
              + " (the caching allocator empties its cache before it runs out, as PyTorch's does)"]
    if plan.levers:
        lines += ["", f"over budget at batch {configured.batch_size}; levers:"]
        for lever in plan.levers:
            if lever.plan is None:
                lines.append(f"  {lever.name}: not available ({lever.note})")
            else:
                lines.append(f"  {lever.name}: {_gib(lever.plan.on_device)} GiB on the device, "
                             f"{'fits' if lever.plan.fits else 'still over'}; {' '.join(lever.overrides)}")
    step = configured.roofline.step
    lines += ["", f"where the floor goes (batch {configured.batch_size}, share of {step.floor_s:.3f} s; bytes moved):"]
    for entry in _top(configured.roofline.by_chain, step.floor_s):
        lines.append(f"  {entry['share_of_floor']:6.1%}  {_si(entry['bytes'], 'B'):>9}  {entry['name']}")
    lines += ["", (f"assumed, not traced: CUDA context {CUDA_CONTEXT // 2**20} MiB, library workspaces "
                   f"{LIBRARY_WORKSPACES // 2**20} MiB; floors are predictions from datasheet rates, not timings "
                   f"(plan took {plan.seconds:.1f} s)")]
    return "\n".join(lines)
