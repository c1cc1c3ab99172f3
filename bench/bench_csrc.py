"""The csrc/ C++ CPU ops against the PyTorch reference ops they replace on a CPU, forward + backward,
at the shapes the CPU recipes run (configs/lgt_cpu.toml: batch 8, 4x8x8 latents, a 32-channel U-Net
in channels_last, 64 SWD directions; configs/ddpm_textures.toml: batch 32, 3x32x32, 32 channels),
measured in one run with the two interleaved round by round (a busy machine slows both alike).

    pytest bench/bench_csrc.py -s                     # figures, bench/results/csrc-cpu.json, the goal
    pytest bench/bench_csrc.py --benchmark-disable    # one call of each, as a smoke test (CI)

Goal: the csrc op >= 1.5x the reference's speed for every case.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from common import device_name

import kernels
from kernels._dispatch import csrc_loaded

RESULTS = Path(__file__).resolve().parent / "results"
ROUNDS, WARMUP = 200, 20

# name: (shape, groups, channels_last)
GROUP_NORM_CASES = {
    "lgt_cpu 8x32x8x8": ((8, 32, 8, 8), 32, True),
    "lgt_cpu 8x64x4x4": ((8, 64, 4, 4), 32, True),
    "ddpm_textures 32x32x32x32": ((32, 32, 32, 32), 32, False),
    "ddpm_textures 32x64x16x16": ((32, 64, 16, 16), 32, False),
}
# name: (shape, directions, kernel size)
PATCH_SWD_CASES = {"lgt_cpu 8x4x8x8, 64 directions": ((8, 4, 8, 8), 64, 3)}

pytestmark = pytest.mark.skipif(not csrc_loaded(), reason="the csrc op library is not loaded here")


def group_norm_step(shape, groups, channels_last, backend):
    B, C = shape[:2]
    x = torch.randn(shape)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    weight, bias = (torch.randn(2, C)).unbind(0)
    scale, shift = (0.1 * torch.randn(B, 2 * C)).chunk(2, dim=1)
    film = [t.detach().requires_grad_() for t in (weight, bias, scale, shift)]
    dy = torch.randn_like(x)

    def step():
        kernels.group_norm_film_silu(x, groups, *film, backend=backend).backward(dy)
    return step


def patch_swd_step(shape, directions, kernel_size, backend):
    """LGT's call: x needs a gradient; the style reference and the directions are data."""
    x = torch.randn(shape, requires_grad=True)
    y = torch.randn(shape)
    theta = F.normalize(torch.randn(directions, shape[1] * kernel_size ** 2), dim=1)

    def step():
        kernels.patch_swd(x, y, theta, kernel_size, backend=backend).backward()
    return step


def all_cases():
    cases = {f"group_norm_film_silu {name}": lambda backend, c=case: group_norm_step(*c, backend)
             for name, case in GROUP_NORM_CASES.items()}
    cases.update({f"patch_swd {name}": lambda backend, c=case: patch_swd_step(*c, backend)
                  for name, case in PATCH_SWD_CASES.items()})
    return cases


def interleaved_medians(steps: dict, rounds: int) -> dict[str, float]:
    for step in steps.values():
        for _ in range(WARMUP):
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


@pytest.mark.parametrize("case", list(all_cases()))
def test_csrc_and_reference_run(case, benchmark):
    """Smoke (CI): one fwd+bwd of each implementation."""
    if not benchmark.disabled:
        pytest.skip("measured by test_csrc_goals")
    for backend in ("torch", "csrc"):
        all_cases()[case](backend)()


def test_csrc_goals(benchmark):
    """Every case: csrc fwd+bwd >= 1.5x the reference's speed, measured in one run."""
    if benchmark.disabled:
        pytest.skip("figures only when benchmarks are enabled")
    rows = {}
    for name, make in all_cases().items():
        medians = interleaved_medians({"torch": make("torch"), "csrc": make("csrc")}, ROUNDS)
        rows[name] = {"torch_ms": medians["torch"], "csrc_ms": medians["csrc"],
                      "speedup": medians["torch"] / medians["csrc"]}
    print(f"\ncsrc vs the PyTorch reference, fwd+bwd, {device_name()}, {torch.get_num_threads()} threads, "
          f"median of {ROUNDS}:")
    print(f"{'case':<52} {'torch ms':>9} {'csrc ms':>9} {'speedup':>8}")
    for name, row in rows.items():
        print(f"{name:<52} {row['torch_ms']:>9.3f} {row['csrc_ms']:>9.3f} {row['speedup']:>7.2f}x")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "csrc-cpu.json").write_text(json.dumps(
        {"device": device_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
         "cases": rows}, indent=1) + "\n")
    slow = {name: round(row["speedup"], 2) for name, row in rows.items() if row["speedup"] < 1.5}
    assert not slow, f"below the 1.5x goal: {slow}"
