"""engine-train: train (or resume: run the same command again) the run a TOML config describes.

    engine-train CONFIG.toml [--section.key=value ...] [--print-config]
    engine-train CONFIG.toml [--section.key=value ...] --plan [--gpu NAME] [--budget 8GiB] [--json]

config -> preparation (built-in data made into files, cached) -> training. Under torchrun every
process runs this; preparation happens before the process group exists (see engine/prepare.py).
--plan prints what engine-plan prints (will it fit, how fast can it be) and trains nothing.
"""

from __future__ import annotations

import argparse
import sys

from engine.commands import EXIT_INTERRUPTED, run_command
from engine.commands.plan import add_plan_arguments, print_plan
from engine.config import describe_options, load_config, with_absolute_paths
from engine.distributed import World
from engine.methods import method_class
from engine.prepare import prepare
from engine.stages import run_stages
from engine.train import train

PROG = "engine-train"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Train (or resume: run the same command again) the run a TOML config describes.",
        epilog="Any config key can be overridden as --section.key=value. Keys (a method's sections apply "
               "when method.name selects it):\n" + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config file, e.g. configs/lgt_4070.toml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    plan = parser.add_argument_group("--plan: predict memory and speed instead of training (see engine-plan)")
    plan.add_argument("--plan", action="store_true", help="print the plan of this config and exit (no GPU, no data)")
    add_plan_arguments(plan)
    return parser


def planned_stages(cfg) -> list[str]:
    """The stages this run can go through (engine/stages.py); preparation's only for built-in latents."""
    names = ["training", "evaluation"] if cfg.eval.at_end else ["training"]
    if method_class(cfg.method.name).trains_on_latents(cfg) and cfg.data.source == "builtin:textures":
        names = ["encoding", *names] if cfg.data.autoencoder else ["autoencoder", "encoding", *names]
    return names


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)

    def body() -> int:
        cfg = with_absolute_paths(load_config(args.config, overrides))
        if args.plan:
            return print_plan(cfg, args, args.config)
        if args.print_config:
            print(cfg.to_toml(), end="")
            return 0
        with run_stages(planned_stages(cfg)):
            result = train(prepare(cfg, World.from_environment()))
        state = "stopped early; rerun the same command to resume" if result.stopped_early else "done"
        print(f"{state}: step {result.step}, run directory {result.run_dir}")
        return EXIT_INTERRUPTED if result.stopped_early else 0

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
