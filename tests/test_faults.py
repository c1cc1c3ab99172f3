"""Fault tests of a training run, sized for CI: kill -9 at random moments, two writers, damaged data
mid-run, non-finite weights, metrics and config files under a hostile or unlucky run directory,
Ctrl+C with DataLoader workers."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import losses, tiny_config

import engine.train as train_module
from engine.checkpoint import latest_checkpoint
from engine.commands.train import main as train_main
from engine.filelock import exclusive_lock
from engine.train import DataReadError, NonFiniteLossError, train


def write_config(tmp_path: Path, run: Path, *extra: str) -> Path:
    config = tmp_path / f"{run.name}.toml"
    config.write_text(tiny_config(run, *extra).to_toml())
    return config


def start_training(config: Path, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.commands.train", str(config)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            **kwargs)


def logged_steps(run: Path) -> int:
    path = run / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


# --------------------------------------------------------------------------- kill -9


def test_kill_9_at_random_moments_then_a_rerun_finishes_bit_identical(tmp_path):
    steps = 14
    extra = ("--train.steps=14", "--checkpoint.every=1", "--checkpoint.keep=2", "--sample.every=0")
    straight = tmp_path / "straight"
    train(tiny_config(straight, *extra))
    run = tmp_path / "killed"
    config = write_config(tmp_path, run, *extra)
    rng = random.Random(int(torch.randint(2**31, ())))
    kills = 0
    for _ in range(3):
        proc = start_training(config)
        deadline = time.time() + 120
        while logged_steps(run) < 1 and proc.poll() is None:  # past start-up: inside the step loop
            assert time.time() < deadline
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 0.6))  # a random moment: mid-step, mid-checkpoint, mid-log line
        if proc.poll() is not None:
            break  # it finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        kills += 1
    assert kills >= 1
    assert train_main([str(config)]) == 0
    assert losses(run) == losses(straight)  # every step, bit for bit, however it was interrupted
    final, reference = latest_checkpoint(run / "checkpoints"), latest_checkpoint(straight / "checkpoints")
    assert final.step == steps
    assert all(torch.equal(final.model_state()[k], v) for k, v in reference.model_state().items())


# --------------------------------------------------------------------------- one writer per run directory


def test_a_second_process_on_a_run_directory_exits_at_once_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    with exclusive_lock(run / ".lock") as fd:  # another engine-train, alive and training
        os.write(fd, b"4242\n")
        started = time.time()
        assert train_main([str(write_config(tmp_path, run, "--train.steps=2"))]) == 1
        assert time.time() - started < 30
    err = capsys.readouterr().err
    assert "in use by another training process (pid 4242)" in err
    assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_a_lock_file_left_by_a_killed_process_does_not_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").write_text("999999\n")  # its process is gone: the kernel released its lock
    assert train(tiny_config(run, "--train.steps=1", "--sample.every=0")).step == 1


# --------------------------------------------------------------------------- damaged data mid-run


def folder_of_pictures(root: Path, count: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def test_an_image_damaged_mid_run_stops_after_a_checkpoint_and_the_rerun_replays_exactly(tmp_path):
    images = folder_of_pictures(tmp_path / "images")
    extra = (f"--data.source=folder:{images}", "--data.image_size=8", "--train.steps=12", "--train.batch_size=2",
             "--checkpoint.every=1000", "--sample.every=0", "--model.attention_resolutions=[4]")
    train(tiny_config(tmp_path / "straight", *extra))
    victim = images / "class1" / "3.png"
    intact = victim.read_bytes()

    def damage_after_step_2(step: int) -> bool:
        if step == 2:
            victim.write_bytes(intact[: len(intact) // 2])  # a truncated file, after the start-up check
        return False

    run = tmp_path / "run"
    with pytest.raises(DataReadError, match=r"3\.png") as err:
        train(tiny_config(run, *extra), should_stop=damage_after_step_2)
    stopped_at = latest_checkpoint(run / "checkpoints").step
    assert stopped_at >= 2 and f"step {stopped_at}" in str(err.value) and "rerun the same command" in str(err.value)
    victim.write_bytes(intact)
    train(tiny_config(run, *extra))
    assert losses(run) == losses(tmp_path / "straight")


# --------------------------------------------------------------------------- non-finite weights


def test_weights_made_non_finite_by_an_update_are_never_checkpointed(tmp_path, monkeypatch):
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step_that_overflows(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:  # a finite loss and gradient, and an update that overflows
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_overflows)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 2: the update made the weights non-finite") as err:
        train(tiny_config(run, "--train.steps=4", "--checkpoint.every=1", "--sample.every=0"))
    assert latest_checkpoint(run / "checkpoints").step == 1
    assert "step-1" in str(err.value) and "is intact" in str(err.value)


def test_a_non_finite_first_step_says_no_checkpoint_exists(tmp_path, monkeypatch):
    method_cls = train_module.method_class("ddpm")
    real_forward = method_cls.forward

    def nan_forward(self, batch):
        out = real_forward(self, batch)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(method_cls, "forward", nan_forward)
    with pytest.raises(NonFiniteLossError, match="No checkpoint was written yet") as err:
        train(tiny_config(tmp_path / "run", "--train.steps=3", "--sample.every=0"))
    assert "is intact" not in str(err.value)


# --------------------------------------------------------------------------- run-directory files


def test_metrics_history_survives_a_crash_while_it_is_rewritten(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_config(run, "--train.steps=4", "--sample.every=0"), should_stop=lambda step: step == 2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.0}\n')  # logged after the last checkpoint: a resume drops it
    history = (run / "metrics.jsonl").read_bytes()

    def crash(path):
        raise KeyboardInterrupt("killed while the rewritten history was being written")

    monkeypatch.setattr("engine.safe_files.fsync_file", crash)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(run, "--train.steps=4", "--sample.every=0"))
    assert (run / "metrics.jsonl").read_bytes() == history
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []


def test_planted_symlinks_in_the_run_directory_are_never_written_through(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "--train.steps=2", "--sample.every=0"))
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    (run / "config.toml").unlink()
    (run / "config.toml").symlink_to(outside)
    train(tiny_config(run, "--train.steps=3", "--sample.every=0"))
    assert outside.read_text() == "precious" and not (run / "config.toml").is_symlink()
    (run / "metrics.jsonl").unlink()
    (run / "metrics.jsonl").symlink_to(outside)
    with pytest.raises(OSError, match="metrics.jsonl is a symbolic link"):
        train(tiny_config(run, "--train.steps=4", "--sample.every=0"))
    assert outside.read_text() == "precious"


# --------------------------------------------------------------------------- Ctrl+C with workers


def test_ctrl_c_with_dataloader_workers_says_so_once(tmp_path):
    images = folder_of_pictures(tmp_path / "images")
    run = tmp_path / "run"
    config = write_config(tmp_path, run, f"--data.source=folder:{images}", "--data.image_size=8",
                          "--data.num_workers=2", "--train.steps=500", "--train.batch_size=2",
                          "--sample.every=0", "--checkpoint.every=1000", "--model.attention_resolutions=[4]")
    proc = start_training(config, start_new_session=True)  # its own process group, as a terminal's job
    deadline = time.time() + 120
    while logged_steps(run) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl+C reaches the main process and its workers
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert (out + err).count("SIGINT: finishing this step") == 1, out + err
    assert "rerun the same command to resume" in out
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == \
        latest_checkpoint(run / "checkpoints").step
