"""engine-encode: an image folder (one sub-folder per style / class) -> one latents file.

    engine-encode --images DIR --autoencoder CKPT_OR_DIR --out latents.safetensors
                  [--batch-size 32] [--sample] [--dtype fp16|fp32] [--image-size 256] [--device auto]
                  [--workers N] [--loader auto|torch|dali]

See engine/encode.py for what is stored.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engine.commands import add_device_argument, at_least, run_command
from engine.encode import DTYPES, encode_folder

PROG = "engine-encode"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Encode an image folder (one sub-folder per style/class) into one latents file "
                               "for data.source = 'latents:PATH'.")
    parser.add_argument("--images", required=True, help="folder with one sub-folder of images per style/class")
    parser.add_argument("--autoencoder", required=True,
                        help="run directory or checkpoints/step-N of an autoencoder training, or a local "
                             "diffusers AutoencoderKL directory")
    parser.add_argument("--out", required=True, help="latents file to write (.safetensors)")
    parser.add_argument("--batch-size", type=at_least(1), default=32, help="images encoded at once (default 32)")
    parser.add_argument("--sample", action="store_true", help="store a posterior draw instead of the mean")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --sample draws (default 0)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="stored dtype (default fp16)")
    parser.add_argument("--image-size", type=at_least(1), default=256,
                        help="shorter side resized to this, then centre-cropped square (default 256)")
    add_device_argument(parser)
    parser.add_argument("--workers", type=at_least(1), default=None,
                        help="image-decoding threads (default min(8, CPUs))")
    parser.add_argument("--loader", choices=("auto", "torch", "dali"), default="auto",
                        help="what decodes the images: DALI (on the GPU when encoding on one) or PIL; auto = DALI "
                             "where nvidia-dali imports (pip install -e '.[dali]'), as data.loader (default auto)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        data = encode_folder(args.images, args.autoencoder, args.out, args.batch_size, args.sample, args.dtype,
                             args.image_size, args.device, args.seed, args.workers, args.loader)
        counts = torch.bincount(data.labels, minlength=len(data.class_names)).tolist()
        print(f"wrote {args.out}: {len(data.labels)} latents {list(data.latents.shape[1:])} {args.dtype}, "
              f"scaling factor {data.scaling_factor:.6g}, posterior {data.posterior}, classes "
              + ", ".join(f"{name} ({count})" for name, count in zip(data.class_names, counts)))

    return run_command(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
