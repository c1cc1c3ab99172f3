"""engine-sample: a PNG or JPEG grid of samples from a trained generative run (EMA weights by default).

    engine-sample --checkpoint RUN [--sampler NAME] [--steps N] [--eta 0] [--cfg 1.0]
                  [--labels brick,grass | --prompt TEXT ...] [--n 16] [--seed 0] [--device auto]
                  [--autoencoder AE] --out samples.png

Runs of ddpm, fm (flow matching), fmm (flow map matching) and score_flow. Each method has its own
samplers (SAMPLERS_OF); --sampler and --steps default to the ones the run's sample grids used
(its [ddpm] / [fm] / [fmm] / [score_flow] section). --eta is DDIM's alone. A run trained on
latents samples latents and writes them decoded by the autoencoder its config records (or
--autoencoder): pictures, never latent channels; without an autoencoder it is an error. A
text-conditioned run takes --labels (rows of its prompt table, by class) or --prompt (new text,
embedded by the encoder the table was made with; the samples cycle over the prompts).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

from engine.commands import (
    UsageError,
    add_device_argument,
    at_least,
    finite_float,
    non_negative_float,
    picture_path,
    run_command,
)
from engine.data.base import class_ids
from engine.methods import ddpm, flow_map_matching, flow_matching, method_class, score_flow
from engine.methods.generation import to_pictures
from engine.methods.sections import typed_prompts
from engine.pictures import save_grid
from engine.runs import load_run

PROG = "engine-sample"
SAMPLERS_OF = {"ddpm": ddpm.SAMPLERS, "fm": flow_matching.SAMPLERS, "fmm": flow_map_matching.SAMPLERS,
               "score_flow": score_flow.SAMPLERS}
SAMPLING_METHODS = tuple(SAMPLERS_OF)
ALL_SAMPLERS = tuple(dict.fromkeys(name for samplers in SAMPLERS_OF.values() for name in samplers))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Draw a PNG grid of samples from a trained "
                                                            "ddpm, fm, fmm or score_flow run.")
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step-N directory")
    parser.add_argument("--out", type=picture_path, default="samples.png",
                        help="grid picture to write: .png, or .jpg / .jpeg (JPEG, quality 95)")
    parser.add_argument("--n", type=at_least(1), default=16, help="number of samples")
    parser.add_argument("--sampler", choices=ALL_SAMPLERS,
                        help="ddpm: ddpm | ddim; fm: euler | midpoint | heun | dopri5; fmm: compose; "
                             "score_flow: euler | heun (default: the run's grid sampler)")
    parser.add_argument("--steps", type=at_least(1), help="sampler steps (DDPM uses every timestep; dopri5: "
                        "the first step is 1/steps; default: the run's grid steps)")
    parser.add_argument("--eta", type=non_negative_float, help="DDIM eta (0 = deterministic, the default)")
    parser.add_argument("--cfg", type=finite_float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--labels", help="comma-separated class ids or names (default: cycle over classes)")
    parser.add_argument("--prompt", action="append", help="text-conditioned runs: a prompt to sample (repeat for "
                        "several; embedded by the run's text encoder)")
    parser.add_argument("--nrow", type=at_least(0), default=0, help="images per grid row (default: ~sqrt(n))")
    parser.add_argument("--seed", type=int, default=0)
    add_device_argument(parser)
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--autoencoder", help="runs trained on latents: decode with this autoencoder (run "
                        "directory, checkpoint or local diffusers folder) instead of the one the run recorded")
    return parser


def labels_for(text: str | None, class_names: list[str], n: int) -> list[int] | None:
    """'0,2' or 'brick,grass' -> label ids (cycled to n); None when the model has no classes."""
    if not class_names:
        return None
    labels = list(range(len(class_names))) if text is None else class_ids(text, class_names, "--labels")
    return [labels[i % len(labels)] for i in range(n)]


def sampler_settings(args, run) -> dict:
    """The sampler keyword arguments for the run's method: --sampler/--steps or the run's grid settings;
    UsageError for a sampler the method does not have or --eta outside DDIM."""
    method = run.config.method.name
    section = getattr(run.config, method)
    sampler = args.sampler or getattr(section, "sampler", SAMPLERS_OF[method][0])
    if sampler not in SAMPLERS_OF[method]:
        raise UsageError(f"--sampler {sampler}: a {method} run samples with {' | '.join(SAMPLERS_OF[method])}")
    settings = {"sampler": sampler, "steps": args.steps or section.sample_steps}
    if args.eta is not None:
        if sampler != "ddim":
            raise UsageError(f"--eta is DDIM's noise scale; a {method} run sampled with {sampler} has no eta")
        settings["eta"] = args.eta
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        run = load_run(args.checkpoint, args.device, ema=not args.raw_weights, autoencoder=args.autoencoder,
                       methods=SAMPLING_METHODS, hint=" (LGT runs: engine-transfer; autoencoders: engine-encode)")
        method, device = run.method, run.device
        settings = sampler_settings(args, run)
        on_latents = method_class(run.config.method.name).trains_on_latents(run.config)
        if args.autoencoder and not on_latents:
            raise UsageError(f"--autoencoder: {args.checkpoint} was trained on pictures, not latents: it decodes nothing")
        if args.prompt and args.labels:
            raise UsageError("--prompt and --labels both choose what to draw: give one of them")
        if args.prompt and run.data_info.text is None:
            raise UsageError(f"--prompt: {args.checkpoint} was trained without text conditioning ([text] encoder = "
                             f"''): choose classes with --labels")
        if on_latents:
            method.attached_autoencoder()  # a missing autoencoder fails before any sampling
        if args.prompt:
            labels = [i % len(args.prompt) for i in range(args.n)]
        else:
            labels = labels_for(args.labels, run.data_info.class_names, args.n)
        generator = torch.Generator(device).manual_seed(args.seed)
        with typed_prompts(method, args.prompt) if args.prompt else contextlib.nullcontext():
            samples = method.sample(args.n, generator,
                                    labels=None if labels is None else torch.tensor(labels, device=device),
                                    cfg_scale=args.cfg, progress=True, **settings)
        pictures = to_pictures(method, samples, on_latents, strict=True)
        nrow = args.nrow or max(1, round(args.n ** 0.5))
        save_grid(pictures.float().cpu(), Path(args.out), nrow)
        print(f"wrote {args.out} ({args.n} samples, {settings['sampler']} x {settings['steps']}, step {run.step} "
              f"of {args.checkpoint})")

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
