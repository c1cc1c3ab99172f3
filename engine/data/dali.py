"""Image folders decoded by NVIDIA DALI (`pip install -e '.[dali]'`): `data.loader = "dali"`, or
"auto" where nvidia.dali imports, for `data.source = "folder:PATH"`; and engine-encode --loader.

The engine, not DALI, decides what is read (DALI's own readers would shuffle and shard by their own
rules). For micro-batch i a Python callback hands DALI, through `fn.external_source`, the encoded
bytes of the files the torch path reads for batch i (the same EpochStreamBatchSampler: seeded,
resumable epoch order and rank shards), each with its label and the crop and flip the torch path
cuts (`crop_placement`, from the same augmentation seeds, in the picture resized by
`shorter_side_size` of the size read at start-up). DALI decodes (on the GPU, `mixed`, when the
batches go to a CUDA device; else on CPU threads), resizes the crop's region to S x S (bicubic,
antialiased) and mirrors it, NCHW; torch scales it to [-1, 1]. So batch i holds the torch path's
images, labels, crops and flips; the pixels are equal where nothing is resized (on the CPU DALI's
libjpeg-turbo decodes a JPEG as PIL's does; on the GPU nvJPEG may differ by a level), and within a
few levels where something is (DALI's bicubic is not PIL's), or where PIL decodes a large JPEG at a
reduced scale first (`open_rgb`'s draft; the longer side may then differ by a pixel, and so may a
crop's offset).

Pictures that DALI's decoder would not turn into `to_rgb`'s RGB (see DALI_MODES: alpha or a
transparent colour, which to_rgb composites over white; CMYK; another format behind a .png name)
are decoded by PIL, as the torch path decodes them, and handed to DALI as an uncompressed PNG.

A file that cannot be decoded fails DALI's batch with a message that names no file: the batch's
files are then decoded again with PIL, which raises the torch path's UnreadableImageError naming
it. One known difference: DALI's libjpeg-turbo decodes a JPEG whose compressed data is corrupt
inside (with a warning on stderr) where PIL refuses it. A truncated JPEG both refuse: at start-up,
or, truncated later, in its batch.
"""

from __future__ import annotations

import functools
import io
import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.data.base import Batch, check_image_memory
from engine.data.images import EpochStreamBatchSampler, ImageFolderSource, ImageHeader, crop_placement
from engine.pictures import open_rgb, shorter_side_size

__all__ = ["DaliImageFolderSource", "DaliReader", "dali_problem", "use_dali"]

INSTALL = "pip install -e '.[dali]'"
PREFETCH = 2  # batches DALI prepares ahead of the one handed out (its prefetch_queue_depth)

# What DALI's decoder turns into exactly the RGB that engine.pictures.to_rgb makes (each is checked
# in tests/test_dali.py; a 16-bit RGB PNG may differ by one level: PIL truncates it, DALI rounds).
DALI_FORMATS = ("JPEG", "PNG")
DALI_MODES = ("RGB", "L", "P", "1", "I;16", "I;16B", "I;16L")

# One sample of a batch: (file index, top, left, mirrored), the crop in the picture resized so that
# its shorter side is image_size.
Crop = tuple[int, int, int, bool]


@functools.cache
def dali_problem() -> str | None:
    """Why DALI cannot load images here, or None when it can."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError as err:
        if err.name in ("nvidia", "nvidia.dali"):
            return "nvidia-dali not installed"
        return f"nvidia-dali does not import: {err}"
    return None


def use_dali(setting: str, option: str) -> tuple[bool, str]:
    """(whether `option` = `setting` ("auto", "torch" or "dali") reads image folders with DALI, and
    if not, why not); ImportError saying how to install DALI when "dali" asks for it in vain."""
    if setting == "torch":
        return False, f"{option} = 'torch'"
    problem = dali_problem()
    if problem is not None and setting == "dali":
        raise ImportError(f"{option} = 'dali', but {problem}: {INSTALL} (or set {option} = 'torch')")
    return problem is None, problem or ""


def dali_decodes(header: ImageHeader) -> bool:
    """Whether DALI's decoder reads this file as `to_rgb` does (else PIL decodes it for DALI)."""
    return header.format in DALI_FORMATS and header.mode in DALI_MODES and not header.transparent


def png_bytes(image: Image.Image) -> np.ndarray:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=0)  # stored, not deflated: fast both ways
    return np.frombuffer(buffer.getbuffer(), dtype=np.uint8)


class DaliReader:
    """Batches of crops of image files, decoded by a DALI pipeline: images [B, 3, S, S] in [-1, 1]
    on `device` (decoded on its GPU when it is a CUDA device, else on `threads` CPU threads) and
    labels [B]. `samples` and `headers`: (path, label) and `verify_image_header` of every file."""

    def __init__(self, samples: list[tuple[Path, int]], headers: list[ImageHeader], image_size: int,
                 threads: int, device: str | torch.device = "cpu"):
        self.samples, self.headers, self.image_size, self.threads = samples, headers, image_size, threads
        self.device = torch.device(device)
        self.resized = [shorter_side_size(header.size, image_size) for header in headers]  # (width, height)

    def centre_crops(self, indices: range) -> list[Crop]:
        """The centred square of each file, as engine.pictures.load_image cuts it."""
        size = self.image_size
        return [(i, (self.resized[i][1] - size) // 2, (self.resized[i][0] - size) // 2, False) for i in indices]

    def batches(self, crops: Callable[[int], list[Crop]], batch_size: int,
                count: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) of crops(0), crops(1), ... (each at most batch_size samples; `count`
        batches, or endless). An image that cannot be decoded stops it with the torch path's error."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        def feed(info):  # called by DALI in this thread, up to PREFETCH batches ahead of the one handed out
            if count is not None and info.iteration >= count:
                raise StopIteration
            batch = crops(info.iteration)
            # The crop as a fraction of the picture, (y, x) as DALI's HWC layout: DALI resizes just
            # that region to S x S, sampling where a resize of the whole picture would (so a crop of
            # it), with less work. A fraction is right whatever size PIL decodes a picture at.
            resized = np.array([self.resized[index][::-1] for index, *_ in batch], dtype=np.float64)
            start = np.array([(top, left) for _, top, left, _ in batch], dtype=np.float64)
            return ([self._encoded(index) for index, *_ in batch],
                    np.array([self.samples[index][1] for index, *_ in batch], dtype=np.int64),
                    (start / resized).astype(np.float32), ((start + self.image_size) / resized).astype(np.float32),
                    np.array([mirrored for *_, mirrored in batch], dtype=np.int32))

        iterator = DALIGenericIterator(self._pipeline(feed, batch_size), ["x", "labels"], prepare_first_batch=False)
        for number in range(count) if count is not None else itertools.count():
            try:
                (out,) = next(iterator)
            except RuntimeError as err:  # DALI's own error: "Failed to decode sample #1", no file named
                raise self._read_error(crops(number), err) from None
            # Scaled here as image_to_tensor scales (DALI's (x - 127.5) / 127.5 may differ in the last bit).
            yield out["x"].float().div_(127.5).sub_(1.0), out["labels"]

    def _encoded(self, index: int) -> np.ndarray:
        path = self.samples[index][0]
        try:
            if dali_decodes(self.headers[index]):
                return np.fromfile(path, dtype=np.uint8)
            return png_bytes(open_rgb(path, min_size=self.image_size))
        except (OSError, ValueError):
            # Raised here, the error would stop the batch DALI is prefetching, not the one handed
            # out: empty bytes make this sample's batch fail to decode when its turn comes instead.
            return np.empty(0, dtype=np.uint8)

    def _read_error(self, batch: list[Crop], err: RuntimeError) -> Exception:
        """The error a batch that DALI failed on stops with: the first of its files that PIL cannot
        read raises what the torch path raises for it; if PIL reads them all, a ValueError (a data
        error to the training loop) with DALI's reason and the batch's files."""
        for index, *_ in batch:
            open_rgb(self.samples[index][0], min_size=self.image_size)
        detail = re.search(r"encountered:\s*(.+)", str(err))
        files = ", ".join(str(self.samples[index][0]) for index, *_ in batch)
        return ValueError(f"DALI could not decode a batch of images that PIL reads "
                          f"({detail.group(1).strip() if detail else err}): {files}; "
                          f"the torch loader reads them (data.loader = 'torch', engine-encode --loader torch)")

    def _pipeline(self, feed: Callable, batch_size: int):
        from nvidia.dali import fn, pipeline_def, types

        gpu = self.device.type == "cuda"
        size = self.image_size
        device_id = (torch.cuda.current_device() if self.device.index is None else self.device.index) if gpu else None

        @pipeline_def(batch_size=batch_size, num_threads=self.threads, device_id=device_id,
                      prefetch_queue_depth=PREFETCH)
        def pipeline():
            encoded, labels, roi_start, roi_end, mirrors = fn.external_source(source=feed, num_outputs=5,
                                                                             batch=True, batch_info=True)
            images = fn.decoders.image(encoded, device="mixed" if gpu else "cpu", output_type=types.RGB,
                                       adjust_orientation=False,  # as PIL: EXIF orientation is not applied
                                       jpeg_fancy_upsampling=True)  # the GPU's chroma upsampling as libjpeg-turbo's
            images = fn.resize(images, size=[size, size], roi_start=roi_start, roi_end=roi_end, roi_relative=True,
                               interp_type=types.INTERP_CUBIC, antialias=True)
            images = fn.crop_mirror_normalize(images, mirror=mirrors, dtype=types.UINT8, output_layout="CHW")
            return images, labels

        return pipeline()


class DaliImageFolderSource(ImageFolderSource):
    """An image folder whose batches DALI decodes: the batches ImageFolderSource draws (see the
    module doc), on `device` (a CUDA device: decoded on it). Decoding runs on num_workers threads."""

    def __init__(self, root: str | Path, image_size: int, flip: bool, seed: int, rank: int = 0,
                 num_workers: int = 0, world_size: int = 1, device: str | torch.device = "cpu"):
        super().__init__(root, image_size, flip, seed, rank, num_workers, world_size)
        self.reader = DaliReader(self.dataset.samples, self.headers, image_size, max(1, num_workers), device)

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        size, flip, resized = self.dataset.image_size, self.dataset.flip, self.reader.resized
        # Batches in flight: uint8 ones DALI prefetches and hands out, and the float32 one in use.
        check_image_memory(size, batch_size * size**2 * (3 * (PREFETCH + 1) + 12),
                           f"batches of {batch_size} crops of {size} px")
        sampler = EpochStreamBatchSampler(len(self.dataset), batch_size, self.seed, self.rank, start,
                                          self.world_size)

        def crops(number: int) -> list[Crop]:
            return [(index, *crop_placement(aug_seed, *resized[index], size, flip))
                    for index, aug_seed in sampler.batch(start + number)]

        for x, labels in self.reader.batches(crops, batch_size):
            yield Batch(x, labels)
