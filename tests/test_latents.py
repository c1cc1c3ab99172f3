"""Latent datasets: the file format, the style index and the device-resident source."""

import os

import pytest
import torch

from engine.config import load_config
from engine.data import build_data_source
from engine.data.latents import (
    AutoencoderIdentity,
    LatentFile,
    LatentSource,
    StyleIndex,
    read_latents,
    write_latents,
)

CLASSES = ["brick", "grass", "gravel", "moon"]


@pytest.fixture(autouse=True)
def one_thread():
    # The CI box has 2 cores shared by parallel jobs; one intra-op thread avoids oversubscription.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_file(n=60, labels=None, classes=CLASSES, dtype=torch.float16) -> LatentFile:
    """Latents whose every value is their row id, so a gathered row tells where it came from."""
    if labels is None:
        labels = torch.arange(n) % len(classes)
    rows = torch.arange(len(labels), dtype=torch.float32)
    latents = rows[:, None, None, None].expand(-1, 4, 2, 2).to(dtype).contiguous()
    return LatentFile(latents, labels.long(), list(classes), 0.5, AutoencoderIdentity("/ae/run", "abc123"), "mean")


def test_write_then_read_round_trips_everything(tmp_path):
    data = make_file()
    path = tmp_path / "sub" / "latents.safetensors"
    write_latents(path, data)
    back = read_latents(path)
    assert back.latents.dtype == torch.float16 and torch.equal(back.latents, data.latents)
    assert back.labels.dtype == torch.int64 and torch.equal(back.labels, data.labels)
    assert back.class_names == CLASSES and back.scaling_factor == 0.5 and back.posterior == "mean"
    assert back.autoencoder == AutoencoderIdentity("/ae/run", "abc123")
    assert [p.name for p in path.parent.iterdir()] == ["latents.safetensors"]  # no temporary left


def test_truncated_file_is_a_clear_error_naming_it(tmp_path):
    path = tmp_path / "latents.safetensors"
    write_latents(path, make_file())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"latents\.safetensors.*truncated or corrupt.*engine-encode"):
        read_latents(path)


def test_missing_file_says_to_run_engine_encode(tmp_path):
    with pytest.raises(FileNotFoundError, match="run engine-encode first"):
        LatentSource.load(tmp_path / "nope.safetensors", seed=0)


def test_a_file_that_is_not_a_latents_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="expected 'latents' and 'labels'"):
        read_latents(path)


def test_style_index_never_returns_a_row_of_another_label_and_covers_every_row(seed):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(5, (120,), generator=generator)
    labels[:5] = torch.arange(5)  # every label present
    index = StyleIndex(labels, 5)
    requested = torch.randint(5, (20000,), generator=generator)
    rows = index.sample_rows_of(requested, generator)
    assert rows.dtype == torch.long and rows.shape == requested.shape
    assert torch.equal(labels[rows], requested)
    for label in range(5):
        expected = set((labels == label).nonzero().flatten().tolist())
        assert set(index.rows_of(label).tolist()) == expected
        assert set(rows[requested == label].tolist()) == expected  # ~800 draws over ~24 rows


def test_style_index_handles_a_label_with_one_row():
    index = StyleIndex(torch.tensor([1, 0, 1, 1]), 2)
    rows = index.sample_rows_of(torch.zeros(100, dtype=torch.long), torch.Generator().manual_seed(0))
    assert rows.tolist() == [1] * 100


def test_a_label_with_no_rows_is_an_error_at_start_naming_it():
    labels = torch.tensor([0, 0, 1, 3, 3])
    index = StyleIndex(labels, 4, CLASSES)
    with pytest.raises(ValueError, match=r"2 \('gravel'\)"):
        index.require_all()
    with pytest.raises(ValueError, match=r"4, 5"):
        StyleIndex(labels, 4).require_all(6)  # labels past the end of the file count as empty
    StyleIndex(labels[labels != 3], 2).require_all()


def test_source_batches_are_a_function_of_seed_rank_and_number():
    source = LatentSource(*_fields(make_file()), seed=3)
    first = [b for _, b in zip(range(6), source.batches(0, 8))]
    resumed = next(source.batches(5, 8))
    assert torch.equal(first[5].x, resumed.x) and torch.equal(first[5].labels, resumed.labels)
    other_rank = next(LatentSource(*_fields(make_file()), seed=3, rank=1).batches(5, 8))
    assert not torch.equal(other_rank.x, resumed.x)
    batch = first[0]
    assert batch.x.dtype == torch.float32 and batch.x.shape == (8, 4, 2, 2)
    rows = batch.x[:, 0, 0, 0].long()
    assert torch.equal(source.labels[rows], batch.labels)  # each latent comes with its own label


def test_source_exposes_shape_names_scale_and_autoencoder(tmp_path):
    path = tmp_path / "latents.safetensors"
    write_latents(path, make_file())
    source = build_data_source(load_config(None, [f"--data.source=latents:{path}"]).data, seed=0)
    assert isinstance(source, LatentSource)
    assert source.sample_shape == (4, 2, 2) and source.class_names == CLASSES
    assert source.scaling_factor == 0.5 and source.autoencoder.weights_hash == "abc123"
    assert source.latents.dtype == torch.float16  # kept as stored on the device
    styles = torch.tensor([3, 0, 2, 2, 1])
    reference = source.sample_style_reference(styles, torch.Generator().manual_seed(0))
    assert torch.equal(source.labels[reference[:, 0, 0, 0].long()], styles)


def test_split_holdout_is_deterministic_disjoint_and_keeps_every_label():
    source = LatentSource(*_fields(make_file(n=40)), seed=0)
    train, held = source.split_holdout(2)
    again_train, again_held = LatentSource(*_fields(make_file(n=40)), seed=9).split_holdout(2)
    assert torch.equal(held.x, again_held.x) and torch.equal(train.latents, again_train.latents)
    assert torch.bincount(held.labels, minlength=4).tolist() == [2, 2, 2, 2]
    held_rows = set(held.x[:, 0, 0, 0].long().tolist())
    train_rows = set(train.latents[:, 0, 0, 0].long().tolist())
    assert not held_rows & train_rows and len(held_rows | train_rows) == 40
    train.style_index.require_all()
    with pytest.raises(ValueError, match="none would be left to train on"):
        source.split_holdout(10)


def _fields(data: LatentFile):
    return data.latents, data.labels, data.class_names, data.scaling_factor, data.autoencoder


def test_write_latents_never_writes_through_a_planted_symlink(tmp_path, monkeypatch):
    import safetensors.torch

    import engine.data.latents

    def naive_save_file(tensors, path, metadata=None):  # opens the path it is given, as older safetensors did
        with open(path, "wb") as f:
            f.write(safetensors.torch.save(tensors, metadata))

    monkeypatch.setattr(engine.data.latents, "save_file", naive_save_file)
    outside = tmp_path / "outside"
    outside.mkdir()
    victims = [outside / "final.bin", outside / "temporary.bin"]
    for victim in victims:
        victim.write_bytes(b"precious")
    path = tmp_path / "data" / "latents.safetensors"
    path.parent.mkdir()
    path.symlink_to(victims[0])  # at the final name
    (path.parent / f".{path.name}.{os.getpid()}.tmp").symlink_to(victims[1])  # at a guessable temporary name

    write_latents(path, make_file())

    assert not path.is_symlink() and torch.equal(read_latents(path).latents, make_file().latents)
    assert [victim.read_bytes() for victim in victims] == [b"precious", b"precious"]
