import os

import numpy as np
import pytest
import torch
from PIL import Image

from engine.pictures import grid_for_tensorboard, load_image, make_grid, save_grid


def constant_images(values: list[float], channels: int, side: int = 2) -> torch.Tensor:
    return torch.tensor(values).view(-1, 1, 1, 1).expand(-1, channels, side, side).clone()


def test_grid_places_images_row_major_with_black_padding():
    images = constant_images([-1.0, 0.0, 1.0], channels=1)  # 2x2 each
    grid = make_grid(images, nrow=2, padding=1)

    assert grid.dtype == np.uint8 and grid.shape == (7, 7, 1)  # 2 rows x 2 cols of (2 + 1) + 1
    assert (grid[1:3, 1:3] == 0).all()  # image 0 (-1 -> 0) at row 0, col 0
    assert (grid[1:3, 4:6] == 128).all()  # image 1 (0 -> 127.5, rounded) at row 0, col 1
    assert (grid[4:6, 1:3] == 255).all()  # image 2 (1 -> 255) at row 1, col 0
    assert (grid[4:6, 4:6] == 0).all()  # no image 3: stays black
    assert (grid[0] == 0).all() and (grid[:, 3] == 0).all() and (grid[3] == 0).all()  # padding


def test_grid_keeps_colour_channels_apart_and_clamps():
    image = torch.stack([torch.full((3, 4), v) for v in (-1.0, 1.0, 5.0)])[None]  # [1, 3, 3, 4]
    grid = make_grid(image, nrow=1, padding=0)

    assert grid.shape == (3, 4, 3)
    assert (grid[..., 0] == 0).all() and (grid[..., 1] == 255).all() and (grid[..., 2] == 255).all()


def test_grid_rejects_latents_with_a_hint():
    with pytest.raises(ValueError, match="decoded"):
        make_grid(torch.zeros(2, 4, 8, 8), nrow=2)


def test_tensorboard_grid_is_rgb_in_unit_range(seed):
    images = torch.rand(5, 1, 6, 6) * 2 - 1
    grid = grid_for_tensorboard(images, nrow=3)

    assert grid.shape == (3, 2 * 8 + 2, 3 * 8 + 2) and grid.dtype == torch.float32
    assert 0 <= grid.min() and grid.max() <= 1
    assert torch.equal(grid[0], grid[2])
    expected = torch.from_numpy(make_grid(images, nrow=3)).float()[..., 0] / 255
    assert torch.equal(grid[1], expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_round_trip_is_exact_for_quantised_images(tmp_path, seed, channels):
    levels = torch.randint(0, 256, (1, channels, 5, 7))
    image = levels.float() / 127.5 - 1
    path = tmp_path / "samples" / "grid.png"

    save_grid(image, path, nrow=1, padding=0)
    loaded = load_image(path)

    assert loaded.shape == (3, 5, 7)
    assert torch.equal(loaded, image[0].expand(3, -1, -1))
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temporary file left behind


def test_save_grid_replaces_an_existing_file(tmp_path):
    path = tmp_path / "grid.png"
    save_grid(constant_images([1.0], channels=3), path, nrow=1, padding=0)
    save_grid(constant_images([-1.0], channels=3), path, nrow=1, padding=0)

    assert (load_image(path) == -1).all()


def test_load_image_resizes_shorter_side_and_crops_the_centre(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # a white band exactly over the centred 20 x 20 square
    Image.fromarray(pixels).save(tmp_path / "wide.png")

    image = load_image(tmp_path / "wide.png", size=10)

    assert image.shape == (3, 10, 10)
    assert (image[:, :, 1:-1] > 0.9).all()  # inner columns white (the borders blur a little)


def test_load_image_error_names_the_unreadable_file(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")

    with pytest.raises(ValueError, match="broken.png"):
        load_image(path)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")


def through_png(tmp_path, image: Image.Image) -> torch.Tensor:
    """`image` saved as a PNG and read back with load_image."""
    path = tmp_path / "picture.png"
    image.save(path)
    return load_image(path)


def rgb(*pixels) -> torch.Tensor:
    """8-bit RGB pixels in a row -> the [3, 1, W] tensor load_image gives for them."""
    return torch.tensor(pixels, dtype=torch.float32).T[:, None] / 127.5 - 1


def test_transparent_pixels_are_composited_over_white_not_revealed(tmp_path):
    # Opaque red, fully transparent black (what optimisers store under transparency), half blue.
    rgba = np.array([[[255, 0, 0, 255], [0, 0, 0, 0], [0, 0, 255, 128]]], dtype=np.uint8)
    grey_alpha = np.array([[[0, 255], [0, 0]]], dtype=np.uint8)

    torch.testing.assert_close(through_png(tmp_path, Image.fromarray(rgba, "RGBA")),
                               rgb((255, 0, 0), (255, 255, 255), (127, 127, 255)), atol=1 / 127.5, rtol=0)
    assert torch.equal(through_png(tmp_path, Image.fromarray(grey_alpha, "LA")), rgb((0, 0, 0), (255, 255, 255)))


def test_palette_and_one_bit_images_expand_to_their_colours(tmp_path):
    palette = Image.new("P", (3, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0, 0, 0, 0])
    palette.putdata([0, 1, 2])
    see_through = palette.copy()
    see_through.info["transparency"] = 2  # palette entry 2 is transparent

    assert torch.equal(through_png(tmp_path, palette), rgb((10, 20, 30), (200, 100, 0), (0, 0, 0)))
    assert torch.equal(through_png(tmp_path, see_through), rgb((10, 20, 30), (200, 100, 0), (255, 255, 255)))
    assert torch.equal(through_png(tmp_path, Image.fromarray(np.array([[True, False]]))),
                       rgb((255, 255, 255), (0, 0, 0)))
    assert Image.open(tmp_path / "picture.png").mode == "1"


def test_save_grid_never_writes_through_a_planted_symlink(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / "final.txt", outside / "temporary.txt"]
    for victim in victims:
        victim.write_text("precious")
    out = tmp_path / "run" / "grid.png"
    out.parent.mkdir()
    out.symlink_to(victims[0])  # at the final name
    (out.parent / f".{out.name}.{os.getpid()}.tmp").symlink_to(victims[1])  # at a guessable temporary name

    save_grid(constant_images([1.0], channels=3), out, nrow=1, padding=0)

    assert not out.is_symlink() and (load_image(out) == 1).all()
    assert [victim.read_text() for victim in victims] == ["precious", "precious"]
