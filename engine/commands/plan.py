"""engine-plan: will a config fit a GPU, and how fast can its step be? No GPU needed.

    engine-plan CONFIG.toml [--section.key=value ...] [--budget 8GiB] [--batch-sizes 16,48,128]
                [--gpu rtx4070-laptop|rtx4090|a100|h100] [--json] [--kernels]

Runs the configured method's training step and sample grid by the engine's own code on fake
tensors, choosing the CUDA code paths (engine/plan/), and prints peak memory (allocated, reserved,
on the device, by category and phase), FLOPs, bytes moved, kernel launches and the roofline floor
on the GPU's datasheet rates, whether it fits the budget, the largest batch that leaves 1 GiB free
and, over budget, the levers that bring it under. No data is read (a latents file's header at
most) and nothing is prepared. --kernels also compiles every Triton kernel the step launches for
sm_89 and sm_90 and reports registers, spills and shared memory (exit 1 when one exceeds its
target's shared memory). Also `engine-train CONFIG.toml --plan`.
"""

from __future__ import annotations

import argparse
import json
import sys

from engine.commands import UsageError, run_command
from engine.config import Config, load_config
from engine.plan import GPUS, gpu, make_plan, parse_bytes
from engine.plan.gpus import DEFAULT_GPU
from engine.plan.report import plan_json, plan_text

PROG = "engine-plan"


def batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated batch sizes such as 16,48,128, got {text!r}") \
            from None
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be >= 1, got {text!r}")
    return sizes


def byte_size(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gpu", choices=tuple(GPUS), default=DEFAULT_GPU,
                        help=f"GPU whose rates and memory the plan uses (default {DEFAULT_GPU})")
    parser.add_argument("--budget", type=byte_size, help="memory budget, e.g. 8GiB (default: the GPU's memory)")
    parser.add_argument("--batch-sizes", type=batch_sizes, default=[],
                        help="more batch sizes to plan besides the config's, e.g. 16,48,128")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Predict peak GPU memory, FLOPs, bytes moved and "
                                                            "the step-time floor of a config, without a GPU.",
                                     epilog="Any config key can be overridden as --section.key=value.")
    parser.add_argument("config", help="TOML config file, e.g. configs/lgt_4070.toml")
    add_plan_arguments(parser)
    parser.add_argument("--kernels", action="store_true",
                        help="also compile the step's Triton kernels for sm_89 and sm_90 and report their "
                             "registers, spills and shared memory")
    return parser


def print_plan(cfg: Config, args: argparse.Namespace, config_path: str) -> int:
    """Plan `cfg` as `args` (add_plan_arguments, and --kernels when present) ask, print it; the exit code."""
    target = gpu(args.gpu)
    plan = make_plan(cfg, target, args.budget, args.batch_sizes)
    report = plan_json(plan, config_path) if args.json else None
    status = 0
    if getattr(args, "kernels", False):
        from engine.plan.kernel_resources import compile_launches, resources_table

        resources = compile_launches(plan.launches)
        status = 1 if any(r.over_shared_limit for r in resources) else 0
        if report is not None:
            report["kernels"] = [r.as_dict() for r in resources]
    if report is not None:
        print(json.dumps(report, indent=1))
    else:
        print(plan_text(plan, config_path))
        if getattr(args, "kernels", False):
            print("\n" + resources_table(resources))
    return status


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)

    def body() -> int:
        unknown = [arg for arg in overrides if not arg.startswith("--") or "." not in arg.split("=", 1)[0]]
        if unknown:
            raise UsageError(f"unrecognised arguments: {' '.join(unknown)}")
        return print_plan(load_config(args.config, overrides), args, args.config)

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
