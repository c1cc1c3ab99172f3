"""Datasheet figures of the GPUs a plan can be made for: the roofline's two ceilings and the limits
a Triton kernel must respect.

Rates are dense (no 2:4 sparsity) peak figures at the maximum boost clock; a laptop GPU reaches its
maximum boost only at its highest power limit, so its floor is a lower bound twice over. Rates per
compute unit:

    tensor   bf16 / fp16 matrix maths with fp32 accumulation (tensor cores)
    tf32     fp32 convolutions, which cuDNN runs as TF32 on tensor cores by default
             (torch.backends.cudnn.allow_tf32 = True)
    fp32     everything else: fp32 matrix products (torch.backends.cuda.matmul.allow_tf32 = False
             by default), element-wise maths, reductions, sorting, Triton kernels computing in fp32

Sources:
    rtx4070-laptop  NVIDIA GeForce RTX 4070 Laptop GPU specifications (nvidia.com): 4608 CUDA cores
                    (36 SMs), boost clock up to 2175 MHz, 8 GB GDDR6 on a 128-bit bus at 16 Gbps
                    (256 GB/s). Per-SM rates of GeForce Ada from the NVIDIA Ada Lovelace
                    architecture whitepaper (v2.1, appendix A, RTX 4090 column): 256 fp32 FLOP and
                    512 bf16-with-fp32-accumulate tensor FLOP per SM per clock, TF32 at half the
                    bf16 rate.
    rtx4090         NVIDIA Ada Lovelace architecture whitepaper v2.1, appendix A: 128 SMs at
                    2520 MHz, 82.6 TFLOP/s fp32, 165.2 bf16 tensor (fp32 accumulate), 82.6 TF32,
                    1008 GB/s, 24 GB, 72 MB L2.
    a100            NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM): 19.5 TFLOP/s fp32,
                    156 TF32, 312 bf16 tensor, 2039 GB/s, 80 GB; 108 SMs.
    h100            NVIDIA H100 Tensor Core GPU datasheet (H100 SXM): 67 TFLOP/s fp32, 989 bf16
                    tensor and 494.5 TF32 (the datasheet's sparse 1979 / 989 halved), 3.35 TB/s,
                    80 GB; 132 SMs.
Shared memory a block may use (opt-in maximum per block), from the CUDA C++ Programming Guide,
"Technical Specifications per Compute Capability": 99 KB on compute capability 8.6 / 8.9, 163 KB on
8.0, 227 KB on 9.0.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 10**9
TERA = 10**12
KIB = 1024


@dataclass(frozen=True)
class GPU:
    name: str  # the --gpu value
    title: str
    memory_bytes: int  # what the board has
    bandwidth: float  # bytes / s
    rates: dict[str, float]  # FLOP / s per compute unit (see the module doc)
    compute_capability: tuple[int, int]
    max_shared_per_block: int  # bytes

    @property
    def arch(self) -> str:
        major, minor = self.compute_capability
        return f"sm_{major}{minor}"


def _ada_rates(sms: int, boost_hz: float) -> dict[str, float]:
    """GeForce Ada per-SM rates per clock (whitepaper appendix A)."""
    return {"tensor": 512 * sms * boost_hz, "tf32": 256 * sms * boost_hz, "fp32": 256 * sms * boost_hz}


GPUS: dict[str, GPU] = {
    "rtx4070-laptop": GPU("rtx4070-laptop", "GeForce RTX 4070 Laptop (8 GB, 256 GB/s)", 8 * 2**30, 256 * GB,
                          _ada_rates(36, 2.175e9), (8, 9), 99 * KIB),
    "rtx4090": GPU("rtx4090", "GeForce RTX 4090 (24 GB, 1008 GB/s)", 24 * 2**30, 1008 * GB,
                   {"tensor": 165.2 * TERA, "tf32": 82.6 * TERA, "fp32": 82.6 * TERA}, (8, 9), 99 * KIB),
    "a100": GPU("a100", "A100 80GB SXM (2039 GB/s)", 80 * 2**30, 2039 * GB,
                {"tensor": 312 * TERA, "tf32": 156 * TERA, "fp32": 19.5 * TERA}, (8, 0), 163 * KIB),
    "h100": GPU("h100", "H100 SXM (80 GB, 3.35 TB/s)", 80 * 2**30, 3350 * GB,
                {"tensor": 989 * TERA, "tf32": 494.5 * TERA, "fp32": 67 * TERA}, (9, 0), 227 * KIB),
}
DEFAULT_GPU = "rtx4070-laptop"

# Shared memory limit per compiled target, for the kernel resource report (same source as above).
MAX_SHARED_PER_BLOCK = {(8, 0): 163 * KIB, (8, 6): 99 * KIB, (8, 9): 99 * KIB, (9, 0): 227 * KIB}


def gpu(name: str) -> GPU:
    if name not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; valid: {', '.join(GPUS)}")
    return GPUS[name]
