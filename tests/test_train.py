"""The training loop end to end on CPU: resume, run directory, non-finite stops, signals."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine.train as train_module
from engine.checkpoint import latest_checkpoint
from engine.config import load_config
from engine.train import NonFiniteLossError, train

TINY = ["--data.source=builtin:textures", "--data.image_size=16", "--model.channels=16",
        "--model.channel_mult=[1,2]", "--model.attention_resolutions=[8]", "--model.num_res_blocks=1",
        "--model.num_groups=8", "--model.dropout=0.1", "--train.batch_size=4", "--train.warmup_steps=2",
        "--ddpm.timesteps=50", "--sample.num=4", "--ddpm.sample_steps=3", "--log.every=1",
        "--log.tensorboard=false", "--checkpoint.every=2", "--train.device=cpu", "--data.num_workers=0"]


def tiny_config(run_dir: Path, *extra: str):
    return load_config(None, [*TINY, f"--run.dir={run_dir}", *extra])


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss of a run's metrics.jsonl (rows without a loss, e.g. the final evaluation, skipped)."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def assert_same_final_weights(run_a: Path, run_b: Path) -> None:
    """The latest checkpoints of two run directories hold bit-identical model weights."""
    weights_a = latest_checkpoint(run_a / "checkpoints").model_state()
    weights_b = latest_checkpoint(run_b / "checkpoints").model_state()
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_resume_replays_identical_losses(tmp_path):
    straight = tmp_path / "straight"
    train(tiny_config(straight, "--train.steps=6", "--sample.every=0"))

    resumed = tmp_path / "resumed"
    first = train(tiny_config(resumed, "--train.steps=6", "--sample.every=0"),
                  should_stop=lambda step: step == 3)
    assert first.stopped_early and first.step == 3
    assert latest_checkpoint(resumed / "checkpoints").step == 3
    second = train(tiny_config(resumed, "--train.steps=6", "--sample.every=0"))
    assert second.step == 6 and not second.stopped_early

    assert losses(straight) == losses(resumed)  # bit-identical, every step
    assert_same_final_weights(straight, resumed)


def test_run_directory_holds_config_metrics_samples_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "--train.steps=5", "--sample.every=2", "--checkpoint.keep=2",
                      "--train.grad_accum=2"))
    assert load_config(run / "config.toml").train.steps == 5
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all({"loss", "lr", "grad_norm"} <= r.keys() for r in rows)
    assert len(rows[0]) > 5, "each loss term should be logged under its own key"
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]
    # every 2 steps plus one at the end, newest 2 kept
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-4", "step-5"]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-5"


def test_non_finite_loss_stops_before_the_update(tmp_path, monkeypatch):
    method_cls = train_module.method_class("ddpm")
    real_build = method_cls.from_config.__func__
    seen = {}

    def build_poisoned(cls, cfg, data):
        method = real_build(cls, cfg, data)
        real_forward = method.forward
        calls = {"n": 0}

        def forward(batch):
            calls["n"] += 1
            out = real_forward(batch)
            if calls["n"] == 3:
                seen["weights"] = {k: v.clone() for k, v in method.state_dict().items()}
                out.loss = out.loss * float("nan")
            return out

        method.forward = forward
        seen["method"] = method
        return method

    monkeypatch.setattr(method_cls, "from_config", classmethod(build_poisoned))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train(tiny_config(tmp_path / "run", "--train.steps=6", "--sample.every=0"))
    after = seen["method"].state_dict()
    assert all(torch.equal(after[k], seen["weights"][k]) for k in after), "the NaN update was applied"
    assert latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2


def test_damaged_newest_checkpoint_resumes_from_the_previous(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "--train.steps=4", "--sample.every=0"))
    (run / "checkpoints" / "step-4" / "model.safetensors").write_bytes(b"\0" * 10)
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        result = train(tiny_config(run, "--train.steps=6", "--sample.every=0"))
    assert result.step == 6
    assert sorted(losses(run)) == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config(run, "--train.steps=400", "--sample.every=0",
                                  "--checkpoint.every=1000").to_toml())
    command = [sys.executable, "-m", "engine.commands.train", str(config)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    stopped_at = latest_checkpoint(run / "checkpoints").step
    assert 2 <= stopped_at < 400
    assert "rerun the same command to resume" in out


def test_resume_follows_a_changed_learning_rate(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "--train.steps=6", "--sample.every=0", "--train.lr=1e-3"),
          should_stop=lambda step: step == 3)
    train(tiny_config(run, "--train.steps=6", "--sample.every=0", "--train.lr=1e-5"))
    cfg = tiny_config(run, "--train.steps=6", "--train.lr=1e-5")
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    for step in (4, 5, 6):  # the LR logged after step n is the schedule's value for step n
        assert rows[step]["lr"] == pytest.approx(1e-5 * train_module.lr_lambda(cfg)(step))


def test_a_torn_metrics_line_does_not_block_resume(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, "--train.steps=4", "--sample.every=0"), should_stop=lambda step: step == 2)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # a hard kill mid-write
    with pytest.warns(UserWarning, match="unreadable line"):
        train(tiny_config(run, "--train.steps=4", "--sample.every=0"))
    assert sorted(losses(run)) == [1, 2, 3, 4]


def test_initial_weights_do_not_depend_on_data_preparation(tmp_path, monkeypatch):
    train(tiny_config(tmp_path / "plain", "--train.steps=1", "--sample.every=0"))
    method_cls = train_module.method_class("ddpm")
    real = method_cls.training_data.__func__

    def preparing(cls, cfg, rank, world_size, device):
        torch.rand(1000)  # e.g. reading data that draws random numbers
        return real(cls, cfg, rank, world_size, device)

    monkeypatch.setattr(method_cls, "training_data", classmethod(preparing))
    train(tiny_config(tmp_path / "prepared", "--train.steps=1", "--sample.every=0"))
    assert losses(tmp_path / "plain") == losses(tmp_path / "prepared")


def test_a_failing_sample_grid_costs_neither_the_run_nor_its_checkpoint(tmp_path, monkeypatch, capsys):
    method_cls = train_module.method_class("ddpm")

    def broken_grid(self, batch, generator):
        raise ValueError("make_grid: expected images [N, 1 or 3, H, W]")

    monkeypatch.setattr(method_cls, "sample_grid", broken_grid)
    result = train(tiny_config(tmp_path / "run", "--train.steps=2", "--sample.every=2"))
    assert result.step == 2 and latest_checkpoint(tmp_path / "run" / "checkpoints").step == 2
    assert "no sample grid at step 2" in capsys.readouterr().err


def test_step_time_is_the_true_mean_without_checkpoints_and_grids(tmp_path, monkeypatch):
    """Three slow steps logged once (log.every > steps), each followed by a slow checkpoint: the step
    time is the mean over the 3 steps that passed (not over log.every) and excludes the saves, which
    are logged on their own."""
    method_cls = train_module.method_class("ddpm")
    real_forward = method_cls.forward

    def slow_forward(self, batch):
        time.sleep(0.2)
        return real_forward(self, batch)

    real_save = train_module.ckpt.save_checkpoint

    def slow_save(*args, **kwargs):
        time.sleep(0.5)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(method_cls, "forward", slow_forward)
    monkeypatch.setattr(train_module.ckpt, "save_checkpoint", slow_save)
    train(tiny_config(tmp_path / "run", "--train.steps=3", "--log.every=10", "--checkpoint.every=1",
                      "--sample.every=0"))
    (row,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert row["step"] == 3
    assert 0.2 <= row["sec_per_step"] < 0.2 + 0.4, row  # one forward's sleep, no save's
    assert row["sec_per_step"] == pytest.approx(row["sec_data"] + row["sec_compute"])
    # The saves after steps 1 and 2 (step 3's comes after its log line, in the next interval).
    assert row["sec_checkpoint"] >= 2 * 0.5 and row["sec_sample"] == 0


def test_a_step_the_fp16_scaler_skips_advances_neither_the_schedule_nor_the_ema(tmp_path):
    """GradScaler skips the update when the scaled gradients overflow; the LR schedule and the EMA must
    then stay where they are, as the weights do."""
    from engine.distributed import World
    from engine.ema import EMA

    model = torch.nn.Linear(2, 1)
    ema = EMA(model, 0.9)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    state = train_module.TrainState(model, ema, optimizer, scheduler, scaler, world_size=1)

    def step(x: float) -> None:
        # A finite loss whose scaled gradient (scale * x) overflows float32 when x is huge.
        loss = model(torch.tensor([[x, 1.0]])).sum()
        scaler.scale(loss).backward()
        state.optimizer_step(list(model.parameters()), 0.0, loss.detach(), World())

    step(1.0)
    applied = (scheduler.last_epoch, ema.num_updates, model.weight.detach().clone())
    step(1e35)
    assert (scheduler.last_epoch, ema.num_updates) == applied[:2] and torch.equal(model.weight, applied[2])
    assert state.step == 2  # the step itself is counted: the data and the per-step seed move on
    step(1.0)
    assert (scheduler.last_epoch, ema.num_updates) == (applied[0] + 1, applied[1] + 1)


def test_resume_replays_identical_losses_on_an_image_folder(tmp_path):
    """The DataLoader of an image folder must not draw from the global RNG, or a resumed run (which
    starts iterating in a later step) would shift that step's noise and dropout."""
    from test_faults import folder_of_pictures

    images = folder_of_pictures(tmp_path / "images")
    extra = (f"--data.source=folder:{images}", "--data.image_size=8", "--train.steps=5", "--train.batch_size=2",
             "--sample.every=0", "--model.attention_resolutions=[4]")
    train(tiny_config(tmp_path / "straight", *extra))
    train(tiny_config(tmp_path / "resumed", *extra), should_stop=lambda step: step == 2)
    train(tiny_config(tmp_path / "resumed", *extra))
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
