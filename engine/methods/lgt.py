"""LGT, latent geometric style transport.

A velocity field v(x, t, c) (the engine's U-Net; c is a learned style embedding, the U-Net's class
table, whose extra last row is the null condition) carries a source latent x_0 to a stylised x_1
along dx/dt = v over t in [0, 1] with a fixed-step solver, backpropagating through every step.
One training row:

    target   a style drawn uniformly from the OTHER styles: (source + 1 + randint(K - 1)) % K;
             with probability label_drop_prob the condition is null and the target is the row's
             own style (the unconditional field learns to keep a latent in its style)
    z_ref    a real latent of the target style from the style index, never the row's own source
             latent (with z_ref = z_src both energies pull x_1 back to x_0, and the model learns
             the identity)
    energy   w_style * PatchSWD(x_1, z_ref) + w_content * SSM(x_1, x_0)
             + w_vel * integral of mean ||v||^2 dt + w_div * integral of mean (Hutchinson div v)^2 dt

Inference uses classifier-free guidance, v = v(x,t,null) + s (v(x,t,c) - v(x,t,null)), with the
conditional and unconditional passes batched into one network call.

The training data (a LatentSource) and the autoencoder that decodes latents for pictures are used,
not owned: they are held outside the module's state (no state_dict entries, not moved by .to(), not
duplicated by the EMA's deepcopy). The latent scaling factor is a buffer, so a checkpoint decodes
with the factor its latents were made with.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import ClassVar

import torch
from tqdm import tqdm

import kernels
from engine.data.base import Batch, DataInfo
from engine.data.latents import LatentSource
from engine.methods.base import LossOutput, Method, NotOwned
from engine.methods.lgt_energy import (
    PatchSWD,
    SelfSimilarity,
    global_patch_swd,
    hutchinson_divergence,
    random_directions,
    random_probe,
)
from engine.methods.lgt_quality import (
    accuracy,
    format_evaluation,
    reconstruction_quality,
    train_style_classifier,
    transport_quality,
    verdict,
)
from engine.methods.ode import SOLVERS, integrate, integrate_with_aux
from engine.methods.sections import (
    AutoencoderConfig,
    ModelConfig,
    PrepareConfig,
    check_prepare_sizes,
    class_conditional_network,
)
from engine.models.unet import UNet
from engine.options import option
from engine.profiling import phase

TIME_SCALE = 1000.0  # t in [0, 1] -> the sinusoidal embedding's range (resolves ~1e-3 steps)
TRANSFER_BATCH = 64  # rows per network call at inference (x2 with guidance)
EVAL_SEED = 0  # fixed directions and subsets: evaluations of different runs are comparable


# --------------------------------------------------------------------------- config sections


@dataclass
class LGTConfig:
    label_drop_prob: float = option(0.15, "probability the style condition is dropped to null (target = own style)")
    w_style: float = option(1.0, "weight of the patch sliced-Wasserstein style energy")
    w_content: float = option(1.0, "weight of the self-similarity (SSM) content energy")
    w_vel: float = option(0.0, "weight of the mean squared velocity regulariser (0 = off)")
    w_div: float = option(0.0, "weight of the squared Hutchinson divergence regulariser (0 = off)")
    cfg_scale: float = option(2.0, "classifier-free guidance scale at inference")
    div_probe: str = option("rademacher", "Hutchinson probe of the divergence regulariser",
                            ("rademacher", "gaussian"))
    holdout_per_style: int = option(8, "latents per style held out of training for the end-of-training "
                                    "evaluation (0 = evaluate on training latents)")

    def validate(self, check):
        check(0 <= self.label_drop_prob <= 1, "label_drop_prob", "must be in [0, 1]")
        for key in ("w_style", "w_content", "w_vel", "w_div"):
            check(getattr(self, key) >= 0, key, "must be >= 0")
        check(self.w_style + self.w_content + self.w_vel + self.w_div > 0, "w_style",
              "and every other weight are 0: nothing to train")
        check(self.holdout_per_style >= 0, "holdout_per_style", "must be >= 0")


@dataclass
class ODEConfig:
    solver: str = option("euler", "fixed-step solver of the transport ODE", tuple(SOLVERS))
    steps: int = option(4, "solver steps over t in [0, 1]")
    checkpoint: bool = option(True, "checkpoint every solver step: memory flat in the number of steps")

    def validate(self, check):
        check(self.steps >= 1, "steps", "must be >= 1")


@dataclass
class SWDConfig:
    num_projections: int = option(64, "random unit directions P, redrawn every step")
    kernel_size: int = option(3, "patch side k (odd)")
    per_sample: bool = option(True, "stratified per-sample SWD (kernels.patch_swd); false = global pool")
    max_samples: int = option(8192, "patches drawn from the pooled batch by the global variant")
    scales: list[int] = option([1], "average-pooling factors the SWD is also taken at (multi-scale patches: "
                               "[1, 2] adds 2x2-pooled latents, whose patches see twice the extent); averaged")

    def validate(self, check):
        check(self.num_projections >= 1, "num_projections", "must be >= 1")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size", "must be odd and >= 1")
        check(self.max_samples >= 1, "max_samples", "must be >= 1")
        check(len(self.scales) >= 1 and all(f >= 1 for f in self.scales) and len(set(self.scales)) == len(self.scales),
              "scales", "must be distinct factors >= 1, e.g. [1, 2]")


@dataclass
class SSMConfig:
    max_spatial_samples: int = option(256, "positions drawn per step for the Gram loss (0 = all)")

    def validate(self, check):
        check(self.max_spatial_samples >= 0, "max_spatial_samples", "must be >= 0")


# --------------------------------------------------------------------------- one training row


def draw_targets(source_style: torch.Tensor, num_styles: int, drop_prob: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(target style [B], network condition [B]) per row, from the global RNG.

    target is uniform over the styles other than the source's; with probability drop_prob the
    condition is null (= num_styles) and the target is the source style itself."""
    shape, device = source_style.shape, source_style.device
    other = (source_style + torch.randint(1, num_styles, shape, device=device)) % num_styles
    dropped = torch.rand(shape, device=device) < drop_prob
    target = torch.where(dropped, source_style, other)
    condition = torch.where(dropped, torch.full_like(target, num_styles), target)
    return target, condition


def sample_style_reference(latents: torch.Tensor, index, target: torch.Tensor, source: torch.Tensor
                           ) -> torch.Tensor:
    """A real latent of style target[b] for every row b, never the row's own source latent: [B, C, H, W] fp32.

    `index` is the data's StyleIndex (rows sorted by style, offsets, counts). A row of another style
    can never be the source row; a row whose target is its own style (a dropped condition) could draw
    itself. Batches do not say which dataset row they came from, so the draw is compared with the
    source by value, and where they are equal (the source row, or an exact copy of it) the draw moves
    to a uniformly random other row of that style. Needs >= 2 latents per style; no host sync.
    """
    counts = index.counts[target]
    first = index.offsets[target]
    u = torch.rand((2, target.shape[0]), device=target.device, dtype=torch.float64)
    # float64 keeps floor(u * count) < count for every u < 1; the minimum is belt and braces.
    rank = torch.minimum((u[0] * counts).long(), counts - 1)
    drawn = latents[index.rows[first + rank]]
    own = (drawn.float() == source).flatten(1).all(dim=1)
    others = counts - 1
    shift = 1 + torch.minimum((u[1] * others).long(), others - 1)  # uniform in 1..count-1
    rank = torch.where(own, (rank + shift) % counts, rank)
    return latents[index.rows[first + rank]].float()


class LGT(Method):
    name = "lgt"
    config_sections: ClassVar[dict[str, type]] = {"model": ModelConfig, "lgt": LGTConfig, "ode": ODEConfig, "swd": SWDConfig,
                       "ssm": SSMConfig, "autoencoder": AutoencoderConfig, "prepare": PrepareConfig}

    def __init__(self, unet: UNet, latent_shape: tuple[int, int, int], class_names: list[str], lgt_cfg,
                 ode_cfg, swd_cfg, ssm_cfg, data: LatentSource | None = None, scaling_factor: float = 0.0):
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(f"LGT transports between styles: it needs at least 2 styles, got {class_names}")
        self.unet = unet
        self.latent_shape = tuple(latent_shape)  # [C, H, W] of one latent
        self.class_names = list(class_names)
        self.num_styles = len(class_names)
        self.label_drop_prob = lgt_cfg.label_drop_prob
        self.weights = {"style": lgt_cfg.w_style, "content": lgt_cfg.w_content, "vel": lgt_cfg.w_vel,
                        "div": lgt_cfg.w_div}
        self.div_probe = lgt_cfg.div_probe
        self.cfg_scale = lgt_cfg.cfg_scale
        self.solver, self.steps, self.checkpoint_steps = ode_cfg.solver, ode_cfg.steps, ode_cfg.checkpoint
        if max(swd_cfg.scales) > min(self.latent_shape[1:]):
            raise ValueError(f"swd.scales {swd_cfg.scales}: a factor above the latents' side {min(self.latent_shape[1:])} "
                             f"pools them to nothing; use factors up to it")
        self.style_energy = PatchSWD(swd_cfg.num_projections, swd_cfg.kernel_size, swd_cfg.per_sample,
                                     swd_cfg.max_samples, tuple(swd_cfg.scales))
        self.content_energy = SelfSimilarity(ssm_cfg.max_spatial_samples)
        self.register_buffer("scaling_factor", torch.tensor(float(scaling_factor)))
        self._data = NotOwned(data)

    @classmethod
    def trains_on_latents(cls, cfg) -> bool:
        return True

    @classmethod
    def validate_config(cls, cfg, check) -> None:
        check_prepare_sizes(cfg, check)

    @classmethod
    def compile_problem(cls, cfg, device: torch.device) -> str | None:
        # Found by running it: torch 2.13's CPU inductor corrupts memory ("double free or corruption",
        # or a segfault) in the compiled backward of this loss when both energies are on and the SSM
        # subsamples positions; each energy alone compiles and runs. CUDA runs the energies as
        # custom kernels instead.
        if device.type == "cpu" and cfg.lgt.w_style > 0 and cfg.lgt.w_content > 0 and cfg.ssm.max_spatial_samples:
            return ("torch 2.13's CPU inductor crashes in the compiled backward of LGT's energies (patch SWD with "
                    "subsampled SSM)")
        return None

    @classmethod
    def graph_capture_problem(cls, cfg) -> str | None:
        # A captured solver step is recomputed without restoring the RNG state (a capture cannot
        # save it), which is exact only when nothing inside the step draws random numbers.
        if cfg.ode.checkpoint and (cfg.lgt.w_div > 0 or cfg.model.dropout > 0):
            return ("ode.checkpoint = true with random draws inside a solver step (lgt.w_div > 0 draws "
                    "Hutchinson probes, model.dropout > 0 dropout masks)")
        return None

    @classmethod
    def training_data(cls, cfg, rank: int, world_size: int, device: torch.device) -> LatentSource:
        """The latents of data.source (built-in images were turned into a latents file by the
        preparation stage). With lgt.holdout_per_style > 0 the first that many latents of every style
        are held out of training, as `.heldout` (a Batch) for `evaluate`."""
        source = super().training_data(cfg, rank, world_size, device)
        if not isinstance(source, LatentSource):
            raise ValueError(f"LGT trains on latents: data.source = {cfg.data.source!r} must be 'latents:PATH' "  # noqa: TRY004 - a config error
                             f"(from engine-encode), or 'builtin:textures' turned into latents by the "
                             f"preparation stage (engine.prepare.prepare, which engine-train runs first)")
        if cfg.lgt.holdout_per_style > 0:
            source, heldout = source.split_holdout(cfg.lgt.holdout_per_style)
            source.heldout = heldout
        return source

    @classmethod
    def from_config(cls, cfg, data: LatentSource | DataInfo) -> LGT:
        """`data`: the training LatentSource, or a DataInfo (opened from a checkpoint: no data)."""
        unet, _ = class_conditional_network(UNet, cfg.model, data)  # one class per style
        sections = (data.sample_shape, data.class_names, cfg.lgt, cfg.ode, cfg.swd, cfg.ssm)
        if isinstance(data, LatentSource):
            _check_styles(data)
            return cls(unet, *sections, data=data, scaling_factor=data.scaling_factor)
        return cls(unet, *sections)

    # ------------------------------------------------------------------ the velocity field

    def velocity(self, x: torch.Tensor, t: torch.Tensor, condition: torch.Tensor | None) -> torch.Tensor:
        """v(x, t, c): x [B, C, H, W], t [B] in [0, 1], condition [B] style ids (num_styles = null)."""
        return self.unet(x, t * TIME_SCALE, condition)

    def guided_velocity(self, x: torch.Tensor, t: torch.Tensor, styles: torch.Tensor, cfg_scale: float
                        ) -> torch.Tensor:
        """v(x,t,null) + s (v(x,t,c) - v(x,t,null)): one batched network call (one pass at s = 0 or 1)."""
        if cfg_scale == 1.0:
            return self.velocity(x, t, styles)
        null = torch.full_like(styles, self.num_styles)
        if cfg_scale == 0.0:
            return self.velocity(x, t, null)
        both = self.velocity(torch.cat([x, x]), torch.cat([t, t]), torch.cat([styles, null]))
        v_cond, v_null = both.chunk(2)
        return v_null + cfg_scale * (v_cond - v_null)

    def transport(self, x0: torch.Tensor, condition: torch.Tensor
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training transport: (x_1 fp32, {"vel": integral over t of mean v^2, and with w_div > 0
        "div": integral of the batch mean of (Hutchinson div v)^2})."""
        with_div = self.weights["div"] > 0 and torch.is_grad_enabled()

        def field(x, t):
            if with_div and not x.requires_grad:
                x = x.detach().requires_grad_(True)  # the first step starts from data
            # The divergence penalty differentiates the velocity's backward again, which the fused
            # attention kernels cannot; inside `field`, so the checkpointed recomputation does the same.
            with kernels.unfused_attention() if with_div else nullcontext():
                v = self.velocity(x, t, condition)
            aux = (v.float().square().mean(),)
            if with_div:
                divergence = hutchinson_divergence(v, x, random_probe(x, self.div_probe))  # [B]
                aux += (divergence.square().mean(),)
            return v, aux

        x1, aux = integrate_with_aux(field, x0.float(), self.solver, self.steps,
                                     checkpoint=self.checkpoint_steps)
        return x1, dict(zip(("vel", "div"), aux))

    # ------------------------------------------------------------------ training

    def forward(self, batch: Batch) -> LossOutput:
        data = self._data.value
        if data is None:
            raise RuntimeError("this LGT method was opened from a checkpoint without data: it can transfer "
                               "styles but not train")
        source, source_style = batch.x.float(), batch.labels
        target, condition = draw_targets(source_style, self.num_styles, self.label_drop_prob)
        reference = sample_style_reference(data.latents, data.style_index, target, source)
        with phase("transport"):
            x1, regularisers = self.transport(source, condition)
        with phase("style energy"):
            style = self.style_energy(x1, reference)
        with phase("content energy"):
            content = self.content_energy(x1, source)
        terms = {"style": style, "content": content, **regularisers}
        loss = sum(self.weights[name] * value for name, value in terms.items() if self.weights[name] > 0)
        return LossOutput(loss, {name: value.detach() for name, value in terms.items()})

    # ------------------------------------------------------------------ inference

    @torch.no_grad()
    def transfer(self, content_latents: torch.Tensor, styles, cfg_scale: float | None = None,
                 steps: int | None = None, solver: str | None = None,
                 batch_size: int = TRANSFER_BATCH) -> torch.Tensor:
        """Stylised latents [B, C, H, W] (fp32) of content latents [B, C, H, W] in `styles` (one id, or
        [B] ids), with guidance scale `cfg_scale` (default lgt.cfg_scale), `batch_size` rows at a time."""
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        steps, solver = steps or self.steps, solver or self.solver
        content = content_latents.float()
        styles = torch.as_tensor(styles, device=content.device, dtype=torch.long).expand(content.shape[0])
        out = [integrate(lambda x, t, s=s: self.guided_velocity(x, t, s, cfg_scale), x0, solver, steps)
               for x0, s in zip(content.split(batch_size), styles.split(batch_size))]
        return torch.cat(out)

    @torch.no_grad()
    def style_grid(self, content_latents: torch.Tensor, styles: list[int], cfg_scale: float | None = None,
                   steps: int | None = None, solver: str | None = None, strict: bool = False
                   ) -> tuple[torch.Tensor, int]:
        """(pictures, per row) of a content x styles grid: per content row, the content itself, then
        it transported to each of `styles`."""
        n, k = content_latents.shape[0], len(styles)
        style_ids = torch.tensor(styles, device=content_latents.device).repeat(n)  # row-major: content, style
        stylised = self.transfer(content_latents.repeat_interleave(k, dim=0), style_ids, cfg_scale, steps,
                                 solver)
        cells = torch.cat([content_latents.float()[:, None],
                           stylised.view(n, k, *content_latents.shape[1:])], dim=1)  # [n, 1 + k, C, H, W]
        return self.latents_to_images(cells.flatten(0, 1), float(self.scaling_factor), strict), 1 + k

    @torch.no_grad()
    def sample_grid(self, batch: Batch, generator: torch.Generator) -> tuple[torch.Tensor, int]:
        """Every content latent of `batch` (rows) in every style (columns after the content itself).
        Transport is deterministic: `generator` is not needed."""
        return self.style_grid(batch.x, list(range(self.num_styles)))

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self, data: LatentSource, per_class: int, progress: bool = True) -> dict[str, float]:
        """Per style s, on `per_class` held-out content latents of the other styles transported to s
        (guided), against `per_class` real latents of s:

            swd_before/s  global patch SWD between the contents and the real latents of s
            swd_after/s   the same for the transported latents (lower: closer to style s)
            ssm/s         SSM distance between the transported latents and their contents

        then the quality protocol of engine/methods/lgt_quality.py on the same contents and targets
        (quality/*: style accuracy, content metrics against the identity and swap transports, the
        autoencoder's reconstructions, quality/pass = 1 when LGT passes its verdict).

        It transports K x per_class latents, TRANSFER_BATCH rows per network call, and trains one
        small style classifier (a fixed number of steps). Fixed seed, directions and subsets, so the
        numbers of different runs compare and two calls give the same numbers."""
        if not isinstance(data, LatentSource):
            raise ValueError("LGT evaluation needs the run's latents (a LatentSource), not only its "  # noqa: TRY004
                             "data info")
        device = self.scaling_factor.device
        contents, targets = self._evaluation_pairs(data, per_class)
        chunks = list(zip(contents.split(TRANSFER_BATCH), targets.split(TRANSFER_BATCH)))
        moved = torch.cat([self.transfer(content, styles) for content, styles in
                           tqdm(chunks, desc="evaluating", unit="batch", dynamic_ncols=True, disable=not progress,
                                leave=False)])
        swd, ssm = self.style_energy, self.content_energy

        def seeded(on: torch.device = device) -> torch.Generator:
            return torch.Generator(on).manual_seed(EVAL_SEED)

        theta = random_directions(swd.num_projections, contents.shape[1] * swd.kernel_size ** 2, device, seeded())
        results = {}
        for style, name in enumerate(self.class_names):
            rows = targets == style
            if not rows.any():
                continue
            content = contents[rows]
            real_rows = data.style_index.sample_rows_of(targets[rows].to(data.latents.device),
                                                        seeded(data.latents.device))
            real = data.latents[real_rows].to(device).float()
            results[f"swd_before/{name}"] = global_patch_swd(content, real, theta, swd.kernel_size,
                                                             swd.max_samples, seeded()).item()
            results[f"swd_after/{name}"] = global_patch_swd(moved[rows], real, theta, swd.kernel_size,
                                                            swd.max_samples, seeded()).item()
            results[f"ssm/{name}"] = ssm(moved[rows], content, seeded()).item()
        results.update(self._quality(data, per_class, contents, targets, moved, progress))
        return results

    def _quality(self, data: LatentSource, per_class: int, contents: torch.Tensor, targets: torch.Tensor,
                 moved: torch.Tensor, progress: bool) -> dict[str, float]:
        """The quality/* numbers of `evaluate` (see engine/methods/lgt_quality.py): LGT's transports
        `moved` of `contents` to `targets`, and the identity and swap transports of the same pairs.
        What cannot be measured (no autoencoder, data not built-in) is skipped with one note. With
        lgt.holdout_per_style = 0 the "held-out" latents are training latents, which flatters
        quality/classifier_acc_real."""
        device = self.scaling_factor.device
        on_data = data.latents.device
        swap_rows = data.style_index.sample_rows_of(targets.to(on_data), torch.Generator(on_data).manual_seed(EVAL_SEED))
        swap = data.latents[swap_rows].to(device).float()  # real training latents of the targets
        classifier = train_style_classifier(data.latents.to(device), data.labels.to(device), self.num_styles,
                                            EVAL_SEED, progress=progress)
        real, real_styles = evaluation_latents(data, per_class)
        decode, missing = self._picture_decoder(contents[:1])
        results = transport_quality({"identity": contents, "swap": swap, "lgt": moved}, contents, targets,
                                    classifier, self.class_names, decode)
        results["quality/classifier_acc_real"] = accuracy(classifier.predict(real.to(device)), real_styles.to(device))
        if decode is not None:
            crops, missing = self._reconstruction_crops(data, contents.shape[0])
            if crops is not None:
                results.update(reconstruction_quality(self.attached_autoencoder().to(device), crops))
        if missing:
            tqdm.write(f"evaluation: {missing}")
        results["quality/pass"] = float(verdict(results)[0])
        return results

    def _picture_decoder(self, probe: torch.Tensor) -> tuple[Callable[[torch.Tensor], torch.Tensor] | None, str]:
        """(latents -> pictures with the attached autoencoder, "") when it decodes `probe`, else
        (None, a note saying what is skipped and why)."""

        def decode(latents: torch.Tensor) -> torch.Tensor:
            return self.latents_to_images(latents, float(self.scaling_factor), strict=True)

        try:
            decode(probe)
        except (OSError, ValueError, ImportError, RuntimeError) as err:
            return None, f"SSIM and the autoencoder's reconstructions skipped: cannot decode the latents ({err})"
        return decode, ""

    def _reconstruction_crops(self, data: LatentSource, count: int) -> tuple[torch.Tensor | None, str]:
        """(`count` fresh crops [count, C, S, S] of the built-in pictures at the side the latents were
        encoded from, "") for the autoencoder's reconstruction quality, or (None, why not).

        Built-in latents are recognised by their class names (the built-in pictures, in order). The
        crops come from Stream.GRID, counter 1 (the sample grids' noise uses counter 0), with EVAL_SEED:
        the same crops for every run, never the preparation's (Stream.PREPARE) draws."""
        from engine.data.base import Stream, batch_seed
        from engine.data.builtin import BUILTIN_PICTURES, BuiltinTextures

        if list(data.class_names) != list(BUILTIN_PICTURES):
            return None, ("the autoencoder's reconstruction skipped: the latents are not builtin:textures "
                          "(no source pictures to compare with)")
        autoencoder = self.attached_autoencoder()
        side = self.latent_shape[1] * getattr(autoencoder, "downsampling", 0)
        if side == 0:
            return None, "the autoencoder's reconstruction skipped: the autoencoder has no spatial latents"
        generator = torch.Generator().manual_seed(batch_seed(EVAL_SEED, 0, 1, Stream.GRID))
        crops = BuiltinTextures(side, flip=True, seed=EVAL_SEED).draw_crops(count, generator).x
        return (crops.mean(dim=1, keepdim=True) if autoencoder.in_channels == 1 else crops), ""

    @staticmethod
    def format_evaluation(results: dict[str, float]) -> str:
        """`evaluate`'s results as text: a row per style, then the quality table and its verdict."""
        return format_evaluation(results)

    def _evaluation_pairs(self, data: LatentSource, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(contents [K * per_class, C, H, W], their target styles): for each style, `per_class`
        contents of the other styles, drawn with a fixed seed."""
        contents, content_styles = evaluation_latents(data, per_class)
        device = self.scaling_factor.device
        contents, content_styles = contents.to(device), content_styles.to(device)
        generator = torch.Generator().manual_seed(EVAL_SEED)
        picked, targets = [], []
        for style in range(self.num_styles):
            candidates = (content_styles != style).nonzero().flatten()
            choice = candidates[torch.randperm(candidates.numel(), generator=generator)[:per_class].to(device)]
            picked.append(choice)
            targets.append(torch.full_like(choice, style))
        return contents[torch.cat(picked)], torch.cat(targets)


def evaluation_latents(data: LatentSource, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents fp32, styles) to evaluate on: the data's held-out split (`data.heldout`, a Batch) when
    it has one, else the first `per_class` rows of every style (then seen in training)."""
    heldout = getattr(data, "heldout", None)
    if heldout is not None:
        return heldout.x.float(), heldout.labels
    index = data.style_index
    rows = torch.cat([index.rows_of(style)[:per_class] for style in range(index.num_labels)])
    return data.latents[rows].float(), data.labels[rows]


def _check_styles(data) -> None:
    """Every style needs 2 latents: a dropped row's reference is another latent of its own style."""
    data.style_index.require_all(len(data.class_names))
    counts = data.style_index.counts.tolist()
    short = [f"{data.class_names[y]!r} ({count})" for y, count in enumerate(counts) if count < 2]
    if short:
        raise ValueError(f"LGT needs at least 2 training latents per style (a row's style reference is never "
                         f"its own latent); too few for: {', '.join(short)}")
    duplicated = [f"{data.class_names[y]!r} ({count - distinct} of {count})"
                  for y, (count, distinct) in enumerate(zip(counts, _distinct_per_style(data))) if distinct < count]
    if duplicated:
        warnings.warn(f"some latents are exact copies of others of their style, so a row's style reference can "
                      f"equal its own source (the identity-mapping trap); de-duplicate the images: "
                      f"{', '.join(duplicated)}", stacklevel=3)


def _distinct_per_style(data) -> list[int]:
    """How many distinct latents each style has (once, at start)."""
    index = data.style_index
    distinct = []
    for offset, count in zip(index.offsets.tolist(), index.counts.tolist()):
        rows = data.latents[index.rows[offset:offset + count]].flatten(1)
        distinct.append(int(torch.unique(rows, dim=0).shape[0]) if count else 0)
    return distinct
