"""The training loop: setup -> steps -> finish, one function each, read top to bottom.

It owns nothing method-specific: a method (DDPM, autoencoder, LGT, ...) turns a batch into a loss
and a sample grid; the loop does the optimisation, precision, EMA, logging, sample grids,
checkpoints and resume. To resume, run the same command again. The config it trains must be
prepared (engine/prepare.py): built-in data a method cannot read directly is already a file.

Determinism: the global torch RNG is reseeded every step from (run.seed, rank, step) and the data
source draws batch n from (run.seed, rank, n), so a resumed run replays exactly the noise,
timesteps and batches of an uninterrupted one (bit-identical on CPU), as long as it has the same
number of processes (a resume with another number is refused).
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from engine import checkpoint as ckpt
from engine.autoencoders import lazy_autoencoder
from engine.config import Config, ConfigError, load_config
from engine.data.base import Batch, Stream, batch_seed
from engine.distributed import World, init_world, resolve_device, shutdown_world
from engine.ema import EMA
from engine.filelock import LockHeld, exclusive_lock
from engine.graphs import StepGraph, capture_problem
from engine.methods import Method, method_class
from engine.metrics import MetricsWriter
from engine.models.unet import describe_text_conditioning, text_conditioning_record
from engine.pictures import grid_for_tensorboard, save_grid
from engine.profiling import phase
from engine.safe_files import write_text_atomic
from engine.stages import stage


class NonFiniteLossError(RuntimeError):
    """Raised before the optimizer would apply a NaN/inf update."""


class ResumeError(ckpt.CheckpointError):
    """The run directory's checkpoint cannot be continued by this run as configured."""


class DataReadError(RuntimeError):
    """The data source failed mid-training (e.g. an image that cannot be decoded)."""


class RunDirectoryInUse(LockHeld):
    """Another process is training in this run directory."""


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
        self._pid = os.getpid()

    def _handle(self, signum, frame):
        if os.getpid() != self._pid:
            # A DataLoader worker (forked with this handler): Ctrl+C reaches the whole process group,
            # and the main process alone stops the run and speaks; the workers are shut down by it.
            return
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


# --------------------------------------------------------------------------- the training state


class TrainState:
    """Everything a resumed run continues from, besides the weights: the step, the data position,
    the optimizer, LR schedule, grad scaler, EMA, RNG and the number of processes."""

    def __init__(self, method: Method, ema: EMA | None, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler, world_size: int):
        self.method, self.ema = method, ema
        self.optimizer, self.scheduler, self.scaler = optimizer, scheduler, scaler
        self.world_size = world_size
        self.step = 0  # optimizer steps taken (skipped fp16 steps included)
        self.data_position = 0  # micro-batches drawn per rank

    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        return {"step": self.step, "data_position": self.data_position,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema_updates": self.ema.num_updates if self.ema else 0,
                "rng": rng, "world_size": self.world_size}

    def load_state_dict(self, state: dict, where: str) -> None:
        """Restore from a checkpoint's train state. A run of another number of processes would draw
        another batch stream (every rank draws its own), so it is refused."""
        if state["world_size"] != self.world_size:
            raise ResumeError(
                f"{where} was written by a run of {state['world_size']} process(es), but this run has "
                f"{self.world_size}: every rank draws its own batches, so another number of processes "
                f"would not continue the same run. Resume with {state['world_size']} process(es) "
                f"(torchrun --nproc_per_node={state['world_size']}, or plain engine-train for 1), or "
                f"train into a new run.dir")
        self.step, self.data_position = state["step"], state["data_position"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:  # empty when the checkpointed run did not use fp16
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.num_updates = state["ema_updates"]
        torch.set_rng_state(state["rng"]["torch"])

    def restore(self, checkpoint: ckpt.Checkpoint, cfg: Config) -> None:
        """Weights, EMA and train state from `checkpoint`, then the current config's optimizer settings."""
        saved, current = checkpoint.data_info().get("text"), text_conditioning_record(self.method)
        if saved != current:
            # A table of another text but the same shape would load without a shape error: the weights
            # would then condition on prompts they were never trained with.
            raise ckpt.CheckpointError(
                f"{checkpoint.path} was trained with the prompt table {_describe_text(saved)}, but this config "
                f"builds {_describe_text(current)}: resume with the [text] settings it was trained with, or "
                f"train into a new run.dir")
        checkpoint.load_into(self.method, ema=False)
        if self.ema is not None:
            checkpoint.load_into(self.ema.module, ema=True)  # its update count: below
        self.load_state_dict(checkpoint.train_state(), str(checkpoint.path))
        self.set_learning_rate(cfg)

    def optimizer_step(self, params: list[torch.Tensor], grad_clip: float, loss: torch.Tensor,
                       world: World) -> torch.Tensor:
        """Clip, check, step; returns the gradient norm. A non-finite loss (or, without fp16, gradient
        norm) raises NonFiniteLossError before anything is applied. When fp16's GradScaler skips a
        step (overflowed gradients) the LR schedule and the EMA do not advance either."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
        # CPU-GPU sync point: a non-finite update must never reach the weights. With fp16 the scaler
        # itself skips steps whose gradients overflowed, so only the loss is checked.
        finite = torch.isfinite(loss)
        if not self.scaler.is_enabled():
            finite = finite & torch.isfinite(grad_norm)
        if world.size > 1:  # one decision for all ranks, or the others hang in the next collective
            finite = finite.float()
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not bool(finite):
            raise NonFiniteLossError(f"step {self.step + 1}: loss = {loss.item()}, grad norm = {grad_norm.item()}; "
                                     f"the update was not applied")
        scale_before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if scale_before is None or self.scaler.get_scale() >= scale_before:  # else the scaler skipped it
            self.scheduler.step()
            self.update_ema()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return grad_norm

    def after_graph_step(self, found_inf: torch.Tensor) -> None:
        """What follows a captured step's replay, outside the graph: the LR schedule (filling the lr
        tensors in place) and the EMA, which takes the update the device skipped as a mask."""
        self.scheduler.step()
        self.update_ema(skipped=found_inf)
        self.step += 1

    def update_ema(self, skipped: torch.Tensor | None = None) -> None:
        if self.ema is not None:
            with phase("ema"):
                self.ema.update(self.method, skipped)

    def set_learning_rate(self, cfg: Config) -> None:
        """The current config's lr, betas and weight decay (a resumed run follows them: the
        checkpoint's param groups would silently keep the old ones); lr tensors are filled in place."""
        factor = lr_lambda(cfg)(self.scheduler.last_epoch)
        self.scheduler.base_lrs = [cfg.train.lr for _ in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(cfg.train.lr * factor)
            else:
                group["lr"] = cfg.train.lr * factor
            group.update(initial_lr=cfg.train.lr, betas=tuple(cfg.train.betas), weight_decay=cfg.train.weight_decay)


# --------------------------------------------------------------------------- timing


class PhaseTimer:
    """Wall seconds per phase (data, compute, checkpoint, sample) since the last log line."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.steps = 0

    @contextmanager
    def timed(self, name: str):
        start = time.perf_counter()
        with phase(name):
            yield
        self.seconds[name] += time.perf_counter() - start

    def take(self) -> dict[str, float]:
        """The interval's figures, then a fresh interval: per-step means of the step's own work, and
        the total time spent writing checkpoints and sample grids."""
        steps = max(1, self.steps)
        data, compute = self.seconds["data"], self.seconds["compute"]
        figures = {"sec_per_step": (data + compute) / steps, "sec_data": data / steps,
                   "sec_compute": compute / steps, "sec_checkpoint": self.seconds["checkpoint"],
                   "sec_sample": self.seconds["sample"]}
        self.seconds.clear()
        self.steps = 0
        return figures


# --------------------------------------------------------------------------- setup, steps, finish


@dataclass
class Session:
    """What setup builds and the steps use."""

    cfg: Config
    world: World
    device: torch.device
    run_dir: Path
    data: object  # the DataSource
    state: TrainState
    model: torch.nn.Module  # the method, wrapped by DDP when there is more than one process
    params: list[torch.Tensor]
    dtype: torch.dtype
    batches: Iterator[Batch]
    grid_batch: Batch | None
    metrics: MetricsWriter | None
    timer: PhaseTimer
    graph: StepGraph | None  # the captured step, when train.cuda_graphs is on and the run allows it

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def train(cfg: Config, should_stop: Callable[[int], bool] | None = None, *,
          distributed: bool = True) -> TrainResult:
    """Train (or resume) the run described by a prepared `cfg`.

    `should_stop(step)` is checked after every optimizer step, like Ctrl+C: when it returns True
    the loop saves a checkpoint and returns. `distributed=False` trains in this process alone even
    under torchrun (a helper run nested in another, e.g. the built-in autoencoder)."""
    world = World()
    if distributed:
        world = init_world("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    try:
        with ExitStack() as held:
            if world.is_main:  # the one process that writes into the run directory
                held.enter_context(run_directory_lock(Path(cfg.run.dir)))
            session = setup(cfg, world)
            start_step = session.state.step
            with stage("training", f"steps {start_step} -> {cfg.train.steps}"):
                stopped_early = run_steps(session, should_stop or (lambda step: False))
            finish(session, evaluate=not stopped_early and session.state.step > start_step)
            return TrainResult(step=session.state.step, run_dir=session.run_dir, stopped_early=stopped_early)
    finally:
        shutdown_world(world)


@contextmanager
def run_directory_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir/.lock` for the run's lifetime: two processes training into one directory would
    delete each other's temporary checkpoints and interleave their metrics. The lock dies with its
    process (kill -9 included), so a stale lock file never blocks the next run; the file records the
    holder's PID for the message the second process prints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / ".lock"
    try:
        with exclusive_lock(lock, blocking=False) as fd:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            yield
    except LockHeld:
        try:
            holder = lock.read_text().strip() or "unknown"
        except OSError:
            holder = "unknown"
        raise RunDirectoryInUse(f"{run_dir} is in use by another training process (pid {holder}): wait for it "
                                f"to finish or stop it, or set run.dir to another directory") from None


def setup(cfg: Config, world: World) -> Session:
    """Data, method, EMA, optimizer and state (resumed when the run directory has a checkpoint)."""
    device = resolve_device(cfg.train.device, world.local_rank, option="train.device")
    run_dir = Path(cfg.run.dir)
    resume_from = ckpt.latest_checkpoint(run_dir / "checkpoints")  # before any work: a damaged run dir fails fast
    method_cls = method_class(cfg.method.name)
    data = method_cls.training_data(cfg, world.rank, world.size, device)
    # Seeded right before the weights are made, the same on every rank.
    torch.manual_seed(batch_seed(cfg.run.seed, 0, 0, Stream.INIT))
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    method = method_cls.from_config(cfg, data).to(device, memory_format=memory_format)
    if method_cls.trains_on_latents(cfg):  # decodes latents for the sample grids, on this rank's device
        method.attach_autoencoder(lazy_autoencoder(cfg.data.autoencoder, device))
    text = describe_text_conditioning(method)
    if text and world.is_main:
        tqdm.write(text)
    ema = EMA(method, cfg.train.ema_decay, cfg.train.ema_warmup) if cfg.train.ema_decay > 0 else None

    params = [p for p in method.parameters() if p.requires_grad]
    graph_problem = capture_problem(cfg, method_cls, device, world.size) if cfg.train.cuda_graphs else None
    capture = bool(cfg.train.cuda_graphs) and graph_problem is None
    # Fused AdamW on every device: one kernel for all parameters (and on the CPU the fastest one);
    # capturable (lr and step on the device) when the step is captured in a CUDA graph.
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                                  weight_decay=cfg.train.weight_decay, fused=True, capturable=capture)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    dtype = autocast_dtype(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    state = TrainState(method, ema, optimizer, scheduler, scaler, world.size)
    if resume_from is not None:
        state.restore(resume_from, cfg)
        if world.is_main:
            tqdm.write(f"resuming from {resume_from.path} (step {state.step})")
    if world.is_main:
        _write_run_config(run_dir, cfg)
    model = method
    if world.size > 1:
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None)
    compile_problem = method_cls.compile_problem(cfg, device) if cfg.train.compile else None
    if compile_problem is not None and world.is_main:
        tqdm.write(f"train.compile = {cfg.train.compile!r}: eager steps, because {compile_problem}")
    if cfg.train.compile and compile_problem is None:
        model = compiled(model, ema, cfg.train.compile)
    graph = None
    if cfg.train.cuda_graphs and world.is_main and graph_problem is not None:
        tqdm.write(f"train.cuda_graphs = {cfg.train.cuda_graphs!r}: eager steps, because {graph_problem}")
    if capture:
        example = Batch(torch.zeros(cfg.train.batch_size, *data.sample_shape, device=device),
                        torch.zeros(cfg.train.batch_size, dtype=torch.long, device=device))
        graph = StepGraph(model, params, optimizer, example, cfg.train.grad_clip, dtype)
    grid_batch = next(iter(data.batches(0, cfg.sample.num))).to(device) if cfg.sample.every else None
    return Session(cfg=cfg, world=world, device=device, run_dir=run_dir, data=data, state=state, model=model,
                   params=params, dtype=dtype, batches=data.batches(state.data_position, cfg.train.batch_size),
                   grid_batch=grid_batch,
                   metrics=MetricsWriter(run_dir, state.step, cfg.log.tensorboard) if world.is_main else None,
                   timer=PhaseTimer(), graph=graph)


def compiled(model: torch.nn.Module, ema: EMA | None, setting: bool | str) -> torch.nn.Module:
    """torch.compile of the training loss (`model`, wrapped) and, in place so that checkpoint keys do
    not change, of the networks the EMA copy samples with (its sample grids and evaluation)."""
    mode = "max-autotune" if setting == "max-autotune" else None
    if ema is not None:
        for network in ema.module.children():
            if any(True for _ in network.parameters()):  # networks, not buffer holders like a noise schedule
                network.compile(mode=mode)
    return torch.compile(model, mode=mode)


def run_steps(s: Session, should_stop: Callable[[int], bool]) -> bool:
    """Optimizer steps up to train.steps, with logs, checkpoints and grids; True when stopped early."""
    cfg, state = s.cfg, s.state
    progress = tqdm(total=cfg.train.steps, initial=state.step, unit="step", dynamic_ncols=True,
                    disable=not s.world.is_main, desc=s.run_dir.name)
    last_saved = state.step
    with StopRequest() as stop:
        while state.step < cfg.train.steps:
            try:
                terms, grad_norm = train_step(s)
            except DataReadError as err:
                raise DataReadError(f"{err.__cause__}. {_save_before_stopping(s, last_saved)}") from err.__cause__
            progress.update(1)
            logging = state.step % cfg.log.every == 0 or state.step == cfg.train.steps
            stop_now = _agree(stop.requested or should_stop(state.step), s)
            saving = state.step % cfg.checkpoint.every == 0 or stop_now or state.step == cfg.train.steps
            if s.graph is not None and (logging or saving):
                _check_graph_steps(s, last_saved)
            if s.metrics is not None and logging:
                _log(s, terms, grad_norm, progress)
            if saving:
                save_checkpoint(s)
                last_saved = state.step
            # After the checkpoint: a failing picture must never cost the step's checkpoint.
            if s.grid_batch is not None and s.world.is_main and state.step % cfg.sample.every == 0:
                with s.timer.timed("sample"):
                    _save_sample_grid(s)
            if stop_now:
                break
    progress.close()
    if last_saved != state.step:
        save_checkpoint(s)
    return state.step < cfg.train.steps


def train_step(s: Session) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One optimizer step over train.grad_accum micro-batches: (loss terms averaged over them, grad norm)."""
    cfg, state = s.cfg, s.state
    torch.manual_seed(batch_seed(cfg.run.seed, s.world.rank, state.step, Stream.STEP))
    state.method.train()
    accum = cfg.train.grad_accum
    terms: dict[str, torch.Tensor] = {}
    step_start_position = state.data_position
    if s.graph is not None:
        with s.timer.timed("data"):
            batch = _next_batch(s, step_start_position)
        with s.timer.timed("compute"):
            terms, grad_norm, found_inf = s.graph.replay(batch)
            state.after_graph_step(found_inf)
        s.timer.steps += 1
        return terms, grad_norm
    for micro in range(accum):
        with s.timer.timed("data"):
            batch = _next_batch(s, step_start_position)
        with s.timer.timed("compute"):
            # DDP all-reduces gradients only on the last micro-batch of the step.
            sync = nullcontext() if (s.world.size == 1 or micro == accum - 1) else s.model.no_sync()
            with sync:
                with phase("forward"), torch.autocast(s.device.type, dtype=s.dtype,
                                                           enabled=s.dtype != torch.float32):
                    out = s.model(batch)
                with phase("backward"):
                    state.scaler.scale(out.loss / accum).backward()
            for key, value in {"loss": out.loss, **out.terms}.items():
                terms[key] = terms.get(key, 0) + value.detach().float() / accum
    with s.timer.timed("compute"), phase("optimizer"):
        try:
            grad_norm = state.optimizer_step(s.params, cfg.train.grad_clip, terms["loss"], s.world)
        except NonFiniteLossError as err:
            raise NonFiniteLossError(f"{err}. {_last_checkpoint_note(s)}: lower train.lr, enable "
                                     f"train.grad_clip, or use train.precision = 'fp32'") from None
    s.timer.steps += 1
    return terms, grad_norm


def finish(s: Session, evaluate: bool) -> None:
    """The end-of-training evaluation (rank 0; not after an early stop or a rerun of a finished run)."""
    if evaluate and s.world.is_main and s.cfg.eval.at_end:
        method = s.state.ema.module if s.state.ema else s.state.method
        method.eval()
        with phase("evaluation"), stage("evaluation", f"{s.cfg.eval.per_class} per class"):
            results = method.evaluate(s.data, s.cfg.eval.per_class)
        if results:
            if hasattr(method, "format_evaluation"):  # a method's own layout (LGT: tables and a verdict)
                text = method.format_evaluation(results)
            else:
                width = max(len(k) for k in results)
                text = "\n".join(f"  {k:<{width}}  {v:.5g}" for k, v in results.items())
            tqdm.write("evaluation:\n" + text)
            if s.metrics is not None:
                s.metrics.scalars(s.state.step, {f"eval/{k}": v for k, v in results.items()})
    if s.metrics is not None:
        s.metrics.close()


# --------------------------------------------------------------------------- the pieces of a step


def _next_batch(s: Session, step_start_position: int) -> Batch:
    """The next micro-batch on the device; DataReadError (with the data position back at the start
    of the step, which then never happened) when the source cannot read it."""
    try:
        batch = next(s.batches)
    except (ValueError, OSError) as err:  # an unreadable or vanished file
        s.state.data_position = step_start_position
        raise DataReadError() from err
    s.state.data_position += 1
    batch = batch.to(s.device)
    if s.cfg.train.channels_last:
        batch = Batch(batch.x.contiguous(memory_format=torch.channels_last), batch.labels)
    return batch


def _check_graph_steps(s: Session, last_saved: int) -> None:
    """Captured steps skip non-finite updates on the device; here, at a log line or checkpoint (a
    sync point anyway), the host learns of them and stops without saving."""
    skipped = s.graph.take_skipped()
    if skipped:
        raise NonFiniteLossError(
            f"{skipped} step(s) between step {last_saved + 1} and step {s.state.step} had a non-finite loss or "
            f"gradient norm; the device skipped their updates and nothing after step {last_saved} is saved. "
            f"{_last_checkpoint_note(s)}: lower train.lr, enable train.grad_clip, or use train.precision = "
            f"'fp32'")


def save_checkpoint(s: Session) -> None:
    with s.timer.timed("checkpoint"):
        state = s.state
        # One sync per checkpoint: an update can make weights non-finite with a finite loss and
        # gradient (a huge step); such weights must never become a checkpoint that verifies.
        finite = torch.stack([torch.isfinite(p).all() for p in state.method.parameters()]).all()
        if not bool(finite):
            bad = next(name for name, p in state.method.named_parameters() if not torch.isfinite(p).all())
            raise NonFiniteLossError(f"step {state.step}: the update made the weights non-finite ({bad}); they "
                                     f"were not saved. {_last_checkpoint_note(s)}: lower train.lr, enable "
                                     f"train.grad_clip, or use train.precision = 'fp32'")
        if s.world.is_main:
            ckpt.save_checkpoint(
                s.checkpoint_dir, state.step, model_state=state.method.state_dict(),
                ema_state=state.ema.state_dict() if state.ema else None, train_state=state.state_dict(),
                config=s.cfg, data_info=_data_info(s),
                keep=s.cfg.checkpoint.keep)
        s.world.barrier()


def _describe_text(record: dict | None) -> str:
    if record is None:
        return "none (class conditioning)"
    return f"{record['shape']} of prompts {record['prompts']} by {record['encoder']}"


def _data_info(s: Session) -> dict:
    """What a checkpoint records of the data (and prompt table) to rebuild the method without them."""
    info = {"sample_shape": list(s.data.sample_shape), "class_names": list(s.data.class_names)}
    text = text_conditioning_record(s.state.method)
    if text is not None:
        info["text"] = text
    return info


def _log(s: Session, terms: dict[str, torch.Tensor], grad_norm: torch.Tensor, progress: tqdm) -> None:
    values = {key: value.item() for key, value in terms.items()}
    values.update(lr=s.state.scheduler.get_last_lr()[0], grad_norm=grad_norm.item(), **s.timer.take())
    s.metrics.scalars(s.state.step, values)
    progress.set_postfix(loss=f"{values['loss']:.4g}", refresh=False)


def _agree(stop: bool, s: Session) -> bool:
    """Every rank must stop at the same step: true when any rank asks."""
    if s.world.size == 1:
        return stop
    flag = torch.tensor(float(stop), device=s.device)
    torch.distributed.all_reduce(flag)
    return bool(flag.item() > 0)


def _save_before_stopping(s: Session, last_saved: int) -> str:
    """Save the last completed step before a data error stops the run (one process only: with
    several, the others are inside a collective that a checkpoint's barrier would deadlock)."""
    if s.world.size == 1 and s.state.step != last_saved:
        save_checkpoint(s)
    return (f"{_last_checkpoint_note(s)}; fix or remove the file, then rerun the same command "
            f"(removing a file changes the data, so the order of the remaining epochs changes)")


def _last_checkpoint_note(s: Session) -> str:
    found, _ = ckpt.find_checkpoints(s.checkpoint_dir)
    if found is None:
        return "No checkpoint was written yet, so a rerun starts over"
    return f"The last checkpoint, {found.path} (step {found.step}), is intact and a rerun resumes from it"


def _write_run_config(run_dir: Path, cfg: Config) -> None:
    """Keep the resolved config as run_dir/config.toml; say which keys a rerun changed."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.toml"
    if path.exists():
        try:
            previous = load_config(path).to_dict()
        except ConfigError as err:
            tqdm.write(f"the previous {path} cannot be compared with this config ({err}); replacing it")
            previous = cfg.to_dict()
        changed = [f"{section}.{key}: {previous.get(section, {}).get(key)!r} -> {value!r}"
                   for section, values in cfg.to_dict().items()
                   for key, value in values.items() if previous.get(section, {}).get(key) != value]
        if changed:
            tqdm.write("config changed since the last run of this directory:\n  " + "\n  ".join(changed))
    write_text_atomic(path, cfg.to_toml())


@torch.no_grad()
def _save_sample_grid(s: Session) -> None:
    method = s.state.ema.module if s.state.ema else s.state.method
    method.eval()
    step = s.state.step
    generator = torch.Generator(s.grid_batch.x.device).manual_seed(batch_seed(s.cfg.run.seed, 0, 0, Stream.GRID))
    try:
        images, nrow = method.sample_grid(s.grid_batch, generator)
        save_grid(images, s.run_dir / "samples" / f"step-{step:07d}.png", nrow)
    except (ValueError, RuntimeError, OSError) as err:
        tqdm.write(f"warning: no sample grid at step {step}: {err}; training goes on", file=sys.stderr)
        return
    if s.metrics is not None:
        s.metrics.image("samples", grid_for_tensorboard(images, nrow), step)
