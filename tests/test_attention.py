"""attention: SDPA (and xformers where present) against a float64 softmax(q k^T / sqrt(d)) v written
out, forward and backward, odd sizes; clear ValueErrors for bad ranks, shapes, dtypes, devices and
backends."""

import importlib

import pytest
import torch

import kernels

# `kernels.attention` names the function once the package is imported; this is the module.
attention_module = importlib.import_module("kernels.attention")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP32_RTOL = 1e-5


def _naive_attention(q, k, v):
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).clone().requires_grad_(True)


def _assert_close_to_reference(actual, expected, rtol):
    """Relative to the largest reference entry."""
    torch.testing.assert_close(actual.double(), expected, rtol=rtol, atol=rtol * expected.abs().max().item())


def _output_and_grads(fn, q, k, v, grad_out):
    out = fn(q, k, v)
    return (out, *torch.autograd.grad(out, (q, k, v), grad_out))


@pytest.mark.parametrize("backend", ["auto", "sdpa"])
@pytest.mark.parametrize("q_shape, kv_length", [((2, 3, 5, 7), 5), ((1, 2, 9, 3), 4), ((3, 1, 1, 5), 11)])
def test_matches_float64_reference(seed, backend, q_shape, kv_length):
    q = torch.randn(q_shape, dtype=torch.float64, device=DEVICE)
    k = torch.randn(*q_shape[:2], kv_length, q_shape[-1], dtype=torch.float64, device=DEVICE)
    v = torch.randn(*q_shape[:2], kv_length, q_shape[-1], dtype=torch.float64, device=DEVICE)
    grad_out = torch.randn(q_shape, dtype=torch.float64, device=DEVICE)
    expected = _output_and_grads(_naive_attention, *(_leaf(t) for t in (q, k, v)), grad_out)
    actual = _output_and_grads(lambda *qkv: kernels.attention(*qkv, backend=backend),
                               *(_leaf(t, torch.float32) for t in (q, k, v)), grad_out.float())
    assert actual[0].shape == q_shape
    assert all(a.dtype == torch.float32 for a in actual)
    # 1e-4 leaves room for SDPA's fused GPU kernels (fp32, but not float64's summation order).
    for a, e in zip(actual, expected):
        _assert_close_to_reference(a, e, FP32_RTOL if DEVICE == "cpu" else 1e-4)


def test_half_precision_returns_the_input_dtype(seed):
    q, k, v = (torch.randn(1, 2, 5, 8, device=DEVICE).half() for _ in range(3))
    out = kernels.attention(q, k, v, backend="sdpa")
    assert out.dtype == torch.float16
    expected = _naive_attention(q.double(), k.double(), v.double())
    _assert_close_to_reference(out, expected, 2e-3)


def _bad_inputs():
    q = torch.zeros(2, 3, 5, 4)
    kv = torch.zeros(2, 3, 6, 4)
    return {
        "q is 3-D": (torch.zeros(2, 5, 4), kv, kv, r"expects q \[B,h,Lq,d\]"),
        "k and v are 3-D": (q, torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), r"expects q \[B,h,Lq,d\]"),
        "k and v shapes differ": (q, kv, torch.zeros(2, 3, 7, 4), r"expects q \[B,h,Lq,d\]"),
        "head dims differ": (q, torch.zeros(2, 3, 6, 5), torch.zeros(2, 3, 6, 5), r"expects q \[B,h,Lq,d\]"),
        "batch sizes differ": (q, torch.zeros(1, 3, 6, 4), torch.zeros(1, 3, 6, 4), r"expects q \[B,h,Lq,d\]"),
        "integer tensors": (q.long(), kv.long(), kv.long(), "floating point of one dtype"),
        "mixed float dtypes": (q, kv.double(), kv.double(), "floating point of one dtype"),
        "v is half": (q, kv, kv.half(), "floating point of one dtype"),
        "bool tensors": (q.bool(), kv.bool(), kv.bool(), "floating point of one dtype"),
        "complex tensors": (q.cfloat(), kv.cfloat(), kv.cfloat(), "floating point of one dtype"),
        "v on another device": (q, kv, kv.to("meta"), "on one device"),
        "q is not a tensor": ([[0.0]], kv, kv, "q must be a tensor"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
@pytest.mark.parametrize("backend", ["auto", "sdpa", "xformers"])
def test_bad_inputs_raise_value_error(case, backend):
    q, k, v, message = _bad_inputs()[case]
    with pytest.raises(ValueError, match=message):
        kernels.attention(q, k, v, backend=backend)


@pytest.mark.parametrize("backend", ["triton", "torch", "flash", ""])
def test_unknown_backend_raises_value_error(backend):
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="attention backend must be one of"):
        kernels.attention(q, q, q, backend=backend)


def test_xformers_backend_without_xformers_or_cuda_raises_value_error():
    """CPU tensors: xformers has no CPU kernels, so this is a ValueError whether or not it imports."""
    q = torch.zeros(1, 1, 2, 4)
    with pytest.raises(ValueError, match="needs xformers installed and CUDA tensors"):
        kernels.attention(q, q, q, backend="xformers")


def test_without_xformers_auto_uses_sdpa_and_xformers_raises(seed, monkeypatch):
    """As if xformers failed to import, on this machine's device (CUDA where there is one)."""
    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: None)
    q, k, v = (torch.randn(1, 2, 3, 4, device=DEVICE) for _ in range(3))
    expected = _naive_attention(q.double(), k.double(), v.double())
    _assert_close_to_reference(kernels.attention(q, k, v), expected, FP32_RTOL if DEVICE == "cpu" else 1e-4)
    with pytest.raises(ValueError, match="needs xformers installed and CUDA tensors"):
        kernels.attention(q, k, v, backend="xformers")
