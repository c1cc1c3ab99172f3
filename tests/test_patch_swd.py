"""patch_swd: the reference against a naive unfold + matmul + sort, the Triton kernel (forward and
backward) against the float64 reference, theta's gradient on both backends, ties, identical inputs,
half precision, bad inputs.

On CPU the kernel runs under TRITON_INTERPRET=1, where tl.sort costs ~1 ms per element and
stage: shapes stay tiny.
"""

import importlib
import warnings

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels.patch_swd import patch_swd_reference

# `kernels.patch_swd` names the function once the package is imported; this is the module.
patch_swd_module = importlib.import_module("kernels.patch_swd")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_RTOL = 1e-5


def _random_directions(num_directions, patch_size, dtype=torch.float64):
    return F.normalize(torch.randn(num_directions, patch_size, dtype=dtype, device=DEVICE), dim=1)


def _naive_patch_swd(x, y, theta, kernel_size):
    """The definition written out: unfold every patch, project, sort each (b, p) row, compare."""
    def sorted_projections(image):
        patches = F.unfold(image, kernel_size, padding=kernel_size // 2)  # [B, C*k*k, N]
        return torch.sort(theta @ patches, dim=-1).values  # [B, P, N]

    return ((sorted_projections(x) - sorted_projections(y)) ** 2).mean()


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _assert_close_to_reference(actual, expected, rtol):
    """Relative to the largest reference entry: gradients have near-zero entries."""
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _loss_and_grads(loss_fn, x, y, *more_inputs):
    """The loss and its gradients with respect to x, y and any further inputs (e.g. theta)."""
    loss = loss_fn(x, y)
    return (loss, *torch.autograd.grad(loss, (x, y, *more_inputs)))


def _reference(theta, kernel_size):
    return lambda x, y: patch_swd_reference(x, y, theta, kernel_size)


def _triton(theta, kernel_size):
    return lambda x, y: kernels.patch_swd(x, y, theta.float(), kernel_size, backend="triton")


@pytest.mark.parametrize("shape, kernel_size, num_directions", [
    ((2, 1, 5, 7), 1, 3), ((2, 3, 5, 7), 3, 4), ((1, 4, 6, 5), 5, 2)])
def test_reference_matches_naive_unfold_sort(seed, shape, kernel_size, num_directions):
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    theta = _random_directions(num_directions, shape[1] * kernel_size**2).requires_grad_(True)
    expected = _loss_and_grads(lambda a, b: _naive_patch_swd(a, b, theta, kernel_size), x, y, theta)
    actual = _loss_and_grads(lambda a, b: patch_swd_reference(a, b, theta, kernel_size), x, y, theta)
    for a, e in zip(actual, expected):
        _assert_close_to_reference(a, e, 1e-12)


def test_reference_is_zero_for_identical_inputs(seed):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss = patch_swd_reference(x, x.detach().clone(), _random_directions(8, 27), 3)
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert not grad.any()


@pytest.mark.parametrize("shape, kernel_size, num_directions", [
    ((2, 1, 5, 7), 1, 3), ((2, 3, 5, 7), 3, 2), ((1, 4, 4, 6), 5, 3)])
def test_triton_matches_float64_reference(seed, shape, kernel_size, num_directions):
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    y = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    theta = _random_directions(num_directions, shape[1] * kernel_size**2)
    expected = _loss_and_grads(_reference(theta, kernel_size), _leaf(x), _leaf(y))
    actual = _loss_and_grads(_triton(theta, kernel_size), _leaf(x, torch.float32), _leaf(y, torch.float32))
    assert actual[0].dtype == torch.float32
    for a, e in zip(actual, expected):
        _assert_close_to_reference(a, e, FP32_RTOL)


def test_triton_without_y_gradient_matches_reference(seed):
    """The LGT case: y is a data latent, so only x's permutation is computed."""
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64, device=DEVICE)
    y = torch.randn(2, 4, 5, 6, device=DEVICE)
    theta = _random_directions(3, 36)
    x_ref = _leaf(x)
    expected = patch_swd_reference(x_ref, y.double(), theta, 3)
    expected.backward()
    x_kernel = _leaf(x, torch.float32)
    actual = kernels.patch_swd(x_kernel, y, theta.float(), 3, backend="triton")
    actual.backward()
    _assert_close_to_reference(actual, expected, FP32_RTOL)
    _assert_close_to_reference(x_kernel.grad, x_ref.grad, FP32_RTOL)
    with torch.no_grad():
        _assert_close_to_reference(kernels.patch_swd(x_kernel, y, theta.float(), 3, backend="triton"),
                                   expected, FP32_RTOL)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shape, kernel_size, num_directions, image_grads", [
    ((2, 3, 5, 7), 1, 3, (True, True)),    # everything needs a gradient
    ((2, 2, 3, 5), 3, 2, (True, False)),   # the LGT case plus theta: y is data
    ((1, 3, 5, 3), 3, 3, (False, False)),  # theta alone: y's projections still depend on it
])
def test_theta_gradient_matches_float64_reference(seed, monkeypatch, backend, shape, kernel_size,
                                                  num_directions, image_grads):
    if DEVICE == "cuda":
        # The torch backend's conv2d (forward and backward) follows cuDNN's TF32 default on CUDA,
        # whose rounding reorders near-tied projections; the Triton path does not use cuDNN.
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    y = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    theta = _random_directions(num_directions, shape[1] * kernel_size**2)

    def loss_and_grads(loss_fn, dtype):
        images = [_leaf(t, dtype).requires_grad_(grad) for t, grad in zip((x, y), image_grads)]
        theta_leaf = _leaf(theta, dtype)
        loss = loss_fn(*images, theta_leaf)
        inputs = [t for t in (*images, theta_leaf) if t.requires_grad]
        return (loss, *torch.autograd.grad(loss, inputs))

    expected = loss_and_grads(lambda a, b, t: patch_swd_reference(a, b, t, kernel_size), torch.float64)
    actual = loss_and_grads(lambda a, b, t: kernels.patch_swd(a, b, t, kernel_size, backend=backend),
                            torch.float32)
    assert len(actual) == 2 + sum(image_grads)
    assert all(a.dtype == torch.float32 for a in actual)
    for a, e in zip(actual, expected):
        _assert_close_to_reference(a, e, FP32_RTOL)


def test_triton_theta_gradient_in_half_precision_theta(seed):
    """theta in float16 with float32 images: the gradient comes back in theta's dtype."""
    x = torch.randn(1, 2, 3, 5, device=DEVICE)
    y = torch.randn(1, 2, 3, 5, device=DEVICE)
    theta = _random_directions(2, 18).half().requires_grad_(True)
    (grad,) = torch.autograd.grad(kernels.patch_swd(x, y, theta, 3, backend="triton"), theta)
    theta_ref = theta.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(patch_swd_reference(x.double(), y.double(), theta_ref, 3), theta_ref)
    assert grad.dtype == torch.float16
    _assert_close_to_reference(grad, expected, 1e-3)


def test_triton_keeps_only_what_the_backward_needs(seed):
    """Without a theta gradient the autograd node holds theta and dL/dproj for the inputs needing a
    gradient (no images, no y buffer when y is data); with one it also holds both images and y's."""
    x = torch.randn(1, 2, 3, 5, device=DEVICE, requires_grad=True)
    y = torch.randn(1, 2, 3, 5, device=DEVICE)
    theta = _random_directions(2, 18).float()

    def saved(theta):
        return [t is not None for t in kernels.patch_swd(x, y, theta, 3, backend="triton").grad_fn.saved_tensors]

    assert saved(theta) == [True, True, False, False, False]
    assert saved(theta.clone().requires_grad_(True)) == [True] * 5


def _pixel_directions(num_channels):
    """k = 1 and one-hot directions: the projections are the pixel values themselves (exact)."""
    return torch.eye(num_channels, dtype=torch.float64, device=DEVICE)


def test_triton_ties_at_matching_ranks_match_reference(seed):
    """x has exact ties; y = g(x shuffled) with g increasing has the same ties at the same ranks,
    so every tie order gives the same gradient and the reference's is the one to match."""
    x = torch.randint(0, 4, (2, 2, 4, 5), device=DEVICE).double() / 4
    shuffle = torch.argsort(torch.rand(2, 2, 20, device=DEVICE), dim=-1)
    y = (3 * x.flatten(2).gather(-1, shuffle) - 1).reshape(x.shape)
    theta = _pixel_directions(2)
    expected = _loss_and_grads(_reference(theta, 1), _leaf(x), _leaf(y))
    actual = _loss_and_grads(_triton(theta, 1), _leaf(x, torch.float32), _leaf(y, torch.float32))
    for a, e in zip(actual, expected):
        _assert_close_to_reference(a, e, FP32_RTOL)


def test_triton_ties_in_x_only_give_a_valid_subgradient(seed):
    """Ties in x alone: the loss and y's gradient match, untied pixels of x get the reference
    gradient, and each group of tied pixels the same total (any tie order is a valid subgradient)."""
    x = torch.randint(0, 6, (2, 2, 4, 5), device=DEVICE).double() / 8
    y = torch.randn(2, 2, 4, 5, dtype=torch.float64, device=DEVICE)
    theta = _pixel_directions(2)
    expected_loss, expected_grad, expected_grad_y = _loss_and_grads(_reference(theta, 1), _leaf(x), _leaf(y))
    loss, grad, grad_y = _loss_and_grads(_triton(theta, 1), _leaf(x, torch.float32), _leaf(y, torch.float32))
    _assert_close_to_reference(loss, expected_loss, FP32_RTOL)
    # y has no ties and meets the same sorted x values whatever the tie order.
    _assert_close_to_reference(grad_y, expected_grad_y, FP32_RTOL)
    rows, grad_rows, expected_rows = x.flatten(2), grad.double().flatten(2), expected_grad.flatten(2)
    for b in range(x.shape[0]):
        for c in range(x.shape[1]):
            for value in rows[b, c].unique():
                tied = rows[b, c] == value
                group_grad, expected_group_grad = grad_rows[b, c][tied], expected_rows[b, c][tied]
                _assert_close_to_reference(group_grad.sum(), expected_group_grad.sum(), FP32_RTOL)
                if tied.sum() == 1:
                    _assert_close_to_reference(group_grad, expected_group_grad, FP32_RTOL)


def test_triton_is_zero_for_identical_inputs(seed):
    x = torch.randn(2, 3, 5, 7, device=DEVICE, requires_grad=True)
    loss = kernels.patch_swd(x, x.detach().clone(), _random_directions(3, 27).float(), 3, backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert not grad.any()


def test_triton_reads_channels_last_inputs(seed):
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    y = torch.randn(2, 3, 4, 5, device=DEVICE)
    theta = _random_directions(2, 27)
    expected = _loss_and_grads(_triton(theta, 3), _leaf(x), _leaf(y))
    channels_last = [_leaf(t.to(memory_format=torch.channels_last)) for t in (x, y)]
    actual = _loss_and_grads(_triton(theta, 3), *channels_last)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="bf16 arithmetic is wrong under TRITON_INTERPRET=1; checked on a GPU"))]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_triton_half_precision_error_within_twice_eager(seed, dtype):
    """Inputs in half precision, maths in fp32: the kernel's error against float64 (on the same
    rounded inputs) stays within 2x what eager PyTorch makes at the same precision."""
    x = torch.randn(2, 4, 5, 6, device=DEVICE).to(dtype)
    y = torch.randn(2, 4, 5, 6, device=DEVICE).to(dtype)
    theta = _random_directions(3, 36)
    expected = _loss_and_grads(_reference(theta, 3), _leaf(x, torch.float64), _leaf(y, torch.float64))
    eager = _loss_and_grads(_reference(theta.float(), 3), _leaf(x), _leaf(y))
    actual = _loss_and_grads(_triton(theta, 3), _leaf(x), _leaf(y))
    assert actual[0].dtype == dtype and actual[1].dtype == dtype
    for a, e, ref in zip(actual, eager, expected):
        scale = ref.abs().max().item()
        kernel_error = (a.double() - ref).abs().max().item()
        eager_error = (e.double() - ref).abs().max().item()
        assert kernel_error <= 2 * eager_error + FP32_RTOL * scale


def test_long_rows_fall_back_to_torch_with_one_warning(seed):
    patch_swd_module._warn_row_too_long_once.cache_clear()
    height = patch_swd_module.MAX_TRITON_ROW_LENGTH // 64 + 1
    x = torch.randn(1, 1, height, 64, device=DEVICE)
    y = torch.randn(1, 1, height, 64, device=DEVICE)
    theta = _random_directions(2, 9).float()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = [kernels.patch_swd(x, y, theta, 3, backend="triton") for _ in range(2)]
    assert len([w for w in caught if "too long for the in-kernel sort" in str(w.message)]) == 1
    assert losses[0].item() == losses[1].item() == patch_swd_reference(x, y, theta, 3).item()


def _bad_inputs():
    x = torch.zeros(2, 3, 4, 4)
    theta = torch.zeros(5, 27)
    return {
        "theta width is not C*k*k": (x, x, torch.zeros(5, 26), 3, "theta must be"),
        "x and y shapes differ": (x, torch.zeros(2, 3, 4, 5), theta, 3, "y must have x's shape"),
        "kernel size is even": (x, x, torch.zeros(5, 12), 2, "positive odd"),
        "x is not 4-D": (torch.zeros(3, 4, 4), torch.zeros(3, 4, 4), theta, 3, "must be a non-empty"),
        "x is an integer tensor": (x.long(), x.long(), theta, 3, "float16, bfloat16"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_inputs_raise_value_error(case, backend):
    x, y, theta, kernel_size, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        kernels.patch_swd(x, y, theta, kernel_size, backend=backend)


def test_unknown_backend_raises_value_error():
    x = torch.zeros(1, 1, 3, 3)
    with pytest.raises(ValueError, match="backend must be one of"):
        kernels.patch_swd(x, x, torch.ones(1, 9) / 3, 3, backend="cuda")
