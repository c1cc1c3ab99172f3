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
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from engine.data.base import Batch, Stream, batch_seed
from engine.pictures import PIL_READ_ERRORS, image_to_tensor, open_rgb, resize_shorter_side

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


def verify_image(path: Path) -> None:
    """A fast integrity check that does not decode pixels (PNG: chunk CRCs; JPEG: header only)."""
    try:
        with Image.open(path) as image:
            image.verify()
    except PIL_READ_ERRORS as err:
        raise ValueError(f"data.source: cannot read image {path} ({type(err).__name__}: {err}); "
                         f"replace or delete the file") from err


# --------------------------------------------------------------------------- order and augmentation


@functools.lru_cache(maxsize=2)  # a batch usually spans one or two epochs; a permutation is O(N) to draw
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch `epoch`, the same on every rank (each then takes its own shard of it)."""
    generator = torch.Generator().manual_seed(batch_seed(seed, 0, epoch, Stream.BATCHES))
    return torch.randperm(num_samples, generator=generator)


def augmentation_seed(seed: int, rank: int, number: int, position: int) -> int:
    """The seed of the crop and flip of sample `position` of micro-batch `number`."""
    return batch_seed(batch_seed(seed, rank, number, Stream.AUGMENT), 0, position, Stream.BATCHES)


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
        generator = torch.Generator().manual_seed(aug_seed)
        top, left, flip = torch.rand(3, generator=generator).tolist()
        top, left = int(top * (image.height - size + 1)), int(left * (image.width - size + 1))
        image = image.crop((left, top, left + size, top + size))
        if self.flip and flip < 0.5:
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
            list(pool.map(verify_image, (path for path, _ in samples)))
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
        sampler = EpochStreamBatchSampler(len(self.dataset), batch_size, self.seed, self.rank, start,
                                          self.world_size)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            pin_memory=torch.cuda.is_available())
        iterator = iter(loader)
        try:
            for x, labels in iterator:
                yield Batch(x, labels)
        finally:
            # Stop the workers as soon as this generator is closed or a worker error passes
            # through: that error's traceback keeps `iterator` alive, and torch's clean-up when it
            # is finally garbage-collected waits ~5 s per worker.
            if self.num_workers > 0:
                iterator._shutdown_workers()
