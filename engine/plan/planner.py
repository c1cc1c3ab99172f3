"""A plan: will a config fit a GPU's memory, and how fast can its step be?

`make_plan` traces the config's step (and sample grid) on fake tensors at two batch sizes
(engine.plan.step), derives every other batch size from them (engine.plan.scaling), replays each
through the caching allocator model (engine.plan.memory) and prices it on the GPU's datasheet rates
(engine.plan.roofline). Memory is then checked against a budget:

    on the device = reserved + CUDA context + library workspaces

with the context and workspaces as stated below: the trace does not see them (the context is not
PyTorch's memory at all; cuBLAS / cuDNN take their workspaces inside the library calls), so they
are assumptions, to be measured on a GPU. The step fits when the allocator model, given what the
budget leaves for tensors, never
runs out of memory (it empties its cache first, as PyTorch's does); "reserved" is then what it
reserved under that limit. The largest batch that fits leaves HEADROOM free. A config over budget
gets levers, each with its predicted peak: a smaller batch, the same effective batch through
gradient accumulation, gradient checkpointing, bf16 autocast.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engine.config import Config, ConfigError, validate
from engine.plan.gpus import GPU
from engine.plan.memory import MemoryPrediction, replay
from engine.plan.roofline import STEP_PHASES, Roofline, roofline
from engine.plan.scaling import TraceMismatch, at_batch
from engine.plan.step import StepTrace, trace_step

MIB, GIB = 2**20, 2**30
# On the device but not in the trace (assumptions, to be measured on a GPU):
CUDA_CONTEXT = 400 * MIB  # the CUDA context and the kernels loaded into it (CUDA 12+ lazy loading)
LIBRARY_WORKSPACES = 64 * MIB  # cuBLAS / cuBLASLt workspaces and cuDNN's per-call workspaces
UNTRACED = CUDA_CONTEXT + LIBRARY_WORKSPACES
HEADROOM = GIB  # what the largest fitting batch leaves free
MAX_BATCH = 1 << 16


@dataclass
class BatchPlan:
    batch_size: int
    grad_accum: int
    memory: MemoryPrediction  # on a device with no memory limit
    roofline: Roofline
    on_device: int  # what nvidia-smi would show within the budget (over it: what would be needed)
    fits: bool


@dataclass
class Lever:
    name: str  # what changes, in words
    overrides: list[str]  # the same as --section.key=value arguments
    plan: BatchPlan | None  # None when the config cannot take the lever
    note: str = ""


@dataclass
class Plan:
    config: Config
    gpu: GPU
    budget: int
    batches: list[BatchPlan]  # the config's batch size first, then the others asked for
    largest_batch: int | None  # the largest batch that fits with HEADROOM to spare (None: not even 1)
    levers: list[Lever] = field(default_factory=list)  # when the config's batch does not fit
    resident: dict[str, int] = field(default_factory=dict)  # category -> bytes (gradients: while they live)
    attention_backends: dict[str, int] = field(default_factory=dict)  # SDPA backend -> calls (step and grid)
    step_syncs: int = 0  # host reads (.item(), bool(t)) per step: each a CPU-GPU sync on a GPU
    launches: set = field(default_factory=set)  # the Triton kernel specialisations launched
    grid_images: int = 0
    seconds: float = 0.0

    @property
    def configured(self) -> BatchPlan:
        return self.batches[0]


def parse_bytes(text: str) -> int:
    """'8GiB', '7.5GB', '8192MiB', '8G' (binary units for G/M/K alone) -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": MIB, "mib": MIB, "mb": 10**6,
             "g": GIB, "gib": GIB, "gb": 10**9, "t": 2**40, "tib": 2**40, "tb": 10**12}
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"expected a size such as 8GiB, 7.5GB or 8192MiB, got {text!r}")
    return int(float(match.group(1)) * units[match.group(2).lower()])


def with_batch(cfg: Config, batch_size: int) -> Config:
    changed = cfg.copy()
    changed.train.batch_size = batch_size
    return changed


class Planner:
    """Traces a config at two batch sizes once, then answers for any batch size."""

    def __init__(self, cfg: Config, gpu: GPU, budget: int, target: str = "cuda"):
        self.cfg, self.gpu, self.budget, self.target = cfg, gpu, budget, target
        self._traces: dict[int, StepTrace] = {}
        self._fits: dict[int, bool] = {}

    def trace(self, batch_size: int, sample_grid: bool = True) -> StepTrace:
        """The traced step at `batch_size` (with the sample grid unless `sample_grid` is false: a
        second trace for scaling needs none, engine.plan.scaling takes the first one's)."""
        if batch_size not in self._traces:
            self._traces[batch_size] = trace_step(with_batch(self.cfg, batch_size), self.target,
                                                  self.gpu.compute_capability, sample_grid)
        return self._traces[batch_size]

    def traces(self) -> list[StepTrace]:
        return list(self._traces.values())

    def at(self, batch_size: int) -> StepTrace:
        """The step at `batch_size`: scaled from the first two traces (the first with its grid)."""
        if len(self._traces) < 2:
            return self.trace(batch_size)
        first, second = list(self._traces.values())[:2]
        try:
            return at_batch(first, second, batch_size)
        except TraceMismatch:
            return self.trace(batch_size)

    def within(self, trace: StepTrace, budget: int) -> MemoryPrediction:
        """The replay on a device whose memory is `budget` (context and workspaces included)."""
        return replay(trace, cuda=self.target == "cuda", capacity=budget - UNTRACED)

    def batch_plan(self, batch_size: int, trace: StepTrace | None = None) -> BatchPlan:
        trace = trace or self.at(batch_size)
        memory = replay(trace, cuda=self.target == "cuda")
        limited = self.within(trace, self.budget)
        fits = not limited.out_of_memory
        on_device = (limited if fits else memory).peak_reserved + UNTRACED
        return BatchPlan(batch_size, trace.grad_accum, memory, roofline(trace, self.gpu), on_device, fits)

    def fits_with_headroom(self, batch_size: int) -> bool:
        if batch_size not in self._fits:
            self._fits[batch_size] = not self.within(self.at(batch_size), self.budget - HEADROOM).out_of_memory
        return self._fits[batch_size]

    def largest_batch(self) -> int | None:
        """The largest batch size that fits with HEADROOM to spare. Memory grows about linearly with
        the batch, so the line through the two traced batch sizes gives a first guess; steps of
        growing size then bracket the answer, and a bisection settles it."""
        fits = self.fits_with_headroom
        if not fits(1):
            return None
        first, second = sorted(self._traces)[:2]
        needs = [replay(self.at(b), cuda=self.target == "cuda").peak_reserved for b in (first, second)]
        slope = max(1.0, (needs[1] - needs[0]) / (second - first))
        room = self.budget - HEADROOM - UNTRACED - needs[0]
        guess = int(min(MAX_BATCH, max(1, first + room / slope)))
        step = max(1, guess // 32)
        if fits(guess):
            low, high = guess, guess + step
            while high <= MAX_BATCH and fits(high):
                low, step = high, 2 * step
                high = low + step
        else:
            low, high = max(1, guess - step), guess
            while not fits(low):
                high, step = low, 2 * step
                low = max(1, high - step)
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
        return low


def make_plan(cfg: Config, gpu: GPU, budget: int | None = None, batch_sizes: list[int] | None = None,
              levers: bool = True, target: str = "cuda") -> Plan:
    """The plan of `cfg` on `gpu` (see the module doc); `budget` defaults to the GPU's memory."""
    start = time.perf_counter()
    budget = gpu.memory_bytes if budget is None else budget
    planner = Planner(cfg, gpu, budget, target)
    sizes = [cfg.train.batch_size] + [b for b in dict.fromkeys(batch_sizes or []) if b != cfg.train.batch_size]
    low, high = min(sizes), max(sizes)
    planner.trace(low)
    planner.trace(high if high != low else 2 * low, sample_grid=False)
    batches = [planner.batch_plan(b) for b in sizes]
    first = planner.trace(low)
    plan = Plan(cfg, gpu, budget, batches, planner.largest_batch(), resident=resident_bytes(planner.at(sizes[0])),
                attention_backends=first.attention_backends,
                step_syncs=sum(first.syncs.get(phase, 0) for phase in STEP_PHASES),
                launches=set().union(*(t.launches for t in planner.traces())), grid_images=first.grid_images)
    if levers and not batches[0].fits:
        plan.levers = over_budget_levers(planner, plan.largest_batch)
    plan.seconds = time.perf_counter() - start
    return plan


def resident_bytes(trace: StepTrace) -> dict[str, int]:
    """Bytes of each category of allocation (engine.plan.step tags them) over the whole trace."""
    totals = dict.fromkeys(("parameters", "gradients", "optimizer", "ema", "data"), 0)
    for allocation, nbytes in trace.events:
        category = trace.categories.get(allocation)
        if nbytes > 0 and category in totals:
            totals[category] += nbytes
    return totals


def over_budget_levers(planner: Planner, largest: int | None) -> list[Lever]:
    """What brings a config that does not fit under its budget, each with its predicted plan."""
    cfg = planner.cfg
    batch, accum = cfg.train.batch_size, cfg.train.grad_accum
    levers = []
    if largest is not None:
        levers.append(Lever(f"batch {batch} -> {largest}", [f"--train.batch_size={largest}"],
                            planner.batch_plan(largest)))
        steps = math.ceil(batch * accum / largest)

        def accumulate(c: Config) -> None:
            c.train.batch_size, c.train.grad_accum = largest, steps

        levers.append(_retraced(planner, f"gradient accumulation: {steps} x {largest} (effective batch "
                                         f"{steps * largest})",
                                [f"--train.batch_size={largest}", f"--train.grad_accum={steps}"], accumulate))
    checkpoint = [f"--{section}.checkpoint=true" for section in ("model", "ode")
                  if section in cfg.sections and not getattr(cfg, section).checkpoint]
    if checkpoint:
        levers.append(_retraced(planner, "gradient checkpointing", checkpoint, _set_checkpointing))
    if cfg.train.precision in ("fp32",):
        levers.append(_retraced(planner, "bf16 autocast", ["--train.precision=bf16"],
                                lambda c: setattr(c.train, "precision", "bf16")))
    return levers


def _set_checkpointing(cfg: Config) -> None:
    for section in ("model", "ode"):
        if section in cfg.sections:
            getattr(cfg, section).checkpoint = True


def _retraced(planner: Planner, name: str, overrides: list[str], change: Callable[[Config], None]) -> Lever:
    cfg = planner.cfg.copy()
    change(cfg)
    try:
        validate(cfg, "plan lever")
    except ConfigError as err:
        return Lever(name, overrides, None, str(err))
    other = Planner(cfg, planner.gpu, planner.budget, planner.target)
    return Lever(name, overrides, other.batch_plan(cfg.train.batch_size))
