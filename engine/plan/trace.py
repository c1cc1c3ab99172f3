"""Recording what a step does on fake tensors: every op with its cost, and every tensor storage's
life (allocation, free) in program order.

`StepRecorder` is a TorchDispatchMode above a FakeTensorMode, so it sees every op below autograd
and autocast (the kernels a GPU would run, forward and backward), in order:

- each op gets an `OpRecord` (engine.plan.costs) tagged with the phase the loop is in (the loop
  marks its phases with NVTX ranges; engine.plan.cuda_paths forwards them here), the named range
  inside it, and the module that ran it (engine.plan.step's forward hooks; the ops of a backward
  with the module whose autograd node they run);
- each storage an op creates is an allocation of its byte size, and a weak reference with a
  callback records its free when the last tensor, view or autograd-saved reference to it dies,
  which is when the caching allocator would get it back (engine.plan.memory replays these events);
- Triton launches are recorded by `record_launch` (engine.plan.cuda_paths patches the kernels'
  launch so that nothing runs).

Values. Code reads some values back to the host (`.item()`, `bool(t)`, `.tolist()`: a host sync on
a GPU), and some shapes depend on values (`unique`, `nonzero`, boolean masks). Small tensors (a
storage up to SHADOW_BYTES: labels, schedules, random indices, counts) therefore carry their real
value, computed by running the op for real whenever every input's value is known; big ones
(weights, activations) never do. A value that is still unknown is answered as a healthy run would
have it: torch.isfinite checks pass, other booleans read False, numbers read 1 (0 for integers),
`unique` finds every row distinct.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensor, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from engine.plan.costs import (
    ALLOCATION_OPS,
    OpCost,
    aten_cost,
    is_metadata_only,
    mutated_tensors,
    tensors_in,
    triton_cost,
)

aten = torch.ops.aten
_DEVICE = torch.ops.prim.device.default
_HOST_READ = aten._local_scalar_dense.default
_UNIQUE = (aten.unique_dim, aten._unique2, aten.unique_consecutive)
SHADOW_BYTES = 4 << 20


@dataclass
class OpRecord:
    name: str  # "aten.convolution" or "triton._ssm_fwd_kernel"
    phase: str
    region: str  # the named range inside the phase ("style energy", "ode step 1/4"), or ""
    owner: str  # the module (forward) or autograd node (backward) that ran it
    cost: OpCost


class _Unknown(Exception):
    """A tensor argument whose value is not known."""


class StepRecorder(TorchDispatchMode):
    """See the module doc. `events` holds (allocation id, +bytes) and (allocation id, -bytes) in
    program order (bytes of the storage, unrounded), `event_phases` the phase of each, `ops` the op
    records, `marks` the event and op counts at named points (`mark`), `syncs` the host reads per
    phase."""

    def __init__(self, fake_mode):
        super().__init__()
        self.fake_mode = fake_mode
        self.marks: dict[str, tuple[int, int]] = {}
        self.events: list[tuple[int, int]] = []
        self.event_phases: list[str] = []
        self.ops: list[OpRecord] = []
        self.phase = "setup"
        self.region = ""
        self.owner_stack: list[str] = []
        self.syncs = Counter()
        self._live: dict[int, tuple[int, int, weakref.ref]] = {}  # id(storage) -> (allocation, bytes, ref)
        self._next_id = 0
        self._shadows: dict[int, tuple[weakref.ref, torch.Tensor]] = {}  # id(fake) -> (ref, real value)
        self._finite: dict[int, weakref.ref] = {}  # booleans derived from torch.isfinite

    def mark(self, name: str) -> None:
        """Remember where the trace is now (e.g. where the step begins)."""
        self.marks[name] = (len(self.events), len(self.ops))

    # ------------------------------------------------------------------ storages

    def track(self, tensor: torch.Tensor) -> None:
        """Count `tensor`'s storage as allocated now (once), and freed when it dies."""
        storage = tensor.untyped_storage()
        key = id(storage)
        nbytes = storage.nbytes()
        if key in self._live or nbytes == 0:  # empty tensors take no memory
            return
        allocation = self._next_id
        self._next_id += 1

        def freed(_, key=key, allocation=allocation, nbytes=nbytes):
            self._live.pop(key, None)
            self.events.append((allocation, -nbytes))
            self.event_phases.append(self.phase)

        self._live[key] = (allocation, nbytes, weakref.ref(storage, freed))
        self.events.append((allocation, nbytes))
        self.event_phases.append(self.phase)

    def allocation_of(self, tensor: torch.Tensor) -> int | None:
        """The allocation id of a live tensor's storage (None when it is not tracked)."""
        entry = self._live.get(id(tensor.untyped_storage()))
        return None if entry is None else entry[0]

    # ------------------------------------------------------------------ values

    def value_of(self, t: torch.Tensor) -> torch.Tensor | None:
        """The real value of a fake tensor, when it is known."""
        entry = self._shadows.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else None

    def know(self, fake: torch.Tensor, real: torch.Tensor) -> None:
        key = id(fake)
        self._shadows[key] = (weakref.ref(fake, lambda _: self._shadows.pop(key, None)), real)

    def fake_of(self, real: torch.Tensor) -> torch.Tensor:
        """A fake tensor standing for `real`, whose value it keeps (whatever its size)."""
        fake = self.fake_mode.from_tensor(real)
        self.track(fake)
        self.know(fake, real)
        return fake

    def _real(self, value):
        if isinstance(value, FakeTensor):
            real = self.value_of(value)
            if real is None:
                raise _Unknown
            return real
        return value

    def _run_for_real(self, func, args, kwargs):
        """func on the real values of its arguments, or _Unknown."""
        flat, spec = tree_flatten((args, kwargs))
        real_args, real_kwargs = tree_unflatten([self._real(v) for v in flat], spec)
        # Below autocast and autograd already: the op runs as dispatched, recording nothing.
        with unset_fake_temporarily(), torch.no_grad(), torch.autocast("cpu", enabled=False):
            return func(*real_args, **real_kwargs)

    def _shadow_outputs(self, func, args, kwargs, out) -> None:
        """Give small outputs of `func` their real values when all its inputs' are known."""
        outputs, _ = tree_flatten(out)
        small = all(not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() <= SHADOW_BYTES
                    for t in outputs)
        if small and func.overloadpacket not in ALLOCATION_OPS:
            try:
                real_out = self._run_for_real(func, args, kwargs)
            except _Unknown:
                pass
            else:
                for fake, real in zip(outputs, tree_flatten(real_out)[0]):
                    if isinstance(fake, torch.Tensor):
                        self.know(fake, real)
                return
        for t in mutated_tensors(func, args, kwargs):  # what the op wrote no longer has a known value
            self._shadows.pop(id(t), None)

    # ------------------------------------------------------------------ ops

    def record(self, name: str, cost: OpCost) -> None:
        self.ops.append(OpRecord(name, self.phase, self.region, self._owner(), cost))

    def record_launch(self, name: str, arguments: dict, grid: tuple) -> None:
        self.record(f"triton.{name}", triton_cost(name, arguments, grid))

    def _owner(self) -> str:
        if self.owner_stack:
            return self.owner_stack[-1]
        node = torch._C._current_autograd_node()
        return "" if node is None else node.metadata.get("owner", node.name())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _DEVICE:
            return func(*args, **kwargs)
        if func is _HOST_READ:
            self.syncs[self.phase] += 1
            return self._host_value(args[0])
        if func.namespace == "lgt" and func._schema.name in torch._library.custom_ops.OPDEFS:
            # The engine's Python custom ops: run their real implementation (on fake tensors, its
            # Triton launches recorded), with this mode re-entered so its inner ops are seen too.
            # (The csrc library's C++ ops, on a CPU target, are recorded below like any op: their
            # fake implementations give their outputs.)
            with self:
                return torch._library.custom_ops.OPDEFS[func._schema.name]._init_fn(*args, **kwargs)
        if func.overloadpacket is aten.index:
            args = (args[0], [self._mask_positions(i) for i in args[1]])
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            out = self._value_dependent(func, args, kwargs)
        outputs = tensors_in(out if isinstance(out, (tuple, list)) else (out,))
        inputs = tensors_in(args) + tensors_in(kwargs.values())
        if not is_metadata_only(func, inputs, outputs):
            self.record(str(func.overloadpacket), aten_cost(func, args, kwargs, out, outputs))
        self._shadow_outputs(func, args, kwargs, out)
        finite = self._finite and any(self.is_finiteness_check(t) for t in inputs)
        for t in outputs:
            self.track(t)
            if finite and t.dtype == torch.bool:
                self.mark_finiteness_check(t)
        return out

    def _mask_positions(self, index):
        """A boolean mask of known value as the positions it selects (what indexing with it reads)."""
        if isinstance(index, torch.Tensor) and index.dtype == torch.bool:
            mask = self.value_of(index) if isinstance(index, FakeTensor) else index
            if mask is not None:
                with unset_fake_temporarily():
                    return self.fake_of(mask.nonzero().squeeze(1))
        return index

    def _value_dependent(self, func, args, kwargs):
        """An op whose output shape depends on values: from the real values, else (unique) as if
        every row were distinct."""
        try:
            real_out = self._run_for_real(func, args, kwargs)
        except _Unknown:
            if func.overloadpacket not in _UNIQUE:
                raise
            return self._all_distinct(func, args, kwargs)
        flat, spec = tree_flatten(real_out)
        return tree_unflatten([self.fake_of(t) if isinstance(t, torch.Tensor) else t for t in flat], spec)

    def _host_value(self, t: torch.Tensor):
        if not isinstance(t, FakeTensor):
            with unset_fake_temporarily():
                return t.item()
        real = self.value_of(t) if t.constant is None else t.constant
        if real is not None:
            with unset_fake_temporarily():
                return real.item()
        if t.dtype == torch.bool:
            return self.is_finiteness_check(t)
        return 1.0 if t.is_floating_point() else 0

    @staticmethod
    def _all_distinct(func, args, kwargs):
        x = args[0]
        dim = kwargs.get("dim", args[1] if func.overloadpacket is aten.unique_dim and len(args) > 1 else None)
        values = x.clone() if dim is not None else x.flatten().clone()
        inverse = torch.empty(x.shape[dim] if dim is not None else x.shape, dtype=torch.long)
        counts = torch.empty(values.shape[dim or 0], dtype=torch.long)
        return values, inverse, counts

    # ------------------------------------------------------------------ finiteness checks

    def mark_finiteness_check(self, t: torch.Tensor) -> None:
        self._finite[id(t)] = weakref.ref(t)

    def is_finiteness_check(self, t) -> bool:
        ref = self._finite.get(id(t))
        return ref is not None and ref() is t

    @contextlib.contextmanager
    def finiteness_checks(self):
        """torch.isfinite's results (and booleans computed from them) read back as True. (isfinite
        itself decomposes into other ops before this mode sees it, so it is wrapped.)"""
        original = torch.isfinite

        def isfinite(t):
            out = original(t)
            self.mark_finiteness_check(out)
            return out

        torch.isfinite = isfinite
        try:
            yield
        finally:
            torch.isfinite = original
