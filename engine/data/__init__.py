"""Data sources: `build_data_source` turns `data.source` into a `DataSource` (see base.py).

This package only reads data: turning built-in images into latents (training an autoencoder,
encoding) is the preparation stage's work (engine/prepare.py), done before a source is built.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.data.base import Batch, DataSource, Stream, batch_seed
from engine.data.builtin import BuiltinTextures
from engine.data.dali import DaliImageFolderSource, use_dali
from engine.data.digits import BuiltinDigits
from engine.data.images import ImageFolderSource
from engine.data.latents import LatentSource
from engine.options import ConfigError

__all__ = ["Batch", "DataSource", "Stream", "batch_seed", "build_data_source"]


def build_data_source(cfg, seed: int, rank: int = 0, world_size: int = 1,
                      device: str | torch.device = "cpu") -> DataSource:
    """The source `cfg.source` names (cfg: the [data] section); `device` is where a latent source
    keeps its tensors. Image folders give each of `world_size` ranks its own shard of every epoch;
    the other sources draw i.i.d. batches per rank."""
    kind, _, path = cfg.source.partition(":")
    if cfg.source == "builtin:textures":
        return BuiltinTextures(cfg.image_size, cfg.flip, seed, rank)
    if cfg.source == "builtin:digits":
        return BuiltinDigits(seed, rank)
    if kind == "folder" and path:
        return folder_source(cfg, Path(path), seed, rank, world_size, device)
    if kind == "latents" and path:
        return LatentSource.load(path, seed, rank, device)
    raise ConfigError(f"data.source = {cfg.source!r} is not one of 'builtin:textures', 'builtin:digits', 'folder:PATH' "
                      f"(one sub-folder per class of PNG/JPEG images) or 'latents:PATH' (from engine-encode)")


def folder_source(cfg, root: Path, seed: int, rank: int, world_size: int, device: str | torch.device):
    """An image folder read by the loader `cfg.loader` chooses; the choice is said once, by rank 0."""
    args = (root, cfg.image_size, cfg.flip, seed, rank, cfg.num_workers, world_size)
    dali, why_not = use_dali(cfg.loader, "data.loader")
    if rank == 0:
        if dali:
            decode = "GPU" if torch.device(device).type == "cuda" else "CPU"
            print(f"data: DALI pipeline ({decode} decode), {max(1, cfg.num_workers)} threads", flush=True)
        else:
            print(f"data: torch DataLoader, {cfg.num_workers} workers ({why_not})", flush=True)
    if dali:
        return DaliImageFolderSource(*args, device=device)
    return ImageFolderSource(*args)
