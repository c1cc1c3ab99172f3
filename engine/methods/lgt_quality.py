"""LGT's style-transfer quality protocol: does a transport carry the *style* of its target and keep
its content? Measured on held-out contents and their target styles, for LGT and for two trivial
transports of the same contents to the same targets:

    identity  x_1 = the content itself: perfect content, no style
    swap      x_1 = a real training latent of the target style: perfect style, no content
    lgt       x_1 = the run's guided transport

Every transport gets the same metrics:

    style_acc  the fraction of x_1 that a small classifier (`StyleClassifier`, trained on the run's
               real training latents) assigns to the target style; chance = 1 / K. Its accuracy on
               real held-out latents (`classifier_acc_real`) says whether it tells styles apart at all
    ssm        SSM distance (all positions) between x_1 and its content; lower = closer, identity 0
    ssim       SSIM of the luminance at <= SSIM_SIDE px of decode(x_1) and decode(content); higher =
               closer, identity 1 (only when an autoencoder decodes the latents)

and, for built-in data, the autoencoder's reconstruction of fresh crops (ae_psnr in dB, ae_ssim): a
blurry decoder caps every decoded picture.

The verdict (`verdict`): LGT passes when
    1. the classifier recognises real held-out latents: classifier_acc_real >= MIN_CLASSIFIER_ACC;
    2. style: style_acc(lgt) >= style_acc(identity) + STYLE_MARGIN;
    3. content: every content metric measured is at least CONTENT_FRACTION of the way from swap to
       identity: ssm(lgt) <= ssm(swap) + 0.5 (ssm(identity) - ssm(swap)), the same for ssim.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from engine.data.latents import StyleIndex
from engine.methods.lgt_energy import SelfSimilarity

Tensor = torch.Tensor

TRANSPORTS = ("identity", "swap", "lgt")  # the columns of the table, in order
MIN_CLASSIFIER_ACC = 0.5  # below it the classifier cannot tell real styles apart: no verdict holds
STYLE_MARGIN = 0.5  # style_acc(lgt) - style_acc(identity), absolute
CONTENT_FRACTION = 0.5  # how far from swap towards identity every content metric must be
SSIM_SIDE = 32  # luminance compared at this side (or the decoded side when smaller)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5  # Wang et al.'s gaussian window
CLASSIFIER_STEPS = 400
CLASSIFIER_BATCH = 64
CLASSIFIER_WIDTH = 32
CLASSIFIER_LR = 3e-3
METRIC_BATCH = 64  # rows per classifier / SSM call


# --------------------------------------------------------------------------- picture metrics


def gaussian_window(size: int, sigma: float, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> Tensor:
    """[size, size] normalised gaussian weights (outer product of two 1-D gaussians)."""
    offsets = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    line = torch.exp(-offsets.square() / (2 * sigma ** 2))
    line = line / line.sum()
    return line[:, None] * line[None, :]


def ssim(x: Tensor, y: Tensor, data_range: float = 2.0, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA
         ) -> Tensor:
    """Structural similarity per image [N] of x, y [N, C, H, W] (mean over channels and positions).

    Wang et al. 2004: gaussian window (valid positions only; narrowed to the largest odd size that fits
    a smaller image), C1 = (0.01 L)^2, C2 = (0.03 L)^2 with L = data_range (2 for pictures in
    [-1, 1]), population (co)variances. Computed in x's dtype (float64 stays float64)."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim: x and y must be [N, C, H, W] of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    size = min(window, *x.shape[2:])
    size -= 1 - size % 2  # odd
    channels = x.shape[1]
    weights = gaussian_window(size, sigma, x.dtype, x.device).expand(channels, 1, size, size)

    def blur(z: Tensor) -> Tensor:
        return F.conv2d(z, weights, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x.square()
    var_y = blur(y * y) - mu_y.square()
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x.square() + mu_y.square() + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def luminance(images: Tensor, side: int = SSIM_SIDE) -> Tensor:
    """Pictures [N, 3 or 1, H, W] -> luminance [N, 1, h, w] (BT.601 weights), area-resized so the
    shorter side is `side` (kept when already <= side)."""
    if images.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=images.dtype, device=images.device)
        grey = (images * weights[:, None, None]).sum(dim=1, keepdim=True)
    else:
        grey = images.mean(dim=1, keepdim=True)
    height, width = grey.shape[2:]
    if min(height, width) <= side:
        return grey
    scale = side / min(height, width)
    return F.interpolate(grey, size=(round(height * scale), round(width * scale)), mode="area")


def luminance_ssim(a: Tensor, b: Tensor, side: int = SSIM_SIDE) -> Tensor:
    """SSIM [N] of the low-resolution luminance of pictures a, b [N, C, H, W] in [-1, 1]."""
    return ssim(luminance(a.float(), side), luminance(b.float(), side))


def psnr(x: Tensor, y: Tensor, data_range: float = 2.0) -> Tensor:
    """Peak signal-to-noise ratio in dB per image [N] (x, y [N, C, H, W] in a range of `data_range`)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp_min(1e-12))


def ssm_distance(x: Tensor, y: Tensor, batch_size: int = METRIC_BATCH) -> float:
    """The SSM content energy with every position, averaged over the rows of x, y [N, C, H, W]."""
    energy = SelfSimilarity(max_spatial_samples=0)
    total = sum(energy(a, b).item() * a.shape[0] for a, b in zip(x.split(batch_size), y.split(batch_size)))
    return total / x.shape[0]


# --------------------------------------------------------------------------- the style classifier


class StyleClassifier(nn.Module):
    """A small conv net on latents [B, C, H, W] -> style logits [B, K]: per-channel standardisation
    (the training latents' statistics), 3 conv 3x3 + SiLU (the second with stride 2, the first too
    when the side is above 16, so 4x32x32 latents cost about 4x what 4x8x8 ones do), global average
    pool, linear."""

    def __init__(self, channels: int, num_styles: int, side: int, width: int = CLASSIFIER_WIDTH):
        super().__init__()
        first_stride = 2 if side > 16 else 1
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=first_stride, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_styles)
        self.register_buffer("mean", torch.zeros(channels, 1, 1))
        self.register_buffer("std", torch.ones(channels, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features((x.float() - self.mean) / self.std))

    @torch.no_grad()
    def predict(self, latents: Tensor, batch_size: int = METRIC_BATCH) -> Tensor:
        """The most likely style of every latent [N] (long)."""
        with torch.autocast(latents.device.type, enabled=False):
            return torch.cat([self(chunk).argmax(dim=1) for chunk in latents.split(batch_size)])


def train_style_classifier(latents: Tensor, labels: Tensor, num_styles: int, seed: int,
                           steps: int = CLASSIFIER_STEPS, batch_size: int = CLASSIFIER_BATCH,
                           progress: bool = True) -> StyleClassifier:
    """A StyleClassifier trained on real latents [N, C, H, W] with labels [N]: `steps` AdamW steps
    on batches drawn uniformly over styles, then uniformly within the style (so a rare style counts
    as much as a common one). Deterministic for a fixed `seed`: the initial weights come from a
    forked global RNG (the caller's RNG state is untouched), the batches from a seeded generator,
    cuDNN is held to deterministic algorithms."""
    device = latents.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        classifier = StyleClassifier(latents.shape[1], num_styles, min(latents.shape[2:]))
    standardised = latents.float().transpose(0, 1).flatten(1)  # [C, N*H*W]
    classifier.mean.copy_(standardised.mean(dim=1)[:, None, None])
    classifier.std.copy_(standardised.std(dim=1).clamp_min(1e-6)[:, None, None])
    classifier.to(device)
    index = StyleIndex(labels, num_styles)
    present = (index.counts > 0).nonzero().flatten()  # styles with latents to learn from
    generator = torch.Generator(device).manual_seed(seed)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=CLASSIFIER_LR, weight_decay=0.01)
    with (torch.enable_grad(), torch.autocast(device.type, enabled=False),
          torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False, deterministic=True)):
        for _ in tqdm(range(steps), desc="evaluating: style classifier", unit="step", dynamic_ncols=True,
                      disable=not progress, leave=False):
            styles = present[torch.randint(present.numel(), (batch_size,), generator=generator, device=device)]
            rows = index.sample_rows_of(styles, generator)
            # Label smoothing keeps the optimum at finite logits: on separable styles the gradients would
            # otherwise shrink into denormal floats, which a CPU handles ~10x slower.
            loss = F.cross_entropy(classifier(latents[rows].float()), labels[rows].long(), label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return classifier.eval()


def accuracy(predicted: Tensor, expected: Tensor) -> float:
    return (predicted == expected).float().mean().item()


# --------------------------------------------------------------------------- the protocol


def transport_quality(transports: dict[str, Tensor], contents: Tensor, targets: Tensor,
                      classifier: StyleClassifier, class_names: list[str],
                      decode: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """The metrics of every transport x_1 [N, C, H, W] in `transports` (name -> x_1) of contents
    [N, C, H, W] to targets [N]:

        quality/style_acc/<name>           fraction of x_1 classified as its target style
        quality/style_acc/<name>/<style>   the same per target style, for "lgt" only
        quality/ssm/<name>                 SSM distance (all positions) to the content
        quality/ssim/<name>                luminance SSIM of decode(x_1) and decode(content), with `decode`
    """
    results = {}
    source_pictures = decode(contents) if decode is not None else None
    for name, moved in transports.items():
        correct = classifier.predict(moved) == targets
        results[f"quality/style_acc/{name}"] = correct.float().mean().item()
        if name == "lgt":
            for style, style_name in enumerate(class_names):
                rows = targets == style
                if rows.any():
                    results[f"quality/style_acc/lgt/{style_name}"] = correct[rows].float().mean().item()
        results[f"quality/ssm/{name}"] = ssm_distance(moved, contents)
        if source_pictures is not None:
            pictures = source_pictures if moved is contents else decode(moved)
            results[f"quality/ssim/{name}"] = luminance_ssim(pictures, source_pictures).mean().item()
    return results


@torch.no_grad()
def reconstruction_quality(autoencoder: nn.Module, images: Tensor, batch_size: int = 16) -> dict[str, float]:
    """The autoencoder's reconstruction decode(encode(x)) (posterior mean) of pictures x [N, C, H, W]
    in [-1, 1]: quality/ae_psnr (dB, mean over pictures, all channels) and quality/ae_ssim (luminance)."""
    device = next(iter(autoencoder.buffers())).device
    reconstructions = torch.cat([autoencoder.decode(autoencoder.encode(chunk.to(device).float()).mode())
                                 .float().clamp(-1, 1) for chunk in images.split(batch_size)])
    images = images.to(device).float()
    return {"quality/ae_psnr": psnr(reconstructions, images).mean().item(),
            "quality/ae_ssim": luminance_ssim(reconstructions, images).mean().item()}


# --------------------------------------------------------------------------- verdict and table


def _halfway(metric: str, lower_is_better: bool, results: dict[str, float]) -> tuple[float, bool] | None:
    """(the bound LGT must reach, whether it does) for one content metric, None if it was not measured."""
    values = [results.get(f"quality/{metric}/{name}") for name in TRANSPORTS]
    if None in values:
        return None
    identity, swap, lgt = values
    bound = swap + CONTENT_FRACTION * (identity - swap)
    return bound, (lgt <= bound if lower_is_better else lgt >= bound)


def verdict(results: dict[str, float]) -> tuple[bool, str]:
    """(whether LGT passes the protocol, its text): the rule of the module doc, a line "verdict: PASS"
    or "verdict: FAIL", then one line per check with LGT's number and the bound it must reach."""
    real = results["quality/classifier_acc_real"]
    lgt, identity = results["quality/style_acc/lgt"], results["quality/style_acc/identity"]
    style = f"style accuracy {lgt:.3f} vs identity {identity:.3f} (needs >= +{STYLE_MARGIN})"
    checks = [(real >= MIN_CLASSIFIER_ACC, f"classifier on real held-out latents {real:.3f} (needs >= {MIN_CLASSIFIER_ACC})"),
              (lgt - identity >= STYLE_MARGIN, style)]
    for metric, lower_is_better in (("ssm", True), ("ssim", False)):
        halfway = _halfway(metric, lower_is_better, results)
        if halfway is not None:
            bound, ok = halfway
            needs = f"{'<=' if lower_is_better else '>='} {bound:.4g}, halfway from swap to identity"
            checks.append((ok, f"{metric} {results[f'quality/{metric}/lgt']:.4g} (needs {needs})"))
    passed = all(ok for ok, _ in checks)
    failed = sum(not ok for ok, _ in checks)
    head = f"verdict: {'PASS' if passed else 'FAIL'} ({failed} of {len(checks)} checks failed)"
    return passed, "\n".join([head, *(f"  {'ok' if ok else 'FAILS':<5}  {text}" for ok, text in checks)])


QUALITY_ROWS = (("style_acc", "style accuracy (higher = in style)"),
                ("ssm", "SSM to content (lower = kept)"),
                ("ssim", f"SSIM luminance <={SSIM_SIDE}px (higher = kept)"))


def format_quality(results: dict[str, float]) -> list[str]:
    """The quality block as lines: metric | identity | swap | LGT, the classifier's and the
    autoencoder's numbers, the verdict."""
    styles = sum(key.startswith("quality/style_acc/lgt/") for key in results)
    rows = [(label, [results[f"quality/{metric}/{name}"] for name in TRANSPORTS])
            for metric, label in QUALITY_ROWS if f"quality/{metric}/lgt" in results]
    width = max(len(label) for label, _ in rows)
    lines = [f"quality on held-out contents ({styles} target styles, chance {1 / max(styles, 1):.3f}):",
             f"  {'metric':<{width}}  {'identity':>9}  {'swap':>9}  {'LGT':>9}"]
    lines += [f"  {label:<{width}}  " + "  ".join(f"{value:>9.4f}" for value in values) for label, values in rows]
    if "quality/ssim/lgt" not in results:
        lines.append("  SSIM: not measured (no autoencoder to decode the latents)")
    lines.append(f"  style classifier on real held-out latents: accuracy {results['quality/classifier_acc_real']:.3f}")
    if "quality/ae_psnr" in results:
        lines.append(f"  autoencoder reconstruction of fresh built-in crops: PSNR {results['quality/ae_psnr']:.2f} dB, "
                     f"SSIM {results['quality/ae_ssim']:.4f}")
    lines += ["  " + line for line in verdict(results)[1].splitlines()]
    return lines


def format_evaluation(results: dict[str, float]) -> str:
    """LGT.evaluate's results as text: one row per style (SWD to the style before and after
    transport, SSM distance to the content, LGT's style accuracy), then the quality block."""
    styles = [key.split("/", 1)[1] for key in results if key.startswith("swd_before/")]
    columns = [("swd_before", "swd_before/{}"), ("swd_after", "swd_after/{}"), ("ssm", "ssm/{}"),
               ("style_acc", "quality/style_acc/lgt/{}")]
    width = max(len("style"), *(len(s) for s in styles)) if styles else len("style")
    lines = [f"{'style':<{width}}  " + "  ".join(f"{title:>10}" for title, _ in columns)]
    for style in styles:
        values = [results.get(key.format(style), math.nan) for _, key in columns]
        lines.append(f"{style:<{width}}  " + "  ".join(f"{value:>10.5g}" for value in values))
    if "quality/style_acc/lgt" in results:
        lines += ["", *format_quality(results)]
    return "\n".join(lines)
