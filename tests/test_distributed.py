"""Multi-process training through torchrun (DDP over gloo on CPU)."""

import json
import os
import subprocess
import sys

from test_train import tiny_config

from engine.checkpoint import latest_checkpoint


def test_torchrun_two_processes_train_and_checkpoint_once(tmp_path):
    run = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config(run, "--train.steps=3", "--sample.every=2").to_toml())
    script = tmp_path / "train.py"
    script.write_text("from engine.cli import train_main\ntrain_main()\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(config)], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # only rank 0 logs
    assert latest_checkpoint(run / "checkpoints").step == 3
    assert latest_checkpoint(run / "checkpoints").train_state()["world_size"] == 2
    assert (run / "samples" / "step-0000002.png").exists()
