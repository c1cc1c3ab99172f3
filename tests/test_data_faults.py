"""Damaged data: images and latents files broken the ways real files break, each met with one clear
error naming the file, at start-up where it can be seen cheaply, never a crash or silent garbage
hours into training."""

import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engine.data.images import AugmentedImages, ImageFolderSource, UnreadableImageError, verify_image
from engine.data.latents import (
    FORMAT,
    AutoencoderIdentity,
    LatentFile,
    first_nonfinite_row,
    read_latents,
    write_latents,
)
from engine.pictures import image_to_tensor, load_image, open_rgb, to_rgb

# --------------------------------------------------------------------------- damaged images


def picture(seed: int = 0, side: int = 24) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def encoded(pixels: np.ndarray, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format, **options)
    return buffer.getvalue()


def folder_with(tmp_path: Path, name: str, data: bytes) -> Path:
    """A one-class folder holding two good PNGs and `name` with `data`."""
    for i in range(2):
        path = tmp_path / "a" / f"good{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encoded(picture(i), "PNG"))
    (tmp_path / "a" / name).write_bytes(data)
    return tmp_path


def corrupted_in_the_middle(jpeg: bytes) -> bytes:
    """A JPEG whose compressed data holds a stray frame marker half-way: header and end-of-image
    marker intact (so no cheap check can see it), but the decoder stops on it."""
    middle = (jpeg.index(b"\xff\xda") + len(jpeg)) // 2  # half-way through the scan (after SOS)
    return jpeg[:middle] + b"\xff\xc0\x00\x11" + jpeg[middle + 4:]


@pytest.mark.parametrize("cut", [0.5, 0.9, 0.999])
def test_truncated_jpeg_is_refused_at_start_naming_the_file(tmp_path, cut):
    jpeg = encoded(picture(side=96), "JPEG")  # large enough that every cut falls in the compressed data
    root = folder_with(tmp_path, "cut.jpg", jpeg[:int(len(jpeg) * cut)])

    with pytest.raises(UnreadableImageError, match=r"cannot read image .*cut\.jpg \(truncated JPEG.*"
                                                   r"replace or delete the file"):
        ImageFolderSource(root, 8, True, 0)


def test_truncated_png_is_refused_at_start_by_its_chunk_checksums(tmp_path):
    png = encoded(picture(), "PNG")
    root = folder_with(tmp_path, "cut.png", png[:len(png) // 2])

    with pytest.raises(UnreadableImageError, match=r"cannot read image .*cut\.png \("):
        ImageFolderSource(root, 8, True, 0)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\xff\xd8\xff\xe0 garbage after a JPEG magic"],
                         ids=["empty", "garbage", "jpeg-magic-then-garbage"])
def test_empty_and_garbage_files_are_refused_at_start_naming_the_file(tmp_path, data):
    root = folder_with(tmp_path, "bad.jpg", data)

    with pytest.raises(UnreadableImageError, match=r"cannot read image .*bad\.jpg \("):
        ImageFolderSource(root, 8, True, 0)


def test_complete_jpegs_pass_the_start_check_whatever_follows_their_end(tmp_path):
    jpeg = encoded(picture(), "JPEG")
    variants = {
        "plain.jpg": jpeg,
        "padded.jpg": jpeg + bytes(300),  # zero padding, longer than the tail the check reads first
        "motion.jpg": jpeg + b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8,  # a video appended
    }
    for name, data in variants.items():
        (tmp_path / name).write_bytes(data)
        assert verify_image(tmp_path / name) == (24, 24)


def test_an_embedded_end_marker_does_not_hide_a_truncated_jpeg(tmp_path):
    # A comment segment (like an EXIF thumbnail) holding FF D9: a search for the bytes would find
    # it; walking the segments by their lengths does not.
    jpeg = encoded(picture(), "JPEG", comment=b"thumbnail \xff\xd9 ends here")
    path = tmp_path / "cut.jpg"
    path.write_bytes(jpeg[:len(jpeg) * 3 // 4] + b"appended")

    with pytest.raises(UnreadableImageError, match="truncated JPEG"):
        verify_image(path)


@pytest.mark.parametrize("damage", ["corrupted-middle", "replaced-after-start"])
def test_an_image_that_fails_to_decode_in_training_gives_one_message_with_or_without_workers(tmp_path, damage):
    jpeg = encoded(picture(7, side=48), "JPEG")
    if damage == "corrupted-middle":  # passes the start-up check: only decoding can find this damage
        at_start = broken = corrupted_in_the_middle(jpeg)
    else:
        at_start, broken = jpeg, b"garbage written after start-up"
    root = folder_with(tmp_path, "bad.jpg", at_start)
    bad = root / "a" / "bad.jpg"

    errors = []
    for workers in (0, 2):
        bad.write_bytes(at_start)
        source = ImageFolderSource(root, 8, flip=True, seed=0, num_workers=workers)
        bad.write_bytes(broken)
        with pytest.raises(UnreadableImageError) as caught:
            list(itertools.islice(source.batches(0, batch_size=2), 4))  # 4 batches cover the 3 images
        errors.append(caught.value)

    with pytest.raises(UnreadableImageError) as direct:
        open_rgb(bad)
    for err in errors:
        assert str(err) == str(direct.value)  # what one process reading the file says
        assert str(err).startswith(f"cannot read image {bad} (")
        assert str(err).endswith("); replace or delete the file")
        assert "Traceback" not in str(err) and "worker" not in str(err) and "\n" not in str(err)
        assert err.path == bad


def test_sixteen_bit_greyscale_png_spans_the_whole_range_monotonically(tmp_path):
    gradient = np.linspace(0, 65535, 300).round().astype(np.uint16)[None].repeat(4, 0)  # [4, 300]
    path = tmp_path / "deep.png"
    Image.fromarray(gradient).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL opens it with 16 bits per sample

    image = load_image(path)  # engine-encode and engine-transfer read images through this

    assert image.shape == (3, 4, 300)
    row = image[0, 0]
    assert row[0] == -1 and row[-1] == 1
    assert (row.diff() >= 0).all() and len(row.unique()) > 200
    expected = torch.from_numpy(gradient / 257.0).round().div(127.5).sub(1).float()
    torch.testing.assert_close(image, expected.expand(3, -1, -1), atol=1e-6, rtol=0)


def test_sixteen_bit_levels_reach_training_crops_at_their_own_scale(tmp_path):
    levels = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)  # the 8-bit levels, in 16 bits
    path = tmp_path / "a" / "deep.png"
    path.parent.mkdir()
    Image.fromarray(levels).save(path)
    dataset = AugmentedImages([(path, 0)], image_size=16, flip=False)

    crop, _ = dataset[(0, 0)]

    expected = (torch.arange(256, dtype=torch.float32).view(16, 16) / 127.5 - 1).expand(3, -1, -1)
    assert torch.equal(crop, expected)


@pytest.mark.parametrize(("mode", "dtype", "white"), [("I;16B", ">u2", 65535), ("I;16L", "<u2", 65535),
                                                      ("I", "<i4", 65535), ("F", "<f4", 1.0)])
def test_every_high_depth_mode_is_read_on_its_own_scale(mode, dtype, white):
    # Modes no PNG opens as are included: every decoded picture goes through the same conversion.
    image = Image.frombytes(mode, (3, 1), np.array([[0, white / 2, white]], dtype=dtype).tobytes())

    pixels = image_to_tensor(to_rgb(image))

    torch.testing.assert_close(pixels[:, 0], torch.tensor([-1.0, 0.0, 1.0]).expand(3, -1), atol=1 / 127.5,
                               rtol=0)


# --------------------------------------------------------------------------- damaged latents


def raw_latents_file(path: Path, latents: torch.Tensor, scaling_factor: str = "0.5") -> Path:
    """A latents file written without write_latents' checks, as a damaged or foreign file would be."""
    labels = torch.arange(latents.shape[0]) % 2
    metadata = {"format": FORMAT, "class_names": json.dumps(["a", "b"]), "scaling_factor": scaling_factor,
                "autoencoder": "/ae", "autoencoder_hash": "abc", "posterior": "mean"}
    save_file({"latents": latents.contiguous(), "labels": labels}, path, metadata=metadata)
    return path


def good_latents(n: int = 30) -> torch.Tensor:
    return torch.randn(n, 4, 3, 3, generator=torch.Generator().manual_seed(0)).half()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_latents_row_with_nan_or_inf_is_refused_on_load_naming_file_and_row(tmp_path, bad):
    latents = good_latents()
    latents[17, 2, 1, 0] = bad
    latents[23, 0, 0, 0] = bad  # only the first bad row is named
    path = raw_latents_file(tmp_path / "z.safetensors", latents)

    with pytest.raises(ValueError, match=r"latents file .*z\.safetensors: row 17 holds NaN/inf values; "
                                         r"re-run engine-encode"):
        read_latents(path)


@pytest.mark.parametrize("factor", ["inf", "nan", "-1.0", "0.0"])
def test_a_scaling_factor_that_is_not_finite_and_positive_is_refused(tmp_path, factor):
    path = raw_latents_file(tmp_path / "z.safetensors", good_latents(), scaling_factor=factor)

    with pytest.raises(ValueError, match=rf"z\.safetensors: scaling_factor = {factor} must be a finite number > 0"):
        read_latents(path)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64])
def test_integer_latents_are_refused_naming_the_dtype(tmp_path, dtype):
    path = raw_latents_file(tmp_path / "z.safetensors", good_latents().to(dtype))
    name = str(dtype).removeprefix("torch.")

    with pytest.raises(ValueError, match=rf"latents must be float16/bfloat16/float32/float64, got {name};"):
        read_latents(path)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_every_float_dtype_of_latents_is_accepted(tmp_path, dtype):
    latents = good_latents().to(dtype)
    back = read_latents(raw_latents_file(tmp_path / "z.safetensors", latents))

    assert back.latents.dtype == dtype and torch.equal(back.latents, latents)


def test_a_truncated_latents_file_is_refused_naming_it(tmp_path):
    path = raw_latents_file(tmp_path / "z.safetensors", good_latents())
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(ValueError, match=r"z\.safetensors: it is truncated or corrupt"):
        read_latents(path)


@pytest.mark.parametrize("damage", ["nan-row", "int8", "inf-factor"])
def test_write_latents_refuses_what_read_latents_would_refuse_and_writes_nothing(tmp_path, damage):
    latents, factor = good_latents(), 0.5
    if damage == "nan-row":
        latents[4] = float("nan")
    elif damage == "int8":
        latents = latents.to(torch.int8)
    else:
        factor = float("inf")
    data = LatentFile(latents, torch.arange(30) % 2, ["a", "b"], factor, AutoencoderIdentity("/ae", "abc"), "mean")

    with pytest.raises(ValueError, match="row 4 holds NaN/inf|got int8|scaling_factor = inf"):
        write_latents(tmp_path / "z.safetensors", data)
    assert list(tmp_path.iterdir()) == []


def test_the_first_bad_row_is_found_across_chunk_boundaries(monkeypatch):
    import engine.data.latents

    monkeypatch.setattr(engine.data.latents, "_FINITE_CHECK_VALUES", 20)  # 2 rows of 9 values per chunk
    latents = torch.zeros(11, 1, 3, 3)
    assert first_nonfinite_row(latents) is None
    for row in (0, 1, 2, 7, 10):
        damaged = latents.clone()
        damaged[row, 0, 2, 2] = float("nan")
        damaged[-1, 0, 0, 0] = float("inf")
        assert first_nonfinite_row(damaged) == row
