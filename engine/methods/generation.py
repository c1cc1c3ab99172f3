"""Pieces the generative methods share: seeded noise, label checks, sample grids, training on
latents, and the held-out quality check.

Sample grids (`grid_layout`, `grid_noise`) are drawn from a generator seeded the same way every
time, so successive grids compare, and every class starts from the same noises (see grid_noise).

ddpm, fm and fmm train on autoencoder latents when `uses_latents(cfg, section)` says so
(`data.source = "latents:PATH"`, or `<section>.latent = true`: builtin:textures prepared into
latents by engine/prepare.py). Their samples are then latents, decoded into pictures by the
autoencoder that made them (`to_pictures`, with the scaling factor the method holds as a buffer);
latents are never clamped to [-1, 1], only the decoded pictures are.

The quality check compares n generated pictures with n real ones (fixed seeds throughout, so two
runs' numbers compare):

    swd     sliced Wasserstein-2 distance between the two sets of flattened pictures: both sets
            projected on QUALITY_DIRECTIONS random unit directions, each projection sorted, the
            root mean square difference of the sorted values (a distance in pixel units, [-1, 1]
            scale; on latents, in latent units). It sees the whole distribution: mode collapse and
            blur both raise it.
    nn_rms  mean over generated pictures of the distance to the nearest real one, divided by
            sqrt(values per picture): how far samples are from looking like some real picture.

Real pictures are the source's held-out split when it has one (`data.heldout`, e.g.
builtin:digits), else the first n items of its stream (builtin:textures crops). A method that
trains on latents is compared in latent space (generated latents against the real latents of its
data, neither clamped nor decoded): no autoencoder is needed, and the numbers of two latent runs
compare when they share a latents file.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from engine.data.base import Batch, DataInfo
from engine.methods.base import Method
from engine.methods.sections import check_prepare_sizes, check_text_config

QUALITY_DIRECTIONS = 256
QUALITY_SEED = 0
EVAL_BATCH = 64  # samples generated per call while evaluating


def noise(shape: tuple[int, ...], generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """N(0, I) drawn on the generator's device and then moved, so a CPU generator also drives CUDA."""
    return torch.randn(shape, generator=generator, device=generator.device).to(device)


def check_labels(labels: torch.Tensor | None, n: int, num_classes: int, device: torch.device
                 ) -> torch.Tensor | None:
    """Labels [n] in [0, num_classes] (num_classes = unconditional) as long on `device`, or None."""
    if labels is None:
        return None
    if num_classes == 0:
        raise ValueError("this model was trained without classes; sample with labels=None")
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape [{n}] (one per sample), got {tuple(labels.shape)}")
    if labels.min() < 0 or labels.max() > num_classes:
        raise ValueError(f"labels must be in [0, {num_classes}] ({num_classes} = unconditional), "
                         f"got values in [{int(labels.min())}, {int(labels.max())}]")
    return labels.to(device=device, dtype=torch.long)


def guided(model_call, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None, null_label: int,
           cfg_scale: float) -> torch.Tensor:
    """Classifier-free guidance of `model_call(x, t, labels)`: out(null) + s (out(label) - out(null)),
    conditional and unconditional rows in one call; one plain call when s = 1 or there are no labels."""
    if labels is None or cfg_scale == 1.0:
        return model_call(x, t, labels)
    null = torch.full_like(labels, null_label)
    if cfg_scale == 0.0:
        return model_call(x, t, null)
    cond, uncond = model_call(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null])).chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def grid_layout(num: int, num_classes: int) -> tuple[torch.Tensor | None, int]:
    """Labels for a sample grid of `num` images and the images per row.

    Few classes (2 <= K, K^2 <= num): one row per class. More classes, up to num: labels cycle
    over the classes in rows of K, so each column is one class. Beyond that labels cycle in a
    square-ish grid; no classes: unconditional.
    """
    square_row = math.ceil(math.sqrt(num))
    if num_classes == 0:
        return None, square_row
    cycling = torch.arange(num) % num_classes
    if num_classes == 1 or num_classes > num:
        return cycling, square_row
    if num_classes**2 <= num:
        per_row = math.ceil(num / num_classes)
        return torch.arange(num) // per_row, per_row
    return cycling, num_classes


def grid_noise(labels: torch.Tensor | None, shape: tuple[int, ...], generator: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """Initial noise [n, ...] = `shape` of a sample grid whose cell i is of class labels[i] ([n], or
    None: unconditional, every cell its own noise).

    The seed's bug was monitoring grids that hid missing conditioning. The rule here, whatever the
    layout: one noise per position along the class axis, shared by the classes. The k-th cell of
    each class (in cell order) starts from noise n_k, and n_0, n_1, ... are independent draws. In
    grid_layout's one-row-per-class grid, column k is noise n_k seen through every class, which is
    "a different noise per class column, the same noise across the rows (the classes)"; in its
    one-column-per-class grid the same holds with rows and columns swapped. With a deterministic
    sampler (DDIM at eta 0, the ODE samplers) conditioning is then the only difference between cells
    at one position: a model that ignores its label draws them identical, and a working one makes
    each class visibly its own from the same start. (Stochastic samplers, DDPM or DDIM at eta > 0,
    draw fresh noise per cell at every step, which blurs that comparison.)
    Deterministic for a generator seeded the same way."""
    n = shape[0]
    if labels is None:
        position = torch.arange(n)
    else:
        labels = labels.cpu()
        earlier = torch.ones(n, n, dtype=torch.bool).tril(diagonal=-1)  # [i, j]: j comes before i
        position = ((labels[:, None] == labels[None, :]) & earlier).sum(dim=1)
    noises = noise((int(position.max()) + 1, *shape[1:]), generator, device)
    return noises[position.to(device)]


class GenerativeMethod(Method):
    """What ddpm, fm and fmm share beyond their maths: their own config section (`section`) says
    whether they train on latents (`uses_latents`), the latent and [text] config rules, and the
    latents' scaling factor held as a buffer."""

    section: ClassVar[str]

    @classmethod
    def trains_on_latents(cls, cfg) -> bool:
        return uses_latents(cfg, cls.section)

    @classmethod
    def validate_config(cls, cfg, check) -> None:
        check_latent_config(cfg, cls.section, check)
        check_text_config(cfg, check)

    def hold_latent_scaling(self, latent_scaling: float | None) -> None:
        """`latent_scaling`: None on pixels; on latents, the factor they were multiplied by
        (`latent_scaling(...)`). A buffer, so a checkpoint decodes with the factor its latents were
        made with; pixel runs keep it out of their checkpoints."""
        self.latent = latent_scaling is not None
        self.register_buffer("scaling_factor", torch.tensor(float(latent_scaling or 0.0)), persistent=self.latent)


def uses_latents(cfg, section: str) -> bool:
    """Whether ddpm / fm / fmm (their config section `section`) trains on latents: data.source is a
    latents file, or `<section>.latent = true` has builtin:textures prepared into latents."""
    return cfg.data.source.startswith("latents:") or getattr(cfg, section).latent


def check_latent_config(cfg, section: str, check) -> None:
    """`<section>.latent = true` needs a source the preparation stage can make latents of, and
    [prepare] crop sides the [autoencoder] can encode."""
    if getattr(cfg, section).latent:
        check(cfg.data.source == "builtin:textures" or cfg.data.source.startswith("latents:"), f"{section}.latent",
              "needs data.source = 'builtin:textures' (encoded by the built-in autoencoder, see [autoencoder] "
              "and [prepare]) or 'latents:PATH'; encode an image folder with engine-encode first")
        check_prepare_sizes(cfg, check)


def latent_scaling(data, on_latents: bool) -> float | None:
    """None for a method that trains on pixels; else the factor `data`'s latents are multiplied by
    (a LatentSource's), or 0 for a DataInfo (a run opened from a checkpoint: its buffer then brings
    the factor). ValueError when latents are asked for but `data` holds pictures."""
    if not on_latents:
        return None
    if isinstance(data, DataInfo):
        return 0.0
    factor = getattr(data, "scaling_factor", None)  # a LatentSource's, or a wrapper's of one
    if factor is not None:
        return factor
    raise ValueError(f"this config trains on latents but its data source is {type(data).__name__} (pictures): "
                     f"prepare it first (engine.prepare.prepare, which engine-train runs), or set data.source "
                     f"to a 'latents:PATH' file from engine-encode")


def to_pictures(method, samples: torch.Tensor, on_latents: bool, strict: bool = False) -> torch.Tensor:
    """Pictures [N, C', H', W'] in [-1, 1] of a generative method's samples [N, C, H, W]: latents
    decoded by the method's autoencoder with its `scaling_factor` (Method.latents_to_images: without
    an autoencoder, an error when `strict`, else the latent channels), pixels clamped. Latents are
    never clamped before decoding: their range is not [-1, 1]."""
    if on_latents:
        return method.latents_to_images(samples, float(method.scaling_factor), strict)
    return samples.clamp(-1, 1)


def real_reference(data, per_class: int) -> Batch:
    """Up to per_class real items per class (see the module doc), on the CPU."""
    heldout = getattr(data, "heldout", None)
    if heldout is None:
        n = per_class * max(1, len(data.class_names))
        return next(iter(data.batches(0, n))).to("cpu")
    rows = torch.cat([(heldout.labels == y).nonzero().flatten()[:per_class]
                      for y in range(len(data.class_names))])
    return Batch(heldout.x[rows].cpu(), heldout.labels[rows].cpu())


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, num_directions: int = QUALITY_DIRECTIONS,
                       seed: int = QUALITY_SEED) -> float:
    """Sliced W2 between the rows of x [n, ...] and y [n, ...] (same n), see the module doc."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"sliced_wasserstein needs sets of one size, got {x.shape[0]} and {y.shape[0]}")
    x, y = x.flatten(1).double().cpu(), y.flatten(1).double().cpu()
    directions = torch.randn(x.shape[1], num_directions, generator=torch.Generator().manual_seed(seed),
                             dtype=torch.float64)
    directions = directions / directions.norm(dim=0, keepdim=True)
    px, _ = (x @ directions).sort(dim=0)
    py, _ = (y @ directions).sort(dim=0)
    return (px - py).square().mean().sqrt().item()


def nearest_neighbour_rms(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over generated rows of the distance to the nearest real row, / sqrt(values per row)."""
    g, r = generated.flatten(1).double().cpu(), real.flatten(1).double().cpu()
    return (torch.cdist(g, r).min(dim=1).values.mean() / math.sqrt(g.shape[1])).item()


def evaluate_samples(draw, data, per_class: int, num_classes: int, device: torch.device, clamp: bool = True
                     ) -> dict[str, float]:
    """`sample_quality` of one generated sample per real one (`real_reference`), with the real one's
    label: `draw(n, generator, labels [n] or None) -> samples [n, C, H, W]` is called EVAL_BATCH
    samples at a time with one generator seeded with QUALITY_SEED. `clamp`: the samples are
    pictures, clamped to [-1, 1]; latents (clamp=False) are compared as they are."""
    real = real_reference(data, per_class)
    generator = torch.Generator(device).manual_seed(QUALITY_SEED)
    labels = real.labels if num_classes else None
    chunks = [draw(min(EVAL_BATCH, len(real.x) - start), generator,
                   None if labels is None else labels[start:start + EVAL_BATCH])
              for start in range(0, len(real.x), EVAL_BATCH)]
    generated = torch.cat(chunks).float()
    return sample_quality(generated.clamp(-1, 1) if clamp else generated, real.x)


def sample_quality(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """{"swd", "nn_rms"} of generated pictures against as many real ones."""
    n = min(generated.shape[0], real.shape[0])
    return {"swd": sliced_wasserstein(generated[:n], real[:n]), "nn_rms": nearest_neighbour_rms(generated, real)}
