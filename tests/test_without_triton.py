"""The engine and the kernels import and train on CPU without triton (macOS, Windows): triton is
imported only when the Triton backend runs.

Each case runs a fresh interpreter (triton must not have been imported yet) with TRITON_INTERPRET=1
set, so that "auto" would have a reason to pick the interpreter if the dispatch let it. The ops
(forward and backward on "auto"), a small U-Net and the LGT energies train, then every module of
the engine package is imported:
  blocked    an import hook makes `import triton` fail, as on a machine without it; backend="triton"
             is then a clear ValueError.
  installed  triton is importable; the same work must still leave it unimported (lazy imports, and
             "auto" never choosing the interpreter on CPU tensors).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

BLOCK_TRITON = r'''
import importlib.abc
import sys


class BlockTriton(importlib.abc.MetaPathFinder):
    """`import triton` (and any triton.*) fails as it does where triton is not installed."""

    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ImportError(f"No module named {name!r}")
        return None


sys.meta_path.insert(0, BlockTriton())
'''

WORK = r'''
import importlib
import pkgutil
import sys

import torch
import torch.nn.functional as F

import engine
import kernels

torch.manual_seed(0)
x = torch.randn(2, 4, 6, 5, requires_grad=True)
y = torch.randn(2, 4, 6, 5)
weight = torch.ones(4, requires_grad=True)
bias = torch.zeros(4, requires_grad=True)
scale, shift = (0.1 * torch.randn(2, 8)).requires_grad_().chunk(2, dim=1)
losses = {
    "group_norm_film_silu": kernels.group_norm_film_silu(x, 2, weight, bias, scale, shift).square().mean(),
    "patch_swd": kernels.patch_swd(x, y, F.normalize(torch.randn(3, 36), dim=1), 3),
    "ssm_loss": kernels.ssm_loss(x, y, torch.randperm(30)[:7]),
    "attention": kernels.attention(*(x.reshape(2, 2, 2, 30).transpose(-1, -2),) * 3).square().mean(),
}
for name, loss in losses.items():
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
if BLOCKED:
    for call in (lambda: kernels.ssm_loss(x, y, backend="triton"),
                 lambda: kernels.group_norm_film_silu(x, 2, backend="triton")):
        try:
            call()
        except ValueError as err:
            assert "triton is not installed; use backend='torch' or 'auto'" in str(err), err
        else:
            raise AssertionError("backend='triton' ran without triton")

from engine.models.unet import UNet

unet = UNet(in_channels=3, out_channels=3, channels=8, channel_mult=[1, 2], num_res_blocks=1,
            attention_resolutions=[4], num_heads=2, num_groups=4, dropout=0.0, num_classes=3, image_size=8)
images = torch.randn(2, 3, 8, 8)
out = unet(images, torch.tensor([3.0, 700.0]), torch.tensor([0, 2]))
assert out.shape == images.shape
out.square().mean().backward()  # the zero-initialised head still gets a gradient
assert all(p.grad is not None for p in unet.out_conv.parameters())

from engine.methods.lgt_energy import PatchSWD, SelfSimilarity

x1 = torch.randn(2, 4, 8, 8, requires_grad=True)
energy = PatchSWD(num_projections=4)(x1, torch.randn(2, 4, 8, 8)) + SelfSimilarity(16)(x1, torch.randn(2, 4, 8, 8))
energy.backward()
assert torch.isfinite(x1.grad).all()

# Every other engine module (train loop, commands, data, ...) imports without triton too.
for module in pkgutil.walk_packages(engine.__path__, "engine."):
    importlib.import_module(module.name)

loaded = sorted(name for name in sys.modules if name == "triton" or name.startswith("triton."))
assert not loaded, f"triton was imported: {loaded[:5]}"
print("ok")
'''


@pytest.mark.parametrize("blocked", [True, False], ids=["blocked", "installed"])
def test_cpu_work_never_imports_triton(blocked):
    if not blocked:
        pytest.importorskip("triton")  # this case means something only where triton can be imported
    script = (BLOCK_TRITON if blocked else "") + f"BLOCKED = {blocked}\n" + WORK
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    # cwd: `python -c` puts the working directory first on sys.path, so this checkout is imported.
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
