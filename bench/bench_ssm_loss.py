"""SSM (Gram) loss: the eager reference (gather + normalise + bmm, one [B, S, S] difference held)
against the tiled Triton kernels (no S x S matrix stored), at full resolution (S = N = 1024, no
index) and subsampled (S = 256 positions); forward and forward+backward (gradient for x only: y
is the content source, as in LGT). Each case records median ms and peak MB in extra_info.

GPU:  pytest bench/bench_ssm_loss.py --benchmark-json=bench/results/<device>.json
CPU:  TRITON_INTERPRET=1 pytest bench/bench_ssm_loss.py --benchmark-disable
      (a smoke test on tiny shapes; without TRITON_INTERPRET=1 the Triton cases are skipped).
"""

import pytest
import torch
from common import median_ms, on_gpu, peak_memory_mb, record, skip_unless_triton_runs, synchronized

import kernels
from kernels.ssm_loss import ssm_loss_reference

# (B, D, N, S): LGT's 32 x 32 latents at batch 48, 4 channels or 36 (4 channels x 3 x 3 patches);
# S = N means every position (index=None).
GPU_CASES = [(48, D, 1024, S) for D in (4, 36) for S in (256, 1024)]
CPU_CASES = [(1, 4, 40, 40), (1, 4, 40, 16)]
CASES = GPU_CASES if on_gpu() else CPU_CASES
DEVICE = "cuda" if on_gpu() else "cpu"


def triton_ssm_loss(x, y, index):
    return kernels.ssm_loss(x, y, index, backend="triton")


IMPLEMENTATIONS = {"eager_reference": ssm_loss_reference, "triton": triton_ssm_loss}


def select_implementation(name):
    if name == "triton":
        skip_unless_triton_runs()
    return IMPLEMENTATIONS[name]


def step(loss_fn, case, backward):
    """One call to time: the loss, or the loss and x's gradient."""
    B, D, N, S = case
    x = torch.randn(B, D, N, device=DEVICE, requires_grad=backward)
    y = torch.randn(B, D, N, device=DEVICE)
    index = None if S == N else torch.randperm(N, device=DEVICE)[:S]
    if not backward:
        return lambda: loss_fn(x, y, index)
    return lambda: torch.autograd.grad(loss_fn(x, y, index), x)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("case", CASES, ids=lambda case: "B{}_D{}_N{}_S{}".format(*case))
def test_ssm_loss(benchmark, case, implementation, backward):
    fn = step(select_implementation(implementation), case, backward)
    ms = median_ms(fn) if on_gpu() else median_ms(fn, warmup=0, rep=1)
    B, D, N, S = case
    record(benchmark, implementation=implementation, pass_="forward_backward" if backward else "forward",
           batch=B, features=D, positions=N, samples=S, dtype="float32", median_ms=ms,
           peak_mb=peak_memory_mb(fn))
    benchmark.pedantic(synchronized(fn), rounds=20 if on_gpu() else 1, warmup_rounds=2 if on_gpu() else 0)
