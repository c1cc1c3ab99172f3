"""engine-sample: a PNG grid of samples from a trained diffusion run (EMA weights by default).

    engine-sample --checkpoint RUN [--sampler ddpm|ddim] [--steps 50] [--eta 0] [--cfg 1.5]
                  [--labels brick,grass] [--n 16] [--seed 0] [--device auto] --out samples.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.commands import add_device_argument, at_least, finite_float, non_negative_float, run_command
from engine.data.base import class_ids
from engine.pictures import save_grid
from engine.runs import load_run

PROG = "engine-sample"
SAMPLING_METHODS = ("ddpm",)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Draw a PNG grid of samples from a trained "
                                                            "diffusion run.")
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step-N directory")
    parser.add_argument("--out", default="samples.png", help="PNG file to write")
    parser.add_argument("--n", type=at_least(1), default=16, help="number of samples")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    parser.add_argument("--steps", type=at_least(1), default=50, help="DDIM steps (DDPM uses every timestep)")
    parser.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--cfg", type=finite_float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--labels", help="comma-separated class ids or names (default: cycle over classes)")
    parser.add_argument("--nrow", type=at_least(0), default=0, help="images per grid row (default: ~sqrt(n))")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    return parser


def labels_for(text: str | None, class_names: list[str], n: int) -> list[int] | None:
    """'0,2' or 'brick,grass' -> label ids (cycled to n); None when the model has no classes."""
    if not class_names:
        return None
    labels = list(range(len(class_names))) if text is None else class_ids(text, class_names, "--labels")
    return [labels[i % len(labels)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        run = load_run(args.checkpoint, args.device, ema=not args.raw_weights, methods=SAMPLING_METHODS,
                       hint=" (LGT runs: engine-transfer; autoencoders: engine-encode)")
        method, device = run.method, run.device
        labels = labels_for(args.labels, run.data_info.class_names, args.n)
        generator = torch.Generator(device).manual_seed(args.seed)
        images = method.sample(args.n, generator,
                               labels=None if labels is None else torch.tensor(labels, device=device),
                               sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg,
                               progress=True)
        nrow = args.nrow or max(1, round(args.n ** 0.5))
        save_grid(images.clamp(-1, 1).float().cpu(), Path(args.out), nrow)
        print(f"wrote {args.out} ({args.n} samples, {args.sampler}, step {run.step} of {args.checkpoint})")

    return run_command(PROG, body)



if __name__ == "__main__":
    sys.exit(main())
