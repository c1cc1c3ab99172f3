"""Triton kernels compiled ahead of time for sm_89 and sm_90 (no GPU): at the LGT recipe's shapes
(configs/lgt_4070.toml: latents 4x32x32, batch 48, 64 SWD directions, 256 SSM positions, U-Net
widths 96-192) they spill no registers and fit the target's shared memory."""

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kernels
from engine.plan.cuda_paths import cuda_kernel_dispatch, recorded_triton_launches
from engine.plan.kernel_resources import KernelResources, compile_launches, resources_table
from engine.plan.trace import StepRecorder


def launches_of(run) -> set:
    """The Triton launches `run()` makes on fake tensors with the CUDA dispatch, recorded."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    recorder = StepRecorder(fake)
    launches: set = set()
    with recorder, cuda_kernel_dispatch(), recorded_triton_launches(recorder, launches), fake:
        run()
    return launches


def lgt_shaped_kernels():
    x1 = torch.randn(48, 4, 32, 32, requires_grad=True)  # transported latents
    source = torch.randn(48, 4, 32, 32)
    kernels.ssm_loss(x1, source, torch.randperm(1024)[:256]).backward()
    kernels.ssm_loss(x1, source.requires_grad_(), torch.randperm(1024)[:256]).backward()  # both gradients
    theta = torch.nn.functional.normalize(torch.randn(64, 36), dim=1)
    kernels.patch_swd(x1, torch.randn(48, 4, 32, 32), theta).backward()
    h = torch.randn(96, 192, 16, 16, dtype=torch.bfloat16, requires_grad=True)  # U-Net activations
    film = [torch.randn(96, 192, dtype=torch.bfloat16) for _ in range(2)]
    kernels.group_norm_film_silu(h, 32, torch.ones(192), torch.zeros(192), *film).float().sum().backward()


def test_lgt_kernels_spill_nothing_and_fit_shared_memory_on_sm_89_and_sm_90():
    launches = launches_of(lgt_shaped_kernels)
    assert {launch.kernel for launch in launches} == {
        "_ssm_fwd_kernel", "_ssm_bwd_kernel", "_patch_swd_fwd_kernel", "_patch_swd_bwd_kernel",
        "_group_norm_film_silu_fwd_kernel", "_group_norm_film_silu_bwd_kernel"}
    resources = compile_launches(launches)
    assert {r.target for r in resources} == {"sm_89", "sm_90"}
    table = resources_table(resources)
    assert all(r.spill_stores == r.spill_loads == 0 for r in resources), table
    assert not any(r.over_shared_limit for r in resources), table
    assert all(0 < r.registers <= 255 for r in resources), table


def test_shared_memory_over_the_target_limit_is_flagged():
    row = KernelResources("k", "sm_89", "", 64, 0, 0, 0, shared=100 * 1024, shared_limit=99 * 1024, num_warps=4)
    assert row.over_shared_limit and "OVER THE SHARED MEMORY LIMIT" in resources_table([row])
