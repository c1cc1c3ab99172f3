"""Registers, spills, shared memory and warps of the Triton kernels a step launches, without a GPU.

Each launch a plan records (engine.plan.cuda_paths.TritonLaunch: the kernel, its argument types,
integer values and alignments, constexprs, num_warps, num_stages) is compiled ahead of time by
Triton's own compiler for an explicit target, through `JITFunction.warmup` with a stand-in driver
that reports that target, so the specialisation is exactly the one a launch would compile. ptxas
(shipped in the triton wheel) then reports registers and spills of the PTX, with the flags Triton
uses; the shared memory is Triton's own figure. This runs in a child process (`compile_launches`):
Triton decides at import whether it interprets kernels (TRITON_INTERPRET=1, as the tests set), and
compiling needs the real compiler.

    python -m engine.plan.kernel_resources < jobs.json > resources.json   # jobs: [[launch, target], ...]
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from engine.plan.gpus import MAX_SHARED_PER_BLOCK

TARGETS = ((8, 9), (9, 0))


@dataclass
class KernelResources:
    kernel: str
    target: str  # "sm_89"
    constants: str  # the constexprs and options that define the specialisation
    registers: int
    spill_stores: int  # bytes
    spill_loads: int
    stack_frame: int
    shared: int  # bytes of shared memory a block needs
    shared_limit: int
    num_warps: int

    @property
    def over_shared_limit(self) -> bool:
        return self.shared > self.shared_limit

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "over_shared_limit": self.over_shared_limit}


def compile_launches(launches, targets=TARGETS, workers: int | None = None) -> list[KernelResources]:
    """Compile each distinct launch for each target in child processes (see the module doc), as many
    at once as there are CPUs (or `workers`); rows in the order of the sorted launches."""
    jobs = [(dataclasses.asdict(launch), list(target)) for launch in sorted(launches, key=repr) for target in targets]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def run(chunk: list) -> list[dict]:
        child = subprocess.run([sys.executable, "-m", "engine.plan.kernel_resources"], input=json.dumps(chunk),
                               capture_output=True, text=True, env=env, check=False)
        if child.returncode != 0:
            raise RuntimeError(f"compiling the Triton kernels failed:\n{child.stderr[-4000:]}")
        return json.loads(child.stdout)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, [jobs[worker::workers] for worker in range(workers)]))
    rows = [None] * len(jobs)
    for worker, chunk in enumerate(results):
        rows[worker::workers] = chunk
    return [KernelResources(**row) for row in rows]


def resources_table(resources: list[KernelResources]) -> str:
    header = f"{'Triton kernel':<36}{'target':>7}{'regs':>6}{'spill st/ld B':>15}{'smem KiB':>10}{'warps':>6}"
    lines = [header + "  specialisation"]
    for r in resources:
        flag = "  OVER THE SHARED MEMORY LIMIT" if r.over_shared_limit else ""
        lines.append(f"{r.kernel:<36}{r.target:>7}{r.registers:>6}{f'{r.spill_stores}/{r.spill_loads}':>15}"
                     f"{r.shared / 1024:>10.1f}{r.num_warps:>6}  {r.constants}{flag}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the child process


class _TargetDriver:
    """What Triton asks of its driver to compile (not to launch): the target, a device and stream
    id. The device id is the target's capability, so each target gets its own kernel cache."""

    def __init__(self, capability: tuple[int, int]):
        from triton.backends.compiler import GPUTarget

        self.capability = capability[0] * 10 + capability[1]
        self.target = GPUTarget("cuda", self.capability, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.capability

    def get_current_stream(self, device=None):
        return 0


def _argument(signature: list, dtypes: dict):
    from triton.runtime.jit import MockTensor

    kind = signature[0]
    if kind == "tensor":
        _, dtype, aligned = signature
        mock = MockTensor(dtypes[dtype])
        if not aligned:  # a view starting off a 16-byte boundary: Triton then assumes less alignment
            mock.data_ptr = lambda: 4
        return mock
    return None if kind == "none" else signature[1]


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                    r"Used (\d+) registers", re.DOTALL)


def _ptxas_report(ptx: str, capability: int) -> tuple[int, int, int, int]:
    """(registers, spill stores, spill loads, stack frame) of `ptx` by ptxas -v, Triton's flags."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, "kernel.ptx")
        with open(source, "w") as f:
            f.write(ptx)
        result = subprocess.run([get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                                 f"--gpu-name={sm_arch_from_capability(capability)}", source, "-o", source + ".o"],
                                capture_output=True, text=True, check=True)
    match = _PTXAS.search(result.stderr)
    if match is None:
        raise RuntimeError(f"unexpected ptxas output:\n{result.stderr}")
    stack, stores, loads, registers = map(int, match.groups())
    return registers, stores, loads, stack


def _compile(launch: dict, capability: tuple[int, int]) -> KernelResources:
    import torch
    from triton.runtime.driver import driver

    module = importlib.import_module(launch["module"])
    kernel = getattr(module, launch["kernel"])
    dtypes = {str(d).removeprefix("torch."): d for d in (torch.float16, torch.bfloat16, torch.float32,
                                                        torch.float64, torch.int32, torch.int64, torch.bool)}
    arguments = [_argument(signature, dtypes) for signature in launch["arguments"]]
    options = dict(launch["options"])
    driver.set_active(_TargetDriver(capability))  # this process only compiles
    compiled = kernel.warmup(*arguments, grid=(1,), **options)
    sm = capability[0] * 10 + capability[1]
    registers, stores, loads, stack = _ptxas_report(compiled.asm["ptx"], sm)
    names = [p.name for p in kernel.params]
    constants = [f"{name}={signature[1]}" for name, signature in zip(names, launch["arguments"])
                 if signature[0] == "constant"]
    constants += [f"{k}={v}" for k, v in launch["options"]]
    return KernelResources(launch["kernel"], f"sm_{sm}", " ".join(constants), registers, stores, loads, stack,
                           compiled.metadata.shared, MAX_SHARED_PER_BLOCK[capability], compiled.metadata.num_warps)


def main() -> None:
    jobs = json.load(sys.stdin)  # [(launch, target)]
    json.dump([dataclasses.asdict(_compile(launch, tuple(target))) for launch, target in jobs], sys.stdout)


if __name__ == "__main__":
    main()
