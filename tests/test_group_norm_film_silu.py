"""Fused GroupNorm -> FiLM -> SiLU: the Triton kernel against a float64 reference, forward and
backward, on fresh random inputs (the `seed` fixture), odd shapes, both memory formats.

Error budget: fp32 within 1e-5 relative of float64. Low precision is held to the eager PyTorch
reference at the same precision (flash-attention's rule): the kernel's largest error against
float64 may be at most twice eager's plus a small absolute term.
"""

import pytest
import torch

import kernels
from kernels import _triton_group_norm
from kernels._triton_group_norm import launch_backward, launch_forward
from kernels.group_norm_film_silu import _empty_statistics, group_norm_film_silu_reference

SHAPES_AND_GROUPS = [  # [B, C, H, W] with 1 group, a middle count, and one channel per group
    ((1, 6, 5, 7), 1), ((1, 6, 5, 7), 3), ((1, 6, 5, 7), 6),
    ((2, 12, 3, 9), 1), ((2, 12, 3, 9), 4), ((2, 12, 3, 9), 12),
    ((3, 20, 4, 4), 1), ((3, 20, 4, 4), 5), ((3, 20, 4, 4), 20),
]
LOW_PRECISION = [torch.float16, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="bf16 arithmetic is wrong under TRITON_INTERPRET=1"))]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FILM_NAMES = ("weight", "bias", "scale", "shift")


def make_inputs(shape, dtype, channels_last=False, present=FILM_NAMES):
    """x, the FiLM tensors (scale and shift as views of one [B, 2C] embedding, like emb.chunk(2, 1))
    and the leaves that carry gradients."""
    B, C = shape[:2]
    x = torch.randn(shape, device=DEVICE, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    weight = 1 + 0.5 * torch.randn(C, device=DEVICE, dtype=dtype)
    bias = 0.5 * torch.randn(C, device=DEVICE, dtype=dtype)
    embedding = 0.5 * torch.randn(B, 2 * C, device=DEVICE, dtype=dtype)
    leaves = {"x": x, "weight": weight, "bias": bias, "embedding": embedding}
    for t in leaves.values():
        t.requires_grad_()
    scale, shift = embedding.chunk(2, dim=1)
    film = {"weight": weight, "bias": bias, "scale": scale, "shift": shift}
    film = {name: (t if name in present else None) for name, t in film.items()}
    return x, film, leaves


def as_float64(leaves, film):
    """Float64 copies of the leaves and the FiLM tensors rebuilt from them the same way."""
    leaves64 = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}
    scale, shift = leaves64["embedding"].chunk(2, dim=1)
    rebuilt = {"weight": leaves64["weight"], "bias": leaves64["bias"], "scale": scale, "shift": shift}
    return leaves64, {name: (rebuilt[name] if film[name] is not None else None) for name in film}


def output_and_grads(fn, x, film, leaves, dy):
    """y and the gradients of <y, dy> for every leaf that y depends on (None for the others)."""
    y = fn(x, **film)
    grads = torch.autograd.grad(y, list(leaves.values()), dy, allow_unused=True)
    return [y.detach(), *grads]


def run_all(x, film, leaves, num_groups, act, dy):
    """(kernel, float64 reference, eager reference at x's precision): each [y, dx, dweight, ...]."""
    def kernel(x, **film):
        return kernels.group_norm_film_silu(x, num_groups, **film, act=act, backend="triton")

    def reference(x, **film):
        return group_norm_film_silu_reference(x, num_groups, **film, act=act)

    leaves64, film64 = as_float64(leaves, film)
    return (output_and_grads(kernel, x, film, leaves, dy),
            output_and_grads(reference, leaves64["x"], film64, leaves64, dy.double()),
            output_and_grads(reference, x, film, leaves, dy))


def max_error(result, exact):
    return (result.double() - exact).abs().max().item()


def assert_within_budget(kernel_results, exact_results, eager_results, dtype):
    names = ["y", *(f"d{name}" for name in ("x", "weight", "bias", "embedding"))]
    for name, result, exact, eager in zip(names, kernel_results, exact_results, eager_results):
        if exact is None:
            assert result is None, f"{name}: gradient for an unused input"
            continue
        assert result.dtype == dtype, f"{name}: dtype {result.dtype}, expected {dtype}"
        magnitude = exact.abs().max().item()
        if dtype == torch.float32:
            torch.testing.assert_close(result.double(), exact, rtol=1e-5, atol=1e-5 * magnitude, msg=name)
        else:
            budget = 2 * max_error(eager, exact) + 1e-3 * magnitude
            error = max_error(result, exact)
            assert error <= budget, f"{name}: error {error:.3g} over budget {budget:.3g} (2x eager + atol)"


@pytest.mark.parametrize("shape,num_groups", SHAPES_AND_GROUPS)
@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_matches_float64_reference_forward_and_backward(seed, shape, num_groups, dtype, channels_last):
    x, film, leaves = make_inputs(shape, dtype, channels_last)
    dy = torch.randn_like(x)
    kernel, exact, eager = run_all(x, film, leaves, num_groups, True, dy)
    assert_within_budget(kernel, exact, eager, dtype)


@pytest.mark.parametrize("present", [(), ("weight",), ("bias",), ("scale",), ("shift",),
                                     ("bias", "scale", "shift"), ("weight", "scale", "shift"),
                                     ("weight", "bias", "shift"), ("weight", "bias", "scale")],
                         ids=lambda present: "+".join(present) or "none")
@pytest.mark.parametrize("act", [True, False], ids=["silu", "no_act"])
def test_optional_film_tensors_and_activation(seed, present, act):
    x, film, leaves = make_inputs((2, 12, 3, 5), torch.float32, present=present)
    dy = torch.randn_like(x)
    kernel, exact, eager = run_all(x, film, leaves, 4, act, dy)
    assert_within_budget(kernel, exact, eager, torch.float32)


def test_fp32_parameters_with_fp16_activations(seed):
    """Mixed precision: output in x's dtype, each gradient in its own tensor's dtype."""
    x = torch.randn(2, 12, 3, 5, device=DEVICE, dtype=torch.float16, requires_grad=True)
    weight, bias = (torch.randn(12, device=DEVICE, requires_grad=True) for _ in range(2))
    embedding = torch.randn(2, 24, device=DEVICE, requires_grad=True)
    y = kernels.group_norm_film_silu(x, 4, weight, bias, *embedding.chunk(2, dim=1), backend="triton")
    y.backward(torch.randn_like(y))
    assert y.dtype == x.grad.dtype == torch.float16
    assert weight.grad.dtype == bias.grad.dtype == embedding.grad.dtype == torch.float32
    exact = group_norm_film_silu_reference(x.double(), 4, weight.double(), bias.double(),
                                           *embedding.double().chunk(2, dim=1))
    assert max_error(y, exact) <= 2e-3 * exact.abs().max().item()


@pytest.mark.parametrize("shape,num_groups,tile,channels_last", [
    ((2, 12, 5, 7), 2, 16, False),  # tiles of 1 channel x 16 positions, the last one part-masked
    ((2, 12, 2, 3), 2, 32, True),  # tiles of 4 channels x 8 positions, masked both ways
])
def test_groups_spanning_many_tiles(seed, monkeypatch, shape, num_groups, tile, channels_last):
    """Small tiles exercise the loops over a group: the merging of per-tile statistics and the
    per-channel sums carried across tiles, which the test shapes above fit in one tile."""
    monkeypatch.setattr(_triton_group_norm, "_FORWARD_TILE", tile)
    monkeypatch.setattr(_triton_group_norm, "_BACKWARD_TILE", tile)
    x, film, leaves = make_inputs(shape, torch.float32, channels_last)
    leaves["x"] = x = (3 + x.detach()).requires_grad_()  # an offset, so a wrong merge of tile means shows
    dy = torch.randn_like(x)
    kernel, exact, eager = run_all(x, film, leaves, num_groups, True, dy)
    assert_within_budget(kernel, exact, eager, torch.float32)


def test_statistics_stay_exact_for_large_offset_small_spread(seed):
    """x = 1e4 + 0.1 * randn: E[x^2] - E[x]^2 in fp32 would lose the variance entirely."""
    x, film, leaves = make_inputs((2, 12, 5, 7), torch.float32)
    leaves["x"] = x = (1e4 + 0.1 * x.detach()).requires_grad_()
    dy = torch.randn_like(x)
    kernel, exact, eager = run_all(x, film, leaves, 3, True, dy)
    assert_within_budget(kernel, exact, eager, torch.float32)


def test_output_keeps_the_memory_format(seed):
    x, film, _ = make_inputs((2, 8, 3, 5), torch.float32, channels_last=True)
    y = kernels.group_norm_film_silu(x, 4, **film, backend="triton")
    assert y.is_contiguous(memory_format=torch.channels_last)
    y.sum().backward()  # an expanded (stride 0) gradient flows through the strided backward
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_non_flattenable_input_is_copied_and_still_correct(seed):
    x = torch.randn(2, 6, 4, 10, device=DEVICE)[..., ::2]  # stride_h != W * stride_w
    y = kernels.group_norm_film_silu(x, 3, backend="triton")
    torch.testing.assert_close(y.double(), group_norm_film_silu_reference(x.double(), 3), rtol=1e-5, atol=1e-5)


def test_torch_and_triton_backends_agree(seed):
    x, film, _ = make_inputs((2, 12, 3, 9), torch.float32)
    torch.testing.assert_close(kernels.group_norm_film_silu(x, 4, **film, backend="triton"),
                               kernels.group_norm_film_silu(x, 4, **film, backend="torch"))


def test_double_backward_matches_the_reference(seed):
    """create_graph=True (LGT's divergence penalty differentiates a gradient): the second derivative
    through the Triton op equals the float64 reference's."""
    x, film, leaves = make_inputs((2, 12, 3, 5), torch.float32)
    leaves64, film64 = as_float64(leaves, film)

    def second_order(op, x_, film_, leaves_, **kw):
        y = op(x_, 4, **film_, **kw)
        (dx,) = torch.autograd.grad((y * y.detach().sin()).sum(), x_, create_graph=True)
        return torch.autograd.grad(dx.pow(2).sum(), list(leaves_.values()))

    fused = second_order(kernels.group_norm_film_silu, x, film, leaves, backend="triton")
    reference = second_order(group_norm_film_silu_reference, leaves64["x"], film64, leaves64)
    for got, want in zip(fused, reference):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_strided_weight_and_bias_views(seed):
    x = torch.randn(2, 6, 3, 5, device=DEVICE)
    weight, bias = torch.randn(2, 12, device=DEVICE)[:, ::2]
    torch.testing.assert_close(kernels.group_norm_film_silu(x, 3, weight, bias, backend="triton").double(),
                               group_norm_film_silu_reference(x.double(), 3, weight.double(), bias.double()),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,num_groups", [((1, 6, 5, 7), 3), ((2, 4, 3, 3), 1)])
def test_kernels_write_every_output_element(seed, shape, num_groups):
    """Outputs are pre-filled with NaN, so an element the kernels skip shows up as NaN."""
    x, film, _ = make_inputs(shape, torch.float32, present=("weight", "scale"))
    film = {name: None if t is None else t.detach() for name, t in film.items()}
    args = (num_groups, *film.values())
    y = torch.full_like(x, float("nan"))
    mean, rstd = (t.fill_(float("nan")) for t in _empty_statistics(x, num_groups))
    launch_forward(x.detach(), y, mean, rstd, *args, eps=1e-5, act=True)
    dx = torch.full_like(x, float("nan"))
    sum_du, sum_du_xhat = (torch.full(shape[:2], float("nan"), device=DEVICE) for _ in range(2))
    launch_backward(torch.randn_like(x), x.detach(), dx, mean, rstd, sum_du, sum_du_xhat, *args, act=True)
    for name, t in {"y": y, "mean": mean, "rstd": rstd, "dx": dx, "sum_du": sum_du,
                    "sum_du_xhat": sum_du_xhat}.items():
        assert not t.isnan().any(), f"{name} has unwritten (NaN) elements"


def test_custom_ops_pass_opcheck(seed):
    x, film, _ = make_inputs((2, 6, 3, 5), torch.float32, channels_last=True)
    weight, bias, scale, shift = film.values()
    forward_args = (x, 3, weight, bias, scale, shift, 1e-5, True)
    torch.library.opcheck(torch.ops.lgt.group_norm_film_silu_fwd.default, forward_args)
    _, mean, rstd = torch.ops.lgt.group_norm_film_silu_fwd(*forward_args)
    backward_args = (torch.randn_like(x), x.detach(), mean, rstd, 3, weight.detach(), bias.detach(),
                     scale.detach(), shift.detach(), True)
    torch.library.opcheck(torch.ops.lgt.group_norm_film_silu_bwd.default, backward_args)


def test_compiles_without_graph_break(seed):
    x, _, leaves = make_inputs((2, 6, 3, 5), torch.float32)

    def block(x, weight, bias, embedding):
        scale, shift = embedding.chunk(2, dim=1)
        return kernels.group_norm_film_silu(x, 3, weight, bias, scale, shift, backend="triton") * 2

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    args = list(leaves.values())
    dy = torch.randn_like(x)
    compiled_grads = torch.autograd.grad(compiled(*args), args, dy)
    eager_grads = torch.autograd.grad(block(*args), args, dy)
    for compiled_grad, eager_grad in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.parametrize("call,message", [
    (lambda x: kernels.group_norm_film_silu(x[0], 2), "must be \\[B, C, H, W\\]"),
    (lambda x: kernels.group_norm_film_silu(x, 4), "not divisible"),
    (lambda x: kernels.group_norm_film_silu(x, 0), "not divisible"),
    (lambda x: kernels.group_norm_film_silu(x, 2, weight=torch.ones(5)), "weight must have shape"),
    (lambda x: kernels.group_norm_film_silu(x, 2, scale=torch.ones(6)), "scale must have shape"),
    (lambda x: kernels.group_norm_film_silu(x, 2, shift=torch.ones(2, 6, 1)), "shift must have shape"),
    (lambda x: kernels.group_norm_film_silu(x.long(), 2), "floating-point"),
    (lambda x: kernels.group_norm_film_silu(x, 2, bias=torch.ones(6, dtype=torch.int32)), "floating-point"),
    (lambda x: kernels.group_norm_film_silu(x, 2, weight=torch.ones(6, device="meta")), "one device"),
    (lambda x: kernels.group_norm_film_silu(x, 2, backend="cuda"), "backend must be one of"),
], ids=["rank", "indivisible", "zero_groups", "weight_shape", "scale_rank", "shift_rank",
        "integer_x", "integer_bias", "mixed_devices", "unknown_backend"])
def test_bad_arguments_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.randn(2, 6, 3, 3))
