"""Patch SWD: eager unfold + matmul + sort (how the seed wrote it), the conv2d + sort reference, and
the fused Triton kernel; forward and forward+backward (gradient for x only: y is a data latent, as
in LGT). Each case records median ms and peak MB in pytest-benchmark's extra_info.

GPU:  pytest bench/bench_patch_swd.py --benchmark-json=bench/results/<device>.json
CPU:  TRITON_INTERPRET=1 pytest bench/bench_patch_swd.py --benchmark-disable
      (a smoke test on a tiny shape; without TRITON_INTERPRET=1 the Triton cases are skipped).
"""

import pytest
import torch
import torch.nn.functional as F
from common import median_ms, on_gpu, peak_memory_mb, record, skip_unless_triton_runs, synchronized

import kernels
from kernels.patch_swd import patch_swd_reference

KERNEL_SIZE = 3
# (B, C, H, W, P): LGT's 4 x 32 x 32 latents at batch 48, with 64 and 256 directions.
GPU_CASES = [(48, 4, 32, 32, 64), (48, 4, 32, 32, 256)]
CPU_CASES = [(1, 2, 4, 4, 2)]  # the interpreter's tl.sort costs ~1 ms per element and stage
CASES = GPU_CASES if on_gpu() else CPU_CASES
DEVICE = "cuda" if on_gpu() else "cpu"


def unfold_patch_swd(x, y, theta, kernel_size):
    """The seed's formulation: materialise every patch [B, N, C*k*k], project, sort along N."""
    def sorted_projections(image):
        patches = F.unfold(image, kernel_size, padding=kernel_size // 2).transpose(1, 2).contiguous()
        return torch.sort(patches @ theta.T, dim=1).values  # [B, N, P]

    return F.mse_loss(sorted_projections(x), sorted_projections(y))


def triton_patch_swd(x, y, theta, kernel_size):
    return kernels.patch_swd(x, y, theta, kernel_size, backend="triton")


IMPLEMENTATIONS = {
    "unfold": unfold_patch_swd,
    "conv_reference": patch_swd_reference,
    "triton": triton_patch_swd,
}


def select_implementation(name):
    if name == "triton":
        skip_unless_triton_runs()
    return IMPLEMENTATIONS[name]


def step(loss_fn, case, backward):
    """One call to time: the loss, or the loss and x's gradient."""
    B, C, H, W, P = case
    x = torch.randn(B, C, H, W, device=DEVICE, requires_grad=backward)
    y = torch.randn(B, C, H, W, device=DEVICE)
    theta = F.normalize(torch.randn(P, C * KERNEL_SIZE**2, device=DEVICE), dim=1)
    if not backward:
        return lambda: loss_fn(x, y, theta, KERNEL_SIZE)
    return lambda: torch.autograd.grad(loss_fn(x, y, theta, KERNEL_SIZE), x)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", CASES, ids=lambda case: "B{}_C{}_{}x{}_P{}".format(*case))
def test_patch_swd(benchmark, case, implementation, backward):
    fn = step(select_implementation(implementation), case, backward)
    ms = median_ms(fn) if on_gpu() else median_ms(fn, warmup=0, rep=1)
    record(benchmark, implementation=implementation, pass_="forward_backward" if backward else "forward",
           shape=list(case[:4]), directions=case[4], kernel_size=KERNEL_SIZE, dtype="float32", median_ms=ms,
           peak_mb=peak_memory_mb(fn))
    benchmark.pedantic(synchronized(fn), rounds=20 if on_gpu() else 1, warmup_rounds=2 if on_gpu() else 0)
