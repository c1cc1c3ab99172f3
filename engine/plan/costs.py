"""What one op costs on a GPU: FLOPs (and on which compute unit), bytes moved, kernel launches.

Bytes are the floor's bytes: every tensor an op reads is read once and every tensor it writes is
written once (what a kernel that keeps its intermediates on chip moves); an expanded (stride 0)
dimension is read once. FLOPs of matrix products, convolutions and attention come from
torch.utils.flop_counter's formulas; every other op counts one FLOP per output element (they are
memory-bound; the count only has to be of the right order). Triton kernels are costed from their
launch grid and block sizes by the formulas in TRITON_KERNELS, which count the work the kernel
executes, padding included.

Launches follow CUDA's eager execution: an op that only makes a view or an uninitialised tensor
launches nothing; a multi-tensor (`_foreach_*`, fused optimizer) op launches one kernel per batch of
tensors it can address at once (multi_tensor_apply: 110 / 64 / 48 / 36 / 30 tensors for 1 to 5
tensor lists, 320 blocks of 65536 elements); a convolution backward launches one kernel per
gradient it returns; anything else one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

aten = torch.ops.aten

LOW_PRECISION = (torch.bfloat16, torch.float16)
MATRIX_OPS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
CONVOLUTION_OPS = {aten.convolution, aten._convolution, aten.convolution_backward, aten.cudnn_convolution}
ATTENTION_OPS = {aten._scaled_dot_product_flash_attention, aten._scaled_dot_product_flash_attention_backward,
                 aten._scaled_dot_product_efficient_attention,
                 aten._scaled_dot_product_efficient_attention_backward}
ALLOCATION_OPS = {aten.empty, aten.empty_like, aten.empty_strided, aten.new_empty, aten.new_empty_strided,
                  aten.empty_permuted}
# In-place ops that overwrite their `self` without reading it.
OVERWRITING_OPS = {aten.copy_, aten.fill_, aten.zero_, aten.normal_, aten.uniform_, aten.random_,
                   aten.bernoulli_, aten.exponential_}
# Fused optimizers mark their gradients as mutable (they unscale them in place when given a grad
# scale); without one the gradients are only read.
READ_ONLY_GRADS = {aten._fused_adamw_, aten._fused_adam_}
MULTI_TENSOR_MAX_TENSORS = (110, 64, 48, 36, 30)
MULTI_TENSOR_MAX_BLOCKS = 320
MULTI_TENSOR_CHUNK = 65536


@dataclass
class OpCost:
    flops: int
    bytes: int
    launches: int
    unit: str  # "tensor" | "tf32" | "fp32": which rate of engine.plan.gpus runs the FLOPs


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (an expanded dimension counts once)."""
    count = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            count *= size
    return count * t.element_size()


def tensors_in(values: Iterable) -> list[torch.Tensor]:
    """The tensors among an op's arguments or outputs (aten nests them at most one list deep)."""
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (list, tuple)):
            found.extend(v for v in value if isinstance(v, torch.Tensor))
    return found


@dataclass(frozen=True)
class _Schema:
    names: tuple[str, ...]  # argument names in order
    mutated: frozenset[str]  # arguments the op writes
    read: frozenset[str]  # arguments the op reads (all but the overwritten ones)


_SCHEMAS: dict = {}


def _schema(func) -> _Schema:
    if func not in _SCHEMAS:
        packet = func.overloadpacket
        arguments = func._schema.arguments
        mutated = {a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write}
        if packet in READ_ONLY_GRADS:
            mutated.discard("grads")
        overwritten = {"self"} & mutated if packet in OVERWRITING_OPS else set()
        _SCHEMAS[func] = _Schema(tuple(a.name for a in arguments), frozenset(mutated),
                                 frozenset(a.name for a in arguments) - overwritten)
    return _SCHEMAS[func]


def _unit(packet, read: list[torch.Tensor]) -> str:
    if packet in MATRIX_OPS or packet in CONVOLUTION_OPS or packet in ATTENTION_OPS:
        if any(t.dtype in LOW_PRECISION for t in read):
            return "tensor"
        return "tf32" if packet in CONVOLUTION_OPS else "fp32"
    return "fp32"


def _multi_tensor_launches(lists: list[list[torch.Tensor]]) -> int:
    depth = min(len(lists), len(MULTI_TENSOR_MAX_TENSORS))
    first = lists[0]
    chunks = sum(math.ceil(t.numel() / MULTI_TENSOR_CHUNK) for t in first)
    return max(1, math.ceil(len(first) / MULTI_TENSOR_MAX_TENSORS[depth - 1]),
               math.ceil(chunks / MULTI_TENSOR_MAX_BLOCKS))


@functools.cache
def _flop_registry() -> dict:
    # Imported on first use: torch.utils.flop_counter imports triton (through torch._inductor), and
    # the engine's modules must import where triton is not installed.
    from torch.utils.flop_counter import flop_registry

    return flop_registry


def aten_cost(func, args: tuple, kwargs: dict, out, outputs: list[torch.Tensor]) -> OpCost:
    """The cost of one aten op call: its arguments `args` / `kwargs`, its result `out` and the
    tensors in it, `outputs`."""
    packet = func.overloadpacket
    if packet in ALLOCATION_OPS:
        return OpCost(0, 0, 0, "fp32")
    schema = _schema(func)
    bound = dict(zip(schema.names, args))
    bound.update(kwargs)
    read, written, lists = [], [], []
    for name, value in bound.items():
        if isinstance(value, torch.Tensor):
            tensors = [value]
        elif isinstance(value, (list, tuple)):
            tensors = [v for v in value if isinstance(v, torch.Tensor)]
            if tensors:
                lists.append(tensors)
        else:
            continue
        if name in schema.read:
            read.extend(tensors)
        if name in schema.mutated:
            written.extend(tensors)
    if not schema.mutated:
        written = outputs
    moved = sum(tensor_bytes(t) for t in read) + sum(tensor_bytes(t) for t in written)
    registry = _flop_registry()
    if packet in registry:
        flops = int(registry[packet](*args, **kwargs, out_val=out))
    else:
        flops = sum(t.numel() for t in written)
    if lists:
        launches = _multi_tensor_launches(lists)
    elif packet is aten.convolution_backward:
        launches = sum(1 for t in out if t is not None)
    else:
        launches = 1
    return OpCost(flops, moved, launches, _unit(packet, read))


def mutated_tensors(func, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The tensors an op call writes in place."""
    mutated = _schema(func).mutated
    if not mutated:
        return []
    bound = dict(zip(_schema(func).names, args))
    bound.update(kwargs)
    return tensors_in(value for name, value in bound.items() if name in mutated)


def is_metadata_only(func, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> bool:
    """An op that launches nothing: every output shares storage with an input (views, detach,
    reshapes that need no copy) and nothing is written."""
    if _schema(func).mutated:
        return False
    if not outputs:
        return True
    sources = {id(t.untyped_storage()) for t in inputs}
    return all(id(t.untyped_storage()) in sources for t in outputs)


def _storage_id(t: torch.Tensor) -> int:
    return id(t.untyped_storage())


# --------------------------------------------------------------------------- Triton kernels


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sort_steps(n: int) -> int:
    """Compare-exchange steps of a bitonic sort of n (a power of two) values, per value."""
    stages = max(1, int(math.log2(n)))
    return stages * (stages + 1) // 2


def _group_norm_forward(a: dict, grid: tuple) -> int:
    per_element = 14 if a["ACT"] else 10
    return grid[0] * a["channels_per_group"] * a["spatial"] * per_element


def _group_norm_backward(a: dict, grid: tuple) -> int:
    per_element = 30 if a["ACT"] else 20
    return grid[0] * a["channels_per_group"] * a["spatial"] * per_element


def _patch_swd_forward(a: dict, grid: tuple) -> int:
    n, taps = a["BLOCK_N"], a["C"] * a["KERNEL_SIZE"] ** 2
    per_row = 2 * (2 * taps * n + n * _sort_steps(n))  # x and y: project, then sort
    return grid[0] * grid[1] * a["BLOCK_P"] * per_row


def _patch_swd_backward(a: dict, grid: tuple) -> int:
    per_program = a["KERNEL_SIZE"] ** 2 * _cdiv(a["P"], a["BLOCK_P"]) * 2 * a["BLOCK_P"] * a["BLOCK_C"] * a["BLOCK_N"]
    return grid[0] * grid[1] * per_program


def _gram_tile(a: dict) -> int:
    """FLOPs of one [BLOCK_S, BLOCK_S] tile of G_x - G_y (two Grams over the padded feature dim)."""
    return 2 * _cdiv(a["D"], a["BLOCK_D"]) * 2 * a["BLOCK_S"] ** 2 * a["BLOCK_D"]


def _ssm_forward(a: dict, grid: tuple) -> int:
    blocks = _cdiv(a["S"], a["BLOCK_S"])
    tiles = blocks * (blocks + 1) // 2  # the upper triangle of block pairs
    return grid[0] * tiles * (_gram_tile(a) + 3 * a["BLOCK_S"] ** 2)


def _ssm_backward(a: dict, grid: tuple) -> int:
    blocks = _cdiv(a["S"], a["BLOCK_S"])
    products = int(a["GRAD_X"]) + int(a["GRAD_Y"])
    per_tile = _gram_tile(a) + products * 2 * a["BLOCK_S"] ** 2 * a["BLOCK_D"]
    return grid[0] * grid[1] * grid[2] * blocks * per_tile


# Kernel function name -> FLOPs(arguments by parameter name, launch grid). Every @triton.jit kernel
# of kernels/_triton_*.py needs an entry (tests/test_plan.py checks).
TRITON_KERNELS: dict[str, Callable[[dict, tuple], int]] = {
    "_group_norm_film_silu_fwd_kernel": _group_norm_forward,
    "_group_norm_film_silu_bwd_kernel": _group_norm_backward,
    "_patch_swd_fwd_kernel": _patch_swd_forward,
    "_patch_swd_bwd_kernel": _patch_swd_backward,
    "_ssm_fwd_kernel": _ssm_forward,
    "_ssm_bwd_kernel": _ssm_backward,
}


def triton_cost(name: str, arguments: dict, grid: tuple) -> OpCost:
    """One Triton launch: FLOPs from TRITON_KERNELS (fp32 units: the kernels compute in fp32, their
    dots in IEEE fp32), bytes of every distinct tensor argument once."""
    if name not in TRITON_KERNELS:
        raise KeyError(f"no cost formula for the Triton kernel {name}; add one to "
                       f"engine.plan.costs.TRITON_KERNELS")
    grid = tuple(grid) + (1,) * (3 - len(grid))
    seen, moved = set(), 0
    for value in arguments.values():
        if isinstance(value, torch.Tensor) and _storage_id(value) not in seen:
            seen.add(_storage_id(value))
            moved += tensor_bytes(value)
    return OpCost(TRITON_KERNELS[name](arguments, grid), moved, 1, "fp32")
