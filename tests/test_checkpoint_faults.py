"""Checkpoints under faults: a full disk at every write, planted symlinks, and sweeps of truncations
and bit flips over every file of a small checkpoint. Sized to run in a few seconds."""

import errno
import itertools
import os
import random
import re
import warnings

import pytest
import torch
from safetensors import SafetensorError

from engine import checkpoint as ckpt
from engine.config import Config

FILES = ["model.safetensors", "ema.safetensors", "train_state.pt", "config.toml", "data_info.json",
         "manifest.json"]


def save(directory, step, keep=3):
    """A small but complete checkpoint: weights, EMA, an optimizer-like train state with RNG bytes."""
    weights = {"w": torch.linspace(-1, 1, 24).reshape(4, 6) * step, "b": torch.arange(5.0)}
    optimizer = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": weights["w"] / 3}},
                 "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.99), "params": [0]}]}
    train_state = {"step": step, "data_position": 2 * step, "world_size": 1, "ema_updates": step,
                   "optimizer": optimizer, "scaler": {}, "rng": {"torch": torch.get_rng_state()}}
    ema = {k: v / 2 for k, v in weights.items()}
    return ckpt.save_checkpoint(directory, step, model_state=weights, ema_state=ema, train_state=train_state,
                                config=Config("lgt"),
                                data_info={"sample_shape": [4, 8, 8], "class_names": ["a", "b"]}, keep=keep)


def loads_whole(checkpoint):
    return (torch.equal(checkpoint.model_state()["b"], torch.arange(5.0))
            and checkpoint.train_state()["step"] == checkpoint.step and checkpoint.config() == Config("lgt")
            and checkpoint.data_info()["class_names"] == ["a", "b"])


def no_warnings_latest(checkpoint_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return ckpt.latest_checkpoint(checkpoint_dir)


# --------------------------------------------------------------------------- a full disk

WRITERS = {  # name: (owner, attribute) of every call that writes or syncs a checkpoint's bytes
    "save_file": (ckpt, "save_file"),
    "torch.save": (torch, "save"),
    "write_text_atomic": (ckpt, "write_text_atomic"),  # config, data_info, manifest, latest
    "os.fsync": (os, "fsync"),
}
DISK_FULL = {  # how each library reports a full disk
    "ENOSPC": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "torch_writer": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter "
                                         "failed writing file data/0: file write failed"),
    "safetensors": lambda: SafetensorError("Error while serializing: I/O error: No space left on device "
                                           "(os error 28)"),
}


def failing_at(call, real, error):
    """`real`, except that its `call`-th call (from 0) raises `error()`."""
    calls = itertools.count()

    def writer(*args, **kwargs):
        if next(calls) == call:
            raise error()
        return real(*args, **kwargs)
    return writer


def calls_in_one_save(tmp_path, monkeypatch, owner, attribute):
    real, calls = getattr(owner, attribute), []
    with monkeypatch.context() as patch:
        patch.setattr(owner, attribute, lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
        save(tmp_path / "counting", 1)
    return len(calls)


@pytest.mark.parametrize("error", sorted(DISK_FULL))
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_disk_full_at_any_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, writer, error):
    """Each call of the writer fails in turn: the save raises CheckpointError 'no space left' with
    the size a checkpoint needs, leaves no temporary directory or file, and the previous checkpoint
    still verifies, loads and is what `latest` names, unless the new one was already complete."""
    owner, attribute = WRITERS[writer]
    real = getattr(owner, attribute)
    calls = calls_in_one_save(tmp_path, monkeypatch, owner, attribute)
    assert calls >= 1
    for call in range(calls):
        checkpoint_dir = tmp_path / f"call-{call}"
        save(checkpoint_dir, 1)
        with monkeypatch.context() as patch:
            patch.setattr(owner, attribute, failing_at(call, real, DISK_FULL[error]))
            with pytest.raises(ckpt.CheckpointError) as caught:
                save(checkpoint_dir, 2)
        message = str(caught.value)
        assert message.startswith(f"no space left on {checkpoint_dir}: a checkpoint needs ~"), message
        assert all(part in message for part in ("(model ", ", EMA ", ", train state ", "checkpoint.keep"))
        assert [p.name for p in checkpoint_dir.iterdir() if p.name.startswith(".")] == []
        assert ckpt.verify(checkpoint_dir / "step-1") is None
        assert loads_whole(ckpt.Checkpoint(checkpoint_dir / "step-1", 1))
        found = no_warnings_latest(checkpoint_dir)
        if (checkpoint_dir / "step-2").exists():  # failed after the rename: the new checkpoint is whole
            assert found.step == 2 and loads_whole(found)
        else:
            assert found.step == 1 and (checkpoint_dir / "latest").read_text() == "step-1\n"
        save(checkpoint_dir, 3)  # with space again, the next save just works
        assert no_warnings_latest(checkpoint_dir).step == 3


def test_disk_full_while_saving_the_same_step_again_keeps_one_whole_copy(tmp_path, monkeypatch):
    """Re-saving step 2 (stopped right after a periodic save) with a sync failing at each point in
    turn: step 2 is always there and whole, the old copy or the new, and nothing is left aside."""
    calls = calls_in_one_save(tmp_path, monkeypatch, os, "fsync")
    for call in range(calls):
        checkpoint_dir = tmp_path / f"call-{call}"
        save(checkpoint_dir, 1)
        save(checkpoint_dir, 2)
        with monkeypatch.context() as patch:
            patch.setattr(os, "fsync", failing_at(call, os.fsync, DISK_FULL["ENOSPC"]))
            with pytest.raises(ckpt.CheckpointError, match="no space left"):
                save(checkpoint_dir, 2)
        assert sorted(p.name for p in checkpoint_dir.iterdir()) == ["latest", "step-1", "step-2"]
        found = no_warnings_latest(checkpoint_dir)
        assert found.step == 2 and loads_whole(found)


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_other_write_errors_name_the_directory_and_the_error(tmp_path, monkeypatch, writer):
    owner, attribute = WRITERS[writer]
    save(tmp_path, 1)
    monkeypatch.setattr(owner, attribute, failing_at(0, getattr(owner, attribute),
                                                     lambda: OSError(errno.EIO, "Input/output error")))
    expected = f"cannot write a checkpoint in {re.escape(str(tmp_path))}: .*Input/output error"
    with pytest.raises(ckpt.CheckpointError, match=expected):
        save(tmp_path, 2)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert no_warnings_latest(tmp_path).step == 1


def test_the_message_sizes_what_was_being_written(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "save_file", failing_at(0, ckpt.save_file, DISK_FULL["ENOSPC"]))
    big = {"w": torch.zeros(1000, 1000)}  # 4 MB
    with pytest.raises(ckpt.CheckpointError) as caught:
        ckpt.save_checkpoint(tmp_path, 1, model_state=big, ema_state=big,
                             train_state={"moments": [torch.zeros(500_000)]}, config=Config("lgt"),
                             data_info={}, keep=1)
    assert "needs ~10.0 MB (model 4.0 MB, EMA 4.0 MB, train state 2.0 MB)" in str(caught.value)


# --------------------------------------------------------------------------- planted symlinks

def snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else "directory"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("target_kind", ["file", "directory"])
@pytest.mark.parametrize("planted", ["latest", "latest.tmp", f".tmp-step-2-{os.getpid()}", "step-2",
                                     "step-0"])
def test_a_planted_symlink_never_redirects_a_write(tmp_path, planted, target_kind):
    """A symlink at any name the save writes, renames or deletes, pointing outside the checkpoints
    directory: nothing outside changes, and the checkpoint is written in place."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep me")
    (outside / "sub").mkdir()
    (outside / "sub" / "model.safetensors").write_bytes(b"not yours")
    checkpoint_dir = tmp_path / "run" / "checkpoints"
    save(checkpoint_dir, 1)
    before = snapshot(outside)
    (checkpoint_dir / planted).unlink(missing_ok=True)  # `latest` is there already
    (checkpoint_dir / planted).symlink_to(outside / ("precious.txt" if target_kind == "file" else "sub"))
    save(checkpoint_dir, 2, keep=1)
    assert snapshot(outside) == before
    written = checkpoint_dir / "step-2"
    assert written.is_dir() and not written.is_symlink() and ckpt.verify(written) is None
    latest = checkpoint_dir / "latest"
    assert not latest.is_symlink() and latest.read_text() == "step-2\n"
    assert not os.path.lexists(checkpoint_dir / f".tmp-step-2-{os.getpid()}")
    assert no_warnings_latest(checkpoint_dir).step == 2


def test_a_symlinked_step_directory_is_never_loaded(tmp_path):
    """The engine never makes a step-N symlink: one there is not a candidate, however new and intact
    what it points to is."""
    elsewhere = save(tmp_path / "elsewhere", 99)
    checkpoint_dir = tmp_path / "run" / "checkpoints"
    save(checkpoint_dir, 1)
    (checkpoint_dir / "step-99").symlink_to(elsewhere)
    assert no_warnings_latest(checkpoint_dir).step == 1
    assert ckpt.open_checkpoint(tmp_path / "run").step == 1


# --------------------------------------------------------------------------- truncation and bit-flip sweeps

def damaged_versions(data, every_bit, rng):
    """(what, bytes): truncations to 0, 1, half and all but one byte; single-bit flips at every bit,
    or at one random bit of each of ~50 bytes spread over the file."""
    size = len(data)
    for length in sorted({0, 1, size // 2, size - 1}):
        yield f"truncated to {length} bytes", data[:length]
    if every_bit:
        flips = [(i, bit) for i in range(size) for bit in range(8)]
    else:
        flips = [(i, rng.randrange(8)) for i in sorted({round(k * (size - 1) / 49) for k in range(50)})]
    for i, bit in flips:
        flipped = bytearray(data)
        flipped[i] ^= 1 << bit
        yield f"bit {bit} of byte {i} flipped", bytes(flipped)


def loader_fails_cleanly(checkpoint, name):
    """The loader of file `name` returns or raises CheckpointError, as for a tool that opens the
    directory without verifying it."""
    load = {"model.safetensors": checkpoint.model_state, "train_state.pt": checkpoint.train_state,
            "ema.safetensors": lambda: checkpoint.model_state(ema=True), "config.toml": checkpoint.config,
            "data_info.json": checkpoint.data_info}[name]
    try:
        load()
    except ckpt.CheckpointError:
        pass


@pytest.mark.parametrize("name", FILES)
def test_every_truncation_and_bit_flip_is_detected_and_skipped(tmp_path, name):
    """verify() names the damage and never raises; resuming falls back to the previous checkpoint
    with a warning; opening the damaged directory is a CheckpointError; no loader crashes. For the
    manifest every bit is flipped; the full fall-back chain runs at every 8th bit and each truncation."""
    checkpoint_dir = tmp_path / "checkpoints"
    save(checkpoint_dir, 1)
    damaged_dir = save(checkpoint_dir, 2)
    damaged = ckpt.Checkpoint(damaged_dir, 2)
    original = (damaged_dir / name).read_bytes()
    every_bit = name == ckpt.MANIFEST
    cases = detected = 0
    for index, (what, data) in enumerate(damaged_versions(original, every_bit, random.Random(name))):
        (damaged_dir / name).write_bytes(data)
        cases += 1
        problem = ckpt.verify(damaged_dir)
        assert isinstance(problem, str) and problem, f"{name} {what}: not detected"
        detected += 1
        with pytest.raises(ckpt.CheckpointError, match="is damaged"):
            ckpt.open_checkpoint(damaged_dir)
        if every_bit and not what.startswith("truncated") and index % 8:
            continue
        with pytest.warns(UserWarning, match=r"skipping damaged checkpoint .*step-2") as caught:
            assert ckpt.latest_checkpoint(checkpoint_dir).step == 1
        assert len(caught) == 1
        if not every_bit:
            loader_fails_cleanly(damaged, name)
    (damaged_dir / name).write_bytes(original)
    assert ckpt.verify(damaged_dir) is None and no_warnings_latest(checkpoint_dir).step == 2
    print(f"{name}: {len(original)} bytes, {cases} damaged versions, {detected} detected")
    assert detected == cases == (4 + (8 * len(original) if every_bit else 50))
