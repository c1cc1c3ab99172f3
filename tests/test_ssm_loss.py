"""ssm_loss: the reference against the full Gram computation written out, its invariance to feature
scale, the tiled Triton kernels (forward and backward) against the float64 reference with and
without an index, identical inputs, half precision, bad inputs."""

import importlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels
from kernels.ssm_loss import ssm_loss_reference

# `kernels.ssm_loss` names the function once the package is imported; this is the module.
ssm_module = importlib.import_module("kernels.ssm_loss")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_RTOL = 1e-5


def _full_gram_ssm(x, y, eps=1e-8):
    """The definition written out for every position: unit columns, both Grams in full."""
    def gram(features):
        features = features.reshape(features.shape[0], features.shape[1], -1)  # [B, D, N]
        unit = features / features.norm(dim=1, keepdim=True).clamp_min(eps)
        return torch.einsum("bdi,bdj->bij", unit, unit)

    return ((gram(x) - gram(y)) ** 2).mean()


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _assert_close_to_reference(actual, expected, rtol):
    """Relative to the largest reference entry: gradients have near-zero entries."""
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _loss_and_grads(loss_fn, x, y):
    loss = loss_fn(x, y)
    return (loss, *torch.autograd.grad(loss, (x, y)))


def _index(kind, num_positions):
    if kind == "all":
        return None
    if kind == "subset":
        return torch.randperm(num_positions, device=DEVICE)[: max(1, num_positions // 3)]
    # "repeats": drawn with replacement
    return torch.randint(0, num_positions, (num_positions // 2,), device=DEVICE)


@pytest.mark.parametrize("shape", [(2, 3, 35), (2, 4, 5, 7)])
def test_reference_matches_full_gram_computation(seed, shape):
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    y = torch.randn(shape, dtype=torch.float64, device=DEVICE, requires_grad=True)
    expected = _loss_and_grads(_full_gram_ssm, x, y)
    actual = _loss_and_grads(ssm_loss_reference, x, y)
    for a, e in zip(actual, expected):
        _assert_close_to_reference(a, e, 1e-12)


def test_reference_is_invariant_to_per_position_feature_scale(seed):
    x = torch.randn(2, 4, 30, dtype=torch.float64, device=DEVICE)
    y = torch.randn(2, 4, 30, dtype=torch.float64, device=DEVICE)
    index = _index("repeats", 30)
    scale = torch.rand(2, 1, 30, dtype=torch.float64, device=DEVICE) * 10 + 0.1  # one factor per (b, n)
    expected = ssm_loss_reference(x, y, index)
    torch.testing.assert_close(ssm_loss_reference(x * scale, y, index), expected, rtol=1e-12, atol=0)


def test_reference_is_zero_for_identical_inputs(seed):
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    loss = ssm_loss_reference(x, x.detach().clone())
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert not grad.any()


@pytest.mark.parametrize("shape, index_kind", [
    ((2, 3, 35), "all"),       # S = N, not a multiple of the tile
    ((2, 2, 17), "all"),       # D = 2: padded to tl.dot's minimum of 16 (D = 1 has zero gradient)
    ((2, 4, 5, 7), "repeats"),  # [B, C, H, W] input, positions drawn with replacement
    ((1, 70, 40), "subset"),    # D > 64: several feature blocks
])
def test_triton_matches_float64_reference(seed, shape, index_kind):
    x = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    y = torch.randn(shape, dtype=torch.float64, device=DEVICE)
    index = _index(index_kind, x[0, 0].numel())
    expected = _loss_and_grads(lambda a, b: ssm_loss_reference(a, b, index), _leaf(x), _leaf(y))
    actual = _loss_and_grads(lambda a, b: kernels.ssm_loss(a, b, index, backend="triton"),
                             _leaf(x, torch.float32), _leaf(y, torch.float32))
    assert actual[0].dtype == torch.float32
    for a, e in zip(actual, expected):
        _assert_close_to_reference(a, e, FP32_RTOL)


@pytest.mark.parametrize("num_samples", [None, 256])
def test_triton_matches_reference_at_lgt_latent_shape(seed, num_samples):
    """4 x 32 x 32 latents: exact (S = N = 1024, 16 x 16 tiles) and subsampled (S = 256); y is data."""
    x = torch.randn(1, 4, 32, 32, dtype=torch.float64, device=DEVICE)
    y = torch.randn(1, 4, 32, 32, device=DEVICE)
    index = None if num_samples is None else torch.randperm(1024, device=DEVICE)[:num_samples]
    x_ref, x_kernel = _leaf(x), _leaf(x, torch.float32)
    expected = ssm_loss_reference(x_ref, y.double(), index)
    expected.backward()
    actual = kernels.ssm_loss(x_kernel, y, index, backend="triton")
    actual.backward()
    _assert_close_to_reference(actual, expected, FP32_RTOL)
    _assert_close_to_reference(x_kernel.grad, x_ref.grad, FP32_RTOL)


def test_triton_is_zero_for_identical_inputs(seed):
    x = torch.randn(2, 5, 40, device=DEVICE, requires_grad=True)
    loss = kernels.ssm_loss(x, x.detach().clone(), _index("repeats", 40), backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    assert loss.item() == 0.0
    assert not grad.any()


HALF_DTYPES = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    DEVICE == "cpu", reason="bf16 arithmetic is wrong under TRITON_INTERPRET=1; checked on a GPU"))]


@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_triton_half_precision_error_within_twice_eager(seed, dtype):
    """Inputs in half precision, maths in fp32: the kernel's error against float64 (on the same
    rounded inputs) stays within 2x what eager PyTorch makes at the same precision."""
    x = torch.randn(2, 4, 30, device=DEVICE).to(dtype)
    y = torch.randn(2, 4, 30, device=DEVICE).to(dtype)
    index = _index("repeats", 30)
    expected = _loss_and_grads(lambda a, b: ssm_loss_reference(a, b, index), _leaf(x, torch.float64),
                               _leaf(y, torch.float64))
    eager = _loss_and_grads(lambda a, b: ssm_loss_reference(a, b, index), _leaf(x), _leaf(y))
    actual = _loss_and_grads(lambda a, b: kernels.ssm_loss(a, b, index, backend="triton"), _leaf(x), _leaf(y))
    assert actual[0].dtype == dtype and actual[1].dtype == dtype
    for a, e, ref in zip(actual, eager, expected):
        scale = ref.abs().max().item()
        kernel_error = (a.double() - ref).abs().max().item()
        eager_error = (e.double() - ref).abs().max().item()
        assert kernel_error <= 2 * eager_error + FP32_RTOL * scale


def _bad_inputs():
    x = torch.zeros(2, 3, 10)
    image = torch.zeros(2, 3, 2, 5)  # N = H*W = 10
    valid_range = r"positions in \[0, N\) = \[0, 10\)"
    return {
        "x and y shapes differ": (x, torch.zeros(2, 3, 11), None, 1e-8, "y must have x's shape"),
        "x is 2-D": (torch.zeros(3, 10), torch.zeros(3, 10), None, 1e-8, "must be a non-empty"),
        "x is an integer tensor": (x.long(), x.long(), None, 1e-8, "float16, bfloat16"),
        "index is 2-D": (x, x, torch.zeros(2, 2, dtype=torch.long), 1e-8, "1-D tensor of " + valid_range),
        "index is empty": (x, x, torch.zeros(0, dtype=torch.long), 1e-8, "non-empty 1-D tensor"),
        "index is a list": (x, x, [0, 1], 1e-8, "1-D tensor of " + valid_range),
        "index is float": (x, x, torch.zeros(4), 1e-8, "int64 or int32 " + valid_range),
        "index is bool": (x, x, torch.ones(10, dtype=torch.bool), 1e-8, "int64 or int32"),
        "index is negative": (x, x, torch.tensor([3, -1, 0]), 1e-8, valid_range + ", got values from -1 to 3"),
        "index reaches N": (x, x, torch.tensor([0, 10, 9]), 1e-8, valid_range + ", got values from 0 to 10"),
        "int32 index reaches H*W": (image, image, torch.tensor([10], dtype=torch.int32), 1e-8, valid_range),
        "index on another device": (x, x, torch.zeros(3, dtype=torch.long, device="meta"), 1e-8,
                                    "index must be on x's device"),
        "eps is not positive": (x, x, None, 0.0, "eps must be > 0"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
@pytest.mark.parametrize("backend", ["auto", "torch", "triton"])
def test_bad_inputs_raise_value_error(case, backend):
    x, y, index, eps, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        kernels.ssm_loss(x, y, index, eps, backend=backend)


def test_reference_raises_value_error_for_out_of_range_index():
    x = torch.zeros(1, 2, 7)
    with pytest.raises(ValueError, match=r"\[0, 7\), got values from 0 to 7"):
        ssm_loss_reference(x, x, torch.tensor([0, 7]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_index_at_both_ends_of_the_range_is_accepted(seed, backend):
    x = torch.randn(1, 3, 2, 5, device=DEVICE)
    y = torch.randn(1, 3, 2, 5, device=DEVICE)
    index = torch.tensor([9, 0, 9, 4], dtype=torch.int32, device=DEVICE)
    expected = ssm_loss_reference(x.double(), y.double(), index.long())
    _assert_close_to_reference(kernels.ssm_loss(x, y, index, backend=backend), expected, FP32_RTOL)


# ------------------------------------------------------------------ the index check never syncs on a GPU


class _HostReadError(AssertionError):
    pass


class _NoHostReads(TorchDispatchMode):
    """Records the aten ops run inside it and fails on the ones that copy a value to the host
    (.item(), bool(t), int(t), `if t:` all reach aten._local_scalar_dense)."""

    HOST_READS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal")

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops.append(name)
        if name in self.HOST_READS:
            raise _HostReadError(f"{func} reads a tensor value back to the host")
        return func(*args, **(kwargs or {}))


@pytest.fixture
def no_host_reads(monkeypatch):
    """A context manager in which reading a tensor's value on the host raises _HostReadError:
    .tolist() and .numpy() copy without going through the dispatcher, so they are patched too."""
    def refuse(name):
        def method(self, *args, **kwargs):
            raise _HostReadError(f"Tensor.{name}() reads tensor values back to the host")
        return method

    def guard():
        for name in ("tolist", "numpy", "item"):
            monkeypatch.setattr(torch.Tensor, name, refuse(name))
        return _NoHostReads()

    return guard


def test_out_of_range_index_on_cpu_raises_value_error_on_every_backend():
    x = torch.zeros(1, 2, 7)
    for backend in ("auto", "torch", "triton"):
        with pytest.raises(ValueError, match=r"\[0, 7\), got values from -2 to 3"):
            kernels.ssm_loss(x, x, torch.tensor([0, 3, -2]), backend=backend)


def test_the_guard_catches_the_host_check(no_host_reads):
    """The host branch reads min and max back: the guard must see it, or the next test proves nothing."""
    with pytest.raises(_HostReadError), no_host_reads():
        ssm_module._check_index_range(torch.tensor([0, 3]), 7, "positions", on_host=True)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_device_branch_asserts_on_the_device_without_reading_back(no_host_reads, dtype):
    """The branch GPU tensors take: a torch._assert_async and no value read back. (On CPU tensors
    _assert_async checks at once, so the out-of-range case fails here, as a RuntimeError.)"""
    with no_host_reads() as mode:
        ssm_module._check_index_range(torch.tensor([0, 6, 3], dtype=dtype), 7, "positions", on_host=False)
    assert "aten._assert_async" in mode.ops
    for bad in ([0, 7], [-1, 3]):
        with pytest.raises(RuntimeError, match="ssm_loss: index must hold positions"), no_host_reads():
            ssm_module._check_index_range(torch.tensor(bad, dtype=dtype), 7, "positions", on_host=False)


def test_index_on_a_device_other_than_cpu_takes_the_device_branch(no_host_reads):
    """Meta tensors hold no values (a host check could not even run): the input check on them goes
    through the device assertion, as CUDA tensors do."""
    x = torch.zeros(2, 3, 10, device="meta")
    index = torch.zeros(4, dtype=torch.long, device="meta")
    with no_host_reads() as mode:
        ssm_module._check_inputs(x, x, index, 1e-8)
    assert "aten._assert_async" in mode.ops


@pytest.mark.skipif(DEVICE != "cuda", reason="needs a GPU: CUDA's sync debug mode")
def test_cuda_input_check_does_not_synchronize(seed):
    x = torch.randn(2, 4, 64, device="cuda")
    index = torch.randperm(64, device="cuda")[:16]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ssm_module._check_inputs(x, x, index, 1e-8)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()  # the assertion held
