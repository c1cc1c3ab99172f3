"""Pictures in and out: sample grids, PNG files, and the PIL <-> tensor conversions the image
data sources share.

Convention: an image tensor is float [C, H, W] (or a batch [N, C, H, W]) with values in [-1, 1];
C is 3 (RGB) or 1 (grey). Latents (e.g. 4 channels) are not images: decode them first.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from engine.safe_files import replacing

# What PIL raises on a missing, truncated, corrupt or absurdly large image: a bad PNG chunk is a
# SyntaxError, a truncated stream an OSError, an unknown format UnidentifiedImageError (an OSError).
PIL_READ_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)

# Modes whose samples are wider than 8 bits, with the value that is white: a 16-bit PNG opens as
# I;16 (I in older Pillow), float pictures hold 0..1. PIL's own convert("RGB") clips them at 255.
HIGH_DEPTH_WHITE = {"I;16": 65535.0, "I;16B": 65535.0, "I;16L": 65535.0, "I;16N": 65535.0, "I": 65535.0,
                    "F": 1.0}
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded. The message names the file and says what to do; it is
    the same whichever process (a DataLoader worker or the main one) found the damage."""

    def __init__(self, path: str | Path, detail: str):
        super().__init__(f"cannot read image {path} ({detail}); replace or delete the file")
        self.path, self.detail = Path(path), detail

    def __reduce__(self):  # pickles as (path, detail), not as the formatted message
        return type(self), (self.path, self.detail)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, each mode read on its own scale: 16-bit grey spans 0..65535 and
    float grey 0..1 (rounded to 8 bits, the precision of every other picture); grey, 1-bit and
    palette pictures are expanded; transparent pixels are composited over white, as a viewer
    shows them, rather than revealing whatever colour the file stores under them."""
    white = HIGH_DEPTH_WHITE.get(image.mode)
    if white is not None:
        grey = np.asarray(image, dtype=np.float32) * np.float32(255.0 / white)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def open_rgb(path: str | Path, min_size: int | None = None) -> Image.Image:
    """Decode an image file as 8-bit RGB (see `to_rgb`); UnreadableImageError naming the file when
    it is damaged.

    `min_size`: the caller will shrink the image so its shorter side is this; JPEGs are then
    decoded at a reduced scale (DCT scaling) that still keeps both sides >= min_size, which is
    several times faster on large photos.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            if min_size is not None:
                image.draft("RGB", (min_size, min_size))
            return to_rgb(image)  # decodes the whole file, so corruption shows here
    except PIL_READ_ERRORS as err:
        raise UnreadableImageError(path, f"{type(err).__name__}: {err}") from err


def shorter_side_size(size: tuple[int, int], side: int) -> tuple[int, int]:
    """(width, height) of a picture of `size` scaled so that its shorter side is `side`."""
    width, height = size
    scale = side / min(width, height)
    return max(side, round(width * scale)), max(side, round(height * scale))


def resize_shorter_side(image: Image.Image, side: int) -> Image.Image:
    """Scale (up or down, keeping the aspect ratio) so that the shorter side is exactly `side`."""
    size = shorter_side_size(image.size, side)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.BICUBIC)  # PIL's resize antialiases when shrinking


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB (or L) image -> float [C, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_image(path: str | Path, size: int | None = None) -> torch.Tensor:
    """An image file as float [3, H, W] in [-1, 1].

    `size`: resize so the shorter side is `size`, then take the centred size x size square.
    """
    image = open_rgb(path, min_size=size)
    if size is not None:
        image = resize_shorter_side(image, size)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return image_to_tensor(image)


def make_grid(images: torch.Tensor, nrow: int, padding: int = 2) -> np.ndarray:
    """Images [N, C, H, W] in [-1, 1] (C = 3 or 1) -> one uint8 picture [H', W', C].

    `nrow` images per row, rows filled left to right, top to bottom; `padding` black pixels
    between cells and around the border; cells past N stay black.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"make_grid: expected images [N, 1 or 3, H, W], got shape {tuple(images.shape)}; "
                         f"latents must be decoded to images first")
    if nrow < 1 or padding < 0:
        raise ValueError(f"make_grid: need nrow >= 1 and padding >= 0, got nrow={nrow}, padding={padding}")
    count, channels, height, width = images.shape
    rows = math.ceil(count / nrow)
    pixels = images.detach().float().cpu().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    grid = torch.zeros(rows * (height + padding) + padding, nrow * (width + padding) + padding, channels,
                       dtype=torch.uint8)
    for index in range(count):
        row, col = divmod(index, nrow)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top:top + height, left:left + width] = pixels[index].permute(1, 2, 0)
    return grid.numpy()


# The picture file formats the commands write, by file name extension (any case).
PICTURE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def picture_format(path: str | Path) -> str:
    """PIL's format name for a picture written to `path`; ValueError for an extension not in
    PICTURE_FORMATS (a .webp name must not get PNG bytes)."""
    suffix = Path(path).suffix.lower()
    if suffix not in PICTURE_FORMATS:
        raise ValueError(f"{path}: unknown picture extension {suffix or '(none)'!r}; use "
                         f"{', '.join(PICTURE_FORMATS)}")
    return PICTURE_FORMATS[suffix]


def save_grid(images: torch.Tensor, path: str | Path, nrow: int, padding: int = 2) -> None:
    """Write `make_grid(images, nrow, padding)` as a PNG or JPEG (by `path`'s extension, see
    picture_format; JPEG at quality 95), atomically: a reader never sees half a file. One image with
    nrow=1, padding=0 saves that image alone."""
    file_format = picture_format(path)
    grid = make_grid(images, nrow, padding)
    picture = Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid)
    options = {"quality": 95} if file_format == "JPEG" else {}
    with replacing(path) as temporary:  # created exclusively: a planted symlink is never written through
        picture.save(temporary, format=file_format, **options)


def grid_for_tensorboard(images: torch.Tensor, nrow: int, padding: int = 2) -> torch.Tensor:
    """The grid as TensorBoard's `add_image` wants it: float [3, H', W'] in [0, 1]."""
    grid = torch.from_numpy(make_grid(images, nrow, padding)).permute(2, 0, 1).float().div_(255.0)
    return grid.expand(3, -1, -1).contiguous() if grid.shape[0] == 1 else grid
