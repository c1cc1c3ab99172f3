"""Built-in digits: `data.source = "builtin:digits"`, scikit-learn's 1797 handwritten digits (8x8,
grey levels 0..16, shipped inside its wheel: nothing is downloaded), labels 0-9.

Each digit is scaled to [-1, 1] and upsampled bilinearly to 28x28 (MNIST's size, 784 values: what
the linear 784 -> 128 autoencoder takes), one channel. The size is fixed: data.image_size and
data.flip do not apply (a mirrored digit is another glyph).

Split: every HELDOUT_EVERY-th digit of the file (index % HELDOUT_EVERY == HELDOUT_EVERY - 1, ~20%,
every class represented) is held out of training as `.heldout`, the rest is trained on. A batch
draws its rows i.i.d. uniformly from the training split with a generator seeded from
batch_seed(seed, rank, batch number), so batch n is a pure function of (seed, rank, n).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from engine.data.base import Batch, Stream, batch_seed

DIGITS_SIDE = 28
DIGITS_SHAPE = (1, DIGITS_SIDE, DIGITS_SIDE)
HELDOUT_EVERY = 5
DIGIT_NAMES = [str(d) for d in range(10)]


def load_digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (images [N, 1, 28, 28] float32 in [-1, 1], labels [N] long), file order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError("builtin:digits needs scikit-learn, whose wheel ships the digits "
                          "(pip install scikit-learn)") from err
    digits = load_digits()
    small = torch.as_tensor(digits.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1  # [N, 1, 8, 8]
    images = F.interpolate(small, size=(DIGITS_SIDE, DIGITS_SIDE), mode="bilinear", align_corners=False)
    return images.clamp(-1, 1).contiguous(), torch.as_tensor(digits.target, dtype=torch.long)


class BuiltinDigits:
    """The training split of the built-in digits as a data source; `.heldout` is the held-out split."""

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = seed, rank
        self.class_names = list(DIGIT_NAMES)
        self.sample_shape = DIGITS_SHAPE
        images, labels = load_digits_images()
        held = torch.arange(len(labels)) % HELDOUT_EVERY == HELDOUT_EVERY - 1
        self.images, self.labels = images[~held], labels[~held]
        self.heldout = Batch(images[held], labels[held])

    def __len__(self) -> int:
        return self.images.shape[0]

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        for number in itertools.count(start):
            generator = torch.Generator().manual_seed(batch_seed(self.seed, self.rank, number, Stream.BATCHES))
            rows = torch.randint(len(self), (batch_size,), generator=generator)
            yield Batch(self.images[rows], self.labels[rows])
