"""Checkpoints: atomic writes, verification, fallback past damaged ones, rotation."""

import pytest
import torch

from engine import checkpoint as ckpt
from engine.config import Config


def save(directory, step, keep=3, value=None):
    state = {"w": torch.full((4, 3), float(step) if value is None else value)}
    return ckpt.save_checkpoint(directory, step, model_state=state, ema_state={"w": state["w"] * 2},
                                train_state={"step": step, "data_position": step * 2}, config=Config("lgt"),
                                data_info={"sample_shape": [3, 8, 8], "class_names": ["a"]}, keep=keep)


def test_round_trip_and_latest_pointer(tmp_path):
    save(tmp_path, 10)
    save(tmp_path, 20)
    found = ckpt.latest_checkpoint(tmp_path)
    assert found.step == 20
    assert (tmp_path / "latest").read_text().strip() == "step-20"
    assert torch.equal(found.model_state()["w"], torch.full((4, 3), 20.0))
    assert torch.equal(found.model_state(ema=True)["w"], torch.full((4, 3), 40.0))
    assert found.train_state()["data_position"] == 40
    assert found.config() == Config("lgt")


def test_rotation_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save(tmp_path, step, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-4", "step-5"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "delete_file"])
def test_damaged_newest_is_skipped_with_a_warning(tmp_path, damage):
    save(tmp_path, 1)
    newest = save(tmp_path, 2)
    target = newest / "model.safetensors"
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
    elif damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        target.unlink()
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        found = ckpt.latest_checkpoint(tmp_path)
    assert found.step == 1


def test_rotation_counts_only_intact_checkpoints(tmp_path):
    save(tmp_path, 100)
    save(tmp_path, 200)
    (save(tmp_path, 300) / "ema.safetensors").unlink()  # damaged: resume goes back to 200
    save(tmp_path, 250, keep=1)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-250", "step-300"]
    with pytest.warns(UserWarning, match="step-300"):
        assert ckpt.latest_checkpoint(tmp_path).step == 250


def test_no_intact_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    only = save(tmp_path, 3)
    (only / "train_state.pt").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ckpt.CheckpointError, match="none is intact"):
        ckpt.latest_checkpoint(tmp_path)


def test_half_written_temporary_directory_is_never_loaded(tmp_path):
    save(tmp_path, 1)
    (tmp_path / ".tmp-step-9-123").mkdir()
    assert ckpt.latest_checkpoint(tmp_path).step == 1


def test_empty_directory_means_fresh_start(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path / "checkpoints") is None


def test_open_checkpoint_accepts_run_dir_or_step_dir(tmp_path):
    save(tmp_path / "checkpoints", 4)
    assert ckpt.open_checkpoint(tmp_path).step == 4
    assert ckpt.open_checkpoint(tmp_path / "checkpoints" / "step-4").step == 4
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint found"):
        ckpt.open_checkpoint(tmp_path / "elsewhere")
