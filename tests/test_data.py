import itertools
import multiprocessing
import socket
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.config import ConfigError, DataConfig
from engine.data import build_data_source
from engine.data.builtin import BuiltinTextures, builtin_shorter_side
from engine.data.images import AugmentedImages, EpochStreamBatchSampler, ImageFolderSource


def take(batches, count):
    return list(itertools.islice(batches, count))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x.x, y.x) and torch.equal(x.labels, y.labels)


def write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="PNG")


def random_folder(root: Path, counts: dict[str, int], rng: np.random.Generator) -> Path:
    """Class folders of random-noise PNGs, some wider than high and some higher than wide."""
    for name, count in counts.items():
        for i in range(count):
            shape = (10, 14, 3) if i % 2 else (13, 9, 3)
            write_png(root / name / f"{i}.png", rng.integers(0, 256, shape, dtype=np.uint8))
    return root


# --------------------------------------------------------------------------- built-in textures


def test_builtin_batches_are_crops_in_range_with_valid_labels(seed):
    source = BuiltinTextures(image_size=8, flip=True, seed=seed)
    batch = next(source.batches(0, batch_size=16))

    assert source.sample_shape == (3, 8, 8)
    assert batch.x.shape == (16, 3, 8, 8) and batch.x.dtype == torch.float32
    assert -1 <= batch.x.min() and batch.x.max() <= 1
    assert batch.labels.dtype == torch.long
    assert 0 <= batch.labels.min() and batch.labels.max() < len(source.class_names)


def test_builtin_batch_is_a_function_of_seed_and_number(seed):
    first = take(BuiltinTextures(8, True, seed).batches(0, 8), 3)
    again = take(BuiltinTextures(8, True, seed).batches(0, 8), 3)
    other_seed = take(BuiltinTextures(8, True, seed + 1).batches(0, 8), 1)

    assert_same_batches(first, again)
    assert not torch.equal(first[0].x, first[1].x)
    assert not torch.equal(first[0].x, other_seed[0].x)


def test_builtin_resume_replays_the_same_batches(seed):
    source = BuiltinTextures(8, True, seed)
    assert_same_batches(take(source.batches(5, 4), 3), take(source.batches(0, 4), 8)[5:])


def test_builtin_crop_extraction_matches_slicing_each_picture(seed):
    source = BuiltinTextures(8, True, seed)
    n = 32
    labels = torch.randint(len(source.class_names), (n,))
    heights, widths = (torch.tensor([p.shape[dim] for p in source.pictures])[labels] for dim in (1, 2))
    top = (torch.rand(n) * (heights - 8 + 1)).long()
    left = (torch.rand(n) * (widths - 8 + 1)).long()
    flipped = torch.rand(n) < 0.5

    crops = source.extract_crops(labels, top, left, flipped)

    for i in range(n):
        expected = source.pictures[labels[i]][:, top[i]:top[i] + 8, left[i]:left[i] + 8]
        assert torch.equal(crops[i], expected.flip(-1) if flipped[i] else expected)


def test_builtin_flip_off_never_mirrors(seed):
    generator = torch.Generator()
    plain = BuiltinTextures(8, False, seed).draw_crops(64, generator.manual_seed(seed))
    maybe_flipped = BuiltinTextures(8, True, seed).draw_crops(64, generator.manual_seed(seed))

    assert torch.equal(plain.labels, maybe_flipped.labels)
    mirrored = [not torch.equal(a, b) for a, b in zip(plain.x, maybe_flipped.x)]
    assert any(mirrored)
    for a, b, m in zip(plain.x, maybe_flipped.x, mirrored):
        assert torch.equal(a.flip(-1), b) if m else torch.equal(a, b)


def test_builtin_pictures_load_without_network(monkeypatch):
    def no_network(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    source = BuiltinTextures(8, True, 0)

    assert len(source.class_names) >= 10
    assert all(p.shape[0] == 3 and min(p.shape[1:]) == 32 for p in source.pictures)  # 4 x image_size


def test_builtin_picture_side_is_four_crops_capped_by_native_size():
    assert builtin_shorter_side(512, 32) == 128
    assert builtin_shorter_side(512, 256) == 512  # never upscaled beyond the native size ...
    assert builtin_shorter_side(172, 256) == 256  # ... unless a crop would not fit


# --------------------------------------------------------------------------- image folders


@pytest.mark.parametrize("num_workers", [0, 2])
def test_folder_resume_replays_identical_batches(tmp_path, seed, num_workers):
    root = random_folder(tmp_path, {"a": 3, "b": 2, "c": 2}, np.random.default_rng(seed))
    reference = ImageFolderSource(root, image_size=8, flip=True, seed=seed, num_workers=0)
    resumed = ImageFolderSource(root, image_size=8, flip=True, seed=seed, num_workers=num_workers)

    uninterrupted = take(reference.batches(0, batch_size=3), 6)
    assert_same_batches(take(resumed.batches(4, batch_size=3), 2), uninterrupted[4:])
    assert uninterrupted[0].x.shape == (3, 3, 8, 8) and -1 <= uninterrupted[0].x.min()


def test_folder_visits_every_image_once_per_epoch_with_its_label(tmp_path, seed):
    # Each image is one flat grey level (its id) at exactly the crop size, so a sample names its file.
    counts = {"b_dogs": 3, "a_cats": 4}
    level_to_class = {}
    for class_name, count in counts.items():
        for i in range(count):
            level = 10 * (len(level_to_class) + 1)
            write_png(tmp_path / class_name / f"{i}.png", np.full((8, 8, 3), level, dtype=np.uint8))
            level_to_class[level] = class_name
    source = ImageFolderSource(tmp_path, image_size=8, flip=True, seed=seed, num_workers=0)

    samples = [(round((x[0, 0, 0].item() + 1) * 127.5), label.item())
               for batch in take(source.batches(0, batch_size=3), 5) for x, label in zip(batch.x, batch.labels)]

    assert source.class_names == ["a_cats", "b_dogs"]
    assert source.class_counts == {"a_cats": 4, "b_dogs": 3}
    for epoch in (samples[:7], samples[7:14]):
        assert sorted(level for level, _ in epoch) == sorted(level_to_class)
    assert all(source.class_names[label] == level_to_class[level] for level, label in samples)


def test_epochs_are_differently_shuffled_and_batches_continue_across_them(seed):
    sampler = EpochStreamBatchSampler(num_samples=50, batch_size=15, seed=seed, rank=0, start=0)
    stream = [index for batch in take(iter(sampler), 7) for index, _ in batch]  # 105 samples

    assert sorted(stream[:50]) == list(range(50)) and sorted(stream[50:100]) == list(range(50))
    assert stream[:50] != stream[50:100]


def test_ranks_draw_disjoint_shards_of_every_epoch(seed):
    ranks = [EpochStreamBatchSampler(51, 5, seed, rank=r, start=0, world_size=2) for r in (0, 1)]
    streams = [[index for batch in take(iter(sampler), 10) for index, _ in batch] for sampler in ranks]  # 2 epochs
    for epoch in range(2):
        shards = [set(stream[25 * epoch:25 * (epoch + 1)]) for stream in streams]
        assert len(shards[0]) == len(shards[1]) == 25 and not shards[0] & shards[1]
    one_process = EpochStreamBatchSampler(51, 5, seed, rank=0, start=0)
    assert [i for i, _ in one_process.batch(0)] != streams[0][:5]
    with pytest.raises(ValueError, match="cannot shard 1 images over 2 processes"):
        EpochStreamBatchSampler(1, 5, seed, rank=0, start=0, world_size=2)


def test_folder_augmentation_is_a_seeded_random_crop_and_flip(tmp_path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 12, 3), dtype=np.uint8)
    write_png(tmp_path / "only" / "wide.png", pixels)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    windows = {(left, flipped): image[:, :, left:left + 8].flip(-1) if flipped else image[:, :, left:left + 8]
               for left in range(5) for flipped in (False, True)}

    def placements(flip: bool) -> set:
        dataset = AugmentedImages([(tmp_path / "only" / "wide.png", 0)], image_size=8, flip=flip)
        found = set()
        for aug_seed in range(seed, seed + 40):
            crop, _ = dataset[(0, aug_seed)]
            assert torch.equal(crop, dataset[(0, aug_seed)][0])  # same seed, same crop
            found |= {key for key, window in windows.items() if torch.equal(crop, window)}
        return found

    with_flip, without_flip = placements(True), placements(False)
    assert {f for _, f in with_flip} == {False, True} and len({left for left, _ in with_flip}) > 1
    assert {f for _, f in without_flip} == {False}


def test_folder_scan_finds_any_case_png_and_jpeg_and_skips_other_files(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a.PNG", "b.jpeg", "sub/c.JPG"):
        path = tmp_path / "x" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(
            path, format="PNG" if name.endswith("PNG") else "JPEG")
    (tmp_path / "x" / "notes.txt").write_text("not an image")
    write_png(tmp_path / ".hidden" / "z.png", np.zeros((9, 9, 3), dtype=np.uint8))

    source = ImageFolderSource(tmp_path, image_size=8, flip=False, seed=0)

    assert source.class_names == ["x"] and source.class_counts == {"x": 3}


def test_missing_folder_is_reported_with_the_expected_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"folder not found: {tmp_path / 'nope'}.*sub-folder per class"):
        ImageFolderSource(tmp_path / "nope", 8, True, 0)


def test_folder_without_class_folders_is_reported(tmp_path):
    write_png(tmp_path / "loose.png", np.zeros((9, 9, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderSource(tmp_path, 8, True, 0)


def test_empty_class_folder_is_reported_by_name(tmp_path):
    random_folder(tmp_path, {"full": 1}, np.random.default_rng(0))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'} has no PNG/JPEG images"):
        ImageFolderSource(tmp_path, 8, True, 0)


def test_corrupt_image_fails_at_start_naming_the_file(tmp_path):
    random_folder(tmp_path, {"a": 2}, np.random.default_rng(0))
    good = (tmp_path / "a" / "0.png").read_bytes()
    (tmp_path / "a" / "0.png").write_bytes(good[: len(good) // 2])  # truncated

    with pytest.raises(ValueError, match="cannot read image .*0.png"):
        ImageFolderSource(tmp_path, 8, True, 0)


def test_image_corrupted_during_training_fails_in_the_worker_naming_the_file(tmp_path):
    random_folder(tmp_path, {"a": 2}, np.random.default_rng(0))
    source = ImageFolderSource(tmp_path, 8, True, seed=0, num_workers=2)
    (tmp_path / "a" / "1.png").write_bytes(b"garbage")

    workers_before = set(multiprocessing.active_children())

    with pytest.raises(ValueError, match="cannot read image .*1.png"):
        take(source.batches(0, batch_size=2), 1)
    assert set(multiprocessing.active_children()) <= workers_before  # the workers were stopped


# --------------------------------------------------------------------------- the builder


def test_builder_makes_the_named_source(tmp_path):
    random_folder(tmp_path, {"a": 1, "b": 1}, np.random.default_rng(0))

    folder = build_data_source(DataConfig(source=f"folder:{tmp_path}", image_size=8, num_workers=0), seed=1)
    builtin = build_data_source(DataConfig(source="builtin:textures", image_size=8), seed=1)

    assert isinstance(folder, ImageFolderSource) and folder.class_names == ["a", "b"]
    assert isinstance(builtin, BuiltinTextures) and builtin.sample_shape == (3, 8, 8)


def test_builder_hands_latent_paths_and_device_to_the_latent_source(monkeypatch):
    import engine.data

    calls = []
    fake = types.SimpleNamespace(load=lambda *args: calls.append(args) or "latent source")
    monkeypatch.setattr(engine.data, "LatentSource", fake)
    cfg = DataConfig(source="latents:/data/z.safetensors")

    assert build_data_source(cfg, seed=3, rank=1, world_size=2, device="cuda") == "latent source"
    assert calls == [("/data/z.safetensors", 3, 1, "cuda")]


@pytest.mark.parametrize("source", ["webdataset:/x", "folder:", "builtin:mnist"])
def test_builder_rejects_unknown_sources_listing_the_valid_ones(source):
    with pytest.raises(ConfigError, match="builtin:textures.*folder:PATH.*latents:PATH"):
        build_data_source(DataConfig(source=source), seed=0)


def test_every_random_stream_comes_from_the_one_table():
    """batch_seed's stream is always a member of `Stream` (never a bare number), so two uses can
    never pick the same stream by accident."""
    import ast

    from engine.data.base import Stream

    assert len({int(s) for s in Stream}) == len(Stream)
    root = Path(__file__).resolve().parents[1] / "engine"
    calls = 0
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "batch_seed":
                calls += 1
                assert len(node.args) == 4, f"{path}:{node.lineno}: batch_seed needs its stream"
                stream = node.args[3]
                assert isinstance(stream, ast.Attribute) and getattr(stream.value, "id", None) == "Stream", (
                    f"{path}:{node.lineno}: the stream must be a Stream member")
    assert calls >= 6


# --------------------------------------------------------------------------- image_size bounds


@pytest.fixture
def machine_memory(monkeypatch):
    """Set the machine memory the data sources see (bytes, or None = unknown)."""
    import engine.data.base

    def set_memory(size):
        monkeypatch.setattr(engine.data.base, "physical_memory", lambda: size)

    return set_memory


@pytest.mark.parametrize("memory", [16 * 2**30, 256 * 2**30, None])
def test_an_absurd_image_size_fails_at_once_naming_data_image_size(tmp_path, machine_memory, memory):
    machine_memory(memory)
    random_folder(tmp_path, {"a": 2}, np.random.default_rng(0))
    for build in (lambda: BuiltinTextures(100000, True, 0),
                  lambda: ImageFolderSource(tmp_path, 100000, True, 0, num_workers=2)):
        began = time.perf_counter()
        with pytest.raises(ValueError, match=r"data\.image_size = 100000: .* would need \d[\d.e+]* GiB"):
            build()
        assert time.perf_counter() - began < 0.5


def test_the_memory_an_image_size_needs_is_compared_with_the_machines(tmp_path, machine_memory):
    random_folder(tmp_path, {"a": 2}, np.random.default_rng(0))  # 13 x 9 and 10 x 14 pictures
    machine_memory(100 * 2**10)  # 100 KiB; a 128 x ~180 px picture and one crop need ~260 KiB
    with pytest.raises(ValueError, match=r"data\.image_size = 128: .* of memory, this machine has 9\.54e-05 GiB"):
        ImageFolderSource(tmp_path, 128, True, 0)
    with pytest.raises(ValueError, match=r"data\.image_size = 64: builtin:textures' 12 pictures"):
        BuiltinTextures(64, True, 0)

    machine_memory(64 * 2**20)
    source = ImageFolderSource(tmp_path, 64, True, 0)  # a picture of 64 x ~92 px and one crop: ~0.2 MB
    assert next(source.batches(0, 100)).x.shape == (100, 3, 64, 64)  # ~5 MB a batch
    with pytest.raises(ValueError, match=r"data\.image_size = 64: batches of 2000 crops of 64 px would need"):
        next(source.batches(0, 2000))  # ~100 MB a batch


def test_builtin_memory_need_is_computed_from_the_native_sizes_before_resizing(machine_memory):
    pixels = sum(p.shape[1] * p.shape[2] for p in BuiltinTextures(64, True, 0).pictures)
    need = 2 * 3 * 4 * pixels  # float32 RGB, twice while the flat buffer is assembled

    machine_memory(need - 1)
    with pytest.raises(ValueError, match=rf"would need {need / 2**30:.3g} GiB of memory"):
        BuiltinTextures(64, True, 0)
    machine_memory(need)
    BuiltinTextures(64, True, 0)


def test_where_memory_is_unknown_a_fixed_cap_stands_in(tmp_path, machine_memory):
    machine_memory(None)
    random_folder(tmp_path, {"a": 2}, np.random.default_rng(0))
    assert ImageFolderSource(tmp_path, 8192, True, 0).sample_shape == (3, 8192, 8192)
    with pytest.raises(ValueError, match=r"data\.image_size = 8193: .*memory is unknown, so at most 8192 px"):
        ImageFolderSource(tmp_path, 8193, True, 0)


def test_the_machines_memory_is_read_from_the_os():
    from engine.data.base import physical_memory

    memory = physical_memory()
    assert memory is None or memory > 2**28
