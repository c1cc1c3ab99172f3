"""Stand-ins for a config's data sources: the shapes it implies, with no data read.

The method's own `training_data` runs as in training (holdout splits, style indexes, encoders,
wrappers), but the data sources it builds are replaced, for the plan, by stand-ins of the same
shapes (`planned_sources` swaps them into engine.data, where build_data_source finds them):

- latents (data.source = "latents:PATH", or builtin:textures for a method that trains on latents,
  which preparation would turn into a latents file): a LatentSource whose latents are a fake tensor
  of the real shape and dtype and whose labels have a value (row i has style i mod K).
  builtin:textures implies prepare.crops fp16 latents (what engine-encode writes) of
  [autoencoder.latent_channels, prepare.image_size / downsampling, same] in the 12 built-in
  styles; a latents file gives its shape, dtype and class names from its header (the tensors are
  not read).
- images (builtin:textures, builtin:digits, folder:PATH: read on the host, a batch at a time):
  batches of fake images [C, H, W] as they arrive on the device; the classes are the 12 built-in
  pictures, the ten digits, or the folder's sub-folder names.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

import engine.data
import engine.data.latents as latents_module
from engine.config import Config
from engine.data.base import Batch
from engine.data.builtin import BUILTIN_PICTURES
from engine.data.latents import AutoencoderIdentity, LatentFile
from engine.methods import method_class
from engine.methods.sections import prompt_table_for

BUILTIN_LATENTS = "planned-builtin-latents"  # the data.source path a plan gives built-in latents
SAFETENSORS_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}
SKLEARN_DIGITS = 1797  # scikit-learn's digits data set
Known = Callable[[torch.Tensor], torch.Tensor]  # a real tensor -> a fake one that keeps its value


def read_safetensors_header(path: str | Path) -> dict:
    """The JSON header of a safetensors file (tensor dtypes, shapes, metadata): its first bytes only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(length))


def latents_file_layout(path: str | Path) -> tuple[tuple[int, ...], torch.dtype, list[str], float]:
    """(latents shape [N, C, h, w], stored dtype, class names, scaling factor) from a latents file's header."""
    try:
        header = read_safetensors_header(path)
        entry = header["latents"]
        metadata = header.get("__metadata__", {})
        return (tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]], json.loads(metadata["class_names"]),
                float(metadata.get("scaling_factor", 1.0)))
    except FileNotFoundError:
        raise FileNotFoundError(f"data.source: latents file not found: {path}; run engine-encode first") from None
    except (OSError, ValueError, KeyError, struct.error) as err:
        raise ValueError(f"data.source: cannot read the header of latents file {path}: {err!r}") from err


def builtin_latents(cfg: Config) -> bool:
    """Whether `cfg` trains on latents that preparation would make from builtin:textures."""
    return method_class(cfg.method.name).trains_on_latents(cfg) and cfg.data.source == "builtin:textures"


def planned_latents_layout(cfg: Config) -> tuple[tuple[int, ...], torch.dtype, list[str], float]:
    """(shape [N, C, h, w], dtype, class names, scaling factor) of the latents `cfg` trains on."""
    if builtin_latents(cfg):
        side = cfg.prepare.image_size // cfg.autoencoder.downsampling
        return ((cfg.prepare.crops, cfg.autoencoder.latent_channels, side, side), torch.float16,
                list(BUILTIN_PICTURES), 1.0)
    return latents_file_layout(cfg.data.source.partition(":")[2])


class PlannedImages:
    """Fake image batches of one shape (see the module doc)."""

    def __init__(self, sample_shape: tuple[int, int, int], class_names: list[str], seed: int = 0, rank: int = 0):
        self.sample_shape, self.class_names = tuple(sample_shape), list(class_names)
        self.seed, self.rank = seed, rank

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        for _ in itertools.count(start):
            labels = torch.randint(len(self.class_names), (batch_size,)) if self.class_names else \
                torch.zeros(batch_size, dtype=torch.long)
            yield Batch(torch.empty(batch_size, *self.sample_shape), labels)


def _planned_textures(image_size, flip, seed, rank=0):
    return PlannedImages((3, image_size, image_size), list(BUILTIN_PICTURES), seed, rank)


def _planned_folder(root, image_size, flip, seed, rank=0, num_workers=0, world_size=1):
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.source: folder not found: {root}")
    names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    return PlannedImages((3, image_size, image_size), names, seed, rank)


def _planned_digits_class(builtin_digits: type) -> type:
    """A stand-in for the built-in digits, a subclass of the real source (methods check for it)."""

    class PlannedDigits(builtin_digits):
        """The digits' training split (images fake, labels with their values) and held-out split."""

        def __init__(self, seed: int, rank: int = 0):
            digits = importlib.import_module(builtin_digits.__module__)
            side, every = digits.DIGITS_SIDE, digits.HELDOUT_EVERY
            self.seed, self.rank = seed, rank
            self.class_names = list(digits.DIGIT_NAMES)
            self.sample_shape = (1, side, side)
            held = torch.arange(SKLEARN_DIGITS) % every == every - 1
            labels = torch.arange(SKLEARN_DIGITS) % len(self.class_names)
            self.images = torch.empty(int((~held).sum()), 1, side, side)
            self.labels = labels[~held]
            self.heldout = Batch(torch.empty(int(held.sum()), 1, side, side), labels[held])

        batches = PlannedImages.batches

    return PlannedDigits


@contextlib.contextmanager
def planned_sources(cfg: Config, known: Known) -> Iterator[None]:
    """build_data_source builds the stand-ins (engine.data's source classes and the latents reader
    are swapped for the plan's)."""
    layout = planned_latents_layout(cfg) if cfg.data.source.startswith("latents:") or builtin_latents(cfg) else None

    def read_planned(path, device="cpu"):
        shape, dtype, class_names, scaling_factor = layout
        with unset_fake_temporarily():
            labels = torch.arange(shape[0]) % len(class_names)
        return LatentFile(torch.empty(shape, dtype=dtype), known(labels), class_names, scaling_factor,
                          AutoencoderIdentity("planned", ""), "mean")

    def planned_folder_source(data_cfg, root, seed, rank, world_size, device):
        return _planned_folder(root, data_cfg.image_size, data_cfg.flip, seed, rank, data_cfg.num_workers, world_size)

    swaps = [(engine.data, "BuiltinTextures", _planned_textures), (engine.data, "folder_source", planned_folder_source),
             (latents_module, "read_latents", read_planned)]
    if hasattr(engine.data, "BuiltinDigits"):
        swaps.append((engine.data, "BuiltinDigits", _planned_digits_class(engine.data.BuiltinDigits)))
    originals = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, stand_in in swaps:
        setattr(module, name, stand_in)
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def planned_training_data(cfg: Config, known: Known):
    """The method's training data built on stand-in sources (see the module doc), under a
    FakeTensorMode, and the config it was built for (built-in latents get a planned latents path,
    as preparation would give them a real one)."""
    resolved = cfg.copy()
    if builtin_latents(cfg):
        resolved.data.source = f"latents:{BUILTIN_LATENTS}"
    with planned_sources(cfg, known):
        data = method_class(cfg.method.name).training_data(resolved, 0, 1, torch.device("cpu"))
    text = getattr(cfg, "text", None)
    if text is not None and text.enabled:
        # The prompt table is embedded for real (milliseconds, real files), then recorded on the data
        # as a checkpoint records it, so the planned network is built with a fake table of its shape.
        with unset_fake_temporarily():
            table = prompt_table_for(text, data)
        data.text = {"shape": list(table.context.shape), "prompts": table.prompts, "encoder": table.encoder}
    return data, resolved
