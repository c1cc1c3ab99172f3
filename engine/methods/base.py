"""The interface every method (DDPM, autoencoder, LGT, ...) implements.

A method owns the maths: what a training loss is and how samples are drawn, and the config
sections that describe them (`config_sections`). It is an nn.Module holding the network(s) and any
fixed buffers (noise schedules), so that the EMA copy, DDP and checkpoints treat it as one object.
The loop calls `method(batch)` (DDP wraps that call) and `method.sample_grid(...)` on the EMA copy.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from engine.data import build_data_source
from engine.data.base import Batch


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to backpropagate
    terms: dict[str, torch.Tensor] = field(default_factory=dict)  # each logged under its own key


class NotOwned:
    """A reference to something a module uses but does not own (the data set, the autoencoder):
    invisible to state_dict and .to(), and shared rather than copied by copy.deepcopy (the EMA copy)."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self


class LazyAutoencoder:
    """The autoencoder that made a method's latents, loaded by `load()` on first use (pictures only
    need it once in a while, and a run whose autoencoder is gone can still train)."""

    def __init__(self, description: str, load: Callable[[], nn.Module] | None):
        self.description = description  # where it comes from, for messages
        self._load = load
        self._model: nn.Module | None = None
        self._failure: Exception | None = None

    def get(self) -> nn.Module:
        """The autoencoder; FileNotFoundError saying how to point at it, or the loader's other
        errors (ValueError, ...), when it cannot be had. A failure is remembered, not retried."""
        if self._model is None:
            if self._failure is not None:
                raise self._failure
            if self._load is None:
                raise FileNotFoundError(f"no autoencoder is known for these latents ({self.description}); set "
                                        f"data.autoencoder (or pass --autoencoder) to the one that made them")
            try:
                self._model = self._load()
            except FileNotFoundError as err:
                self._failure = FileNotFoundError(
                    f"the autoencoder that made these latents is missing ({err}); pass its run directory with "
                    f"--autoencoder (engine-sample, engine-transfer) or set data.autoencoder")
                raise self._failure from err
            except (ValueError, ImportError, OSError, RuntimeError) as err:
                self._failure = err
                raise
        return self._model


class Method(nn.Module):
    name: ClassVar[str]
    # Config sections this method reads beyond the shared ones: {"ddpm": DDPMConfig, ...}.
    config_sections: ClassVar[dict[str, type]] = {}

    def __init__(self):
        super().__init__()
        self._autoencoder = NotOwned(None)
        self._warned_undecodable = False

    @classmethod
    def trains_on_latents(cls, cfg) -> bool:
        """Whether this method, so configured, trains on latents: the preparation stage then turns
        built-in images into latents for it, and the loop and load_run give it the autoencoder that
        decodes them for pictures. False by default."""
        return False

    @classmethod
    def validate_config(cls, cfg, check) -> None:
        """Rules that span sections: `check(ok, "section.key", message)` for each; none by default."""

    @classmethod
    def compile_problem(cls, cfg, device: torch.device) -> str | None:
        """Why this method's loss must not be compiled with torch.compile on `device` (the run then
        trains eagerly and says why once), or None; none by default."""
        return None

    @classmethod
    def graph_capture_problem(cls, cfg) -> str | None:
        """Why a training step of this method, so configured, cannot be captured as a CUDA graph
        (engine/graphs.py), or None; none by default."""
        return None

    @classmethod
    def training_data(cls, cfg, rank: int, world_size: int, device: torch.device):
        """The data source this method trains on; most methods take `data.source` as it is."""
        return build_data_source(cfg.data, cfg.run.seed, rank, world_size, device)

    @classmethod
    def from_config(cls, cfg, data) -> Method:
        """The method built for `data` (a data source, or a DataInfo when opened from a checkpoint)."""
        raise NotImplementedError

    def forward(self, batch: Batch) -> LossOutput:
        """Training loss for one micro-batch. Randomness comes from the global torch RNG, which the
        loop reseeds every step from (run.seed, rank, step)."""
        raise NotImplementedError

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Pictures for the periodic sample grid: (images [N, C, H, W] in [-1, 1], images per row).

        `batch` is a fixed batch of real data (for methods that transform data); `generator` is
        seeded identically every time so successive grids are comparable."""
        raise NotImplementedError

    def evaluate(self, data, per_class: int) -> dict[str, float]:
        """Numbers printed (and logged as eval/*) at the end of training, on about `per_class`
        held-out items per class; none by default."""
        return {}

    # ------------------------------------------------------------------ latents -> pictures

    def attach_autoencoder(self, autoencoder: LazyAutoencoder) -> None:
        """Encode and decode latents with this autoencoder (methods that train on latents)."""
        self._autoencoder.value = autoencoder

    def attached_autoencoder(self) -> nn.Module:
        """The attached autoencoder; FileNotFoundError (or the loader's error) when there is none."""
        if self._autoencoder.value is None:
            raise FileNotFoundError("no autoencoder is known for these latents; set data.autoencoder (or pass "
                                    "--autoencoder) to the one that made them")
        return self._autoencoder.value.get()

    def latents_to_images(self, latents: torch.Tensor, scaling_factor: float, strict: bool = False
                          ) -> torch.Tensor:
        """Pictures [N, 3, H, W] in [-1, 1] decoded by the attached autoencoder; without one (e.g.
        synthetic latents) the latent channels themselves, with one warning, unless `strict`."""
        from engine.models.autoencoder import decode_to_images

        try:
            if not scaling_factor > 0:
                raise ValueError("the latent scaling factor is unknown (0): this method was not built from "
                                 "a latents file nor loaded from a checkpoint of one")
            return decode_to_images(self.attached_autoencoder().to(latents.device), latents, scaling_factor)
        except (FileNotFoundError, ValueError, ImportError, RuntimeError) as err:
            if strict:
                raise
            if not self._warned_undecodable:
                warnings.warn(f"pictures show latent channels: cannot decode with the autoencoder ({err})",
                              stacklevel=2)
                self._warned_undecodable = True
            return latent_channels_as_images(latents)


def latent_channels_as_images(latents: torch.Tensor) -> torch.Tensor:
    """Latents [N, C, h, w] -> pictures in [-1, 1] without an autoencoder: the first 3 channels as
    RGB (1 channel as grey when C < 3), divided by the largest magnitude in the whole set."""
    pictures = latents[:, :3] if latents.shape[1] >= 3 else latents[:, :1]
    pictures = pictures.float()
    return pictures / pictures.abs().amax().clamp_min(1e-8)
