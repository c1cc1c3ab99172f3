"""Running the engine's CUDA code paths on fake CPU tensors.

On a CPU-only torch, autograd cannot run on fake tensors that say they are on CUDA, so a plan runs
the step on fake CPU tensors of the real shapes and, inside `cuda_code_paths`, makes every choice
the engine and PyTorch would make on a CUDA device:

- kernels: `backend="auto"` picks the Triton kernels (kernels._dispatch treats the CPU as CUDA);
  their launches are recorded, with their arguments, instead of run; torch takes its multi-tensor
  (foreach) paths, and kernels.ssm_loss its on-device index check, as for CUDA tensors;
- autocast: CPU autocast is made to cast as CUDA autocast does. The ops whose autocast rules differ
  between the two devices are found in the dispatcher (an AutocastCPU kernel but no AutocastCUDA
  one, or the reverse); the first are let through uncast, the second cast the way CUDA autocast
  casts them, learnt by running the op once per argument signature on fake CUDA tensors under
  CUDA autocast. (The difference that matters in this engine: CUDA runs upsample_nearest2d in fp32.)
- attention: F.scaled_dot_product_attention picks the backend CUDA would (`cuda_sdpa_backend`:
  flash, then memory-efficient, then the fp32 "math" fallback) and calls that backend's op, whose
  fake implementation has the real outputs (flash: out + logsumexp; math: the [B, heads, L, L]
  scores it stores);
- phases: the NVTX ranges the engine marks (data, forward, backward, optimizer, ema; the LGT energies
  and ODE steps inside them) tell the recorder which phase each op and allocation belongs to.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import pkgutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils._foreach_utils as foreach_utils
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

import engine.profiling
import kernels
import kernels._dispatch
from engine.plan.trace import StepRecorder

aten = torch.ops.aten
# The loop's phase names -> the phases a plan reports.
PHASES = {"data": "data", "forward": "forward", "backward": "backward", "optimizer": "optimizer",
          "ema": "optimizer"}


# --------------------------------------------------------------------------- phases


class _PhaseListener:
    """Stands in for the `nvtx` package in engine.profiling: each range the loop opens
    (`phase("forward")`, ...) also sets the recorder's phase; ranges inside a phase (the LGT
    energies, ODE steps) become its region."""

    def __init__(self, recorder: StepRecorder, nvtx):
        self.recorder, self.nvtx = recorder, nvtx

    @contextlib.contextmanager
    def annotate(self, name: str):
        recorder = self.recorder
        previous = recorder.phase, recorder.region
        if name in PHASES:
            recorder.phase, recorder.region = PHASES[name], ""
        elif recorder.phase in PHASES.values():
            recorder.region = name
        try:
            with self.nvtx.annotate(name) if self.nvtx is not None else contextlib.nullcontext():
                yield
        finally:
            recorder.phase, recorder.region = previous


@contextlib.contextmanager
def loop_phases(recorder: StepRecorder) -> Iterator[None]:
    """Forward the phase ranges the engine marks (engine.profiling.phase) to the recorder."""
    original = engine.profiling._nvtx
    engine.profiling._nvtx = _PhaseListener(recorder, original)
    try:
        yield
    finally:
        engine.profiling._nvtx = original


# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class TritonLaunch:
    """What decides which binary a Triton launch compiles to (for engine.plan.kernel_resources)."""

    module: str
    kernel: str
    arguments: tuple  # per parameter, what it is specialised on (see _launch_signature)
    options: tuple  # (("num_warps", 4), ...)


def _launch_signature(value, constexpr: bool):
    """What Triton specialises a kernel on: a tensor's dtype and 16-byte alignment, an integer's
    being 1 or a multiple of 16 (and needing 64 bits), a constexpr's value; not a float's value."""
    if isinstance(value, torch.Tensor):
        aligned = value.storage_offset() * value.element_size() % 16 == 0
        return ("tensor", str(value.dtype).removeprefix("torch."), aligned)
    if value is None:
        return ("none",)
    if constexpr or isinstance(value, bool):
        return ("constant", value)
    if isinstance(value, int):
        wide = 2**32 if abs(value) >= 2**31 else 0
        return ("int", value if value == 1 else wide + (16 if value % 16 == 0 else 3))
    if isinstance(value, float):
        return ("float", 1.0)
    raise TypeError(f"a Triton launch argument the plan cannot record: {value!r}")


class _RecordedKernel:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, module: str, name: str, kernel, recorder: StepRecorder, launches: set):
        self.module, self.name, self.kernel = module, name, kernel
        self.recorder, self.launches = recorder, launches
        self.parameters = list(inspect.signature(kernel.fn).parameters)
        self.constexprs = {name for name, p in inspect.signature(kernel.fn).parameters.items()
                           if "constexpr" in str(p.annotation)}

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            arguments = dict(zip(self.parameters, args))
            arguments.update((k, v) for k, v in kwargs.items() if k in self.parameters)
            options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in self.parameters))
            shape = grid(arguments) if callable(grid) else grid
            self.recorder.record_launch(self.name, arguments, tuple(shape))
            self.launches.add(TritonLaunch(self.module, self.name,
                                           tuple(_launch_signature(arguments[p], p in self.constexprs)
                                                 for p in self.parameters),
                                           options))
        return launch


def triton_kernel_modules() -> list[str]:
    """The modules that hold the engine's Triton kernels (kernels/_triton_*.py)."""
    return sorted(f"kernels.{m.name}" for m in pkgutil.iter_modules(kernels.__path__)
                  if m.name.startswith("_triton_"))


def triton_kernels(module_name: str) -> dict[str, object]:
    """name -> @triton.jit function of one kernel module (helpers included)."""
    from triton.runtime.jit import KernelInterface

    module = importlib.import_module(module_name)
    return {name: value for name, value in vars(module).items() if isinstance(value, KernelInterface)}


@contextlib.contextmanager
def recorded_triton_launches(recorder: StepRecorder, launches: set) -> Iterator[None]:
    """Every Triton kernel of kernels/ records its launches instead of running."""
    replaced = []
    for module_name in triton_kernel_modules():
        module = importlib.import_module(module_name)
        for name, kernel in triton_kernels(module_name).items():
            replaced.append((module, name, kernel))
            setattr(module, name, _RecordedKernel(module_name, name, kernel, recorder, launches))
    try:
        yield
    finally:
        for module, name, kernel in replaced:
            setattr(module, name, kernel)


@contextlib.contextmanager
def cuda_kernel_dispatch() -> Iterator[None]:
    """backend="auto" chooses for CPU tensors what it chooses for CUDA tensors."""
    original = kernels._dispatch.backend_for_device

    def as_on_cuda(backend: str, device: torch.device) -> str:
        return original(backend, torch.device("cuda") if device.type == "cpu" else device)

    kernels._dispatch.backend_for_device = as_on_cuda
    try:
        yield
    finally:
        kernels._dispatch.backend_for_device = original


@contextlib.contextmanager
def cuda_index_checks() -> Iterator[None]:
    """kernels.ssm_loss checks its positions on the device for CUDA tensors (an asynchronous
    assertion) and reads them back to the host for CPU ones: the plan takes the CUDA check."""
    module = importlib.import_module("kernels.ssm_loss")  # `kernels.ssm_loss` is the function
    original = module._check_index_range

    def on_device(index, num_positions, valid, on_host):
        return original(index, num_positions, valid, False)

    module._check_index_range = on_device
    try:
        yield
    finally:
        module._check_index_range = original


@contextlib.contextmanager
def cuda_foreach() -> Iterator[None]:
    """torch's multi-tensor (foreach) paths, which it takes for CUDA tensors (clip_grad_norm_'s one
    norm kernel per dtype), are taken for fake tensors too (torch allows them for plain tensors only)."""
    foreach_utils._foreach_supported_types.append(FakeTensor)
    try:
        yield
    finally:
        foreach_utils._foreach_supported_types.remove(FakeTensor)


# --------------------------------------------------------------------------- autocast


def autocast_differences() -> tuple[list[str], list[str]]:
    """(ops CPU autocast casts but CUDA autocast does not, ops CUDA autocast casts but CPU does not)."""
    names = torch._C._dispatch_get_all_op_names()

    def has(name: str, key: str) -> bool:
        return torch._C._dispatch_has_kernel_for_dispatch_key(name, key)

    cpu_only = [n for n in names if has(n, "AutocastCPU") and not has(n, "AutocastCUDA")]
    cuda_only = [n for n in names if has(n, "AutocastCUDA") and not has(n, "AutocastCPU")]
    return sorted(cpu_only), sorted(cuda_only)


class _CastRecorder(TorchDispatchMode):
    """Notes the dtype each argument of the probed op is cast to by autocast."""

    def __init__(self, arguments: list[torch.Tensor]):
        super().__init__()
        self.positions = {id(t): i for i, t in enumerate(arguments)}
        self.casts: dict[int, torch.dtype] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket is aten._to_copy and id(args[0]) in self.positions and "dtype" in kwargs:
            self.casts.setdefault(self.positions[id(args[0])], kwargs["dtype"])
        return func(*args, **kwargs)


class CudaAutocastRules:
    """What CUDA autocast does to an op's arguments, per argument signature: the dtype each tensor
    argument is cast to, and a `dtype=` it adds (the "fp32_set_opt_dtype" policy of sum, softmax,
    cumsum, ...: the op computes in fp32 instead of casting its input)."""

    def __init__(self):
        self._cache: dict[tuple, tuple[dict[int, torch.dtype], dict]] = {}
        self._probe_mode = FakeTensorMode(allow_non_fake_inputs=True)

    def rule(self, op, args, kwargs, dtype: torch.dtype) -> tuple[dict[int, torch.dtype], dict]:
        """({position among the flattened arguments: cast dtype}, keyword arguments to add)."""
        flat, _ = tree_flatten((args, kwargs))
        key = (op, dtype, tuple((t.dtype, t.dim()) if isinstance(t, torch.Tensor) else type(t) for t in flat))
        if key not in self._cache:
            self._cache[key] = self._probe(op, args, kwargs, dtype)
        return self._cache[key]

    def _probe(self, op, args, kwargs, dtype):
        # Outside the plan's own modes: the probe is neither recorded nor part of the step.
        with _disable_current_modes(), self._probe_mode:
            twins = tree_map(lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="cuda")
                             if isinstance(t, torch.Tensor) else t, (args, kwargs))
            flat, _ = tree_flatten(twins)
            recorder = _CastRecorder([t for t in flat if isinstance(t, torch.Tensor)])
            positions = [i for i, t in enumerate(flat) if isinstance(t, torch.Tensor)]
            enabled, previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", dtype)
            try:
                with recorder:
                    out = op(*twins[0], **twins[1])
            finally:
                torch.set_autocast_enabled("cuda", enabled)
                torch.set_autocast_dtype("cuda", previous)
        casts = {positions[i]: cast for i, cast in recorder.casts.items()}
        extra = {}
        first_tensor = next((t for t in flat if isinstance(t, torch.Tensor)), None)
        takes_dtype = any(a.name == "dtype" for a in op._schema.arguments) and kwargs.get("dtype") is None
        if (not casts and takes_dtype and isinstance(out, torch.Tensor) and first_tensor is not None
                and out.dtype != first_tensor.dtype):
            extra["dtype"] = out.dtype
        return casts, extra


_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _op(qualified: str):
    name, _, overload = qualified.removeprefix("aten::").partition(".")
    return getattr(getattr(aten, name), overload or "default")


@contextlib.contextmanager
def cuda_autocast_on_cpu() -> Iterator[None]:
    """CPU autocast casts as CUDA autocast would (see the module doc)."""
    cpu_only, cuda_only = autocast_differences()
    rules = CudaAutocastRules()
    library = torch.library.Library("aten", "IMPL")

    def cast_like_cuda(op):
        def kernel(*args, **kwargs):
            casts, extra = rules.rule(op, args, kwargs, torch.get_autocast_dtype("cpu"))
            flat, spec = tree_flatten((args, kwargs))
            flat = [t.to(casts[i]) if i in casts else t for i, t in enumerate(flat)]
            args, kwargs = torch.utils._pytree.tree_unflatten(flat, spec)
            with torch._C._ExcludeDispatchKeyGuard(_AUTOCAST_CPU):
                return op(*args, **kwargs, **extra)
        return kernel

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Oo]verrid.*")
        for name in cpu_only:
            library.impl(name.removeprefix("aten::"), torch.library.fallthrough_kernel, "AutocastCPU")
        for name in cuda_only:
            library.impl(name.removeprefix("aten::"), cast_like_cuda(_op(name)), "AutocastCPU")
    try:
        yield
    finally:
        library._destroy()


# --------------------------------------------------------------------------- attention


def cuda_sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask, dropout_p: float,
                      compute_capability: tuple[int, int]) -> str:
    """The backend torch.nn.functional.scaled_dot_product_attention runs on a CUDA device of this
    compute capability with default settings: "flash", "efficient" or "math".

    The checks of aten/src/ATen/native/transformers/cuda/sdp_utils.cpp that can fail for dense
    [B, heads, L, d] inputs, in its priority order (flash, memory-efficient, math): both fused
    kernels need stride 1 along d for q, k and v; flash needs fp16/bf16, sm_80+, no mask, d <= 256
    (on sm_86 / sm_89 d <= 192 when a gradient is needed); memory-efficient needs fp16/bf16/fp32
    (bf16 on sm_80+) and d a multiple of 8 (4 for fp32)."""
    dense = all(t.dim() == 4 and t.stride(-1) == 1 and t.shape[-2] > 0 for t in (q, k, v))
    if not dense:
        return "math"
    d, dv = q.shape[-1], v.shape[-1]
    grad = any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled()
    sm = compute_capability
    flash_d = 192 if grad and sm in ((8, 6), (8, 9)) else 256
    if (q.dtype in (torch.float16, torch.bfloat16) and sm >= (8, 0) and attn_mask is None
            and d == k.shape[-1] == dv and d <= flash_d):
        return "flash"
    alignment = 4 if q.dtype == torch.float32 else 8
    if (q.dtype in (torch.float16, torch.float32) or (q.dtype == torch.bfloat16 and sm >= (8, 0))) \
            and d % alignment == 0 and dv % alignment == 0:
        return "efficient"
    return "math"


@contextlib.contextmanager
def cuda_attention(compute_capability: tuple[int, int], choices: list[str]) -> Iterator[None]:
    """F.scaled_dot_product_attention runs the op of the backend CUDA would pick; each pick is
    appended to `choices`."""
    original = F.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **extra):
        if extra:
            raise TypeError(f"the plan's scaled_dot_product_attention does not model {sorted(extra)}")
        if torch.is_autocast_enabled("cpu"):  # SDPA is on CUDA autocast's lower-precision list
            dtype = torch.get_autocast_dtype("cpu")
            query, key, value = (t.to(dtype) if t.is_floating_point() else t for t in (query, key, value))
        backend = cuda_sdpa_backend(query, key, value, attn_mask, dropout_p, compute_capability)
        choices.append(backend)
        with torch.autocast("cpu", enabled=False):
            if backend == "flash":
                d = query.shape[-1]
                pad = -d % 8  # the CUDA flash path pads d to a multiple of 8
                q, k, v = (F.pad(t, (0, pad)) if pad else t for t in (query, key, value))
                scale = d ** -0.5 if scale is None else scale
                out = aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, scale=scale)[0]
                return out[..., :d] if pad else out
            if backend == "efficient":
                log_sumexp = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
                return aten._scaled_dot_product_efficient_attention(query, key, value, attn_mask, log_sumexp,
                                                                    dropout_p, is_causal, scale=scale)[0]
            return aten._scaled_dot_product_attention_math(query, key, value, attn_mask, dropout_p, is_causal,
                                                           scale=scale)[0]

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


# --------------------------------------------------------------------------- all of it


@contextlib.contextmanager
def cuda_code_paths(recorder: StepRecorder, compute_capability: tuple[int, int], launches: set,
                    attention_choices: list[str]) -> Iterator[None]:
    """Everything in the module doc, for a GPU of `compute_capability`."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(cuda_kernel_dispatch())
        stack.enter_context(cuda_foreach())
        stack.enter_context(cuda_index_checks())
        if kernels._dispatch.triton_available():
            stack.enter_context(recorded_triton_launches(recorder, launches))
        stack.enter_context(cuda_autocast_on_cpu())
        stack.enter_context(cuda_attention(compute_capability, attention_choices))
        yield
