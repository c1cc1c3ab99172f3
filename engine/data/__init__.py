"""Data sources: `build_data_source` turns `data.source` into a `DataSource` (see base.py)."""

from __future__ import annotations

from pathlib import Path

from engine.config import ConfigError, DataConfig
from engine.data.base import Batch, DataSource, batch_seed
from engine.data.builtin import BuiltinTextures
from engine.data.images import ImageFolderSource

__all__ = ["Batch", "DataSource", "batch_seed", "build_data_source"]


def build_data_source(cfg: DataConfig, seed: int, rank: int = 0, device: str = "cpu") -> DataSource:
    """The source `cfg.source` names; `device` is where a latent source keeps its tensors."""
    kind, _, path = cfg.source.partition(":")
    if cfg.source == "builtin:textures":
        return BuiltinTextures(cfg.image_size, cfg.flip, seed, rank)
    if kind == "folder" and path:
        return ImageFolderSource(Path(path), cfg.image_size, cfg.flip, seed, rank, cfg.num_workers)
    if kind == "latents" and path:
        from engine.data.latents import LatentSource  # imported only when latents are used

        return LatentSource.from_config(cfg, path, seed, rank, device)
    raise ConfigError(f"data.source = {cfg.source!r} is not one of 'builtin:textures', 'folder:PATH' "
                      f"(one sub-folder per class of PNG/JPEG images) or 'latents:PATH' (from engine-encode)")
