"""One training step (and one sample grid) of a config, run by the engine's own code on fake tensors.

`trace_step` builds what engine.train.setup builds (the data, the method, its EMA, fused AdamW,
the LR schedule, the grad scaler, the autocast dtype of the target device) from stand-ins of the
data (engine.plan.data), then runs engine.train.train_step (the loop's step function itself:
micro-batches, autocast, backward, clipping, the non-finite check, the optimizer, the EMA) and the
method's sample grid as the loop draws it, all under a StepRecorder. Nothing is read from disk but
a latents file's header; no tensor memory is allocated.

Target "cuda" takes the CUDA code paths (engine.plan.cuda_paths); target "cpu" takes the CPU paths
(how tests compare a plan with a real step on the CPU allocator). The step is the eager one: what
train.cuda_graphs (one graph launch, a private memory pool) and train.compile (fused kernels)
change is not modelled.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from engine.config import Config
from engine.data.base import Batch, Stream, batch_seed
from engine.distributed import World
from engine.ema import EMA
from engine.methods import method_class
from engine.methods.base import LazyAutoencoder
from engine.models.autoencoder import build_autoencoder
from engine.plan.cuda_paths import cuda_code_paths, loop_phases
from engine.plan.data import planned_training_data
from engine.plan.trace import OpRecord, StepRecorder
from engine.train import PhaseTimer, Session, TrainState, autocast_dtype, lr_lambda, train_step


@dataclass
class StepTrace:
    """What `trace_step` recorded (see engine.plan.trace.StepRecorder), and which allocations hold
    what; `at_batch` (engine.plan.scaling) makes one for another batch size from two of these."""

    batch_size: int
    grad_accum: int
    events: list[tuple[int, int]]  # (allocation id, +bytes | -bytes)
    event_phases: list[str]
    marks: dict[str, tuple[int, int]]  # "step" | "grid" | "end" -> (event index, op index)
    ops: list[OpRecord]
    categories: dict[int, str]  # allocation id -> parameters | ema | optimizer | gradients | data
    syncs: dict[str, int]  # host reads per phase
    launches: set = field(default_factory=set)  # engine.plan.cuda_paths.TritonLaunch
    attention_backends: dict[str, int] = field(default_factory=dict)  # SDPA backend -> calls
    grid_images: int = 0


class ModuleOwners:
    """Tags each op with the module that ran it: forward hooks keep a stack of module labels, and
    a module's new autograd nodes carry its label for the ops of its backward."""

    def __init__(self, recorder: StepRecorder):
        self.recorder = recorder
        self.labels: dict[int, str] = {}
        self._starts: list[int] = []

    def name(self, root: torch.nn.Module) -> None:
        for name, module in root.named_modules():
            parent, _, leaf = name.rpartition(".")
            if next(module.children(), None) is None and name:
                owner = type(root.get_submodule(parent)).__name__ if parent else type(root).__name__
                self.labels[id(module)] = f"{owner}.{leaf}"
            else:
                self.labels[id(module)] = type(module).__name__

    def _before(self, module, args):
        self.recorder.owner_stack.append(self.labels.get(id(module), type(module).__name__))
        inputs = [a.grad_fn._sequence_nr() for a in args if isinstance(a, torch.Tensor) and a.grad_fn is not None]
        self._starts.append(max(inputs, default=-1))

    def _after(self, module, args, output):
        label = self.recorder.owner_stack.pop()
        start = self._starts.pop()
        outputs = output if isinstance(output, (tuple, list)) else [output]
        pending = [t.grad_fn for t in outputs if isinstance(t, torch.Tensor) and t.grad_fn is not None]
        while pending:
            node = pending.pop()
            if node is None or "owner" in node.metadata or node._sequence_nr() <= start:
                continue
            node.metadata["owner"] = label
            pending.extend(next_node for next_node, _ in node.next_functions)

    @contextlib.contextmanager
    def hooked(self):
        handles = [register_module_forward_pre_hook(self._before), register_module_forward_hook(self._after)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def in_memory_format(module: torch.nn.Module, memory_format: torch.memory_format) -> torch.nn.Module:
    """`module.to(memory_format=...)` for a module of fake CPU tensors (whose .to() would try to
    swap them): the 4-D parameters and buffers in that layout."""
    if memory_format != torch.contiguous_format:
        for t in (*module.parameters(), *module.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=memory_format)
    return module


@contextlib.contextmanager
def deepcopy_by_clone() -> Iterator[None]:
    """copy.deepcopy of fake tensors (the EMA's copy of the method) clones them; torch's own
    deepcopy goes through their storage, which fake tensors cannot copy."""

    def deepcopy(self, memo):
        if id(self) not in memo:
            copied = self.detach().clone(memory_format=torch.preserve_format).requires_grad_(self.requires_grad)
            if getattr(self, "_is_param", False):
                copied._is_param = True  # nn.Parameter of a fake tensor (how nn.Parameter wraps subclasses)
            memo[id(self)] = copied
        return memo[id(self)]

    original = FakeTensor.__deepcopy__
    FakeTensor.__deepcopy__ = deepcopy
    try:
        yield
    finally:
        FakeTensor.__deepcopy__ = original


def _planned_autoencoder(cfg: Config, data, memory_format) -> LazyAutoencoder:
    """The autoencoder a method that trains on latents decodes its grids with, built from the
    config's [autoencoder] section on first use (its weights are then part of the grid's memory)."""
    side = data.sample_shape[1] * cfg.autoencoder.downsampling

    def load():
        autoencoder = in_memory_format(build_autoencoder(cfg.autoencoder, (3, side, side)), memory_format).eval()
        # Decoding moves it to the latents' device, where it already is; nn.Module.to would try to
        # swap its fake tensors.
        autoencoder.to = lambda *args, **kwargs: autoencoder
        return autoencoder

    return LazyAutoencoder("planned from [autoencoder]", load)


def trace_step(cfg: Config, target: str = "cuda", compute_capability: tuple[int, int] = (8, 9),
               sample_grid: bool = True) -> StepTrace:
    """Run one training step (and the sample grid, when the config draws grids and `sample_grid`) of
    `cfg` on fake tensors; see the module doc."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = StepRecorder(fake_mode)
    owners = ModuleOwners(recorder)
    launches: set = set()
    attention: list[str] = []
    device = torch.device("cpu")  # fake tensors; the code paths are the target's

    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.random.fork_rng(devices=[]))
        stack.enter_context(recorder)
        stack.enter_context(recorder.finiteness_checks())
        if target == "cuda":
            stack.enter_context(cuda_code_paths(recorder, compute_capability, launches, attention))
        stack.enter_context(loop_phases(recorder))
        stack.enter_context(owners.hooked())
        stack.enter_context(fake_mode)
        recorder.phase = "data"
        data, cfg = planned_training_data(cfg, recorder.fake_of)
        recorder.phase = "setup"
        session = _session(cfg, data, device, target, recorder)
        categories = _categories(session, recorder)
        owners.name(session.state.method)
        if session.state.ema is not None:
            owners.name(session.state.ema.module)
        recorder.mark("step")
        recorder.syncs.clear()  # host reads of the set-up (the data's checks) are not the step's
        train_step(session)
        recorder.mark("grid")
        grid_images = 0
        if sample_grid and session.grid_batch is not None:
            grid_images = _sample_grid(session, recorder)
        recorder.mark("end")
        del session, data  # their storages' frees are not part of the step
    return StepTrace(cfg.train.batch_size, cfg.train.grad_accum, recorder.events, recorder.event_phases,
                     recorder.marks, recorder.ops, categories, dict(recorder.syncs), launches,
                     dict(Counter(attention)), grid_images)


def _session(cfg: Config, data, device: torch.device, target: str, recorder: StepRecorder) -> Session:
    """What engine.train.setup builds, for the target device, without checkpoints or run files."""
    method_cls = method_class(cfg.method.name)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    method = in_memory_format(method_cls.from_config(cfg, data), memory_format)
    if method_cls.trains_on_latents(cfg):
        method.attach_autoencoder(_planned_autoencoder(cfg, data, memory_format))
    with deepcopy_by_clone():
        ema = EMA(method, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay > 0 else None
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, fused=True)
    # The traced step is one of many: the optimizer state the first step creates exists before it.
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    dtype = autocast_dtype(cfg.train.precision, torch.device(target))
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)
    state = TrainState(method, ema, optimizer, scheduler, scaler, world_size=1)
    recorder.phase = "data"
    grid_batch = next(iter(data.batches(0, cfg.sample.num))) if cfg.sample.every else None
    built = {"cfg": cfg, "world": World(), "device": device, "run_dir": Path(cfg.run.dir), "data": data,
             "state": state, "model": method, "params": params, "dtype": dtype, "grid_batch": grid_batch,
             "batches": data.batches(0, cfg.train.batch_size), "timer": PhaseTimer()}
    # What a plan does not use (metrics, a captured CUDA graph: the plan runs the eager step) is None.
    return Session(**{f.name: built.get(f.name) for f in dataclasses.fields(Session)})


def _categories(session: Session, recorder: StepRecorder) -> dict[int, str]:
    """allocation id -> what it holds, for what exists before the step (gradients are added as the
    optimizer step begins: see `_watch_gradients`)."""
    categories = {}

    def tag(tensors, name):
        for t in tensors:
            allocation = recorder.allocation_of(t)
            if allocation is not None:
                categories.setdefault(allocation, name)

    state = session.state
    tag([*state.method.parameters(), *state.method.buffers()], "parameters")
    if state.ema is not None:
        tag([*state.ema.module.parameters(), *state.ema.module.buffers()], "ema")
    tag([t for s in state.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)], "optimizer")
    for allocation, phase in _allocations_by_phase(recorder):
        if phase == "data":
            categories.setdefault(allocation, "data")
    _watch_gradients(session, tag)
    return categories


def _allocations_by_phase(recorder: StepRecorder):
    for (allocation, nbytes), phase in zip(recorder.events, recorder.event_phases):
        if nbytes > 0:
            yield allocation, phase


def _watch_gradients(session: Session, tag) -> None:
    """Tag the gradients when the optimizer step starts (they exist from the backward to then)."""

    def before_step(opt, args, kwargs):
        tag([p.grad for p in session.params if p.grad is not None], "gradients")

    session.state.optimizer.register_step_pre_hook(before_step)


def _sample_grid(session: Session, recorder: StepRecorder) -> int:
    """The loop's periodic grid (engine.train._save_sample_grid without the PNG): the EMA copy, eval
    mode, no autocast, no gradients. Returns the number of pictures."""
    recorder.phase = "sample grid"
    state = session.state
    method = state.ema.module if state.ema else state.method
    method.eval()
    batch: Batch = session.grid_batch
    generator = torch.Generator(batch.x.device).manual_seed(batch_seed(session.cfg.run.seed, 0, 0, Stream.GRID))
    with torch.no_grad():
        images, _ = method.sample_grid(batch, generator)
    return images.shape[0]
