"""The csrc/ C++ op library (kernels/_csrc.py loads it, csrc/*.cpp): GroupNorm -> FiLM -> SiLU and
patch SWD on CPU tensors against float64 references, forward and backward, on fresh random inputs
(the `seed` fixture), odd shapes, contiguous / channels_last / strided inputs; the library's
loading, its failure modes and the errors for bad inputs.

Error budget: float32 within 1e-5 relative of float64 (the C++ ops accumulate in float with double
flushes); float64 inputs run the ops in float64 and match to 1e-10; bfloat16 inputs are held to the
eager PyTorch reference at the same precision (twice its error against float64 plus a bf16 ulp).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _csrc
from kernels._dispatch import csrc_loaded
from kernels.group_norm_film_silu import group_norm_film_silu_reference
from kernels.patch_swd import patch_swd_reference

pytestmark = pytest.mark.skipif(not csrc_loaded() and shutil.which("cmake") is None,
                                reason="cmake is not installed: the csrc library cannot be built here")
REPO = Path(__file__).resolve().parents[1]
FILM = ("weight", "bias", "scale", "shift")


@pytest.fixture(autouse=True)
def library_loaded():
    assert csrc_loaded(), f"the csrc library did not load on a machine with cmake: {_csrc.problem()}"


# --------------------------------------------------------------------------- GroupNorm-FiLM-SiLU


def film_inputs(shape, dtype, layout="contiguous", present=FILM):
    """x in the given layout and the FiLM tensors named in `present`, all leaves needing gradients."""
    B, C, H, W = shape
    if layout == "strided":  # every other column of a wider tensor: neither layout the ops read
        x = torch.randn(B, C, H, 2 * W, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(shape, dtype=dtype)
        if layout == "channels_last":
            x = x.to(memory_format=torch.channels_last)
    x = x.detach().requires_grad_()
    tensors = {"weight": 1 + 0.5 * torch.randn(C, dtype=dtype), "bias": 0.5 * torch.randn(C, dtype=dtype),
               "scale": 0.5 * torch.randn(B, C, dtype=dtype), "shift": 0.5 * torch.randn(B, C, dtype=dtype)}
    film = {name: (t.requires_grad_() if name in present else None) for name, t in tensors.items()}
    return x, film


def value_and_grads(fn, x, film, dy):
    y = fn(x, film)
    leaves = [x] + [t for t in film.values() if t is not None]
    return [y, *torch.autograd.grad(y, leaves, dy)]


def exact(x, groups, film, act):
    """The float64 reference's value and gradients for the same leaves."""
    return lambda x64, film64: group_norm_film_silu_reference(x64, groups, **film64, act=act)


def to_float64(x, film):
    x64 = x.detach().double().requires_grad_()
    return x64, {k: None if t is None else t.detach().double().requires_grad_() for k, t in film.items()}


@pytest.mark.parametrize("shape,groups", [((1, 6, 5, 7), 3), ((2, 12, 3, 9), 4), ((3, 20, 4, 4), 20),
                                          ((2, 8, 1, 1), 2), ((1, 4, 9, 1), 1)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_group_norm_film_silu_matches_float64(seed, shape, groups, layout, dtype):
    x, film = film_inputs(shape, dtype, layout)
    dy = torch.randn(shape, dtype=dtype)
    got = value_and_grads(lambda x, f: kernels.group_norm_film_silu(x, groups, **f, backend="csrc"), x, film, dy)
    x64, film64 = to_float64(x, film)
    want = value_and_grads(exact(x, groups, film, True), x64, film64, dy.double())
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for name, g, w in zip(["y", "x", *FILM], got, want):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), w, rtol=tolerance, atol=tolerance * w.abs().max().item(), msg=name)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("present", [(), ("weight",), ("bias",), ("scale", "shift"), ("weight", "shift")])
@pytest.mark.parametrize("act", [True, False])
def test_group_norm_film_silu_optional_tensors_and_no_activation(seed, present, act):
    x, film = film_inputs((2, 6, 3, 5), torch.float32, present=present)
    dy = torch.randn(2, 6, 3, 5)
    got = value_and_grads(lambda x, f: kernels.group_norm_film_silu(x, 3, **f, act=act, backend="csrc"), x, film, dy)
    x64, film64 = to_float64(x, film)
    want = value_and_grads(exact(x, 3, film, act), x64, film64, dy.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5 * w.abs().max().item())


def test_group_norm_film_silu_bfloat16_within_eager_error(seed):
    x, film = film_inputs((2, 8, 5, 5), torch.bfloat16, "channels_last")
    dy = torch.randn(2, 8, 5, 5, dtype=torch.bfloat16)
    got = value_and_grads(lambda x, f: kernels.group_norm_film_silu(x, 4, **f, backend="csrc"), x, film, dy)
    eager = value_and_grads(lambda x, f: kernels.group_norm_film_silu(x, 4, **f, backend="torch"), x, film, dy)
    x64, film64 = to_float64(x, film)
    want = value_and_grads(exact(x, 4, film, True), x64, film64, dy.double())
    for g, e, w in zip(got, eager, want):
        assert g.dtype == torch.bfloat16
        budget = 2 * (e.double() - w).abs().max().item() + 2 ** -8 * w.abs().max().item()
        assert (g.double() - w).abs().max().item() <= budget


def test_group_norm_film_silu_statistics_survive_a_large_offset(seed):
    """Shifted sums: x = 1e4 + noise keeps its normalised values (a naive E[x^2] - E[x]^2 in float32
    loses them entirely)."""
    x = 1e4 + torch.randn(2, 4, 6, 6)
    y = kernels.group_norm_film_silu(x, 2, act=False, backend="csrc")
    torch.testing.assert_close(y.double(), group_norm_film_silu_reference(x.double(), 2, act=False),
                               rtol=1e-3, atol=2e-3)


def test_group_norm_film_silu_second_derivative(seed):
    """backward(create_graph=True) (LGT's divergence penalty) is differentiable: gradgradcheck."""
    x, film = film_inputs((1, 4, 3, 3), torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda x, w, b, s, t: kernels.group_norm_film_silu(x, 2, w, b, s, t, backend="csrc"),
        (x, *film.values()))


def test_group_norm_film_silu_nan_propagates_and_large_inputs_stay_finite():
    x = torch.randn(1, 2, 4, 4) * 200  # exp's clamps: silu of +-600 is 600 and 0, not inf or NaN
    y = kernels.group_norm_film_silu(x, 1, scale=torch.full((1, 2), 300.0), backend="csrc")
    torch.testing.assert_close(y, group_norm_film_silu_reference(x, 1, scale=torch.full((1, 2), 300.0)),
                               rtol=1e-5, atol=1e-5)
    x[0, 0, 1, 1] = float("nan")
    assert torch.isnan(kernels.group_norm_film_silu(x, 1, backend="csrc")[0, 0]).all()
    x[0, 0, 1, 1] = float("inf")  # the group's variance is NaN: all of it NaN, as in the reference
    torch.testing.assert_close(torch.isnan(kernels.group_norm_film_silu(x, 1, backend="csrc")),
                               torch.isnan(group_norm_film_silu_reference(x, 1)))


def test_group_norm_film_silu_registration_passes_opcheck(seed):
    """Schema, fake (torch.compile) and autograd registrations of the C++ op are consistent."""
    x, film = film_inputs((2, 6, 3, 3), torch.float32, "channels_last")
    args = (x, 3, film["weight"], film["bias"], film["scale"], film["shift"], 1e-5, True)
    torch.library.opcheck(torch.ops.lgt.csrc_group_norm_film_silu.default, args)


def test_group_norm_film_silu_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="not divisible"):
        kernels.group_norm_film_silu(torch.randn(1, 6, 2, 2), 4, backend="csrc")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        kernels.group_norm_film_silu(torch.randn(6, 2, 2), 3, backend="csrc")
    with pytest.raises(ValueError, match="scale must have shape"):
        kernels.group_norm_film_silu(torch.randn(2, 6, 2, 2), 3, scale=torch.randn(6), backend="csrc")


def test_auto_uses_csrc_on_cpu_and_auto_backend_restores_the_reference(seed, monkeypatch):
    calls = []
    original = torch.ops.lgt.csrc_group_norm_film_silu
    monkeypatch.setattr(torch.ops.lgt, "csrc_group_norm_film_silu", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(1, 4, 3, 3)
    kernels.group_norm_film_silu(x, 2)
    assert calls == [1]
    with kernels.auto_backend("torch"):
        kernels.group_norm_film_silu(x, 2)
    assert calls == [1]


# --------------------------------------------------------------------------- patch SWD


def swd_inputs(shape, kernel_size, directions, dtype):
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    y = torch.randn(shape, dtype=dtype, requires_grad=True)
    theta = F.normalize(torch.randn(directions, shape[1] * kernel_size ** 2, dtype=dtype), dim=1).requires_grad_()
    return x, y, theta


@pytest.mark.parametrize("shape,kernel_size,directions", [((2, 3, 5, 7), 3, 5), ((1, 2, 9, 4), 5, 3),
                                                          ((3, 1, 1, 1), 1, 2), ((2, 4, 1, 6), 3, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_patch_swd_matches_float64(seed, shape, kernel_size, directions, dtype):
    x, y, theta = swd_inputs(shape, kernel_size, directions, dtype)
    loss = kernels.patch_swd(x, y, theta, kernel_size, backend="csrc")
    grads = torch.autograd.grad(loss, (x, y, theta))
    inputs64 = [t.detach().double().requires_grad_() for t in (x, y, theta)]
    want = patch_swd_reference(*inputs64, kernel_size)
    want_grads = torch.autograd.grad(want, inputs64)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    assert loss.dtype == dtype
    torch.testing.assert_close(loss.double(), want, rtol=tolerance, atol=0)
    for name, g, w in zip(["x", "y", "theta"], grads, want_grads):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), w, rtol=tolerance, atol=tolerance * w.abs().max().item(), msg=name)


def test_patch_swd_only_the_inputs_that_need_it_get_gradients(seed):
    """LGT's call: x needs a gradient, the style reference and the directions are data."""
    x, y, theta = swd_inputs((2, 4, 6, 6), 3, 8, torch.float32)
    y, theta = y.detach(), theta.detach()
    (grad,) = torch.autograd.grad(kernels.patch_swd(x, y, theta, 3, backend="csrc"), x)
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(patch_swd_reference(x64, y.double(), theta.double(), 3), x64)
    torch.testing.assert_close(grad.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with torch.no_grad():
        assert not kernels.patch_swd(x, y, theta, 3, backend="csrc").requires_grad


def test_patch_swd_ties_identical_inputs_and_nan():
    x = torch.ones(2, 3, 4, 4, requires_grad=True)  # every projection of a row ties
    theta = F.normalize(torch.randn(4, 27), dim=1)
    loss = kernels.patch_swd(x, x.detach(), theta, 3, backend="csrc")
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(grad))
    y = torch.randn(2, 3, 4, 4)
    y[1, 0, 2, 2] = float("nan")
    assert torch.isnan(kernels.patch_swd(torch.randn(2, 3, 4, 4), y, theta, 3, backend="csrc"))


def test_patch_swd_bfloat16_and_mixed_dtypes_return_x_dtype(seed):
    x, y, theta = swd_inputs((2, 2, 5, 5), 3, 4, torch.float32)
    loss = kernels.patch_swd(x.bfloat16(), y.detach(), theta.detach(), 3, backend="csrc")
    assert loss.dtype == torch.bfloat16
    torch.testing.assert_close(loss.float(), patch_swd_reference(x.bfloat16(), y, theta, 3).float(),
                               rtol=2e-2, atol=0)


def test_patch_swd_bad_inputs_raise_value_error():
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(ValueError, match="theta must be"):
        kernels.patch_swd(x, x, torch.randn(3, 17), 3, backend="csrc")
    with pytest.raises(ValueError, match="kernel_size must be a positive odd"):
        kernels.patch_swd(x, x, torch.randn(3, 32), 4, backend="csrc")


# --------------------------------------------------------------------------- loading


def run_python(code, **env):
    environment = {**os.environ, "PYTHONPATH": str(REPO), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment,
                          timeout=300, check=False)


def test_lgt_csrc_0_leaves_the_reference_ops_and_says_why():
    result = run_python(
        "import torch, kernels\n"
        "from kernels._dispatch import backend_for_device\n"
        "assert backend_for_device('auto', torch.device('cpu')) == 'torch'\n"
        "try:\n"
        "    backend_for_device('csrc', torch.device('cpu'))\n"
        "except ValueError as e:\n"
        "    print(e)\n", LGT_CSRC="0")
    assert result.returncode == 0, result.stderr
    assert "LGT_CSRC=0 is set" in result.stdout


def test_a_failed_build_warns_once_and_falls_back(tmp_path):
    """No cmake on PATH and an empty cache: one warning naming what to install; the ops still work."""
    result = run_python(
        "import torch, kernels\n"
        "x = torch.randn(1, 4, 3, 3)\n"
        "kernels.group_norm_film_silu(x, 2)\n"
        "print(kernels._dispatch.csrc_loaded())\n",
        PATH=str(tmp_path), XDG_CACHE_HOME=str(tmp_path / "cache"), LGT_CSRC_LIBRARY="")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert result.stderr.count("csrc op library is not available") == 1
    assert "cmake is not installed" in result.stderr


def test_the_cache_key_follows_sources_and_torch(monkeypatch, tmp_path):
    source = tmp_path / "op.cpp"
    source.write_text("int x;")
    first = _csrc._cache_key([source])
    assert _csrc._cache_key([source]) == first
    source.write_text("int y;")
    second = _csrc._cache_key([source])
    assert second != first
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert _csrc._cache_key([source]) != second


def test_a_failed_build_is_remembered_not_retried(tmp_path):
    """A build that fails (here a cmake that always fails) leaves its log; the next process says so at
    once instead of building again, and deleting the directory retries."""
    fake = tmp_path / "bin" / "cmake"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'CMake Error: no compiler' >> \"$LOG\"\necho 'CMake Error: no compiler'\nexit 1\n")
    fake.chmod(0o755)
    env = {"PATH": f"{fake.parent}:/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "LGT_CSRC_LIBRARY": "", "LOG": str(tmp_path / "calls")}
    code = "import kernels; print(kernels._dispatch.csrc_loaded())"
    first = run_python(code, **env)
    assert first.stdout.strip() == "False" and "the CMake build failed" in first.stderr, first.stderr
    assert "CMake Error: no compiler" in first.stderr
    second = run_python(code, **env)
    assert "its build failed before" in second.stderr, second.stderr
    assert (tmp_path / "calls").read_text().count("CMake Error") == 1  # cmake ran once


def test_patch_swd_refuses_a_second_derivative_and_runs_the_reference_under_torch_func(seed):
    x, y, theta = swd_inputs((2, 2, 4, 4), 3, 3, torch.float32)
    loss = kernels.patch_swd(x, y.detach(), theta.detach(), 3, backend="csrc")
    with pytest.raises(RuntimeError, match="backend='torch' for higher-order"):
        torch.autograd.grad(loss, x, create_graph=True)
    grad = torch.func.grad(lambda x: kernels.patch_swd(x, y.detach(), theta.detach(), 3, backend="csrc"))(x.detach())
    (want,) = torch.autograd.grad(patch_swd_reference(x, y.detach(), theta.detach(), 3), x)
    torch.testing.assert_close(grad, want)


def test_the_ops_check_their_operands_when_called_directly():
    """torch.ops callers skip the Python checks: a wrong shape must fail, not read out of bounds."""
    x = torch.randn(2, 6, 3, 3)
    with pytest.raises(RuntimeError, match="weight must be a floating-point CPU tensor of shape"):
        torch.ops.lgt.csrc_group_norm_film_silu_fwd(x, 3, torch.randn(2), None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="scale must be"):
        torch.ops.lgt.csrc_group_norm_film_silu_fwd(x, 3, None, None, torch.randn(1, 6), None, 1e-5, True)
    _, mean, rstd = torch.ops.lgt.csrc_group_norm_film_silu_fwd(x, 3, None, None, None, None, 1e-5, True)
    with pytest.raises(RuntimeError, match="mean must be"):
        torch.ops.lgt.csrc_group_norm_film_silu_bwd(x, x, mean[:1], rstd, 3, None, None, None, None, True)


def test_patch_swd_theta_gradient_is_deterministic(seed):
    """Two threads each sum a chunk of images; the chunks are added in order, not as threads finish."""
    x, y, theta = swd_inputs((5, 3, 6, 6), 3, 16, torch.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = [torch.autograd.grad(kernels.patch_swd(x, y, theta, 3, backend="csrc"), theta)[0] for _ in range(8)]
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(grads[0], g) for g in grads[1:])


def test_a_library_named_by_hand_that_does_not_load_is_named_and_skipped(tmp_path):
    (tmp_path / "liblgt_csrc.so").write_bytes(b"not a shared library")
    result = run_python("import kernels; print(kernels._dispatch.csrc_loaded())",
                        LGT_CSRC_LIBRARY=str(tmp_path / "liblgt_csrc.so"))
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
    assert f"LGT_CSRC_LIBRARY={tmp_path / 'liblgt_csrc.so'} does not load" in result.stderr
    assert "build it again by hand" in result.stderr
