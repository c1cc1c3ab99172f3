"""Built-in textures: `data.source = "builtin:textures"`, real pictures that ship inside
scikit-image (nothing is downloaded), one class per picture.

Each picture is converted to RGB (grey ones repeated over the channels) and resized so its
shorter side is `builtin_shorter_side(native, image_size)`: 4 x image_size, so that an
image_size crop shows a patch of texture rather than a whole scene; never larger than the native
size, which would only invent detail; never smaller than image_size, so a crop fits. With
image_size=32 the pictures are ~128 px high; with image_size=256 they keep their native size
(300 to 872 px). They are held in memory as float in [-1, 1].

A batch draws, per sample and from a generator seeded with batch_seed(seed, rank, batch number):
a picture (uniform over pictures, its index is the label), a crop position (uniform over the
positions that fit) and a horizontal flip (probability 1/2, if `flip`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import skimage.data
import torch
from PIL import Image

from engine.data.base import Batch, Stream, batch_seed, check_image_memory
from engine.pictures import image_to_tensor, resize_shorter_side, shorter_side_size, to_rgb

# Pictures bundled in scikit-image's wheel (checked to load with no network). Others in
# skimage.data (eagle, lily, skin, ...) are fetched by pooch on first use and must not be listed.
BUILTIN_PICTURES = (
    "brick", "grass", "gravel",  # textures (grey)
    "astronaut", "camera", "chelsea", "coffee", "coins", "hubble_deep_field",
    "immunohistochemistry", "moon", "rocket",  # photographs
)


def builtin_shorter_side(native: int, image_size: int) -> int:
    """The shorter side a built-in picture is resized to (see the module doc)."""
    return max(image_size, min(native, 4 * image_size))


def load_builtin_native(name: str) -> Image.Image:
    """One bundled scikit-image picture at its native size, as 8-bit RGB."""
    try:
        array = getattr(skimage.data, name)()
    except (ImportError, OSError, ValueError) as err:
        raise RuntimeError(f"builtin:textures: scikit-image {skimage.__version__} cannot load its bundled "
                           f"picture {name!r} offline ({type(err).__name__}: {err}); install the "
                           f"scikit-image wheel that ships it or use data.source = 'folder:PATH'") from err
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))


def builtin_picture_size(native: tuple[int, int], image_size: int) -> tuple[int, int]:
    """(width, height) a built-in picture of native (width, height) is resized to for `image_size`."""
    return shorter_side_size(native, builtin_shorter_side(min(native), image_size))


def check_builtin_memory(sizes: list[tuple[int, int]], image_size: int) -> None:
    """ValueError naming data.image_size when the resized pictures (`sizes`: (width, height) each)
    cannot fit in memory: each is held as float32 RGB, twice while the flat buffer is assembled."""
    pixels = sum(width * height for width, height in sizes)
    check_image_memory(image_size, 2 * 3 * 4 * pixels, f"builtin:textures' {len(sizes)} pictures resized for "
                                                       f"{image_size} px crops")


class BuiltinTextures:
    """Random crops of the built-in pictures; label = index of the picture in `class_names`."""

    def __init__(self, image_size: int, flip: bool, seed: int, rank: int = 0):
        self.image_size, self.flip, self.seed, self.rank = image_size, flip, seed, rank
        self.class_names = list(BUILTIN_PICTURES)
        self.sample_shape = (3, image_size, image_size)
        # Every resized picture is at least image_size square: an absurd size fails before the
        # pictures are even loaded, then the exact need is checked before any is resized.
        check_builtin_memory([(image_size, image_size)] * len(BUILTIN_PICTURES), image_size)
        natives = [load_builtin_native(name) for name in BUILTIN_PICTURES]
        check_builtin_memory([builtin_picture_size(p.size, image_size) for p in natives], image_size)
        pictures = [image_to_tensor(resize_shorter_side(p, builtin_shorter_side(min(p.size), image_size)))
                    for p in natives]
        # Every picture lives in one flat buffer, so one indexing op extracts a whole batch of
        # crops from pictures of different sizes.
        self._pixels = torch.cat([p.reshape(-1) for p in pictures])
        sizes = [p.numel() for p in pictures]
        self._offsets = torch.tensor([0] + sizes[:-1]).cumsum(0)
        self._heights = torch.tensor([p.shape[1] for p in pictures])
        self._widths = torch.tensor([p.shape[2] for p in pictures])
        self.pictures = [flat.view(p.shape) for flat, p in zip(torch.split(self._pixels, sizes), pictures)]

    def extract_crops(self, labels: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
                      flipped: torch.Tensor) -> torch.Tensor:
        """Crops [n, 3, S, S] of pictures `labels` [n] at rows top.. and columns left.., mirrored
        where `flipped` [n] (bool) is set."""
        size = self.image_size
        steps = torch.arange(size)
        height, width = self._heights[labels], self._widths[labels]
        # Flat index of the first pixel of every crop row: [n, 3, S].
        row_starts = (self._offsets[labels, None, None]
                      + torch.arange(3)[None, :, None] * (height * width)[:, None, None]
                      + (top[:, None, None] + steps[None, None, :]) * width[:, None, None]
                      + left[:, None, None])
        # windows[i] = pixels[i : i + S], a view (no copy), so indexing it copies whole crop rows.
        windows = self._pixels.unfold(0, size, 1)
        crops = windows[row_starts]
        crops[flipped] = crops[flipped].flip(-1)
        return crops

    def draw_crops(self, n: int, generator: torch.Generator) -> Batch:
        """`n` random crops (picture, position and flip drawn from `generator`), e.g. to build a
        fixed data set to encode."""
        labels = torch.randint(len(self.class_names), (n,), generator=generator)
        # float64 so that u * (positions) stays below `positions` for every u < 1.
        u_top, u_left, u_flip = torch.rand(3, n, generator=generator, dtype=torch.float64)
        top = (u_top * (self._heights[labels] - self.image_size + 1)).long()
        left = (u_left * (self._widths[labels] - self.image_size + 1)).long()
        flipped = (u_flip < 0.5) & self.flip
        return Batch(self.extract_crops(labels, top, left, flipped), labels)

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        for number in itertools.count(start):
            generator = torch.Generator().manual_seed(batch_seed(self.seed, self.rank, number, Stream.BATCHES))
            yield self.draw_crops(batch_size, generator)
