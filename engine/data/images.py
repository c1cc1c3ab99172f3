"""Image folders: `data.source = "folder:PATH"`, one sub-folder per class.

    PATH/
      cats/  a.png  b.jpg  ...       label 0 (class folders sorted by name)
      dogs/  c.JPEG  sub/d.png ...   label 1 (images found recursively, PNG/JPEG, any case)

Each sample: decode as RGB, resize so the shorter side is `image_size` (up or down), take a random
image_size x image_size crop along the longer side, flip horizontally with probability 1/2 (if
`flip`), scale to [-1, 1].

Order: every epoch e is one permutation of the N images, the same on every rank (seeded with
batch_seed(seed, 0, e)). Under torchrun with W processes it is dealt round-robin: rank r takes
positions r, r + W, ... of its first floor(N / W) * W entries, so the ranks' shards of an epoch are
disjoint (as DistributedSampler's with drop_last; the N mod W left over differ from epoch to
epoch). A rank's sample stream is the concatenation of its shards; micro-batch i is samples
i*B .. (i+1)*B - 1 of that stream, and every sample carries an augmentation seed derived from
(seed, rank, i, position). So batch i, crops and flips included, is a pure function of
(seed, rank, W, i, B): a resumed run starting at batch k draws exactly what an uninterrupted run
draws from batch k on, whatever the number of workers.

This module decodes with PIL in torch DataLoader workers; engine/data/dali.py decodes the same
batches with DALI (`data.loader`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from engine.data.base import Batch, Stream, batch_seed, check_image_memory
from engine.pictures import (
    PIL_READ_ERRORS,
    UnreadableImageError,
    image_to_tensor,
    open_rgb,
    resize_shorter_side,
    shorter_side_size,
)

__all__ = ["AugmentedImages", "EpochStreamBatchSampler", "ImageFolderSource", "ImageHeader", "UnreadableImageError",
           "crop_placement", "scan_image_folder", "verify_image", "verify_image_header"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LAYOUT_HINT = "expected one sub-folder per class with PNG/JPEG images"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- scanning


def scan_image_folder(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """(class names, [(image path, label)]) of a folder laid out as one sub-folder per class."""
    if not root.is_dir():
        raise FileNotFoundError(f"data.source: folder not found: {root}; {LAYOUT_HINT}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise ValueError(f"data.source: no class sub-folders in {root}; {LAYOUT_HINT} "
                         f"(for a single class, move the images into e.g. {root / 'all'})")
    samples = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ValueError(f"data.source: class folder {class_dir} has no PNG/JPEG images; "
                             f"add images or remove the folder")
        samples.extend((path, label) for path in files)
    return [d.name for d in class_dirs], samples


class ImageHeader(NamedTuple):
    """What an image file's header says (its pixels are not decoded)."""

    size: tuple[int, int]  # (width, height)
    format: str  # PIL's name of the file format: "PNG", "JPEG", ...
    mode: str  # PIL's mode: "RGB", "L", "RGBA", "I;16", ...
    transparent: bool  # a colour or palette entry marked transparent (PIL's info["transparency"])


def verify_image_header(path: Path) -> ImageHeader:
    """A fast integrity check that does not decode pixels; returns the image's header.

    PIL's verify checks a PNG's chunk CRCs (a truncated PNG fails it) but reads only a JPEG's
    header, so a JPEG must also reach its end-of-image marker: a truncated one does not."""
    try:
        with Image.open(path) as image:
            header = ImageHeader(image.size, image.format, image.mode, "transparency" in image.info)
            image.verify()
    except PIL_READ_ERRORS as err:
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err
    if header.format == "JPEG" and not jpeg_is_complete(path):
        raise UnreadableImageError(path, "truncated JPEG: the file ends before its end-of-image marker")
    return header


def verify_image(path: Path) -> tuple[int, int]:
    """`verify_image_header`'s check; returns the image's (width, height)."""
    return verify_image_header(path).size


# A JPEG marker: FF (after any FF fill bytes) then a code other than 00 (a stuffed FF inside the
# compressed data) or D0..D7 (restart markers, which also occur inside it).
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff\xd0-\xd7])")
_JPEG_EOI, _JPEG_STANDALONE = 0xD9, (0x01, 0xD8)  # end of image; markers without a length field
_JPEG_TAIL = 64


def jpeg_is_complete(path: Path) -> bool:
    """Whether a JPEG file reaches its end-of-image marker (FF D9).

    Usually the file ends with it, maybe followed by zero or FF padding: read just the last bytes.
    Otherwise (data appended after the image, e.g. a motion photo's video) walk the marker
    segments from the start, skipping each by its length (so an embedded thumbnail's own FF D9 is
    not mistaken for the end) and scanning the compressed data for the next marker."""
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - _JPEG_TAIL))
        if f.read().rstrip(b"\x00\xff").endswith(b"\xff\xd9"):
            return True
        f.seek(0)
        data = f.read()
    position = 2  # after SOI (FF D8), which PIL has already identified
    while match := _JPEG_MARKER.search(data, position):
        marker, position = match.group(1)[0], match.end()
        if marker == _JPEG_EOI:
            return True
        if marker not in _JPEG_STANDALONE:
            if position + 2 > len(data):
                return False
            position += max(2, int.from_bytes(data[position:position + 2], "big"))
    return False


# --------------------------------------------------------------------------- order and augmentation


@functools.lru_cache(maxsize=2)  # a batch usually spans one or two epochs; a permutation is O(N) to draw
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`, the same on every rank (each then takes its own shard of it)."""
    generator = torch.Generator().manual_seed(batch_seed(seed, 0, epoch, Stream.BATCHES))
    return torch.randperm(num_samples, generator=generator)


def augmentation_seed(seed: int, rank: int, number: int, position: int) -> int:
    """The seed of the crop and flip of sample `position` of micro-batch `number`."""
    return batch_seed(batch_seed(seed, rank, number, Stream.AUGMENT), 0, position, Stream.BATCHES)


def crop_placement(aug_seed: int, width: int, height: int, size: int, flip: bool) -> tuple[int, int, bool]:
    """(top, left, mirrored) of the size x size crop of augmentation seed `aug_seed` in a picture of
    width x height (already resized); the torch and DALI loaders both cut their crops here."""
    generator = torch.Generator().manual_seed(aug_seed)
    top, left, flip_draw = torch.rand(3, generator=generator).tolist()
    return int(top * (height - size + 1)), int(left * (width - size + 1)), flip and flip_draw < 0.5


class EpochStreamBatchSampler:
    """Yields, for micro-batch start, start + 1, ..., the list of (dataset index, augmentation seed)
    of this rank (see the module doc for the order and the sharding)."""

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int, start: int, world_size: int = 1):
        if not 0 <= rank < world_size or num_samples < world_size:
            raise ValueError(f"cannot shard {num_samples} images over {world_size} processes (rank {rank}): "
                             f"every process needs at least one image per epoch")
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size, self.start = seed, rank, world_size, start
        self.shard_size = num_samples // world_size  # samples of one epoch that this rank draws

    def batch(self, number: int) -> list[tuple[int, int]]:
        stream_positions = torch.arange(number * self.batch_size, (number + 1) * self.batch_size)
        epochs, offsets = stream_positions // self.shard_size, stream_positions % self.shard_size
        indices = torch.empty_like(offsets)
        for epoch in epochs.unique().tolist():  # more than one when the batch crosses an epoch end
            in_epoch = epochs == epoch
            order = epoch_permutation(self.num_samples, self.seed, epoch)
            indices[in_epoch] = order[offsets[in_epoch] * self.world_size + self.rank]
        return [(index, augmentation_seed(self.seed, self.rank, number, position))
                for position, index in enumerate(indices.tolist())]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return (self.batch(number) for number in itertools.count(self.start))


class AugmentedImages(Dataset):
    """dataset[(index, aug_seed)] -> (image [3, S, S] in [-1, 1], label); runs in the workers."""

    def __init__(self, samples: list[tuple[Path, int]], image_size: int, flip: bool):
        self.samples, self.image_size, self.flip = samples, image_size, flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, aug_seed = key
        path, label = self.samples[index]
        size = self.image_size
        image = resize_shorter_side(open_rgb(path, min_size=size), size)
        top, left, mirrored = crop_placement(aug_seed, image.width, image.height, size, self.flip)
        image = image.crop((left, top, left + size, top + size))
        if mirrored:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image_to_tensor(image), label


# --------------------------------------------------------------------------- the source


class ImageFolderSource:
    """Batches of augmented crops from a folder of class sub-folders (see the module doc)."""

    def __init__(self, root: str | Path, image_size: int, flip: bool, seed: int, rank: int = 0,
                 num_workers: int = 0, world_size: int = 1):
        root = Path(root)
        self.class_names, samples = scan_image_folder(root)
        # Fail on a corrupt file now, not hours into training (pixels are decoded only later).
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            self.headers = list(pool.map(verify_image_header, (path for path, _ in samples)))
        # A sample is the whole image resized (uint8 RGB) before its crop (float32) is cut out, in
        # each worker at once: refuse a crop size that cannot fit before any worker tries.
        largest = max(width * height for width, height in (shorter_side_size(h.size, image_size) for h in self.headers))
        check_image_memory(image_size, max(1, num_workers) * (3 * largest + 12 * image_size**2),
                           f"resizing {root}'s images so their shorter side is {image_size} px")
        self.class_counts = {name: 0 for name in self.class_names}
        for _, label in samples:
            self.class_counts[self.class_names[label]] += 1
        log.info("data.source: %d images in %d classes under %s: %s", len(samples), len(self.class_names),
                 root, ", ".join(f"{name}={count}" for name, count in self.class_counts.items()))
        self.dataset = AugmentedImages(samples, image_size, flip)
        self.sample_shape = (3, image_size, image_size)
        self.seed, self.rank, self.world_size, self.num_workers = seed, rank, world_size, num_workers
        EpochStreamBatchSampler(len(samples), 1, seed, rank, 0, world_size)  # too few images fails now

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        """See `DataSource.batches`. An image that cannot be decoded stops the stream with an
        UnreadableImageError naming it, the same message whether or not workers decode."""
        size = self.dataset.image_size
        # Float32 batches in flight: prefetched by each worker (2 apiece), and the one in use.
        check_image_memory(size, (2 * self.num_workers + 1) * batch_size * 12 * size**2,
                           f"batches of {batch_size} crops of {size} px")
        sampler = EpochStreamBatchSampler(len(self.dataset), batch_size, self.seed, self.rank, start,
                                          self.world_size)
        # Its own generator: a DataLoader draws a base seed when iterated, and from the global RNG that
        # draw would shift the training step's noise and dropout, differently in a resumed run (it
        # iterates first in a later step) than in an uninterrupted one. Sampling never uses it.
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available(), generator=torch.Generator().manual_seed(0))
        iterator = iter(loader)
        number = start
        try:
            while True:
                try:
                    x, labels = next(iterator)
                except Exception as err:
                    if self.num_workers == 0:
                        raise  # raised here, in this process: already the plain error
                    failure = err  # a worker's error, re-raised with its traceback pasted into the message
                    break
                yield Batch(x, labels)
                number += 1
        finally:
            # Stop the workers as soon as this generator is closed or a worker error passes
            # through: that error's traceback keeps `iterator` alive, and torch's clean-up when it
            # is finally garbage-collected waits ~5 s per worker.
            if self.num_workers > 0:
                iterator._shutdown_workers()
        # Batches arrive in order, so the failed one is batch `number`: decode its images again here,
        # which raises the error a single process would have raised for the first bad one.
        for index, _ in sampler.batch(number):
            open_rgb(self.dataset.samples[index][0], min_size=self.dataset.image_size)
        raise failure  # not reproducible here (e.g. a worker killed for memory): the worker's own error
