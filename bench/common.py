"""Helpers shared by the kernel benchmarks: timing, peak memory, and what goes into the JSON.

On a GPU, time with `triton.testing.do_bench` (CUDA events, median, L2 flushed between runs).
On CPU the benchmarks are smoke tests only: a perf_counter median, and no memory numbers.
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from kernels._dispatch import triton_unusable_reason


def on_gpu() -> bool:
    return torch.cuda.is_available()


def skip_unless_triton_runs() -> None:
    """Skip the calling benchmark where the Triton backend cannot run on this machine's device (no
    GPU and no TRITON_INTERPRET=1, or triton not installed); the reason comes from the dispatch."""
    reason = triton_unusable_reason(torch.device("cuda" if on_gpu() else "cpu"))
    if reason is not None:
        pytest.skip(f"the Triton kernel cannot run here: {reason}")


def device_name() -> str:
    if on_gpu():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()})"


def median_ms(fn: Callable[[], object], warmup: int = 10, rep: int = 50) -> float:
    """Median wall time of one `fn()` call in milliseconds.

    On a GPU `warmup` and `rep` are milliseconds of running time (do_bench's meaning); on CPU they
    are call counts.
    """
    if on_gpu():
        # Imported here: do_bench crashes under TRITON_INTERPRET=1, which is only ever set on CPU.
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(rep, 1)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def synchronized(fn: Callable[[], object]) -> Callable[[], None]:
    """fn followed by a device sync, so pytest-benchmark's own wall-clock timing is meaningful."""
    def run():
        fn()
        if on_gpu():
            torch.cuda.synchronize()
    return run


def peak_memory_mb(fn: Callable[[], object]) -> float | None:
    """Peak CUDA memory allocated during one `fn()` call above what was already allocated, in MiB.

    None on CPU (not measured).
    """
    if not on_gpu():
        return None
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline) / 2**20


def record(benchmark, **extra) -> None:
    """Put device, versions and the given measurements on a pytest-benchmark fixture's extra_info."""
    benchmark.extra_info.update(
        device=device_name(),
        torch=torch.__version__,
        triton=_installed_version("triton"),
        **extra,
    )


def _installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, read from its metadata (nothing is imported)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def gb_per_s(num_bytes: int, ms: float) -> float:
    """Achieved bandwidth for `num_bytes` of memory traffic taking `ms` milliseconds."""
    return num_bytes / (ms * 1e-3) / 1e9
