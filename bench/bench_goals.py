"""The kernels' speed and memory goals, checked on a GPU as ratios measured in one run.

Each test times (median, `triton.testing.do_bench`) and measures peak memory of the competing
implementations back to back on the same inputs, prints the figures, and asserts each kernel's
goal. Skipped without a GPU: a ratio from the CPU interpreter means nothing.

    pytest bench/bench_goals.py -s      # on a GPU machine
"""

import pytest
import torch
import torch.nn.functional as F
from bench_group_norm_film_silu import compiled_chain, eager_chain, fused_chain
from bench_group_norm_film_silu import make_inputs as make_norm_inputs
from bench_patch_swd import IMPLEMENTATIONS as SWD_IMPLEMENTATIONS
from bench_patch_swd import KERNEL_SIZE
from bench_ssm_loss import IMPLEMENTATIONS as SSM_IMPLEMENTATIONS
from common import device_name, gb_per_s, median_ms, on_gpu, peak_memory_mb

pytestmark = pytest.mark.skipif(not on_gpu(), reason="speed and memory goals are measured on a GPU only")


def measure(fn) -> tuple[float, float]:
    """(median ms, peak MiB above the baseline) of one call."""
    return median_ms(fn, warmup=25, rep=200), peak_memory_mb(fn)


def report(title: str, rows: dict[str, tuple[float, float]]) -> None:
    print(f"\n{title} on {device_name()}")
    for name, (ms, mb) in rows.items():
        print(f"  {name:<16} {ms:8.3f} ms  {mb:9.1f} MiB")


def norm_forward_backward(chain, inputs):
    dy = torch.randn_like(inputs[0])
    return lambda: torch.autograd.grad(chain(*inputs), inputs, dy)


@pytest.mark.parametrize("shape", [(48, 128, 32, 32), (128, 128, 64, 64)], ids=str)
def test_fused_norm_forward_backward_beats_eager_2x_and_compile_1_2x(shape):
    inputs = make_norm_inputs(shape, torch.bfloat16, requires_grad=True)
    rows = {name: measure(norm_forward_backward(chain, inputs))
            for name, chain in (("eager", eager_chain), ("compile", compiled_chain()), ("triton", fused_chain))}
    report(f"GroupNorm-FiLM-SiLU fwd+bwd {shape} bf16", rows)
    assert rows["eager"][0] / rows["triton"][0] >= 2.0
    assert rows["compile"][0] / rows["triton"][0] >= 1.2


def test_fused_norm_never_slower_than_eager_at_the_smallest_shape():
    inputs = make_norm_inputs((8, 64, 32, 32), torch.bfloat16, requires_grad=True)
    eager = measure(norm_forward_backward(eager_chain, inputs))
    fused = measure(norm_forward_backward(fused_chain, inputs))
    report("GroupNorm-FiLM-SiLU fwd+bwd (8, 64, 32, 32) bf16", {"eager": eager, "triton": fused})
    assert fused[0] <= eager[0]


def test_fused_norm_forward_reaches_70_percent_of_copy_bandwidth():
    shape = (128, 128, 64, 64)
    inputs = make_norm_inputs(shape, torch.bfloat16, requires_grad=False)
    x = inputs[0]
    copy_gbs = gb_per_s(2 * x.numel() * x.element_size(), median_ms(lambda: x.clone(), warmup=25, rep=200))
    fused_ms = median_ms(lambda: fused_chain(*inputs), warmup=25, rep=200)
    fused_gbs = gb_per_s(2 * x.numel() * x.element_size(), fused_ms)  # read x once, write y once
    print(f"\ncopy {copy_gbs:.0f} GB/s, fused forward {fused_gbs:.0f} GB/s on {device_name()}")
    assert fused_gbs >= 0.7 * copy_gbs


@pytest.mark.parametrize("directions", [64, 256])
def test_patch_swd_forward_backward_3x_faster_in_a_quarter_of_the_memory(directions):
    x = torch.randn(48, 4, 32, 32, device="cuda", requires_grad=True)
    y = torch.randn(48, 4, 32, 32, device="cuda")
    theta = F.normalize(torch.randn(directions, 4 * KERNEL_SIZE**2, device="cuda"), dim=1)
    rows = {name: measure(lambda fn=fn: torch.autograd.grad(fn(x, y, theta, KERNEL_SIZE), x))
            for name, fn in SWD_IMPLEMENTATIONS.items()}
    report(f"patch_swd fwd+bwd B=48 C=4 32x32 P={directions}", rows)
    fastest_eager = min((rows["unfold"], rows["conv_reference"]), key=lambda row: row[0])
    assert fastest_eager[0] / rows["triton"][0] >= 3.0
    assert rows["triton"][1] <= fastest_eager[1] / 4


def ssm_forward_backward(loss_fn, x, y, index):
    return lambda: torch.autograd.grad(loss_fn(x, y, index), x)


@pytest.mark.parametrize("features", [4, 36])
def test_ssm_exact_uses_no_more_memory_than_eager_subsampled_and_subsampled_is_2x_faster(features):
    x = torch.randn(48, features, 1024, device="cuda", requires_grad=True)
    y = torch.randn(48, features, 1024, device="cuda")
    index = torch.randperm(1024, device="cuda")[:256]
    rows = {
        "eager S=256": measure(ssm_forward_backward(SSM_IMPLEMENTATIONS["eager_reference"], x, y, index)),
        "triton S=256": measure(ssm_forward_backward(SSM_IMPLEMENTATIONS["triton"], x, y, index)),
        "triton S=1024": measure(ssm_forward_backward(SSM_IMPLEMENTATIONS["triton"], x, y, None)),
    }
    report(f"ssm_loss fwd+bwd B=48 D={features} N=1024", rows)
    assert rows["triton S=1024"][1] <= rows["eager S=256"][1]
    assert rows["eager S=256"][0] / rows["triton S=256"][0] >= 2.0
