"""Latent datasets held on the device: `data.source = "latents:PATH"` (a file from engine-encode).

File format (safetensors):
    latents  [N, C, h, w] fp16 (or bf16 / fp32 / fp64), finite, already multiplied by the
             scaling factor
    labels   [N] int64, label i is class_names[i]
    metadata format, class_names (JSON list), scaling_factor, autoencoder (path it was loaded
             from), autoencoder_hash (short hash of its weights), posterior (mean | sample)

`LatentSource` reads the whole file into device memory once and keeps the stored dtype there
(fp16: half the memory, 50k latents of 4x32x32 are 400 MB); a batch gathers its rows on the
device and casts them to fp32. Batch n draws its rows i.i.d. uniformly (with replacement) from a
generator on the device seeded with batch_seed(seed, rank, n): no DataLoader, no host round trip,
and batch n is a pure function of (seed, rank, n), so resumed runs replay the same batches.

`StyleIndex` answers "a random real latent of style y" in O(1) per row, vectorised on the device:
rows sorted by label in one flat tensor plus per-label offsets and counts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.data.base import Batch, Stream, batch_seed
from engine.safe_files import read_tensor_file, replacing

FORMAT = "engine-latents/1"
RERUN_HINT = "re-run engine-encode to write it again"


@dataclass(frozen=True)
class AutoencoderIdentity:
    """Which autoencoder made a set of latents: where it was loaded from and a hash of its weights."""

    path: str
    weights_hash: str


# --------------------------------------------------------------------------- the file


@dataclass
class LatentFile:
    latents: torch.Tensor  # [N, C, h, w] scaled latents, stored dtype
    labels: torch.Tensor  # [N] int64
    class_names: list[str]
    scaling_factor: float
    autoencoder: AutoencoderIdentity
    posterior: str  # "mean" or "sample"


def write_latents(path: str | Path, data: LatentFile) -> None:
    """Write a latents file atomically: a temporary file created exclusively beside it (never
    through a planted symlink), fsync, os.replace. A crash leaves either the old file or the new
    one, never half of one. Refuses what `read_latents` would refuse (NaN/inf rows included)."""
    path = Path(path)
    _check_consistent(data, str(path))
    metadata = {
        "format": FORMAT,
        "class_names": json.dumps(data.class_names),
        "scaling_factor": repr(float(data.scaling_factor)),
        "autoencoder": data.autoencoder.path,
        "autoencoder_hash": data.autoencoder.weights_hash,
        "posterior": data.posterior,
    }
    tensors = {"latents": data.latents.detach().cpu().contiguous(),
               "labels": data.labels.detach().cpu().to(torch.int64).contiguous()}
    with replacing(path) as temporary:
        save_file(tensors, temporary, metadata=metadata)


def read_latents(path: str | Path, device: str | torch.device = "cpu") -> LatentFile:
    """Read a latents file (tensors straight onto `device`), with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file not found: {path}; run engine-encode first "
                                f"(engine-encode --images DIR --autoencoder CKPT --out {path}), or, for latents "
                                f"prepared from builtin:textures, rerun engine-train with the run's config")
    tensors, metadata = read_tensor_file(path, "latents file", ("latents", "labels"), FORMAT, RERUN_HINT, device)
    try:
        data = LatentFile(tensors["latents"], tensors["labels"], json.loads(metadata["class_names"]),
                          float(metadata["scaling_factor"]),
                          AutoencoderIdentity(metadata["autoencoder"], metadata["autoencoder_hash"]),
                          metadata["posterior"])
    except (KeyError, ValueError) as err:
        raise ValueError(f"latents file {path}: metadata is missing or malformed ({err!r}); {RERUN_HINT}") from err
    _check_consistent(data, str(path))
    return data


def read_latents_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a latents file without reading its tensors ({} when it cannot be read: the
    full read, later, reports what is wrong with it)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError):
        return {}


LATENT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FINITE_CHECK_VALUES = 1 << 24  # values tested per chunk: bounds the temporary mask to 16 MB


def first_nonfinite_row(latents: torch.Tensor) -> int | None:
    """The index of the first row of `latents` [N, ...] holding a NaN or inf, or None: one pass over
    the tensor, in chunks of rows so the mask it builds stays small (one host sync per chunk)."""
    rows = latents.reshape(latents.shape[0], -1)
    chunk = max(1, _FINITE_CHECK_VALUES // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], chunk):
        finite = torch.isfinite(rows[start:start + chunk]).all(dim=1)
        if not finite.all():
            return start + int((~finite).nonzero()[0])
    return None


def _check_consistent(data: LatentFile, where: str) -> None:
    latents, labels = data.latents, data.labels
    if latents.dim() != 4 or labels.shape != (latents.shape[0],) or labels.dtype != torch.int64:
        raise ValueError(f"latents file {where}: need latents [N, C, h, w] and int64 labels [N], got "
                         f"{tuple(latents.shape)} and {labels.dtype} {tuple(labels.shape)}; {RERUN_HINT}")
    if latents.dtype not in LATENT_DTYPES:
        raise ValueError(f"latents file {where}: latents must be float16/bfloat16/float32/float64, got "
                         f"{str(latents.dtype).removeprefix('torch.')}; {RERUN_HINT}")
    if latents.shape[0] == 0:
        raise ValueError(f"latents file {where} holds no latents; {RERUN_HINT}")
    if not data.class_names or labels.min() < 0 or labels.max() >= len(data.class_names):
        raise ValueError(f"latents file {where}: labels must lie in [0, {len(data.class_names)}) "
                         f"(one per class name); {RERUN_HINT}")
    if not (math.isfinite(data.scaling_factor) and data.scaling_factor > 0):
        raise ValueError(f"latents file {where}: scaling_factor = {data.scaling_factor} must be a finite "
                         f"number > 0; {RERUN_HINT}")
    bad_row = first_nonfinite_row(latents)
    if bad_row is not None:
        raise ValueError(f"latents file {where}: row {bad_row} holds NaN/inf values; {RERUN_HINT}")


# --------------------------------------------------------------------------- the style index


class StyleIndex:
    """Per label, its rows in one flat tensor sorted by label, with offsets and counts.

        rows     [N]  row ids; rows[offsets[y] : offsets[y] + counts[y]] are the rows of label y
        offsets  [K]  counts [K]

    Built once; `sample_rows_of` is then a few vectorised ops on the device with no host sync.
    """

    def __init__(self, labels: torch.Tensor, num_labels: int | None = None, names: list[str] | None = None):
        labels = labels.long()
        self.num_labels = int(num_labels if num_labels is not None else labels.max().item() + 1)
        self.names = names
        self.rows = torch.argsort(labels, stable=True)  # stable: within a label, file order
        self.counts = torch.bincount(labels, minlength=self.num_labels)
        if self.counts.numel() != self.num_labels:
            raise ValueError(f"StyleIndex: labels go up to {labels.max().item()}, but num_labels = {self.num_labels}")
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def _name(self, label: int) -> str:
        return f"{label} ({self.names[label]!r})" if self.names else str(label)

    def require_all(self, num_labels: int | None = None) -> None:
        """Every label 0..num_labels-1 has at least one row, else a ValueError naming the empty ones.
        Call it when building anything that samples every style, so the problem shows at start."""
        num_labels = self.num_labels if num_labels is None else num_labels
        counts = self.counts.tolist() + [0] * max(0, num_labels - self.num_labels)
        empty = [label for label in range(num_labels) if counts[label] == 0]
        if empty:
            raise ValueError(f"no latents for label(s) {', '.join(self._name(y) for y in empty)}: every style "
                             f"needs at least one latent; add images of them and re-run engine-encode")

    def rows_of(self, label: int) -> torch.Tensor:
        """All rows of one label (file order)."""
        start, count = int(self.offsets[label]), int(self.counts[label])
        return self.rows[start:start + count]

    def sample_rows_of(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """For each requested label [B], a uniformly random row of that label: [B] long.

        Every requested label must have rows (check with `require_all` at start)."""
        counts = self.counts[labels]
        u = torch.rand(labels.shape, generator=generator, device=self.rows.device, dtype=torch.float64)
        # float64 keeps floor(u * count) < count for every u < 1; the clamp is belt and braces.
        within = torch.minimum((u * counts).long(), counts - 1)
        return self.rows[self.offsets[labels] + within]


# --------------------------------------------------------------------------- the data source


class LatentSource:
    """A latents file in device memory as a `DataSource` (see the module doc)."""

    def __init__(self, latents: torch.Tensor, labels: torch.Tensor, class_names: list[str],
                 scaling_factor: float, autoencoder: AutoencoderIdentity, seed: int, rank: int = 0,
                 path: str | None = None):
        self.latents = latents  # [N, C, h, w], stored dtype, on the device
        self.labels = labels  # [N] long, same device
        self.class_names = list(class_names)
        self.sample_shape = tuple(latents.shape[1:])
        self.scaling_factor = scaling_factor  # decode with z / scaling_factor
        self.autoencoder = autoencoder  # which autoencoder decodes these latents
        self.seed, self.rank, self.path = seed, rank, path
        self.device = latents.device
        self.style_index = StyleIndex(labels, len(self.class_names), self.class_names)

    @classmethod
    def load(cls, path: str | Path, seed: int, rank: int = 0, device: str | torch.device = "cpu") -> LatentSource:
        data = read_latents(path, device)
        return cls(data.latents, data.labels, data.class_names, data.scaling_factor, data.autoencoder,
                   seed, rank, str(path))

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batches(self, start: int, batch_size: int) -> Iterator[Batch]:
        number = start
        while True:
            generator = torch.Generator(self.device).manual_seed(
                batch_seed(self.seed, self.rank, number, Stream.BATCHES))
            rows = torch.randint(len(self), (batch_size,), generator=generator, device=self.device)
            yield Batch(self.latents[rows].float(), self.labels[rows])
            number += 1

    def sample_style_reference(self, styles: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A real latent of each requested style [B] -> [B, C, h, w] fp32 (O(1) per row)."""
        return self.latents[self.style_index.sample_rows_of(styles, generator)].float()

    def split_holdout(self, n_per_class: int) -> tuple[LatentSource, Batch]:
        """(a source without the held-out rows, the held-out latents + labels) for evaluation.

        Deterministic, independent of the seed: the first `n_per_class` rows of every label in file
        order are held out. Every label must keep at least one training row."""
        if n_per_class < 1:
            raise ValueError(f"split_holdout: n_per_class must be >= 1, got {n_per_class}")
        index = self.style_index
        short = [y for y, count in enumerate(index.counts.tolist()) if count <= n_per_class]
        if short:
            raise ValueError(f"split_holdout({n_per_class}): label(s) {', '.join(index._name(y) for y in short)} "
                             f"have <= {n_per_class} latents, so none would be left to train on")
        held = torch.cat([index.rows_of(y)[:n_per_class] for y in range(index.num_labels)])
        keep = torch.ones(len(self), dtype=torch.bool, device=self.device)
        keep[held] = False
        train = LatentSource(self.latents[keep], self.labels[keep], self.class_names, self.scaling_factor,
                             self.autoencoder, self.seed, self.rank, self.path)
        return train, Batch(self.latents[held].float(), self.labels[held])
