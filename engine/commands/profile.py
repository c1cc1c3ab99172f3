"""engine-profile: where the time of a training step goes.

    engine-profile CONFIG.toml [--section.key=value ...] [--steps 5] [--warmup 2] [--out profile]

Runs W + N steps of the configured run (prepared as engine-train prepares it) in a scratch run
directory under --out, never touching the real one, with the last N under torch.profiler (CPU
activity, and CUDA's when there is a GPU). Writes OUT/trace.json (open it in Perfetto or
chrome://tracing), prints the time per phase (the engine's named phases: data, forward, each ODE
step, each energy term, backward, optimizer, ema, ...) and the top operators, and the `nsys profile`
command that records the same window in Nsight Systems: the profiled steps are bracketed by
cudaProfilerStart/Stop, which `--capture-range=cudaProfilerApi` follows.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from engine.commands import at_least, run_command
from engine.config import Config, load_config, with_absolute_paths
from engine.distributed import World
from engine.prepare import prepare
from engine.train import setup, train_step

PROG = "engine-profile"
TOP_OPS = 15


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Profile W + N training steps of a config: a "
                                                            "Chrome/Perfetto trace, time per phase, top ops.")
    parser.add_argument("config", help="TOML config file, e.g. configs/lgt_cpu.toml")
    parser.add_argument("--steps", type=at_least(1), default=5, help="profiled steps (default 5)")
    parser.add_argument("--warmup", type=at_least(0), default=2, help="steps before profiling (default 2)")
    parser.add_argument("--out", default="profile", help="output folder: trace.json and a scratch run dir")
    return parser


def profiling_config(cfg: Config, out: Path, total_steps: int) -> Config:
    """The run's config pointed at a scratch run directory, with no periodic checkpoint, grid or
    evaluation inside the window."""
    scratch = cfg.copy()
    scratch.run.dir = str(out / "run")
    scratch.train.steps = total_steps
    scratch.checkpoint.every = total_steps + 1
    scratch.sample.every = 0
    scratch.log.tensorboard = False
    scratch.eval.at_end = False
    return scratch


PHASES = {"data", "compute", "forward", "backward", "optimizer", "ema", "transport", "style energy",
          "content energy", "checkpoint", "sample", "evaluation"}


def phase_table(profiler: torch.profiler.profile, steps: int, names: set[str]) -> list[tuple[str, float, float]]:
    """(phase, CPU ms per step, device ms per step) of the engine's named phases, slowest first."""
    rows = []
    for event in profiler.key_averages():
        if event.key in names or event.key.startswith("ode step "):
            device_us = getattr(event, "device_time_total", 0.0)
            rows.append((event.key, event.cpu_time_total / 1e3 / steps, device_us / 1e3 / steps))
    return sorted(rows, key=lambda row: -row[1])


def profile(cfg: Config, steps: int, warmup: int, out: Path, argv: list[str]) -> None:
    """Profile and report (see the module doc); `argv`: this command's arguments, for the nsys line."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "run", ignore_errors=True)  # the scratch run starts fresh every time
    cfg = profiling_config(prepare(cfg), out, warmup + steps)
    session = setup(cfg, World())
    cuda = session.device.type == "cuda"
    for _ in range(warmup):
        train_step(session)
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as profiler:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()  # cudaProfilerStart: where `nsys --capture-range=cudaProfilerApi` begins
        started = time.perf_counter()
        for _ in range(steps):
            train_step(session)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        seconds = time.perf_counter() - started
    if session.metrics is not None:
        session.metrics.close()
    trace = out / "trace.json"
    profiler.export_chrome_trace(str(trace))
    batch = cfg.train.batch_size * cfg.train.grad_accum
    print(f"{steps} steps after {warmup} warm-up on {session.device}: {seconds / steps * 1e3:.1f} ms per step "
          f"(under the profiler), {batch * steps / seconds:.1f} samples/s; trace: {trace}")
    print(f"\n{'phase':<20} {'CPU ms/step':>12} {'device ms/step':>15}")
    for name, cpu_ms, device_ms in phase_table(profiler, steps, PHASES):
        print(f"{name:<20} {cpu_ms:>12.2f} {device_ms:>15.2f}")
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print("\n" + profiler.key_averages().table(sort_by=sort_by, row_limit=TOP_OPS))
    command = ["nsys", "profile", "--capture-range=cudaProfilerApi", "--capture-range-end=stop",
               "--trace=cuda,nvtx,osrt", "-o", str(out / "nsys"), sys.executable, "-m", "engine.commands.profile",
               *argv]
    print("Nsight Systems, the same window:\n  " + shlex.join(command))


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)

    def body() -> None:
        cfg = with_absolute_paths(load_config(args.config, overrides))
        profile(cfg, args.steps, args.warmup, Path(args.out).resolve(), sys.argv[1:] if argv is None else argv)

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
