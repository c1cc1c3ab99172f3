"""Fixed-step ODE solvers: convergence orders, checkpointed steps, integrated per-step scalars."""

import itertools
import math

import pytest
import torch
from torch import nn

from engine.methods.ode import SOLVERS, integrate, integrate_with_aux


@pytest.mark.parametrize("time_dependent", [False, True], ids=["dx=ax", "dx=(a+2bt)x"])
@pytest.mark.parametrize("solver", list(SOLVERS))
def test_solver_converges_at_its_order_on_a_linear_ode(seed, solver, time_dependent):
    a = -0.5 - 1.5 * torch.rand(6, dtype=torch.float64)  # dx/dt = (a + 2 b t) x, x(1) = x0 exp(a + b)
    b = 0.5 * torch.randn(6, dtype=torch.float64) if time_dependent else torch.zeros(6, dtype=torch.float64)
    x0 = torch.randn(3, 6, dtype=torch.float64)
    exact = x0 * torch.exp(a + b)

    def field(x, t):
        return (a + 2 * b * t[:, None].to(x.dtype)) * x

    errors = [(integrate(field, x0, solver, steps) - exact).abs().max().item() for steps in (16, 32, 64)]
    rates = [math.log2(coarse / fine) for coarse, fine in itertools.pairwise(errors)]
    order = SOLVERS[solver].order
    # error ~ C h^order: halving h divides it by 2^order (once h is small enough; the finest pair is closest)
    assert abs(rates[-1] - order) < 0.2 and abs(rates[0] - order) < 0.4, \
        f"{solver}: errors {errors}, observed orders {rates}"


def _mlp_field(net: nn.Module):
    """A field with dropout, a Hutchinson probe and two per-evaluation scalars (like LGT's)."""

    def field(x, t):
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        v = net(torch.cat([x, t[:, None]], dim=1))
        probe = torch.randint(0, 2, x.shape).float() * 2 - 1
        (vjp,) = torch.autograd.grad(v, x, probe, create_graph=True)
        return v, (v.square().mean(), (vjp * probe).sum(1).square().mean())

    return field


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_checkpointed_steps_give_the_same_loss_and_gradients(seed, solver):
    net = nn.Sequential(nn.Linear(5, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 4))
    x0 = torch.randn(6, 4)
    results = []
    for checkpoint in (False, True):
        net.zero_grad()
        torch.manual_seed(seed)  # the same dropout masks and probes in both runs
        x1, (vel, div) = integrate_with_aux(_mlp_field(net), x0, solver, 3, checkpoint=checkpoint)
        loss = x1.square().mean() + vel + 0.1 * div
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a)
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_b, grad_a)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd saves for backward outside checkpointed regions."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


def test_checkpointed_steps_keep_no_activations_between_steps(seed):
    net = nn.Sequential(nn.Linear(65, 256), nn.SiLU(), nn.Linear(256, 256), nn.SiLU(), nn.Linear(256, 64))
    x0 = torch.randn(32, 64)

    def field(x, t):
        return net(torch.cat([x, t[:, None]], dim=1))

    def saved(steps, checkpoint):
        return _saved_bytes(lambda: integrate(field, x0, "heun", steps, checkpoint=checkpoint).sum())

    plain = [saved(steps, False) for steps in (2, 8)]
    checkpointed = [saved(steps, True) for steps in (2, 8)]
    assert plain[1] > 3.5 * plain[0]  # every step's activations are kept
    assert checkpointed[1] < 0.05 * plain[1]


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_per_evaluation_scalars_are_integrated_with_the_solver_quadrature(solver):
    x0 = torch.zeros(2, 1)
    _, (integral,) = integrate_with_aux(lambda x, t: (torch.zeros_like(x), (t.mean() ** 2,)), x0, solver, 4)
    h = 1 / 4
    expected = {"euler": sum((n * h) ** 2 for n in range(4)) * h,  # left Riemann sum
                "heun": 1 / 3 + h**2 / 6,  # trapezoid rule error for t^2
                "rk4": 1 / 3}[solver]  # Simpson: exact for quadratics
    assert integral.item() == pytest.approx(expected, rel=1e-6)


def test_unknown_solver_is_refused_naming_the_valid_ones():
    with pytest.raises(ValueError, match="euler, heun, rk4"):
        integrate(lambda x, t: x, torch.zeros(1, 1), "midpoint", 2)
