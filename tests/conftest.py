"""Test set-up shared by every test file.

Triton kernels run on CPU tensors only under TRITON_INTERPRET=1, which must be set before any
kernel is defined (i.e. before `import kernels`). On a machine with a GPU the real kernels run.
"""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed so a failure can be replayed with the same inputs."""
    value = random.SystemRandom().randrange(2**31)
    print(f"test seed: {value}")
    torch.manual_seed(value)
    return value
