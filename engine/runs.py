"""Open a trained run for inference: its method with the EMA (or raw) weights on a chosen device.

Every command that uses a trained run (engine-sample, engine-transfer, evaluation) goes through
`load_run`, so they agree on what a run is: the newest intact checkpoint of a run directory (or one
checkpoints/step-N directory), its resolved config, its data info, and, for methods that train on
latents, the autoencoder that made them. The device is the caller's choice, never the run's
train.device: a run trained on a GPU opens on a CPU-only machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from engine.autoencoders import lazy_autoencoder
from engine.checkpoint import Checkpoint, open_checkpoint
from engine.config import Config
from engine.data.base import DataInfo
from engine.distributed import resolve_device
from engine.methods import Method, method_class


class WrongMethodError(ValueError):
    """The run was trained with another method than the command needs."""


@dataclass
class TrainedRun:
    method: Method  # in eval mode, on `device`
    config: Config
    checkpoint: Checkpoint
    data_info: DataInfo  # sample shape and class names
    device: torch.device

    @property
    def step(self) -> int:
        return self.checkpoint.step

    def training_data(self):
        """The run's data source, loaded again on this device (e.g. for its evaluation)."""
        return method_class(self.config.method.name).training_data(self.config, 0, 1, self.device)


def load_run(path: str | Path, device: str = "auto", *, ema: bool = True, autoencoder: str | None = None,
             methods: tuple[str, ...] | None = None, hint: str = "") -> TrainedRun:
    """The run at `path` (run directory or step-N checkpoint) on `device` ('auto', 'cpu', 'cuda[:N]').

    `ema=False` takes the raw weights; `autoencoder` replaces the one the run recorded; `methods`
    lists the methods the caller can use (WrongMethodError otherwise, with `hint` appended)."""
    checkpoint = open_checkpoint(path)
    cfg = checkpoint.config()
    if methods is not None and cfg.method.name not in methods:
        raise WrongMethodError(f"{checkpoint.path} was trained with method.name = {cfg.method.name!r}; this "
                               f"command needs {' or '.join(map(repr, methods))}{hint}")
    target = resolve_device(device)
    recorded = checkpoint.data_info()
    info = DataInfo(tuple(recorded["sample_shape"]), list(recorded["class_names"]), recorded.get("text"))
    method_cls = method_class(cfg.method.name)
    method = method_cls.from_config(cfg, info)
    checkpoint.load_into(method, ema=ema)
    if method_cls.trains_on_latents(cfg):
        method.attach_autoencoder(lazy_autoencoder(autoencoder or cfg.data.autoencoder, target))
    return TrainedRun(method.to(target).eval(), cfg, checkpoint, info, target)
