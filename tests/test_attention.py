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


def test_second_derivatives_match_float64_reference(seed):
    """Under unfused_attention(), a backward with create_graph=True (LGT's divergence penalty) can
    be differentiated again: the fused kernels' backward cannot, so attention is written out there."""
    q, k, v = (torch.randn(2, 3, 6, 4, dtype=torch.float64, device=DEVICE) for _ in range(3))
    grad_out, weight = torch.randn_like(q), torch.randn_like(q)

    def second(fn, dtype):
        leaves = [_leaf(t, dtype) for t in (q, k, v)]
        first = torch.autograd.grad(fn(*leaves), leaves, grad_out.to(dtype), create_graph=True)
        return torch.autograd.grad((first[0] * weight.to(dtype)).sum(), leaves)

    expected = second(_naive_attention, torch.float64)
    with kernels.unfused_attention():
        actual = second(kernels.attention, torch.float32)
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


# --------------------------------------------------------------------------- the models' layout


def _attention_blocks():
    from engine.models.autoencoder import AttentionBlock as AutoencoderAttention
    from engine.models.unet import AttentionBlock as UNetAttention

    return {"unet": lambda: UNetAttention(96, 4, 32), "autoencoder": lambda: AutoencoderAttention(64, 32)}


def _captured_qkv(block, x, monkeypatch):
    """The q, k, v a block hands to kernels.attention."""
    seen = []
    original = kernels.attention

    def capture(q, k, v, backend="auto"):
        seen.append((q, k, v))
        return original(q, k, v, backend=backend)

    monkeypatch.setattr(importlib.import_module("engine.models.attention").kernels, "attention", capture)
    block(x)
    return seen[0]


@pytest.mark.parametrize("model", ["unet", "autoencoder"])
def test_attention_blocks_feed_q_k_v_with_stride_1_along_d(model, monkeypatch):
    """The layout SDPA's flash / memory-efficient kernels and xformers need: d contiguous, in SDPA's
    [B, heads, L, d] and in xformers' [B, L, heads, d] order. torch's own check says so: on the CPU
    SDPA picks its flash kernel (which needs stride 1 along d), and on CUDA the eligibility checks."""
    block = _attention_blocks()[model]()
    x = torch.randn(2, block.qkv.in_channels, 8, 8)
    q, k, v = _captured_qkv(block, x, monkeypatch)
    for t in (q, k, v):
        assert t.shape[-2] == 64 and t.stride(-1) == 1 and t.transpose(1, 2).stride(-1) == 1
    flash = torch.nn.attention.SDPBackend.FLASH_ATTENTION
    assert torch.ops.aten._fused_sdp_choice(q, k, v) == flash.value
    if torch.cuda.is_available():
        params = torch.backends.cuda.SDPAParams(*(t.cuda().bfloat16() for t in (q, k, v)), None, 0.0, False, False)
        assert torch.backends.cuda.can_use_efficient_attention(params, True)


@pytest.mark.parametrize("model", ["unet", "autoencoder"])
def test_attention_blocks_compute_softmax_attention_over_positions(seed, model):
    block = _attention_blocks()[model]().double()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.2)
    x = torch.randn(2, block.qkv.in_channels, 4, 4, dtype=torch.float64)
    heads = getattr(block, "num_heads", 1)
    B, C, H, W = x.shape
    qkv = block.qkv(block.norm(x)).reshape(B, 3, heads, C // heads, H * W)  # channels (q|k|v, head, d)
    q, k, v = qkv.transpose(-1, -2).unbind(1)
    attended = _naive_attention(q, k, v).transpose(-1, -2).reshape(B, C, H, W)
    projection = block.proj if model == "unet" else block.proj_out
    torch.testing.assert_close(block(x), x + projection(attended))


class _XformersStub:
    """xformers' memory_efficient_attention as far as the layout goes: [B, L, heads, d] with stride 1
    along d, else NotImplementedError (xformers' "no operator found" for such inputs)."""

    def __init__(self, accept: bool = True):
        self.accept, self.calls = accept, []

    def memory_efficient_attention(self, q, k, v):
        self.calls.append(tuple(t.stride() for t in (q, k, v)))
        if not self.accept or any(t.stride(-1) != 1 for t in (q, k, v)):
            raise NotImplementedError("No operator found for `memory_efficient_attention_forward` with inputs")
        return torch.empty_like(q)


def test_xformers_accepts_the_unet_blocks_q_k_v(monkeypatch):
    """`auto` on CUDA tensors calls xformers when it imports; the block's q, k, v (their strides, on
    fake CUDA tensors: this runs without a GPU) are in the layout it takes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    block = _attention_blocks()["unet"]()
    q, k, v = _captured_qkv(block, torch.randn(2, 96, 8, 8), monkeypatch)
    stub = _XformersStub()
    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: stub)
    with FakeTensorMode():
        on_cuda = [torch.empty_strided(t.shape, t.stride(), device="cuda") for t in (q, k, v)]
        out = kernels.attention(*on_cuda)
    assert out.shape == q.shape and len(stub.calls) == 1


def test_auto_falls_back_to_sdpa_when_xformers_rejects_the_inputs(monkeypatch):
    from torch._subclasses.fake_tensor import FakeTensorMode

    stub = _XformersStub(accept=False)
    monkeypatch.setattr(attention_module, "_xformers_ops", lambda: stub)
    with FakeTensorMode():
        q = torch.empty(2, 4, 16, 8, device="cuda")
        with pytest.warns(UserWarning, match="xformers rejected the attention inputs"):
            out = kernels.attention(q, q, q)
        assert out.shape == q.shape and len(stub.calls) == 1
        with pytest.raises(ValueError, match="'xformers' rejected the inputs"):
            kernels.attention(q, q, q, backend="xformers")
