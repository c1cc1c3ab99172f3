"""Encoding images into a latents file: what engine-encode does with an image folder (one
sub-folder per style / class), and what the preparation stage does with built-in crops.

Each image is resized so its shorter side is --image-size and centre-cropped to a square, then
encoded in batches (on the GPU when there is one); PIL decodes the images on threads, or a DALI
pipeline does (--loader, as data.loader: see engine/data/dali.py). The posterior mean is stored
unless --sample asks for a draw. Latents are multiplied by the scaling factor before they are
stored: the autoencoder's own (a diffusers VAE's config value) when it has one, else 1 / std of
all the latents of this folder, estimated here (the engine's own autoencoders leave theirs at 0 =
"not estimated"). The file records the factor it used, the class names and which autoencoder made it
(path + weights hash); see engine/data/latents.py for the format. Nothing half-written is left
behind: the file appears under its name only once it is complete.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from engine.autoencoders import load_autoencoder
from engine.data.dali import DaliReader, use_dali
from engine.data.images import scan_image_folder, verify_image_header
from engine.data.latents import AutoencoderIdentity, LatentFile, write_latents
from engine.distributed import resolve_device
from engine.pictures import load_image

DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- encoding


# One batch to encode: images [B, C, H, W] in [-1, 1], their labels [B], their names (for errors).
ImageBatch = tuple[torch.Tensor, torch.Tensor, list[str]]


@torch.no_grad()
def encode_batches(autoencoder: nn.Module, batches: Iterable[ImageBatch], total: int, sample: bool = False,
                   generator: torch.Generator | None = None,
                   desc: str = "encoding") -> tuple[torch.Tensor, torch.Tensor]:
    """(unscaled latents [N, C, h, w] fp32, labels [N] int64), both on the host. NaN / inf latents
    are refused with an error naming the images."""
    device = next(iter(autoencoder.buffers())).device
    latents, labels = [], []
    with tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True) as progress:
        for images, batch_labels, names in batches:
            posterior = autoencoder.encode(images.to(device, non_blocking=True).float())
            z = posterior.sample(generator) if sample else posterior.mode()
            bad = (~torch.isfinite(z).flatten(1).all(dim=1)).nonzero().flatten().tolist()  # one sync per batch
            if bad:
                listed = ", ".join(str(names[i]) for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
                raise ValueError(f"the autoencoder produced NaN/inf latents for {len(bad)} image(s): {listed}; "
                                 f"check those images and the autoencoder checkpoint (did its training diverge?)")
            latents.append(z.float().cpu())
            labels.append(batch_labels.to("cpu", torch.int64))
            progress.update(len(names))
    return torch.cat(latents), torch.cat(labels)


def scale_latents(latents: torch.Tensor, scaling_factor: float) -> tuple[torch.Tensor, float]:
    """(latents * factor, factor), multiplied in place (50k latents of 4x32x32 are 800 MB in fp32).
    factor = the given one if > 0, else 1 / std of these latents (SD's convention: unit variance)."""
    if not scaling_factor > 0:
        std = latents.double().std().item()
        if not (std > 0 and torch.isfinite(torch.tensor(std))):
            raise ValueError(f"cannot estimate a scaling factor: the latents' std is {std} (constant latents?); "
                             f"is the autoencoder trained?")
        scaling_factor = 1.0 / std
    return latents.mul_(scaling_factor), float(scaling_factor)


def encode_dataset(autoencoder: nn.Module, identity: AutoencoderIdentity, batches: Iterable[ImageBatch],
                   total: int, class_names: list[str], out: str | Path, sample: bool = False,
                   dtype: str = "fp16", generator: torch.Generator | None = None,
                   desc: str = "encoding") -> LatentFile:
    """Encode `total` images, scale, check and atomically write one latents file; returns it."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    latents, labels = encode_batches(autoencoder, batches, total, sample, generator, desc)
    latents, factor = scale_latents(latents, float(autoencoder.scaling_factor))
    stored = latents.to(DTYPES[dtype])
    if not torch.isfinite(stored).all():
        raise ValueError(f"{out}: scaled latents overflow {dtype} (largest magnitude "
                         f"{latents.abs().max().item():.4g}); use --dtype fp32")
    data = LatentFile(stored, labels, list(class_names), factor, identity, "sample" if sample else "mean")
    write_latents(out, data)
    return data


# --------------------------------------------------------------------------- image folders


def scan_folder(images: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image, label)]) of a folder with one sub-folder per style / class: the
    same layout and label order as `data.source = "folder:PATH"`."""
    try:
        return scan_image_folder(Path(images))
    except (FileNotFoundError, ValueError) as err:
        message = str(err).removeprefix("data.source: ")
        raise type(err)(f"--images {images}: {message}") from err


def _image_batches(samples: list[tuple[Path, int]], image_size: int, channels: int, batch_size: int,
                   workers: int) -> Iterator[ImageBatch]:
    """Batches of decoded images. Decoding runs on `workers` threads (PIL releases the GIL), one
    batch ahead, so it overlaps the encoding of the previous batch on the GPU. load_image raises
    naming the file when an image cannot be read."""

    def read(path: Path) -> torch.Tensor:
        image = load_image(path, image_size)
        return image.mean(dim=0, keepdim=True) if channels == 1 else image  # grey for 1-channel models

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        def submit(start: int) -> list:
            return [pool.submit(read, path) for path, _ in samples[start:start + batch_size]]

        pending = submit(0)
        for start in range(0, len(samples), batch_size):
            decoding, pending = pending, submit(start + batch_size)
            chunk = samples[start:start + batch_size]
            labels = torch.tensor([label for _, label in chunk], dtype=torch.int64)
            yield torch.stack([f.result() for f in decoding]), labels, [str(path) for path, _ in chunk]


def _dali_image_batches(samples: list[tuple[Path, int]], image_size: int, channels: int, batch_size: int,
                        workers: int, device: torch.device) -> Iterator[ImageBatch]:
    """`_image_batches`, decoded by a DALI pipeline (on `device`'s GPU when it is a CUDA device).
    Every file's header is read first (DALI needs the sizes): a damaged file fails here, by name."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        headers = list(pool.map(verify_image_header, (path for path, _ in samples)))
    reader = DaliReader(samples, headers, image_size, workers, device)
    batches = reader.batches(lambda number: reader.centre_crops(range(number * batch_size,
                                                                      min(len(samples), (number + 1) * batch_size))),
                             batch_size, count=math.ceil(len(samples) / batch_size))
    for number, (images, labels) in enumerate(batches):
        names = [str(path) for path, _ in samples[number * batch_size:(number + 1) * batch_size]]
        yield (images.mean(dim=1, keepdim=True) if channels == 1 else images), labels, names


def encode_folder(images: str | Path, autoencoder: str | Path, out: str | Path, batch_size: int = 32,
                  sample: bool = False, dtype: str = "fp16", image_size: int = 256, device: str = "auto",
                  seed: int = 0, workers: int | None = None, loader: str = "auto") -> LatentFile:
    """What `engine-encode` does; returns the written `LatentFile`. `loader`: what decodes the
    images, "auto", "torch" (PIL on threads) or "dali" (as data.loader; says which, in one line)."""
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"--batch-size and --image-size must be >= 1, got {batch_size} and {image_size}")
    class_names, samples = scan_folder(Path(images))
    dali, why_not = use_dali(loader, "--loader")
    model, identity = load_autoencoder(autoencoder, resolve_device(device))
    channels = model.in_channels
    model.latent_shape((channels, image_size, image_size))  # a size the model cannot take fails now
    model_device = next(iter(model.buffers())).device
    generator = torch.Generator(model_device).manual_seed(seed) if sample else None
    workers = workers if workers is not None else min(8, os.cpu_count() or 1)
    if dali:
        print(f"images: DALI pipeline ({'GPU' if model_device.type == 'cuda' else 'CPU'} decode), {workers} threads",
              flush=True)
        batches = _dali_image_batches(samples, image_size, channels, batch_size, workers, model_device)
    else:
        print(f"images: PIL decoding, {workers} threads ({why_not})", flush=True)
        batches = _image_batches(samples, image_size, channels, batch_size, workers)
    return encode_dataset(model, identity, batches, len(samples), class_names, out, sample, dtype, generator)
