"""The preparation stage: turns a config's built-in data into what training reads, before the
world and the method are built.

Today that means one thing: a config that trains on latents (`Method.trains_on_latents(cfg)`: LGT
always; ddpm, fm and fmm with `<section>.latent = true`) with `data.source = "builtin:textures"`.
On first use
  1. the built-in autoencoder is trained by engine-train's own loop on builtin:textures crops
     (unless data.autoencoder names one), in a run directory under run.cache_dir;
  2. prepare.crops crops of prepare.image_size are drawn and encoded;
  3. the file is cached under run.cache_dir, named by a hash of everything that made it.
Later runs find both in the cache and skip straight to training. `prepare` returns the config
with `data.source = "latents:PATH"` and `data.autoencoder` set, which is what the run records in
its config.toml: the run's files say which latents and which autoencoder it trained with.

Under torchrun every process prepares before the process group exists (so no collective can time
out while an autoencoder trains): rank 0 does the work holding a lock file in run.cache_dir, and the
other ranks wait on that lock, then find everything cached. The same lock keeps two runs that
share a cache from preparing the same files at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from engine.autoencoders import load_autoencoder
from engine.checkpoint import find_checkpoints
from engine.config import Config, validate
from engine.data.base import Stream, batch_seed
from engine.data.builtin import BUILTIN_PICTURES, BuiltinTextures
from engine.data.latents import FORMAT, read_latents_metadata
from engine.distributed import World, resolve_device
from engine.encode import encode_dataset
from engine.filelock import exclusive_lock
from engine.methods import method_class
from engine.stages import skipped, stage
from engine.train import train

BUILTIN_AUTOENCODER_LR = 5e-4  # short runs: higher than the LGT default, still stable with clipping
ENCODE_BATCH_SIZE = 16
WAIT_POLL_SECONDS = 1.0  # how often a waiting rank looks again before rank 0 has taken the lock


class RunInterrupted(Exception):
    """The built-in autoencoder's training was stopped by Ctrl+C/SIGTERM; its checkpoint is saved
    and rerunning the same command resumes it."""


class NotPrepared(FileNotFoundError):
    """What training needs is not in the cache yet (and this process may not make it)."""


def prepare(cfg: Config, world: World | None = None) -> Config:
    """The config training reads: built-in sources made into files, paths resolved (see the module doc).

    `world`: this process's place under torchrun (the process group need not exist yet); rank 0
    prepares, the others wait for it."""
    world = world or World()
    method = method_class(cfg.method.name)
    if not method.trains_on_latents(cfg):
        return cfg
    resolved = cfg.copy()
    if cfg.data.source == "builtin:textures":
        device = resolve_device(cfg.train.device, world.local_rank, option="train.device")
        lock = Path(cfg.run.cache_dir) / ".prepare.lock"
        if world.is_main:
            with exclusive_lock(lock):
                latents, autoencoder = prepare_builtin_latents(cfg, device)
        else:
            latents, autoencoder = _wait_for_main_rank(cfg, lock, world.rank)
        resolved.data.source = f"latents:{latents}"
        resolved.data.autoencoder = autoencoder
    elif not cfg.data.autoencoder and cfg.data.source.startswith("latents:"):
        recorded = read_latents_metadata(cfg.data.source.partition(":")[2]).get("autoencoder", "")
        resolved.data.autoencoder = recorded
    return resolved


def _wait_for_main_rank(cfg: Config, lock: Path, rank: int) -> tuple[Path, str]:
    """What rank 0 prepares, once it is cached. Rank 0 holds `lock` while it works, so this blocks
    on the lock rather than polling; the poll only covers the moment before rank 0 takes it."""
    announced = False
    while True:
        with exclusive_lock(lock):
            try:
                return prepare_builtin_latents(cfg, torch.device("cpu"), may_prepare=False)
            except NotPrepared:
                pass
        if not announced:
            tqdm.write(f"rank {rank}: waiting for rank 0 to prepare the built-in latents in {cfg.run.cache_dir}")
            announced = True
        time.sleep(WAIT_POLL_SECONDS)


def _short_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def builtin_autoencoder_config(cfg: Config) -> Config:
    """The engine-train config of the built-in autoencoder ([autoencoder] and [prepare] of `cfg`),
    its run directory in the cache, named by a hash of the recipe."""
    steps = cfg.prepare.autoencoder_steps
    ae = Config("autoencoder")
    ae.autoencoder = copy.deepcopy(cfg.autoencoder)
    ae.data.source = "builtin:textures"
    ae.data.image_size = cfg.prepare.autoencoder_image_size
    ae.train.steps, ae.train.batch_size = steps, cfg.prepare.autoencoder_batch_size
    ae.train.device, ae.train.precision = cfg.train.device, cfg.train.precision
    ae.train.lr, ae.train.warmup_steps, ae.train.ema_decay = BUILTIN_AUTOENCODER_LR, min(100, steps // 10), 0.999
    ae.checkpoint.every, ae.checkpoint.keep = max(1, steps // 4), 1  # an interrupted run resumes
    ae.sample.every, ae.sample.num = steps, 8  # one input | reconstruction grid, at the end
    ae.log.every, ae.log.tensorboard = min(50, steps), False
    recipe = ae.to_dict()
    del recipe["run"]
    recipe["train"].pop("device")  # the same recipe trained on another device is the same autoencoder
    ae.run.seed, ae.run.cache_dir = cfg.run.seed, cfg.run.cache_dir
    key = _short_hash({"recipe": recipe, "seed": cfg.run.seed})
    ae.run.dir = str(Path(cfg.run.cache_dir) / f"autoencoder-textures-{key}")
    validate(ae, "built-in autoencoder (from [autoencoder] and [prepare])")
    return ae


def train_builtin_autoencoder(cfg: Config, may_prepare: bool = True) -> Path:
    """The run directory of the built-in autoencoder, trained now unless the cache has it."""
    ae = builtin_autoencoder_config(cfg)
    run_dir = Path(ae.run.dir)
    done, _ = find_checkpoints(run_dir / "checkpoints")
    if done is None or done.step < ae.train.steps:
        if not may_prepare:
            raise NotPrepared(f"the built-in autoencoder is not trained yet in {run_dir}")
        tqdm.write(f"builtin:textures latents: training the built-in autoencoder ({ae.train.steps} steps on "
                   f"{ae.data.image_size}px crops) in {run_dir}; later runs reuse it")
        with stage("autoencoder", f"{ae.train.steps} steps"):
            stopped_early = train(ae, distributed=False).stopped_early
        if stopped_early:
            raise RunInterrupted(f"the built-in autoencoder's training was stopped before its {ae.train.steps} "
                                 f"steps; run the same command again to resume it (from {run_dir})")
    else:
        skipped("autoencoder", "cached")
    return run_dir


def _builtin_crop_batches(cfg: Config) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """prepare.crops crops, ENCODE_BATCH_SIZE at a time, from one seeded generator."""
    total = cfg.prepare.crops
    textures = BuiltinTextures(cfg.prepare.image_size, flip=True, seed=cfg.run.seed)
    generator = torch.Generator().manual_seed(batch_seed(cfg.run.seed, 0, 0, Stream.PREPARE))
    for start in range(0, total, ENCODE_BATCH_SIZE):
        batch = textures.draw_crops(min(ENCODE_BATCH_SIZE, total - start), generator)
        names = [f"builtin crop {start + i} ({textures.class_names[y]})" for i, y in enumerate(batch.labels)]
        yield batch.x, batch.labels, names


def prepare_builtin_latents(cfg: Config, device: torch.device, may_prepare: bool = True) -> tuple[Path, str]:
    """(latents file of builtin:textures for this config, the autoencoder that made it), made on
    first use with the autoencoder on `device`.

    The autoencoder is data.autoencoder when set, else the built-in one (trained and cached, see
    the module doc). The file's name hashes the crop settings, the seed and the autoencoder's
    weights, so a change to any of them makes a new file and an unchanged config reuses the old one.
    `may_prepare=False` trains and encodes nothing: NotPrepared when something is missing."""
    autoencoder_path = (Path(cfg.data.autoencoder) if cfg.data.autoencoder
                        else train_builtin_autoencoder(cfg, may_prepare))
    autoencoder, identity = load_autoencoder(autoencoder_path, device)
    size = cfg.prepare.image_size
    autoencoder.latent_shape((autoencoder.in_channels, size, size))  # fail before encoding anything
    key = _short_hash({"source": "builtin:textures", "pictures": list(BUILTIN_PICTURES),
                       "crops": cfg.prepare.crops, "image_size": size, "seed": cfg.run.seed,
                       "autoencoder": identity.weights_hash, "format": FORMAT})
    out = Path(cfg.run.cache_dir) / f"latents-textures-{key}.safetensors"
    if not out.is_file():
        if not may_prepare:
            raise NotPrepared(f"the built-in latents {out} are not encoded yet")
        tqdm.write(f"builtin:textures latents: encoding {cfg.prepare.crops} crops of {size}px with "
                   f"{identity.path} into {out}; later runs reuse it")
        with stage("encoding", f"{cfg.prepare.crops} crops"):
            encode_dataset(autoencoder, identity, _builtin_crop_batches(cfg), cfg.prepare.crops,
                           list(BUILTIN_PICTURES), out, desc="encoding builtin:textures")
    else:
        skipped("encoding", "cached")
    return out, identity.path
