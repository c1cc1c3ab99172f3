"""The preparation stage: built-in latents made once, cached, reused, and the resolved config that
training and the run's files record."""

import pytest
import torch

from engine.config import load_config
from engine.data.latents import read_latents
from engine.prepare import NotPrepared, builtin_autoencoder_config, prepare, prepare_builtin_latents


def tiny_builtin_config(tmp_path, *extra):
    return load_config(None, [
        f"--run.cache_dir={tmp_path / 'cache'}", "--run.seed=1", "--method.name=lgt",
        "--autoencoder.channels=8", "--autoencoder.channel_mult=[1, 2]", "--autoencoder.num_groups=4",
        "--prepare.autoencoder_steps=2", "--prepare.autoencoder_batch_size=2",
        "--prepare.autoencoder_image_size=16", "--prepare.image_size=32",
        "--prepare.crops=6", "--train.device=cpu", *extra])


def test_builtin_latents_are_prepared_once_then_reused(tmp_path, monkeypatch):
    cfg = tiny_builtin_config(tmp_path)
    resolved = prepare(cfg)
    kind, _, path = resolved.data.source.partition(":")
    assert kind == "latents" and cfg.data.source == "builtin:textures"  # the input is left as it was
    data = read_latents(path)
    assert data.latents.shape == (6, 4, 16, 16) and data.latents.dtype == torch.float16
    assert data.class_names[:3] == ["brick", "grass", "gravel"]
    assert abs(data.latents.float().std().item() - 1.0) < 1e-2  # scaled by 1 / std
    run_dir = builtin_autoencoder_config(cfg).run.dir
    assert resolved.data.autoencoder == data.autoencoder.path and data.autoencoder.path.endswith(
        run_dir.split("/")[-1])

    def no_training(*args, **kwargs):
        raise AssertionError("the cached autoencoder and latents should have been reused")

    monkeypatch.setattr("engine.prepare.train", no_training)
    monkeypatch.setattr("engine.prepare.encode_dataset", no_training)
    assert prepare(cfg) == resolved
    # A different crop count is a different file, made with the same cached autoencoder.
    monkeypatch.undo()
    monkeypatch.setattr("engine.prepare.train", no_training)
    other = prepare(tiny_builtin_config(tmp_path, "--prepare.crops=3")).data.source.partition(":")[2]
    assert other != path and read_latents(other).autoencoder == data.autoencoder
    # A named autoencoder (data.autoencoder) is used as is, never trained.
    named = prepare(tiny_builtin_config(tmp_path, f"--data.autoencoder={run_dir}", "--prepare.crops=2"))
    assert read_latents(named.data.source.partition(":")[2]).latents.shape[0] == 2


def test_a_process_that_may_not_prepare_makes_nothing(tmp_path):
    cfg = load_config(None, ["--method.name=lgt", f"--run.cache_dir={tmp_path / 'empty-cache'}"])
    with pytest.raises(NotPrepared, match="not trained yet"):
        prepare_builtin_latents(cfg, torch.device("cpu"), may_prepare=False)
    assert not (tmp_path / "empty-cache").exists()


def test_methods_that_read_their_data_directly_are_left_alone(tmp_path):
    cfg = load_config(None, ["--method.name=ddpm", f"--run.cache_dir={tmp_path / 'cache'}"])
    assert prepare(cfg) is cfg and not (tmp_path / "cache").exists()


def test_latents_files_resolve_the_autoencoder_they_record(tmp_path):
    from engine.data.latents import AutoencoderIdentity, LatentFile, write_latents

    path = tmp_path / "z.safetensors"
    write_latents(path, LatentFile(torch.zeros(4, 4, 2, 2), torch.tensor([0, 0, 1, 1]), ["a", "b"], 1.0,
                                   AutoencoderIdentity("/somewhere/ae", "abc"), "mean"))
    cfg = load_config(None, ["--method.name=lgt", f"--data.source=latents:{path}"])
    assert prepare(cfg).data.autoencoder == "/somewhere/ae"
    chosen = load_config(None, ["--method.name=lgt", f"--data.source=latents:{path}", "--data.autoencoder=/x"])
    assert prepare(chosen).data.autoencoder == "/x"  # the user's choice wins


class Loaded(Exception):
    """Stops preparation right after the autoencoder is loaded."""


def test_each_rank_loads_the_autoencoder_on_its_own_device(tmp_path, monkeypatch):
    """Under torchrun rank 0 encodes on its own GPU (cuda:LOCAL_RANK, not cuda:0); the waiting ranks
    only hash the weights, on the CPU, and never touch another rank's GPU."""
    from engine.distributed import World

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    devices = []

    def record(path, device):
        devices.append(torch.device(device))
        raise Loaded

    monkeypatch.setattr("engine.prepare.load_autoencoder", record)
    cfg = tiny_builtin_config(tmp_path, "--train.device=auto", f"--data.autoencoder={tmp_path / 'ae'}")
    with pytest.raises(Loaded):
        prepare(cfg, World(rank=0, local_rank=3, size=8))
    with pytest.raises(Loaded):
        prepare(cfg, World(rank=5, local_rank=1, size=8))
    assert devices == [torch.device("cuda", 3), torch.device("cpu")]
