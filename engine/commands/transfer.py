"""engine-transfer: LGT style transfer from a trained run to a PNG or JPEG grid, or the run's evaluation.

    engine-transfer --checkpoint RUN --content IMG_OR_DIR --style all|ID|NAME[,...] [--cfg 2.0]
                    [--out transfer.png] [--steps N] [--solver euler|heun|rk4] [--device auto]
    engine-transfer --checkpoint RUN --content-latents latents.safetensors [--rows 0,5,9] ...
    engine-transfer --checkpoint RUN --eval [--per-class N] [--device auto]

Content images are resized (shorter side) and centre-cropped to the side the run's latents come
from, encoded with the autoencoder that made the run's latents (posterior mean x scaling factor),
transported to every requested style with classifier-free guidance, decoded, and saved as one grid:
a row per content, the content itself first, then one column per style.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.commands import (
    UsageError,
    add_device_argument,
    at_least,
    non_negative_float,
    picture_path,
    run_command,
)
from engine.data.base import class_ids
from engine.data.images import IMAGE_SUFFIXES
from engine.data.latents import read_latents
from engine.methods.lgt_quality import format_evaluation
from engine.pictures import load_image, save_grid
from engine.runs import load_run

PROG = "engine-transfer"
DEFAULT_LATENT_ROWS = 8  # rows drawn from a latents file when --rows is not given
ENCODE_BATCH = 16  # content images encoded at once


class TransferError(ValueError):
    """A problem with the inputs of a transfer (exit 1), reported as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Transfer styles with a trained LGT run and save a grid (rows: contents; columns: the "
                    "content, then each style), or print the run's evaluation.")
    parser.add_argument("--checkpoint", required=True,
                        help="LGT run directory or one of its checkpoints/step-N")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--content", help="content image, or a directory of images (PNG/JPEG, sorted by name)")
    what.add_argument("--content-latents",
                      help="latents file (engine-encode's format) to take content rows from")
    what.add_argument("--eval", action="store_true",
                      help="run the evaluation on the run's latents and print it")
    parser.add_argument("--rows", help="with --content-latents: comma-separated row numbers (default: "
                                       f"{DEFAULT_LATENT_ROWS} rows drawn with --seed)")
    parser.add_argument("--style", default="all", help="'all', or comma-separated style ids or names")
    parser.add_argument("--cfg", type=non_negative_float, default=None,
                        help="classifier-free guidance scale of the transfer, or of --eval (default: "
                             "lgt.cfg_scale of the run)")
    parser.add_argument("--steps", type=at_least(1), default=None,
                        help="solver steps (default: ode.steps of the run)")
    parser.add_argument("--solver", choices=("euler", "heun", "rk4"), default=None,
                        help="ODE solver (default: ode.solver of the run)")
    parser.add_argument("--out", type=picture_path, default="transfer.png",
                        help="grid picture to write: .png, or .jpg / .jpeg (JPEG, quality 95)")
    add_device_argument(parser)
    parser.add_argument("--seed", type=int, default=0, help="seed of the rows drawn from --content-latents")
    parser.add_argument("--per-class", type=at_least(1), default=None,
                        help="with --eval: contents transported into each style (default: eval.per_class of "
                             "the run)")
    parser.add_argument("--autoencoder", help="decode/encode with this autoencoder instead of the one that "
                                              "made the run's latents")
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    return parser


def parse_styles(text: str, class_names: list[str]) -> list[int]:
    """'all' | '0,2' | 'brick,grass' -> style ids."""
    if text.strip() == "all":
        return list(range(len(class_names)))
    return class_ids(text, class_names, "--style (or 'all')")


def list_images(path: Path) -> list[Path]:
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise TransferError(f"--content {path}: no PNG/JPEG images in this directory")
        return images
    if not path.is_file():
        raise TransferError(f"--content {path}: no such image or directory")
    return [path]


@torch.no_grad()
def encode_images(method, paths: list[Path], device: torch.device) -> torch.Tensor:
    """Content images -> scaled latents [N, C, h, w] of the run's shape, with the run's autoencoder."""
    autoencoder = method.attached_autoencoder().to(device)
    latent_side = method.latent_shape[1]
    side = latent_side * getattr(autoencoder, "downsampling", 0)
    if side == 0:
        raise TransferError("the run's autoencoder has no spatial latents (linear autoencoder): use "
                            "--content-latents instead of --content")

    def read(path: Path) -> torch.Tensor:
        image = load_image(path, side)
        return image.mean(dim=0, keepdim=True) if autoencoder.in_channels == 1 else image  # as engine-encode

    chunks = [paths[i:i + ENCODE_BATCH] for i in range(0, len(paths), ENCODE_BATCH)]
    latents = torch.cat([autoencoder.encode(torch.stack([read(p) for p in chunk]).to(device)).mode()
                         for chunk in chunks]) * method.scaling_factor
    if tuple(latents.shape[1:]) != method.latent_shape:
        raise TransferError(f"the autoencoder gives latents {list(latents.shape[1:])} but the run was "
                            f"trained on {list(method.latent_shape)}: pass the autoencoder that made its "
                            f"latents")
    return latents


def read_content_latents(path: str, rows: str | None, seed: int, shape: tuple, device: torch.device
                         ) -> torch.Tensor:
    data = read_latents(path)
    count = data.latents.shape[0]
    if rows:
        try:
            picked = [int(r) for r in rows.split(",")]
        except ValueError:
            raise TransferError(f"--rows {rows!r}: expected comma-separated row numbers, e.g. 0,5,9"
                                ) from None
        bad = [r for r in picked if not 0 <= r < count]
        if bad:
            raise TransferError(f"--rows: {bad} out of range; {path} has rows 0..{count - 1}")
    else:
        generator = torch.Generator().manual_seed(seed)
        picked = torch.randperm(count, generator=generator)[:DEFAULT_LATENT_ROWS].tolist()
    latents = data.latents[picked].float()
    if tuple(latents.shape[1:]) != tuple(shape):
        raise TransferError(f"{path} holds latents {list(latents.shape[1:])}, the run was trained on "
                            f"{list(shape)}")
    return latents.to(device)


def print_evaluation(results: dict[str, float]) -> None:
    """One row per style (SWD to the style before and after transport, SSM distance to the content,
    style accuracy), then the quality protocol: metric | identity | swap | LGT, and its verdict."""
    print(format_evaluation(results))


def transfer(args: argparse.Namespace) -> None:
    run = load_run(args.checkpoint, args.device, ema=not args.raw_weights, autoencoder=args.autoencoder,
                   methods=("lgt",), hint=" (diffusion runs: engine-sample)")
    method, device = run.method, run.device
    if args.eval:
        if args.cfg is not None:  # evaluate the transport at this guidance scale
            method.cfg_scale = args.cfg
        print(f"evaluating step {run.step} of {args.checkpoint} on {run.config.data.source}, cfg {method.cfg_scale}")
        print_evaluation(method.evaluate(run.training_data(), args.per_class or run.config.eval.per_class))
        return
    styles = parse_styles(args.style, method.class_names)
    if args.content:
        paths = list_images(Path(args.content))
        content = encode_images(method, paths, device)
        names = [p.name for p in paths]
    else:
        content = read_content_latents(args.content_latents, args.rows, args.seed, method.latent_shape,
                                       device)
        names = [f"{content.shape[0]} rows of {args.content_latents}"]
    cfg_scale = method.cfg_scale if args.cfg is None else args.cfg
    solver, steps = args.solver or method.solver, args.steps or method.steps
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        images, nrow = method.style_grid(content, styles, cfg_scale, steps, solver, strict=True)
    save_grid(images, Path(args.out), nrow)
    style_names = ", ".join(method.class_names[s] for s in styles)
    print(f"wrote {args.out}: {content.shape[0]} content(s) ({', '.join(names)}) x {len(styles)} style(s) "
          f"({style_names}), cfg {cfg_scale}, {solver} x {steps} steps, step {run.step} of "
          f"{args.checkpoint}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        if args.rows and not args.content_latents:
            raise UsageError("--rows only applies with --content-latents")
        if args.per_class and not args.eval:
            raise UsageError("--per-class only applies with --eval")
        transfer(args)

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
