"""Fused GroupNorm -> FiLM -> SiLU under forward-mode AD and vmap (what flow map matching needs):
the Triton op's jvp, vmap of its jvp, the backward through its tangent, and forward-AD dual
tensors, each against torch.func on the float64 reference. Small shapes: each kernel launch runs
under the Triton interpreter."""

import pytest
import torch
from torch.autograd import forward_ad
from torch.func import jvp, vmap

import kernels
from kernels.group_norm_film_silu import group_norm_film_silu_reference

SHAPE, GROUPS = (3, 6, 3, 5), 3
NAMES = ("x", "weight", "bias", "scale", "shift")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_inputs(dtype=torch.float32):
    B, C = SHAPE[:2]
    return {"x": torch.randn(SHAPE, device=DEVICE, dtype=dtype),
            "weight": 1 + 0.5 * torch.randn(C, device=DEVICE, dtype=dtype),
            "bias": 0.5 * torch.randn(C, device=DEVICE, dtype=dtype),
            "scale": 0.5 * torch.randn(B, C, device=DEVICE, dtype=dtype),
            "shift": 0.5 * torch.randn(B, C, device=DEVICE, dtype=dtype)}


def fused(x, weight, bias, scale, shift, act=True):
    return kernels.group_norm_film_silu(x, GROUPS, weight, bias, scale, shift, act=act, backend="triton")


def reference(x, weight, bias, scale, shift, act=True):
    return group_norm_film_silu_reference(x, GROUPS, weight, bias, scale, shift, act=act)


def float64(tensors):
    return {name: t.detach().double() for name, t in tensors.items()}


def assert_close_to_float64(result, exact, name):
    magnitude = exact.abs().max().item()
    assert magnitude > 0, f"{name}: the reference is zero, the check would prove nothing"
    torch.testing.assert_close(result.double(), exact, rtol=1e-5, atol=1e-5 * magnitude, msg=name)


@pytest.mark.parametrize("with_tangent", [NAMES, ("x",), ("weight", "scale"), ("bias", "shift")],
                         ids=lambda names: "+".join(names))
@pytest.mark.parametrize("act", [True, False], ids=["silu", "no_act"])
def test_jvp_matches_the_float64_reference(seed, with_tangent, act):
    """The custom op alone has no jvp rule (torch.func.jvp would return a zero tangent)."""
    primals = make_inputs()
    tangents = {name: torch.randn_like(t) if name in with_tangent else torch.zeros_like(t)
                for name, t in primals.items()}
    y, dy = jvp(lambda *a: fused(*a, act=act), tuple(primals.values()), tuple(tangents.values()))
    y64, dy64 = jvp(lambda *a: reference(*a, act=act), tuple(float64(primals).values()),
                    tuple(float64(tangents).values()))
    assert_close_to_float64(y, y64, "y")
    assert_close_to_float64(dy, dy64, "tangent")


def test_vmap_of_jvp_matches_the_float64_reference(seed):
    """FMM's pattern: per-row calls (B = 1), a jvp in a scalar, vmapped over rows; the rows' own
    weight and bias are vmapped too (they fold into the FiLM terms)."""
    inputs = make_inputs()
    B, C = SHAPE[:2]
    weights = inputs["weight"] + 0.1 * torch.randn(B, C, device=DEVICE)
    biases = inputs["bias"] + 0.1 * torch.randn(B, C, device=DEVICE)

    def per_row(op, x, weight, bias, scale, shift):
        def of_c(c):
            return op(x[None] * c, weight, bias, scale[None] * c, shift[None])[0]
        return jvp(of_c, (torch.ones((), dtype=x.dtype, device=x.device),),
                   (torch.ones((), dtype=x.dtype, device=x.device),))

    args = (inputs["x"], weights, biases, inputs["scale"], inputs["shift"])
    y, dy = vmap(lambda *a: per_row(fused, *a), randomness="different")(*args)
    y64, dy64 = vmap(lambda *a: per_row(reference, *a))(*(a.double() for a in args))
    assert_close_to_float64(y, y64, "y")
    assert_close_to_float64(dy, dy64, "tangent")


def test_backward_through_the_tangent_matches_the_float64_reference(seed):
    """A loss on the tangent (FMM's derivative term) backpropagates into every input."""

    def gradients(op, inputs):
        leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}

        def of_c(c):
            return op(leaves["x"] * c, leaves["weight"], leaves["bias"], leaves["scale"] * c, leaves["shift"])

        one = torch.ones((), dtype=leaves["x"].dtype, device=DEVICE)
        _, dy = jvp(of_c, (one,), (one,))
        return torch.autograd.grad((dy * dy.detach().cos()).sum(), list(leaves.values()))

    inputs = make_inputs()
    for name, got, want in zip(NAMES, gradients(fused, inputs), gradients(reference, float64(inputs))):
        assert_close_to_float64(got, want, f"d{name}")


def test_forward_ad_dual_tensors(seed):
    inputs = make_inputs()
    dx = torch.randn_like(inputs["x"])
    with forward_ad.dual_level():
        y = fused(forward_ad.make_dual(inputs["x"], dx), *list(inputs.values())[1:])
        tangent = forward_ad.unpack_dual(y).tangent
    exact = float64(inputs)
    _, dy64 = jvp(lambda x: reference(x, *list(exact.values())[1:]), (exact["x"],), (dx.double(),))
    assert_close_to_float64(tangent, dy64, "tangent")


def test_plain_calls_still_run_the_custom_op(seed):
    """Without a torch.func transform the op is called as before (torch.compile sees the op itself)."""
    inputs = {name: t.requires_grad_() for name, t in make_inputs().items()}
    y = fused(*inputs.values())
    assert "group_norm_film_silu_fwd" in type(y.grad_fn).__name__
