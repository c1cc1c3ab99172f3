"""The training loop: one function a newcomer can read top to bottom.

It owns nothing method-specific: a method (DDPM, autoencoder, LGT, ...) turns a batch into a loss
and a sample grid; the loop does the optimisation, precision, EMA, logging, sample grids,
checkpoints and resume. To resume, run the same command again.

Determinism: the global torch RNG is reseeded every step from (run.seed, rank, step) and the data
source draws batch n from (run.seed, rank, n), so a resumed run replays exactly the noise,
timesteps and batches of an uninterrupted one (bit-identical on CPU).
"""

from __future__ import annotations

import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.config import Config, load_config
from engine.data.base import Batch, batch_seed
from engine.distributed import World, init_world, resolve_device, shutdown_world
from engine.ema import EMA
from engine.methods import build_method, method_class
from engine.metrics import MetricsWriter
from engine.pictures import grid_for_tensorboard, save_grid
from engine.profiling import nvtx_range

# Independent random streams derived from run.seed (the data source uses stream 0).
STEP_STREAM, INIT_STREAM, GRID_STREAM = 1, 2, 3


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer would apply a NaN/inf update."""


class RunInterrupted(Exception):
    """A run nested inside another (e.g. the built-in autoencoder) was stopped by Ctrl+C/SIGTERM;
    its checkpoint is saved and rerunning the same command resumes it."""


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    run_dir: Path
    stopped_early: bool  # Ctrl+C / SIGTERM / should_stop ended the run before train.steps


class StopRequest:
    """Ctrl+C / SIGTERM ask the loop to finish the current step, save a checkpoint and exit.
    A second Ctrl+C aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                   f"(press Ctrl+C again to abort without saving)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_lambda(cfg: Config) -> Callable[[int], float]:
    """Linear warm-up to the peak LR, then cosine decay to lr * min_lr_ratio at train.steps."""
    warmup, total, floor = cfg.train.warmup_steps, cfg.train.steps, cfg.train.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def train(cfg: Config, should_stop: Callable[[int], bool] | None = None, *,
          distributed: bool = True) -> TrainResult:
    """Train (or resume) the run described by `cfg`.

    `should_stop(step)` is checked after every optimizer step, like Ctrl+C: when it returns True
    the loop saves a checkpoint and returns. `distributed=False` trains in this process alone even
    under torchrun (a helper run nested in another, e.g. the built-in autoencoder LGT prepares)."""
    if not distributed:
        return _train(cfg, World(), should_stop or (lambda step: False))
    world = init_world("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        return _train(cfg, world, should_stop or (lambda step: False))
    finally:
        shutdown_world(world)


def _train(cfg: Config, world: World, should_stop: Callable[[int], bool]) -> TrainResult:
    device = resolve_device(cfg.train.device, world.local_rank, option="train.device")
    run_dir = Path(cfg.run.dir)
    checkpoint_dir = run_dir / "checkpoints"
    resume_from = ckpt.latest_checkpoint(checkpoint_dir)  # before any work: a damaged run dir fails fast

    data = method_class(cfg.method.name).training_data(cfg, world, device)
    # Seeded right before the weights are made (the same on every rank): preparing data, e.g.
    # training the built-in autoencoder, draws random numbers and must not change them.
    torch.manual_seed(batch_seed(cfg.run.seed, 0, 0, INIT_STREAM))
    method = build_method(cfg, data).to(device)
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    method = method.to(memory_format=memory_format)
    ema = EMA(method, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay > 0 else None

    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    dtype = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    step, micro_batches_done = 0, 0
    if resume_from is not None:
        step, micro_batches_done = _restore(resume_from, method, ema, optimizer, scheduler, scaler)
        _apply_optimizer_settings(cfg, optimizer, scheduler)
        if world.is_main:
            tqdm.write(f"resuming from {resume_from.path} (step {step})")
    if world.is_main:
        _write_run_config(run_dir, cfg)
    metrics = MetricsWriter(run_dir, step, cfg.log.tensorboard) if world.is_main else None

    model = method
    if world.size > 1:
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    accum = cfg.train.grad_accum
    batches = data.batches(micro_batches_done, cfg.train.batch_size)
    grid_batch = next(iter(data.batches(0, cfg.sample.num))).to(device) if cfg.sample.every else None
    data_info = {"sample_shape": list(data.sample_shape), "class_names": list(data.class_names)}

    def save(at_step: int) -> None:
        with nvtx_range("checkpoint"):
            if world.is_main:
                ckpt.save_checkpoint(
                    checkpoint_dir, at_step, model_state=method.state_dict(),
                    ema_state=ema.state_dict() if ema else None,
                    train_state={"step": at_step, "data_position": micro_batches_done,
                                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "scaler": scaler.state_dict(), "ema_updates": ema.num_updates if ema else 0,
                                 "rng": _rng_state(), "world_size": world.size},
                    config=cfg, data_info=data_info, keep=cfg.checkpoint.keep)
            world.barrier()

    progress = tqdm(total=cfg.train.steps, initial=step, unit="step", dynamic_ncols=True,
                    disable=not world.is_main, desc=Path(cfg.run.dir).name)
    stopped_early = False
    start_step = last_saved = step
    timer = time.perf_counter()
    with StopRequest() as stop:
        while step < cfg.train.steps:
            torch.manual_seed(batch_seed(cfg.run.seed, world.rank, step, STEP_STREAM))
            method.train()
            term_sums: dict[str, torch.Tensor] = {}
            for micro in range(accum):
                with nvtx_range("data"):
                    batch = next(batches).to(device)
                    if cfg.train.channels_last:
                        batch = Batch(batch.x.contiguous(memory_format=torch.channels_last), batch.labels)
                    micro_batches_done += 1
                # DDP all-reduces gradients only on the last micro-batch of the step.
                sync = nullcontext() if (world.size == 1 or micro == accum - 1) else model.no_sync()
                with sync:
                    with nvtx_range("forward"), torch.autocast(device.type, dtype=dtype,
                                                               enabled=dtype != torch.float32):
                        out = model(batch)
                    with nvtx_range("backward"):
                        scaler.scale(out.loss / accum).backward()
                for key, value in {"loss": out.loss, **out.terms}.items():
                    term_sums[key] = term_sums.get(key, 0) + value.detach().float() / accum

            with nvtx_range("optimizer"):
                scaler.unscale_(optimizer)
                max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
                # CPU-GPU sync point: a non-finite update must never reach the weights. With fp16 the
                # scaler itself skips steps whose gradients overflowed, so only the loss is checked.
                finite = torch.isfinite(term_sums["loss"])
                if scaler.is_enabled() is False:
                    finite = finite & torch.isfinite(grad_norm)
                if world.size > 1:  # one decision for all ranks, or the others hang in the next collective
                    finite = finite.float()
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if not bool(finite):
                    raise NonFiniteLossError(
                        f"step {step + 1}: loss = {term_sums['loss'].item()}, grad norm = {grad_norm.item()}; "
                        f"the update was not applied. The last checkpoint in {checkpoint_dir} is intact: "
                        f"lower train.lr, enable train.grad_clip, or use train.precision = 'fp32'")
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                with nvtx_range("ema"):
                    ema.update(method)
            step += 1
            progress.update(1)

            if metrics is not None and (step % cfg.log.every == 0 or step == cfg.train.steps):
                elapsed, timer = time.perf_counter() - timer, time.perf_counter()
                values = {key: value.item() for key, value in term_sums.items()}
                values.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm.item(),
                              sec_per_step=elapsed / cfg.log.every)
                metrics.scalars(step, values)
                progress.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)
            stop_now = stop.requested or should_stop(step)
            if world.size > 1:  # every rank must agree to stop at the same step
                flag = torch.tensor(float(stop_now), device=device)
                torch.distributed.all_reduce(flag)
                stop_now = bool(flag.item() > 0)
            if step % cfg.checkpoint.every == 0 or stop_now or step == cfg.train.steps:
                save(step)
                last_saved = step
            # After the checkpoint: a failing picture must never cost the step's checkpoint.
            if grid_batch is not None and world.is_main and step % cfg.sample.every == 0:
                _save_sample_grid(ema.module if ema else method, grid_batch, cfg, run_dir, step, metrics)
            if stop_now:
                stopped_early = step < cfg.train.steps
                break
    progress.close()
    if last_saved != step:
        save(step)
    if world.is_main and not stopped_early and step > start_step:  # a rerun of a finished run does nothing
        _report_evaluation(ema.module if ema else method, data, step, metrics)
    if metrics is not None:
        metrics.close()
    return TrainResult(step=step, run_dir=run_dir, stopped_early=stopped_early)


def _restore(checkpoint: ckpt.Checkpoint, method, ema, optimizer, scheduler, scaler) -> tuple[int, int]:
    state = checkpoint.train_state()
    method.load_state_dict(checkpoint.model_state(ema=False))
    if ema is not None:
        ema.load_state_dict(checkpoint.model_state(ema=True), state["ema_updates"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler.is_enabled() and state["scaler"]:  # empty when the checkpointed run did not use fp16
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    return state["step"], state["data_position"]


def _apply_optimizer_settings(cfg: Config, optimizer, scheduler) -> None:
    """A resumed run follows the current config's lr, betas and weight decay: the checkpoint's
    param groups (and the scheduler's base LRs) would silently keep the old ones."""
    factor = lr_lambda(cfg)(scheduler.last_epoch)
    scheduler.base_lrs = [cfg.train.lr for _ in optimizer.param_groups]
    for group in optimizer.param_groups:
        group.update(lr=cfg.train.lr * factor, initial_lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                     weight_decay=cfg.train.weight_decay)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _write_run_config(run_dir: Path, cfg: Config) -> None:
    """Keep the resolved config as run_dir/config.toml; say which keys a rerun changed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.toml"
    if path.exists():
        previous = load_config(path).to_dict()
        changed = [f"{section}.{key}: {previous[section][key]!r} -> {value!r}"
                   for section, values in cfg.to_dict().items()
                   for key, value in values.items() if previous[section][key] != value]
        if changed:
            tqdm.write("config changed since the last run of this directory:\n  " + "\n  ".join(changed))
    tmp = path.with_suffix(".toml.tmp")
    tmp.write_text(cfg.to_toml())
    tmp.replace(path)


@torch.no_grad()
def _save_sample_grid(method, grid_batch: Batch, cfg: Config, run_dir: Path, step: int,
                      metrics: MetricsWriter | None) -> None:
    with nvtx_range("sample"):
        method.eval()
        generator = torch.Generator(grid_batch.x.device).manual_seed(
            batch_seed(cfg.run.seed, 0, 0, GRID_STREAM))
        try:
            images, nrow = method.sample_grid(grid_batch, generator)
            save_grid(images, run_dir / "samples" / f"step-{step:07d}.png", nrow)
        except (ValueError, RuntimeError, OSError) as err:
            tqdm.write(f"warning: no sample grid at step {step}: {err}; training goes on", file=sys.stderr)
            return
        if metrics is not None:
            metrics.image("samples", grid_for_tensorboard(images, nrow), step)


def _report_evaluation(method, data, step: int, metrics: MetricsWriter | None) -> None:
    method.eval()
    results = method.evaluate(data)
    if not results:
        return
    width = max(len(k) for k in results)
    tqdm.write("evaluation:\n" + "\n".join(f"  {k:<{width}}  {v:.5g}" for k, v in results.items()))
    if metrics is not None:
        metrics.scalars(step, {f"eval/{k}": v for k, v in results.items()})
