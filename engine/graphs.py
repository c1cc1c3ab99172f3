"""Whole-step CUDA graphs: forward + backward + optimizer of one training step captured once and
replayed every step, so the ~10^4 small kernels of a step launch as one graph.

What makes a step capturable (and what this module sets up):
- static inputs: one micro-batch's x and labels live in fixed buffers; each step copies its batch
  in, wherever it came from, then replays;
- a capturable optimizer: fused AdamW with capturable=True and the learning rate as a device
  tensor, which the LR schedule fills in place (a Python float would be baked into the graph);
- graph-safe RNG: the default CUDA generator is registered with the graph, which reads its seed and
  offset at each replay, so the per-step `torch.manual_seed` before a replay makes it draw exactly
  the numbers an eager step would;
- warm-up on a side stream before capture (lazy initialisations, cuDNN/cuBLAS plans), with every
  update skipped so that warm-up changes no weight and no optimizer state.

The non-finite guard without a host sync. Inside the graph, `found_inf = !isfinite(loss) |
!isfinite(grad norm)` is handed to the fused AdamW, which skips the update on the device: a
non-finite update never reaches the weights, as in eager mode; the EMA takes the same mask. What
cannot happen without a sync is stopping at that very step: the count of skipped steps stays on
the device and the host reads it at the next log line or checkpoint (already sync points) and
stops there, saving nothing. The trade-off: up to log.every steps of compute are lost and the LR
schedule has run on, against a host sync in every step; the last checkpoint is intact and a rerun
resumes from it.

Configurations that cannot be captured fall back to eager steps with one message
(`capture_problem`).
"""

from __future__ import annotations

import math

import torch

from engine.data.base import Batch
from engine.profiling import phase

WARMUP_ITERATIONS = 3


def capture_problem(cfg, method_cls, device: torch.device, world_size: int) -> str | None:
    """Why a step of this run cannot be captured as a CUDA graph, or None when it can."""
    if device.type != "cuda":
        return "CUDA graphs need a CUDA device (train.device)"
    if world_size > 1:
        return "CUDA graphs are not combined with DDP (torchrun) here"
    if cfg.train.grad_accum > 1:
        return "train.grad_accum > 1 (one captured step takes one micro-batch)"
    if cfg.train.precision == "fp16":
        return "fp16's grad scaler adjusts its scale on the host; use bf16"
    if getattr(getattr(cfg, "model", None), "checkpoint", False):
        return "model.checkpoint = true (per-block recomputation saves and restores the RNG state)"
    return method_cls.graph_capture_problem(cfg)


def graph_step(model: torch.nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
               batch: Batch, grad_clip: float, dtype: torch.dtype, skip: torch.Tensor
               ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One step with no host synchronisation: (loss terms, grad norm, found_inf as 0/1 float).
    The update is skipped on the device when found_inf (or `skip`, a 0/1 tensor) is set.
    Gradients must be None on entry (the backward then writes them rather than accumulating)."""
    device_type = batch.x.device.type
    with phase("forward"), torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
        out = model(batch)
    with phase("backward"):
        out.loss.backward()
    with phase("optimizer"):
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        bad = ~torch.isfinite(out.loss.detach().float()) | ~torch.isfinite(grad_norm)
        found_inf = torch.maximum(bad.float(), skip)
        optimizer.grad_scale, optimizer.found_inf = None, found_inf
        optimizer.step()
        optimizer.grad_scale = optimizer.found_inf = None
    terms = {"loss": out.loss.detach().float(), **{k: v.detach().float() for k, v in out.terms.items()}}
    return terms, grad_norm, found_inf


def learning_rates_as_tensors(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make every param group's lr a device tensor (filled in place by the LR schedule) and the
    optimizer capturable."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["capturable"] = True


class StepGraph:
    """A training step captured on `model` for micro-batches shaped like `example`."""

    def __init__(self, model: torch.nn.Module, params: list[torch.Tensor], optimizer: torch.optim.Optimizer,
                 example: Batch, grad_clip: float, dtype: torch.dtype):
        device = example.x.device
        learning_rates_as_tensors(optimizer, device)
        self.static = Batch(torch.zeros_like(example.x), torch.zeros_like(example.labels))
        self._skip = torch.ones((), device=device)  # 1 during warm-up and capture: no update lands
        run = lambda: graph_step(model, params, optimizer, self.static, grad_clip, dtype, self._skip)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_ITERATIONS):
                optimizer.zero_grad(set_to_none=True)
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        optimizer.zero_grad(set_to_none=True)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.terms, self.grad_norm, self.found_inf = run()
        self._skip.zero_()  # from now on only non-finite steps are skipped
        self.skipped = torch.zeros((), device=device)  # non-finite steps since the last check

    def replay(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Run the step on `batch`: (loss terms, grad norm, found_inf), static tensors the next
        replay overwrites (copy what must outlive it)."""
        self.static.x.copy_(batch.x, non_blocking=True)
        self.static.labels.copy_(batch.labels, non_blocking=True)
        self.graph.replay()
        self.skipped += self.found_inf
        return self.terms, self.grad_norm, self.found_inf

    def take_skipped(self) -> int:
        """Non-finite steps since the last call (a host sync: call it where one happens anyway)."""
        count = int(self.skipped.item())
        self.skipped.zero_()
        return count
