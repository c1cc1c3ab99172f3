"""Fixed-step explicit Runge-Kutta solvers for dx/dt = f(x, t), differentiable end to end.

    integrate(field, x0, solver, steps)            -> x1
    integrate_with_aux(field, x0, solver, steps)   -> (x1, integrals of per-evaluation scalars)

`solver` is one of SOLVERS: euler (order 1), heun (explicit trapezoid, order 2), rk4 (classic,
order 4). Gradients flow through every step. With `checkpoint=True` each step runs under
torch.utils.checkpoint (non-reentrant): only the state between steps is kept, each step's
activations are recomputed in the backward pass, so memory is flat in the number of steps and the
gradients equal those of the unchecked run. The recomputation replays the RNG state
(preserve_rng_state, the default), so dropout masks and random probes drawn inside a step are the
same both times; the autocast state is replayed too.

Per-evaluation scalars (`field` returning (v, aux)) are integrated with the solver's own quadrature
weights, sum over steps of h * sum_i b_i aux_i, i.e. the solver's estimate of the integral of aux
over [t0, t1]: over [0, 1] that is a weighted mean over steps and stages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as checkpoint_step

from engine.profiling import phase

Tensor = torch.Tensor
# (x [B, ...], t [B]) -> v like x, or (v, aux) with aux a tuple of scalar tensors
Field = Callable[[Tensor, Tensor], Tensor]
FieldWithAux = Callable[[Tensor, Tensor], tuple[Tensor, tuple[Tensor, ...]]]


@dataclass(frozen=True)
class Tableau:
    """An explicit Runge-Kutta method: stage i evaluates f at t + c[i] h, x + h sum_j a[i][j] k_j."""

    nodes: tuple[float, ...]  # c
    coefficients: tuple[tuple[float, ...], ...]  # a (row i has i entries)
    weights: tuple[float, ...]  # b
    order: int


SOLVERS: dict[str, Tableau] = {
    "euler": Tableau((0.0,), ((),), (1.0,), order=1),
    "heun": Tableau((0.0, 1.0), ((), (1.0,)), (0.5, 0.5), order=2),
    "rk4": Tableau((0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                   (1 / 6, 1 / 3, 1 / 3, 1 / 6), order=4),
}


def _tableau(solver: str) -> Tableau:
    if solver not in SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; valid: {', '.join(SOLVERS)}")
    return SOLVERS[solver]


def rk_step(field: FieldWithAux, x: Tensor, t: Tensor, h: float, tableau: Tableau) -> tuple[Tensor, ...]:
    """One step from (x, t [B]) to t + h: (x_next, *aux weighted by h * b over the stages).

    The state stays in x's dtype (fp32 under bf16 autocast: velocities are upcast before the update)."""
    stages: list[Tensor] = []
    aux_sums: list[Tensor] = []
    for c, a_row, b in zip(tableau.nodes, tableau.coefficients, tableau.weights):
        x_stage = x
        for a, k in zip(a_row, stages):
            if a:
                x_stage = x_stage + (h * a) * k
        v, aux = field(x_stage, t + c * h)
        stages.append(v.to(x.dtype))
        for i, value in enumerate(aux):
            weighted = (h * b) * value
            if i < len(aux_sums):
                aux_sums[i] = aux_sums[i] + weighted
            else:
                aux_sums.append(weighted)
    update = sum((h * b) * k for b, k in zip(tableau.weights, stages))
    return (x + update, *aux_sums)


def _capturing_cuda_graph() -> bool:
    """During CUDA graph capture the RNG state cannot be read back to be restored for the
    recomputation; the capture is only allowed when a step draws no random numbers (see
    LGT.graph_capture_problem), so the recomputation is exact without it."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def integrate_with_aux(field: FieldWithAux, x0: Tensor, solver: str = "euler", steps: int = 4, *,
                       checkpoint: bool = False, t0: float = 0.0, t1: float = 1.0
                       ) -> tuple[Tensor, tuple[Tensor, ...]]:
    """Integrate from x0 at t0 to t1 in `steps` equal steps; returns (x1, integrals of aux)."""
    if steps < 1:
        raise ValueError(f"ODE steps must be >= 1, got {steps}")
    tableau = _tableau(solver)
    h = (t1 - t0) / steps
    x = x0
    totals: tuple[Tensor, ...] = ()
    for n in range(steps):
        t = torch.full((x0.shape[0],), t0 + n * h, device=x0.device, dtype=torch.float32)
        with phase(f"ode step {n + 1}/{steps}"):
            if checkpoint and torch.is_grad_enabled():
                out = checkpoint_step(rk_step, field, x, t, h, tableau, use_reentrant=False,
                                      preserve_rng_state=not _capturing_cuda_graph())
            else:
                out = rk_step(field, x, t, h, tableau)
        x, aux = out[0], out[1:]
        totals = aux if not totals else tuple(s + a for s, a in zip(totals, aux))
    return x, totals


def integrate(field: Field, x0: Tensor, solver: str = "euler", steps: int = 4, *,
              checkpoint: bool = False, t0: float = 0.0, t1: float = 1.0) -> Tensor:
    """x(t1) for dx/dt = field(x, t), x(t0) = x0 (see the module doc)."""
    x1, _ = integrate_with_aux(lambda x, t: (field(x, t), ()), x0, solver, steps,
                               checkpoint=checkpoint, t0=t0, t1=t1)
    return x1
