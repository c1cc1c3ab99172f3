"""What the training loop needs from a data source."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, unique
from typing import Protocol

import torch


@unique
class Stream(IntEnum):
    """Every independent random stream derived from run.seed, in one table so no two uses share one.

    `batch_seed(seed, rank, counter, stream)` mixes them: the same counter in two streams gives
    unrelated numbers. The values are part of every run's reproducibility: never renumber them."""

    BATCHES = 0  # data draws: latent rows, built-in crops, image-folder epoch permutations
    STEP = 1  # the training loop's per-step global RNG (noise, timesteps, dropout)
    INIT = 2  # the initial weights
    GRID = 3  # the fixed noise of sample grids
    AUGMENT = 5  # image-folder crops and flips
    PREPARE = 7  # the crops of built-in pictures encoded into built-in latents


@dataclass
class Batch:
    x: torch.Tensor  # [B, C, H, W] images in [-1, 1], or latents
    labels: torch.Tensor  # [B] long class / style ids

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.x.to(device, non_blocking=True), self.labels.to(device, non_blocking=True))


class DataSource(Protocol):
    """A source of training batches whose order is a pure function of (seed, rank, batch number).

    That makes the data position of a run one integer (micro-batches drawn so far), so a resumed
    run draws exactly the batches an uninterrupted run would have drawn.
    """

    sample_shape: tuple[int, int, int]  # [C, H, W] of one sample
    class_names: list[str]  # label i is class_names[i]

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        """Micro-batches number `start`, `start + 1`, ... (each `batch_size` samples)."""
        ...


def batch_seed(seed: int, rank: int, number: int, stream: Stream) -> int:
    """A well-mixed 63-bit seed for one (seed, rank, counter) triple (splitmix64 finaliser).

    `stream` (see `Stream`) separates independent uses of the same counter, so they never share
    random numbers."""
    z = (seed * 0x9E3779B97F4A7C15 + rank * 0xBF58476D1CE4E5B9 + number * 0x94D049BB133111EB
         + stream * 0xD6E8FEB86659FD93) & (2**64 - 1)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & (2**64 - 1)
    return (z ^ (z >> 31)) & (2**63 - 1)


# The largest data.image_size allowed where the machine's memory cannot be read.
FALLBACK_MAX_IMAGE_SIZE = 8192


def physical_memory() -> int | None:
    """Bytes of RAM in this machine, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows) or no such name
        return None


def check_image_memory(image_size: int, need_bytes: int, what: str) -> None:
    """Refuse, before anything is allocated, a data.image_size whose pictures cannot fit in memory:
    `need_bytes` is what `what` would take at that size. Where the machine's memory is unknown, a
    fixed cap of FALLBACK_MAX_IMAGE_SIZE px stands in."""
    memory = physical_memory()
    if memory is None:
        if image_size > FALLBACK_MAX_IMAGE_SIZE:
            raise ValueError(f"data.image_size = {image_size}: {what} would need {need_bytes / 2**30:.3g} GiB; "
                             f"this machine's memory is unknown, so at most {FALLBACK_MAX_IMAGE_SIZE} px is "
                             f"allowed; use a smaller data.image_size")
    elif need_bytes > memory:
        raise ValueError(f"data.image_size = {image_size}: {what} would need {need_bytes / 2**30:.3g} GiB of "
                         f"memory, this machine has {memory / 2**30:.3g} GiB; use a smaller data.image_size")


def class_ids(text: str, class_names: list[str], option: str) -> list[int]:
    """'0,2' or 'brick,grass' (ids and names may mix) -> class ids; ValueError naming `option` and
    listing the valid classes."""
    ids = []
    for token in (t.strip() for t in text.split(",")):
        if token.isdigit() and int(token) < len(class_names):
            ids.append(int(token))
        elif token in class_names:
            ids.append(class_names.index(token))
        else:
            valid = ", ".join(f"{i} {name}" for i, name in enumerate(class_names))
            raise ValueError(f"{option}: {token!r} is neither an id below {len(class_names)} nor a name; "
                             f"valid: {valid}")
    return ids


@dataclass
class DataInfo:
    """What a method needs to know about its data when no data is loaded (e.g. sampling from a
    checkpoint): the shape of one sample, the class names and, for text conditioning, what the prompt
    table looks like (its values are in the weights). Saved in every checkpoint."""

    sample_shape: tuple[int, int, int]
    class_names: list[str]
    text: dict | None = None  # the prompt table's {"shape", "prompts", "encoder"} under text conditioning

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        raise RuntimeError("no data is loaded here: this run was opened from a checkpoint for sampling")
