"""GroupNorm -> FiLM -> SiLU: eager PyTorch, torch.compile of the same chain, and the fused Triton
kernel; forward and forward+backward. Each case records median ms, achieved GB/s and peak MB in
pytest-benchmark's extra_info.

GPU:  pytest bench/bench_group_norm_film_silu.py --benchmark-json=bench/results/<device>.json
CPU:  TRITON_INTERPRET=1 pytest bench/bench_group_norm_film_silu.py --benchmark-disable
      (a smoke test on tiny shapes; torch.compile and bf16 are skipped there).
"""

import pytest
import torch
import torch.nn.functional as F
from common import gb_per_s, median_ms, on_gpu, peak_memory_mb, record, skip_unless_triton_runs, synchronized

import kernels

NUM_GROUPS = 32
GPU_SHAPES = [(48, 128, 32, 32), (48, 256, 16, 16), (48, 512, 8, 8), (128, 128, 64, 64), (8, 64, 32, 32)]
CPU_SHAPES = [(1, 32, 3, 5)]  # the interpreter runs each of the B * 32 programs in Python
SHAPES = GPU_SHAPES if on_gpu() else CPU_SHAPES
DTYPES = [torch.bfloat16, torch.float32] if on_gpu() else [torch.float32]
DEVICE = "cuda" if on_gpu() else "cpu"


def eager_chain(x, weight, bias, scale, shift):
    h = F.group_norm(x, NUM_GROUPS, weight, bias)
    return F.silu(h * (1 + scale[:, :, None, None]) + shift[:, :, None, None])


def fused_chain(x, weight, bias, scale, shift):
    return kernels.group_norm_film_silu(x, NUM_GROUPS, weight, bias, scale, shift, backend="triton")


def compiled_chain():
    # A fresh compile per case: dynamo's per-function recompile limit would otherwise send later
    # shapes back to eager without saying so.
    torch._dynamo.reset()
    return torch.compile(eager_chain, dynamic=False)


def make_inputs(shape, dtype, requires_grad):
    B, C = shape[:2]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    weight, bias = torch.randn(2, C, device=DEVICE, dtype=dtype)
    scale, shift = (0.1 * torch.randn(B, 2 * C, device=DEVICE, dtype=dtype)).chunk(2, dim=1)
    return [t.requires_grad_(requires_grad) for t in (x, weight, bias, scale, shift)]


def select_implementation(name):
    if name == "compile" and not on_gpu():
        pytest.skip("torch.compile is only benchmarked on a GPU")
    if name == "triton":
        skip_unless_triton_runs()
    return {"eager": lambda: eager_chain, "compile": compiled_chain, "triton": lambda: fused_chain}[name]()


def step(chain, inputs, backward):
    """One call to time: the forward, or the forward and the gradients of every input."""
    if not backward:
        return lambda: chain(*inputs)
    x = inputs[0]
    dy = torch.randn_like(x)
    return lambda: torch.autograd.grad(chain(*inputs), inputs, dy)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("implementation", ["eager", "compile", "triton"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: "x".join(map(str, shape)))
def test_group_norm_film_silu(benchmark, shape, dtype, implementation, backward):
    chain = select_implementation(implementation)
    fn = step(chain, make_inputs(shape, dtype, requires_grad=backward), backward)
    # do_bench's first call (untimed) compiles; on CPU this is a single-call smoke run.
    ms = median_ms(fn) if on_gpu() else median_ms(fn, warmup=0, rep=1)
    # The least traffic any implementation needs: read x, write y; backward also reads x and dy
    # and writes dx. Parameters ([C] and [B, C]) are negligible.
    tensors_moved = 5 if backward else 2
    bytes_moved = tensors_moved * torch.Size(shape).numel() * dtype.itemsize
    record(benchmark, implementation=implementation, pass_="forward_backward" if backward else "forward",
           shape=list(shape), dtype=str(dtype), median_ms=ms, gb_per_s=gb_per_s(bytes_moved, ms),
           peak_mb=peak_memory_mb(fn))
    benchmark.pedantic(synchronized(fn), rounds=20 if on_gpu() else 1, warmup_rounds=2 if on_gpu() else 0)


def resblock_training_step(norm, shape, dtype):
    """Two GroupNorm -> FiLM -> SiLU -> 3x3 conv stages and a residual, forward and backward."""
    C = shape[1]
    x, weight, bias, scale, shift = make_inputs(shape, dtype, requires_grad=True)
    convs = [torch.nn.Conv2d(C, C, 3, padding=1, device=DEVICE, dtype=dtype) for _ in range(2)]

    def run():
        h = x
        for conv in convs:
            h = conv(norm(h, weight, bias, scale, shift))
        (h + x).float().square().mean().backward()
    return run


@pytest.mark.skipif(not on_gpu(), reason="peak CUDA memory is only measured on a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_resblock_trains_in_less_memory_than_eager(benchmark, dtype):
    """The fused op keeps only x for backward; eager keeps the normalised, FiLM'd and SiLU inputs."""
    shape = (48, 128, 32, 32)
    peaks = {name: peak_memory_mb(resblock_training_step(norm, shape, dtype))
             for name, norm in (("eager", eager_chain), ("triton", fused_chain))}
    record(benchmark, shape=list(shape), dtype=str(dtype), peak_mb_eager=peaks["eager"],
           peak_mb_triton=peaks["triton"])
    benchmark.pedantic(synchronized(resblock_training_step(fused_chain, shape, dtype)), rounds=5)
    assert peaks["triton"] < peaks["eager"], peaks
