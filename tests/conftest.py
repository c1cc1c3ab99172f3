"""Test set-up shared by every test file.

Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, which must be set before any
kernel is defined (i.e. before `import kernels`). On a machine with a GPU the real kernels run.
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

# Test tensors are tiny: extra intra-op threads only add synchronisation, and on a busy 2-core
# machine they oversubscribe the cores (a 6-step training test ran 4x slower with 2 threads).
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses some tests start


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed so a failure can be replayed with the same inputs."""
    value = random.SystemRandom().randrange(2**31)
    print(f"test seed: {value}")
    torch.manual_seed(value)
    return value
