"""Typed configuration: TOML file + command-line overrides, validated before any work starts.

Precedence: command line (`--section.key=value`) > TOML file > the defaults written here. Every
field carries a one-line doc (shown by `engine-train --help`) and, where the values are a closed
set, its choices. Unknown sections or keys, wrong types and impossible values raise `ConfigError`
naming the key, the file and the valid choices.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w
import tomllib


class ConfigError(ValueError):
    """A configuration problem, reported before any work is done."""


def option(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A config field with its documentation (and closed set of values, if any)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, "choices": choices})
    return field(default=default, metadata={"doc": doc, "choices": choices})


# --------------------------------------------------------------------------- shared sections


@dataclass
class RunConfig:
    dir: str = option("runs/default", "run directory: config.toml, checkpoints/, metrics.jsonl, samples/")
    seed: int = option(0, "base seed; every step reseeds from (seed, rank, step) so resumes replay exactly")
    cache_dir: str = option("runs/cache", "where prepared data (e.g. encoded built-in latents) is cached")

    def validate(self, check):
        check(self.dir != "", "dir", "must not be empty")


@dataclass
class TrainConfig:
    steps: int = option(1000, "optimizer steps to train for (a resumed run continues up to this)")
    batch_size: int = option(32, "samples per micro-batch per process; effective batch = this x grad_accum x world")
    device: str = option("auto", "where to train", ("auto", "cpu", "cuda"))
    precision: str = option("auto", "autocast dtype; auto = bf16 on CUDA, fp32 on CPU",
                            ("auto", "fp32", "bf16", "fp16"))
    lr: float = option(2e-4, "peak learning rate of AdamW")
    min_lr_ratio: float = option(0.1, "cosine decay ends at lr * min_lr_ratio")
    warmup_steps: int = option(100, "linear LR warm-up steps before the cosine decay")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    grad_clip: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    ema_decay: float = option(0.999, "EMA decay of the weights used for samples (0 = no EMA)")
    ema_warmup: bool = option(True, "EMA decay ramps as min(decay, (1+n)/(10+n)) so early EMA tracks the model")
    channels_last: bool = option(False, "keep activations in channels_last memory format (CUDA)")

    def validate(self, check):
        check(self.steps > 0, "steps", "must be > 0")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(self.lr > 0, "lr", "must be > 0")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two values in [0, 1)")
        check(self.grad_accum >= 1, "grad_accum", "must be >= 1")
        check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        check(0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1)")


@dataclass
class CheckpointConfig:
    every: int = option(500, "write checkpoints/step-N every this many steps (one is always written at the end)")
    keep: int = option(3, "how many of the newest checkpoints to keep")

    def validate(self, check):
        check(self.every > 0, "every", "must be > 0")
        check(self.keep >= 1, "keep", "must be >= 1")


@dataclass
class DataConfig:
    source: str = option("builtin:textures", "builtin:textures | folder:PATH (one sub-folder per class) | latents:PATH")
    image_size: int = option(32, "side of the square crops fed to the model (image sources)")
    flip: bool = option(True, "random horizontal flips (image sources)")
    num_workers: int = option(2, "DataLoader worker processes for image folders")

    def validate(self, check):
        kinds = ("builtin:textures", "folder:", "latents:")
        check(self.source == kinds[0] or self.source.startswith(kinds[1:]), "source",
              "must be 'builtin:textures', 'folder:PATH' or 'latents:PATH'")
        check(self.image_size >= 8, "image_size", "must be >= 8")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass
class LogConfig:
    every: int = option(10, "write a metrics.jsonl line (and TensorBoard scalars) every this many steps")
    tensorboard: bool = option(True, "also write TensorBoard events to the run directory")

    def validate(self, check):
        check(self.every > 0, "every", "must be > 0")


@dataclass
class SampleConfig:
    every: int = option(500, "save a fixed-seed sample grid every this many steps (0 = off)")
    num: int = option(16, "images in the sample grid")
    sampler: str = option("ddim", "sampler for the grid (diffusion methods)", ("ddpm", "ddim"))
    steps: int = option(50, "sampler steps for the grid (DDIM); DDPM always uses every timestep")
    eta: float = option(0.0, "DDIM eta: 0 = deterministic, 1 = DDPM's variance")
    cfg_scale: float = option(1.0, "classifier-free guidance scale for the grid (1 = conditional only)")

    def validate(self, check):
        check(self.every >= 0, "every", "must be >= 0 (0 turns periodic grids off)")
        check(self.num > 0, "num", "must be > 0")
        check(self.steps > 0, "steps", "must be > 0")
        check(self.eta >= 0, "eta", "must be >= 0")


@dataclass
class ModelConfig:
    channels: int = option(64, "base width of the U-Net")
    channel_mult: list[int] = option([1, 2, 2], "width multiplier per resolution level")
    num_res_blocks: int = option(2, "ResBlocks per level")
    attention_resolutions: list[int] = option([8], "feature-map sides (e.g. 16, 8) that get self-attention")
    num_heads: int = option(4, "attention heads")
    num_groups: int = option(32, "GroupNorm groups (clamped to divide the channel count)")
    dropout: float = option(0.0, "dropout inside ResBlocks")
    checkpoint: bool = option(False, "gradient checkpointing per U-Net block (less memory, more compute)")

    def validate(self, check):
        check(self.channels > 0, "channels", "must be > 0")
        check(len(self.channel_mult) > 0 and all(m > 0 for m in self.channel_mult), "channel_mult",
              "must be a non-empty list of positive ints")
        check(self.num_res_blocks >= 1, "num_res_blocks", "must be >= 1")
        check(self.num_heads >= 1, "num_heads", "must be >= 1")
        check(self.num_groups >= 1, "num_groups", "must be >= 1")
        check(0 <= self.dropout < 1, "dropout", "must be in [0, 1)")


@dataclass
class MethodConfig:
    name: str = option("ddpm", "what is trained", ("ddpm", "autoencoder", "lgt"))

    def validate(self, check):
        pass


# --------------------------------------------------------------------------- method sections


@dataclass
class DDPMConfig:
    timesteps: int = option(1000, "diffusion steps T")
    schedule: str = option("cosine", "beta schedule", ("linear", "cosine"))
    beta_start: float = option(1e-4, "first beta of the linear schedule")
    beta_end: float = option(0.02, "last beta of the linear schedule")
    prediction: str = option("eps", "what the network predicts", ("eps", "v", "x0"))
    loss: str = option("mse", "regression loss on the prediction", ("mse", "l1"))
    label_drop_prob: float = option(0.1, "probability a label is replaced by the null class (CFG training)")
    clip_denoised: bool = option(True, "clamp the predicted x0 to [-1, 1] while sampling")

    def validate(self, check):
        check(self.timesteps >= 2, "timesteps", "must be >= 2")
        check(0 < self.beta_start < self.beta_end < 1, "beta_start", "need 0 < beta_start < beta_end < 1")
        check(0 <= self.label_drop_prob <= 1, "label_drop_prob", "must be in [0, 1]")


@dataclass
class AutoencoderConfig:
    kind: str = option("kl", "KL autoencoder (f=8) or the linear 784->128->784 one", ("kl", "linear"))
    latent_channels: int = option(4, "latent channels of the KL autoencoder")
    channels: int = option(64, "base width of the KL autoencoder")
    channel_mult: list[int] = option([1, 2, 4, 4], "width multiplier per level; len - 1 = log2 of the downsampling")
    num_res_blocks: int = option(1, "ResBlocks per level")
    latent_dim: int = option(128, "latent size of the linear autoencoder")
    kl_weight: float = option(1e-6, "weight of the KL term")
    loss: str = option("l1", "reconstruction loss", ("l1", "mse"))
    num_groups: int = option(32, "GroupNorm groups of the KL autoencoder (clamped to divide the channel count)")
    prepare_crops: int = option(2048, "built-in latents: crops drawn from builtin:textures and encoded")
    prepare_image_size: int = option(256, "built-in latents: side of the encoded crops (latent side = this / 8)")
    prepare_steps: int = option(500, "built-in latents: training steps of the built-in autoencoder "
                                "(when lgt.autoencoder is '')")
    prepare_train_size: int = option(64, "built-in latents: crop side the built-in autoencoder trains on "
                                     "(it is convolutional: it then encodes prepare_image_size crops)")
    prepare_batch_size: int = option(8, "built-in latents: batch size of the built-in autoencoder's training")

    def validate(self, check):
        check(self.latent_channels >= 1, "latent_channels", "must be >= 1")
        check(self.channels >= 1, "channels", "must be >= 1")
        check(len(self.channel_mult) >= 1 and all(m >= 1 for m in self.channel_mult), "channel_mult",
              "must be a non-empty list of positive ints")
        check(self.num_res_blocks >= 1, "num_res_blocks", "must be >= 1")
        check(self.latent_dim >= 1, "latent_dim", "must be >= 1")
        check(self.kl_weight >= 0, "kl_weight", "must be >= 0")
        check(self.num_groups >= 1, "num_groups", "must be >= 1")
        check(self.prepare_crops >= 1, "prepare_crops", "must be >= 1")
        factor = 2 ** (len(self.channel_mult) - 1)
        for key in ("prepare_image_size", "prepare_train_size"):
            check(getattr(self, key) >= factor and getattr(self, key) % factor == 0, key,
                  f"must be a positive multiple of the downsampling factor {factor} (2^(len(channel_mult)-1))")
        check(self.prepare_steps >= 1, "prepare_steps", "must be >= 1")
        check(self.prepare_batch_size >= 1, "prepare_batch_size", "must be >= 1")


@dataclass
class LGTConfig:
    label_drop_prob: float = option(0.15, "probability the style condition is dropped to null (target = own style)")
    w_style: float = option(1.0, "weight of the patch sliced-Wasserstein style energy")
    w_content: float = option(1.0, "weight of the self-similarity (SSM) content energy")
    w_vel: float = option(0.0, "weight of the mean squared velocity regulariser (0 = off)")
    w_div: float = option(0.0, "weight of the squared Hutchinson divergence regulariser (0 = off)")
    cfg_scale: float = option(2.0, "classifier-free guidance scale at inference")
    autoencoder: str = option("", "autoencoder checkpoint used to encode/decode ('' = the built-in one)")
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
    solver: str = option("euler", "fixed-step solver of the transport ODE", ("euler", "heun", "rk4"))
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

    def validate(self, check):
        check(self.num_projections >= 1, "num_projections", "must be >= 1")
        check(self.kernel_size >= 1 and self.kernel_size % 2 == 1, "kernel_size", "must be odd and >= 1")
        check(self.max_samples >= 1, "max_samples", "must be >= 1")


@dataclass
class SSMConfig:
    max_spatial_samples: int = option(256, "positions drawn per step for the Gram loss (0 = all)")

    def validate(self, check):
        check(self.max_spatial_samples >= 0, "max_spatial_samples", "must be >= 0")


# --------------------------------------------------------------------------- the whole config

SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "data": DataConfig,
    "log": LogConfig,
    "sample": SampleConfig,
    "model": ModelConfig,
    "method": MethodConfig,
    "ddpm": DDPMConfig,
    "autoencoder": AutoencoderConfig,
    "lgt": LGTConfig,
    "ode": ODEConfig,
    "swd": SWDConfig,
    "ssm": SSMConfig,
}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    lgt: LGTConfig = field(default_factory=LGTConfig)
    ode: ODEConfig = field(default_factory=ODEConfig)
    swd: SWDConfig = field(default_factory=SWDConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where} must be of type {annotation.__name__}, got {value!r}")
    return value


def _parse_override(arg: str) -> tuple[str, str, Any]:
    """'--train.steps=20' -> ('train', 'steps', 20); the value is read as TOML, else kept as a string."""
    body = arg.removeprefix("--")
    if "=" not in body or "." not in body.split("=", 1)[0]:
        raise ConfigError(f"override {arg!r} must look like --section.key=value (e.g. --train.steps=20)")
    dotted, raw = body.split("=", 1)
    section, key = dotted.split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return section, key, value


def _apply(cfg: Config, section: str, key: str, value: Any, source: str, from_cli: bool) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{source}: unknown section [{section}]; valid sections: {', '.join(SECTIONS)}")
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise ConfigError(f"{source}: unknown key {section}.{key}; valid keys of [{section}]: "
                          f"{', '.join(fields)}")
    annotation = typing.get_type_hints(cls)[key]
    if from_cli and annotation is str and not isinstance(value, str):
        value = str(value)  # `--run.dir=123` means the string "123"
    where = f"{source}: {section}.{key}"
    value = _coerce(value, annotation, where)
    choices = fields[key].metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r} is not one of {', '.join(map(repr, choices))}")
    setattr(getattr(cfg, section), key, value)


def validate(cfg: Config, source: str) -> None:
    for name in SECTIONS:
        section = getattr(cfg, name)

        def check(ok: bool, key: str, message: str, _name=name, _section=section) -> None:
            if not ok:
                raise ConfigError(f"{source}: {_name}.{key} = {getattr(_section, key)!r} {message}")

        section.validate(check)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- `--section.key=value` overrides, then validated."""
    cfg = Config()
    source = str(path) if path is not None else "<defaults>"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
        for section, values in data.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table; valid "
                                  f"sections: {', '.join(SECTIONS)}")
            for key, value in values.items():
                _apply(cfg, section, key, value, str(path), from_cli=False)
    for arg in overrides:
        section, key, value = _parse_override(arg)
        _apply(cfg, section, key, value, "command line", from_cli=True)
    validate(cfg, source + (" + command-line overrides" if overrides else ""))
    return cfg


def with_absolute_paths(cfg: Config) -> Config:
    """The config with its data, cache and autoencoder paths made absolute, so the run's saved
    config.toml means the same files whatever directory a later command runs from."""
    resolved = dataclasses.replace(cfg)
    resolved.run = dataclasses.replace(cfg.run, cache_dir=str(Path(cfg.run.cache_dir).resolve()))
    kind, sep, path = cfg.data.source.partition(":")
    if kind in ("folder", "latents") and path:
        resolved.data = dataclasses.replace(cfg.data, source=f"{kind}{sep}{Path(path).resolve()}")
    if cfg.lgt.autoencoder:
        resolved.lgt = dataclasses.replace(cfg.lgt, autoencoder=str(Path(cfg.lgt.autoencoder).resolve()))
    return resolved


def describe_options() -> str:
    """Every config key with its default and documentation, for `--help`."""
    lines = []
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        defaults = cls()
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
            lines.append(f"  {name}.{f.name} = {getattr(defaults, f.name)!r}: {f.metadata['doc']}{extra}")
    return "\n".join(lines)
