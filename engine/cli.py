"""Console scripts: engine-train and engine-sample."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from engine.config import ConfigError, describe_options, load_config, with_absolute_paths
from engine.data.base import class_ids


def _fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def _at_least(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _non_negative_float(text: str) -> float:
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def train_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="engine-train",
        description="Train (or resume: run the same command again) the run a TOML config describes.",
        epilog="Any config key can be overridden as --section.key=value. Keys:\n" + describe_options(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="TOML config file, e.g. configs/lgt_4070.toml")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = with_absolute_paths(load_config(args.config, overrides))
    except ConfigError as err:
        _fail(str(err))
    if args.print_config:
        print(cfg.to_toml(), end="")
        return

    from engine.checkpoint import CheckpointError
    from engine.train import NonFiniteLossError, RunInterrupted, train

    try:
        result = train(cfg)
    except RunInterrupted as err:
        _fail(str(err), code=130)
    except (CheckpointError, NonFiniteLossError, ValueError, OSError) as err:
        _fail(str(err))
    state = "stopped early; rerun the same command to resume" if result.stopped_early else "done"
    print(f"{state}: step {result.step}, run directory {result.run_dir}")
    if result.stopped_early:
        raise SystemExit(130)


def _parse_labels(text: str | None, class_names: list[str], n: int) -> list[int] | None:
    """'0,2' or 'brick,grass' -> label ids (cycled to n); None when the model has no classes."""
    if not class_names:
        return None
    if text is None:
        return [i % len(class_names) for i in range(n)]
    try:
        labels = class_ids(text, class_names, "--labels")
    except ValueError as err:
        _fail(str(err))
    return [labels[i % len(labels)] for i in range(n)]


def sample_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="engine-sample",
                                     description="Draw a PNG grid of samples from a trained diffusion run.")
    parser.add_argument("--checkpoint", required=True, help="run directory or checkpoints/step-N directory")
    parser.add_argument("--out", default="samples.png", help="PNG file to write")
    parser.add_argument("--n", type=_at_least(1), default=16, help="number of samples")
    parser.add_argument("--sampler", choices=("ddpm", "ddim"), default="ddim")
    parser.add_argument("--steps", type=_at_least(1), default=50, help="DDIM steps (DDPM uses every timestep)")
    parser.add_argument("--eta", type=_non_negative_float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale")
    parser.add_argument("--labels", help="comma-separated class ids or names (default: cycle over classes)")
    parser.add_argument("--nrow", type=_at_least(0), default=0, help="images per grid row (default: ~sqrt(n))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--raw-weights", action="store_true", help="use the raw weights instead of the EMA")
    args = parser.parse_args(argv)

    from engine.checkpoint import CheckpointError, open_checkpoint
    from engine.data.base import DataInfo
    from engine.distributed import resolve_device
    from engine.methods import method_class
    from engine.pictures import save_grid

    try:
        checkpoint = open_checkpoint(args.checkpoint)
    except CheckpointError as err:
        _fail(str(err))
    cfg = checkpoint.config()
    info = checkpoint.data_info()
    data = DataInfo(tuple(info["sample_shape"]), info["class_names"])
    method = method_class(cfg.method.name).from_config(cfg, data)
    if not hasattr(method, "sample"):
        _fail(f"method {cfg.method.name!r} has no sampler for engine-sample "
              f"(LGT runs use engine-transfer; autoencoders engine-encode)")
    method.load_state_dict(checkpoint.model_state(ema=not args.raw_weights))
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        _fail(str(err))
    method = method.to(device).eval()
    labels = _parse_labels(args.labels, data.class_names, args.n)
    generator = torch.Generator(device).manual_seed(args.seed)
    images = method.sample(args.n, generator, labels=None if labels is None else torch.tensor(labels, device=device),
                           sampler=args.sampler, steps=args.steps, eta=args.eta, cfg_scale=args.cfg,
                           progress=True)
    nrow = args.nrow or max(1, round(args.n ** 0.5))
    save_grid(images.clamp(-1, 1).float().cpu(), Path(args.out), nrow)
    print(f"wrote {args.out} ({args.n} samples, {args.sampler}, step {checkpoint.step} of {args.checkpoint})")
