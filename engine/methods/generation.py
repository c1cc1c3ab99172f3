"""Pieces the generative methods share: seeded noise, label checks, and the held-out quality check.

The quality check compares n generated pictures with n real ones (fixed seeds throughout, so two
runs' numbers compare):

    swd     sliced Wasserstein-2 distance between the two sets of flattened pictures: both sets
            projected on QUALITY_DIRECTIONS random unit directions, each projection sorted, the
            root mean square difference of the sorted values (a distance in pixel units, [-1, 1]
            scale). It sees the whole distribution: mode collapse and blur both raise it.
    nn_rms  mean over generated pictures of the distance to the nearest real one, divided by
            sqrt(values per picture): how far samples are from looking like some real picture.

Real pictures are the source's held-out split when it has one (`data.heldout`, e.g.
builtin:digits), else the first n items of its stream (builtin:textures crops).
"""

from __future__ import annotations

import math

import torch

from engine.data.base import Batch

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


def evaluate_samples(draw, data, per_class: int, num_classes: int, device: torch.device) -> dict[str, float]:
    """`sample_quality` of one generated picture per real one (`real_reference`), with the real one's
    label: `draw(n, generator, labels [n] or None) -> pictures [n, C, H, W]` is called EVAL_BATCH
    pictures at a time with one generator seeded with QUALITY_SEED."""
    real = real_reference(data, per_class)
    generator = torch.Generator(device).manual_seed(QUALITY_SEED)
    labels = real.labels if num_classes else None
    chunks = [draw(min(EVAL_BATCH, len(real.x) - start), generator,
                   None if labels is None else labels[start:start + EVAL_BATCH])
              for start in range(0, len(real.x), EVAL_BATCH)]
    return sample_quality(torch.cat(chunks).float().clamp(-1, 1), real.x)


def sample_quality(generated: torch.Tensor, real: torch.Tensor) -> dict[str, float]:
    """{"swd", "nn_rms"} of generated pictures against as many real ones."""
    n = min(generated.shape[0], real.shape[0])
    return {"swd": sliced_wasserstein(generated[:n], real[:n]), "nn_rms": nearest_neighbour_rms(generated, real)}
