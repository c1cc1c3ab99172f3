"""Multi-process training through torchrun (DDP over gloo on CPU): logging and checkpoints once,
preparation by rank 0 before the process group exists, image-folder shards, resume rules."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from test_train import tiny_config

from engine.checkpoint import latest_checkpoint
from engine.commands.train import main as train_main
from engine.config import load_config


def torchrun(nproc: int, *args: str, module: str = "engine.commands.train") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", "-m", module, *args],
                          capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_torchrun_two_processes_train_and_checkpoint_once_and_resume_needs_two(tmp_path, capsys):
    run = tmp_path / "run"
    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config(run, "--train.steps=3", "--sample.every=2").to_toml())
    proc = torchrun(2, str(config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # only rank 0 logs
    assert latest_checkpoint(run / "checkpoints").step == 3
    assert latest_checkpoint(run / "checkpoints").train_state()["world_size"] == 2
    assert (run / "samples" / "step-0000002.png").exists()
    # One process would draw another batch stream: the resume is refused, saying how to continue.
    assert train_main([str(config), "--train.steps=4"]) == 1
    err = capsys.readouterr().err
    assert "written by a run of 2 process(es)" in err and "torchrun --nproc_per_node=2" in err
    assert latest_checkpoint(run / "checkpoints").step == 3


def test_two_processes_prepare_builtin_latents_once_then_train_lgt(tmp_path):
    """Rank 0 trains the built-in autoencoder and encodes while rank 1 waits on the cache's lock;
    both then train on the same latents file, which the run's config.toml records."""
    run, cache = tmp_path / "lgt", tmp_path / "cache"
    config = tmp_path / "lgt.toml"
    config.write_text('[method]\nname = "lgt"\n')
    proc = torchrun(2, str(config), f"--run.dir={run}", f"--run.cache_dir={cache}", "--train.device=cpu",
                    "--train.steps=2", "--train.batch_size=2", "--train.warmup_steps=1", "--log.every=1",
                    "--log.tensorboard=false", "--sample.every=2", "--sample.num=1", "--eval.per_class=1",
                    "--autoencoder.channels=8", "--autoencoder.channel_mult=[1, 2]",
                    "--autoencoder.num_groups=4", "--prepare.autoencoder_steps=2",
                    "--prepare.autoencoder_batch_size=2", "--prepare.autoencoder_image_size=16",
                    "--prepare.image_size=16", "--prepare.crops=96", "--lgt.holdout_per_style=0",
                    "--model.channels=8", "--model.channel_mult=[1, 2]", "--model.attention_resolutions=[4]",
                    "--model.num_res_blocks=1", "--model.num_groups=4", "--model.num_heads=2", "--ode.steps=1",
                    "--swd.num_projections=4", "--ssm.max_spatial_samples=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(cache.glob("autoencoder-textures-*"))) == 1
    assert len(list(cache.glob("latents-textures-*.safetensors"))) == 1
    recorded = load_config(run / "config.toml")
    assert recorded.data.source == f"latents:{next(cache.glob('latents-textures-*.safetensors'))}"
    assert recorded.data.autoencoder == str(next(cache.glob("autoencoder-textures-*")))
    assert latest_checkpoint(run / "checkpoints").step == 2
    assert (run / "samples" / "step-0000002.png").exists()


SHARD_SCRIPT = """
import json, sys
import torch
from engine.config import load_config
from engine.distributed import init_world, shutdown_world
from engine.methods import method_class

folder, out = sys.argv[1], sys.argv[2]
world = init_world("cpu")
cfg = load_config(None, [f"--data.source=folder:{folder}", "--data.image_size=8", "--data.flip=false",
                         "--data.num_workers=0"])
data = method_class("ddpm").training_data(cfg, world.rank, world.size, torch.device("cpu"))
batches = data.batches(0, 2)
# Solid pictures: the red value tells which image a sample is.
drawn = [round((x[0, 0, 0].item() + 1) * 127.5) for _ in range(6) for x in next(batches).x]
json.dump(drawn, open(f"{out}/rank{world.rank}.json", "w"))
shutdown_world(world)
"""


def test_image_folder_epochs_are_sharded_disjointly_over_two_processes(tmp_path):
    folder = tmp_path / "images"
    for i in range(8):
        (folder / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 10 * (i + 1), np.uint8)).save(folder / f"class{i % 2}" / f"{i}.png")
    script = tmp_path / "shards.py"
    script.write_text(SHARD_SCRIPT)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), str(folder), str(tmp_path)], capture_output=True, text=True, timeout=300,
                          check=False, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads(Path(tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    every_image = {10 * (i + 1) for i in range(8)}
    for epoch in range(3):  # 4 samples per rank per epoch, in batches of 2
        shards = [set(drawn[4 * epoch:4 * epoch + 4]) for drawn in ranks]
        assert len(shards[0]) == len(shards[1]) == 4, shards
        assert not shards[0] & shards[1] and shards[0] | shards[1] == every_image, shards
    assert ranks[0][:4] != ranks[0][4:8]  # each epoch has its own order
