"""Image folders through DALI (engine/data/dali.py) against the torch DataLoader path: the same
batches (labels, order, crops, flips, pixels), resume, rank shards, errors naming the file, the
loader choice, and engine-encode reading through DALI. CPU pipelines only (DALI's device_id=None).
Tests that run DALI are skipped, saying why, where nvidia.dali does not import."""

import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError, DataConfig, load_config
from engine.data import build_data_source
from engine.data import dali as dali_module
from engine.data.dali import DaliImageFolderSource, dali_problem
from engine.data.images import EpochStreamBatchSampler, ImageFolderSource, UnreadableImageError
from engine.encode import _dali_image_batches, _image_batches, encode_folder, scan_folder
from engine.pictures import image_to_tensor, open_rgb

needs_dali = pytest.mark.skipif(dali_problem() is not None,
                                reason=f"{dali_problem()} (pip install -e '.[dali]')")

SIZE = 8


def take(batches, count):
    return list(itertools.islice(batches, count))


def save(path: Path, image: Image.Image, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)


def structured(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Smooth gradients plus noise (like a photo, unlike pure noise), uint8 of `shape` (H, W[, C])."""
    height, width = shape[:2]
    y, x = np.mgrid[0:height, 0:width]
    base = 128 + 60 * np.sin(x / 5 + seed) + 40 * np.cos(y / 7 - seed)
    if len(shape) == 3:
        base = np.stack([base, base[::-1], base[:, ::-1]], -1)
    noise = np.random.default_rng(seed).integers(-20, 21, shape)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def crop_sized_folder(root: Path) -> Path:
    """Two classes of PNGs and JPEGs, RGB and grey, whose shorter side is already SIZE (no resizing):
    some wider, some taller, so crops are cut at random offsets along the longer side."""
    shapes = [(SIZE, SIZE + 5), (SIZE + 3, SIZE), (SIZE, SIZE), (SIZE, SIZE + 1)]
    for i, (height, width) in enumerate(shapes * 2):
        kind = "png" if i % 2 else "jpg"
        pixels = structured((height, width, 3) if i % 3 else (height, width), i)
        save(root / f"class{i % 2}" / f"{i}.{kind}", Image.fromarray(pixels), quality=90)
    return root


def sources(root: Path, seed: int, flip: bool = True, **kwargs):
    return (ImageFolderSource(root, SIZE, flip, seed, **kwargs),
            DaliImageFolderSource(root, SIZE, flip, seed, num_workers=2, **kwargs))


def assert_same(torch_batches, dali_batches):
    assert len(torch_batches) == len(dali_batches)
    for a, b in zip(torch_batches, dali_batches):
        assert b.x.dtype == torch.float32 and torch.equal(a.labels, b.labels) and torch.equal(a.x, b.x)


# --------------------------------------------------------------------------- the same batches


@needs_dali
def test_dali_batches_are_the_torch_batches_crops_and_flips_included(tmp_path, seed):
    torch_source, dali_source = sources(crop_sized_folder(tmp_path), seed)
    assert dali_source.class_names == torch_source.class_names == ["class0", "class1"]
    # 8 images: 7 batches of 3 span almost three epochs, so batches cross epoch ends.
    assert_same(take(torch_source.batches(0, 3), 7), take(dali_source.batches(0, 3), 7))


@needs_dali
def test_resized_pictures_match_within_resampling_tolerance(tmp_path, seed):
    # Larger (shrunk) and smaller (enlarged) than SIZE, wide and tall: bicubic in DALI and in PIL.
    for i, shape in enumerate([(23, 31, 3), (40, 17, 3), (5, 6, 3), (12, 9, 3)]):
        save(tmp_path / "a" / f"{i}.png", Image.fromarray(structured(shape, i)))
    torch_source, dali_source = sources(tmp_path, seed, flip=False)
    for a, b in zip(take(torch_source.batches(0, 4), 2), take(dali_source.batches(0, 4), 2)):
        assert torch.equal(a.labels, b.labels)
        levels = (a.x - b.x).abs() * 127.5
        assert levels.mean() < 1 and levels.max() < 8, (levels.mean(), levels.max())  # seen: 0.27, 2


def picture_bytes(mode: str, image_format: str = "PNG", **options) -> bytes:
    rng = np.random.default_rng(len(mode))
    pixels = {"RGB": structured((SIZE, SIZE, 3), 1), "L": structured((SIZE, SIZE), 2),
              "I;16": rng.integers(0, 65536, (SIZE, SIZE)).astype(np.uint16),
              "RGBA": rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8),
              "LA": rng.integers(0, 256, (SIZE, SIZE, 2), dtype=np.uint8),
              "CMYK": rng.integers(0, 256, (SIZE, SIZE, 4), dtype=np.uint8)}
    if mode in ("P", "1"):
        image = Image.fromarray(pixels["RGB"]).convert(mode)
    else:
        image = Image.fromarray(pixels[mode], None if mode == "I;16" else mode)
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **options)
    return buffer.getvalue()


PICTURES = {  # name: (bytes, whether DALI decodes it itself; else PIL does, for DALI)
    "rgb.png": (picture_bytes("RGB"), True),
    "grey.png": (picture_bytes("L"), True),
    "palette.png": (picture_bytes("P"), True),
    "bilevel.png": (picture_bytes("1"), True),
    "sixteen.png": (picture_bytes("I;16"), True),
    "rgb.jpg": (picture_bytes("RGB", "JPEG", quality=85), True),
    "grey.jpg": (picture_bytes("L", "JPEG"), True),
    "rgba.png": (picture_bytes("RGBA"), False),
    "grey-alpha.png": (picture_bytes("LA"), False),
    "transparent-colour.png": (picture_bytes("RGB", transparency=(0, 0, 0)), False),
    "transparent-index.png": (picture_bytes("P", transparency=3), False),
    "cmyk.jpg": (picture_bytes("CMYK", "JPEG"), False),
    "gif-named.png": (picture_bytes("P", "GIF"), False),
}


@needs_dali
def test_every_kind_of_picture_decodes_as_the_torch_path_decodes_it(tmp_path):
    """Grey, palette, 1-bit and 16-bit PNGs DALI decodes as to_rgb does; alpha, transparent
    colours, CMYK and other formats PIL decodes for it (composited over white, 16-bit at its scale)."""
    for name, (data, _) in PICTURES.items():
        (tmp_path / "all").mkdir(exist_ok=True)
        (tmp_path / "all" / name).write_bytes(data)
    source = DaliImageFolderSource(tmp_path, SIZE, flip=False, seed=0)
    decoded_by_dali = {path.name: dali_module.dali_decodes(header)
                       for (path, _), header in zip(source.dataset.samples, source.headers)}
    assert decoded_by_dali == {name: by_dali for name, (_, by_dali) in PICTURES.items()}

    batch = next(source.batches(0, len(PICTURES)))
    order = EpochStreamBatchSampler(len(PICTURES), len(PICTURES), seed=0, rank=0, start=0).batch(0)
    for x, (index, _) in zip(batch.x, order):
        path = source.dataset.samples[index][0]
        assert torch.equal(x, image_to_tensor(open_rgb(path))), path.name


# --------------------------------------------------------------------------- order, resume, shards


@needs_dali
def test_a_resumed_stream_continues_exactly_where_it_stopped(tmp_path, seed):
    _, dali_source = sources(crop_sized_folder(tmp_path), seed)
    uninterrupted = take(dali_source.batches(0, 3), 6)
    assert_same(uninterrupted[4:], take(dali_source.batches(4, 3), 2))


def levels_folder(root: Path, count: int) -> dict[int, int]:
    """`count` flat pictures of SIZE x SIZE, each its own grey level, in two classes; level -> label."""
    labels = {}
    for i in range(count):
        level = 20 * (i + 1)
        save(root / f"class{i % 2}" / f"{i}.png", Image.fromarray(np.full((SIZE, SIZE), level, np.uint8)))
        labels[level] = i % 2
    return labels


@needs_dali
def test_two_ranks_draw_disjoint_and_complete_shards_of_every_epoch(tmp_path, seed):
    labels = levels_folder(tmp_path, 6)
    ranks = [DaliImageFolderSource(tmp_path, SIZE, True, seed, rank=rank, world_size=2) for rank in (0, 1)]
    streams = []
    for source in ranks:
        batches = take(source.batches(0, 2), 3)  # 6 samples: two epochs of this rank's 3
        streams.append([(round((x[0, 0, 0].item() + 1) * 127.5), label.item())
                        for batch in batches for x, label in zip(batch.x, batch.labels)])
    for stream in streams:
        assert all(labels[level] == label for level, label in stream)
    for epoch in (slice(0, 3), slice(3, 6)):
        shards = [{level for level, _ in stream[epoch]} for stream in streams]
        assert len(shards[0]) == len(shards[1]) == 3 and not shards[0] & shards[1]
        assert shards[0] | shards[1] == set(labels)
    # The same shards as the torch path's.
    torch_rank1 = ImageFolderSource(tmp_path, SIZE, True, seed, rank=1, world_size=2)
    assert_same(take(torch_rank1.batches(0, 2), 3), take(ranks[1].batches(0, 2), 3))


# --------------------------------------------------------------------------- damaged files


def jpeg_folder(root: Path) -> Path:
    for i in range(4):
        save(root / "a" / f"{i}.jpg", Image.fromarray(structured((24, 24, 3), i)), quality=90)
    return root


@needs_dali
def test_a_truncated_jpeg_is_refused_at_start_naming_the_file(tmp_path):
    root = jpeg_folder(tmp_path)
    save(root / "a" / "2.jpg", Image.fromarray(structured((96, 96, 3), 2)))  # the cut falls in the compressed data
    jpeg = (root / "a" / "2.jpg").read_bytes()
    (root / "a" / "2.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with pytest.raises(UnreadableImageError, match=r"cannot read image .*2\.jpg \(truncated JPEG"):
        DaliImageFolderSource(root, SIZE, True, 0)


@needs_dali
@pytest.mark.parametrize("damage", ["truncated", "garbage", "deleted"])
def test_an_image_damaged_after_start_stops_its_batch_with_the_torch_paths_error(tmp_path, damage):
    """DALI's own error names no file: the engine's does, for the batch that holds it, as the
    DataLoader does (train.py then saves a checkpoint before stopping)."""
    root = jpeg_folder(tmp_path)
    bad = root / "a" / "2.jpg"
    torch_source, dali_source = sources(root, seed=0)
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:300])
    elif damage == "garbage":
        bad.write_bytes(b"garbage written after start-up")
    else:
        bad.unlink()

    raised = []
    for source in (torch_source, dali_source):
        stream, good = source.batches(0, batch_size=1), 0
        with pytest.raises((UnreadableImageError, FileNotFoundError)) as caught:
            for _ in stream:
                good += 1
        raised.append((good, type(caught.value), str(caught.value)))
    assert raised[0] == raised[1]  # the same batch stops, with the same message
    assert str(bad) in raised[1][2] and raised[1][0] < 4
    if damage != "deleted":
        assert raised[1][2].endswith("; replace or delete the file")


@needs_dali
def test_a_batch_dali_fails_on_but_pil_reads_names_its_files_and_the_torch_loader(tmp_path, monkeypatch):
    root = jpeg_folder(tmp_path)
    source = DaliImageFolderSource(root, SIZE, True, seed=0)
    monkeypatch.setattr(dali_module.DaliReader, "_encoded", lambda self, index: np.frombuffer(b"junk", np.uint8))
    with pytest.raises(ValueError, match=r"DALI could not decode a batch of images that PIL reads \(.+\): "
                                         r".*\.jpg; the torch loader reads them \(data\.loader = 'torch'"):
        next(source.batches(0, 2))


@needs_dali
def test_training_through_dali_stops_on_a_damaged_image_after_a_checkpoint(tmp_path):
    from test_faults import folder_of_pictures
    from test_train import tiny_config

    from engine.checkpoint import latest_checkpoint
    from engine.train import DataReadError, train

    images = folder_of_pictures(tmp_path / "images")
    victim = images / "class1" / "3.png"
    intact = victim.read_bytes()

    def damage_after_step_2(step: int) -> bool:
        if step == 2:
            victim.write_bytes(intact[: len(intact) // 2])
        return False

    run = tmp_path / "run"
    config = tiny_config(run, f"--data.source=folder:{images}", "--data.loader=dali", "--data.image_size=8",
                         "--train.steps=12", "--train.batch_size=2", "--checkpoint.every=1000", "--sample.every=0",
                         "--model.attention_resolutions=[4]")
    with pytest.raises(DataReadError, match=r"cannot read image .*3\.png") as err:
        train(config, should_stop=damage_after_step_2)
    stopped_at = latest_checkpoint(run / "checkpoints").step
    assert stopped_at >= 2 and f"step {stopped_at}" in str(err.value)


# --------------------------------------------------------------------------- the loader option


@pytest.mark.parametrize("loader", ["auto", "torch", "dali"])
def test_data_loader_accepts_its_three_choices(loader):
    assert load_config(None, [f"--data.loader={loader}"]).data.loader == loader


def test_an_unknown_data_loader_is_refused_listing_the_choices():
    with pytest.raises(ConfigError, match=r"data\.loader.*'auto', 'torch', 'dali'"):
        load_config(None, ["--data.loader=nvjpeg"])


@needs_dali
def test_auto_chooses_dali_for_a_folder_and_says_so_once(tmp_path, capsys):
    levels_folder(tmp_path, 2)
    cfg = DataConfig(source=f"folder:{tmp_path}", image_size=SIZE, num_workers=2)

    source = build_data_source(cfg, seed=0)
    assert isinstance(source, DaliImageFolderSource)
    assert capsys.readouterr().out == "data: DALI pipeline (CPU decode), 2 threads\n"
    build_data_source(cfg, seed=0, rank=1, world_size=2)
    assert capsys.readouterr().out == ""  # rank 0 says it

    torch_cfg = DataConfig(source=f"folder:{tmp_path}", image_size=SIZE, num_workers=0, loader="torch")
    assert type(build_data_source(torch_cfg, seed=0)) is ImageFolderSource
    assert capsys.readouterr().out == "data: torch DataLoader, 0 workers (data.loader = 'torch')\n"


def test_without_dali_auto_falls_back_to_torch_and_dali_says_how_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(dali_module, "dali_problem", lambda: "nvidia-dali not installed")
    levels_folder(tmp_path, 2)
    cfg = DataConfig(source=f"folder:{tmp_path}", image_size=SIZE, num_workers=2)

    assert type(build_data_source(cfg, seed=0)) is ImageFolderSource
    assert capsys.readouterr().out == "data: torch DataLoader, 2 workers (nvidia-dali not installed)\n"
    cfg.loader = "dali"
    with pytest.raises(ImportError, match=r"data\.loader = 'dali', but nvidia-dali not installed: "
                                          r"pip install -e '\.\[dali\]'"):
        build_data_source(cfg, seed=0)


# --------------------------------------------------------------------------- engine-encode


@needs_dali
def test_encode_reads_a_folder_through_dali_as_through_pil(tmp_path):
    for i, shape in enumerate([(SIZE, SIZE, 3), (SIZE + 4, SIZE), (SIZE, SIZE + 7, 3), (SIZE, SIZE, 3), (SIZE, SIZE)]):
        save(tmp_path / f"class{i % 2}" / f"{i}.png", Image.fromarray(structured(shape, i)))
    _, samples = scan_folder(tmp_path)
    for channels in (3, 1):
        by_pil = list(_image_batches(samples, SIZE, channels, batch_size=2, workers=1))
        by_dali = list(_dali_image_batches(samples, SIZE, channels, 2, 2, torch.device("cpu")))
        assert len(by_dali) == math.ceil(len(samples) / 2) == len(by_pil)  # the last batch holds one
        for (x, labels, names), (y, dali_labels, dali_names) in zip(by_pil, by_dali):
            assert torch.equal(labels, dali_labels) and names == dali_names and torch.equal(x, y)


@needs_dali
def test_engine_encode_through_dali_writes_the_latents_pil_would(tmp_path, capsys):
    from test_encode import save_autoencoder_run

    for i in range(3):
        save(tmp_path / "styles" / f"s{i % 2}" / f"{i}.png", Image.fromarray(structured((16, 16, 3), i)))
    run_dir = save_autoencoder_run(tmp_path / "ae")
    kwargs = {"image_size": 16, "device": "cpu", "dtype": "fp32", "batch_size": 2}

    by_dali = encode_folder(tmp_path / "styles", run_dir, tmp_path / "dali.safetensors", loader="dali", **kwargs)
    assert "images: DALI pipeline (CPU decode)" in capsys.readouterr().out
    by_pil = encode_folder(tmp_path / "styles", run_dir, tmp_path / "pil.safetensors", loader="torch", **kwargs)
    assert "images: PIL decoding, " in capsys.readouterr().out
    assert torch.equal(by_dali.labels, by_pil.labels)
    assert torch.equal(by_dali.latents, by_pil.latents)
