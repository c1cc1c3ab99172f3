"""Typed configuration: TOML file + command-line overrides, validated before any work starts.

A run's config holds the shared sections defined here ([run], [train], [checkpoint], [data],
[log], [sample], [eval], [method]) plus the sections its method declares (`Method.config_sections`:
[ddpm], [lgt], [ode], ... live with the method that reads them). Which method, and so which
sections, comes from `method.name`.

Precedence: command line (`--section.key=value`) > TOML file > the defaults written in the
sections. Every field carries a one-line doc (shown by `engine-train --help`) and, where the
values are a closed set, its choices. Unknown sections or keys, a section of another method, a key
that moved, wrong types, non-finite numbers and impossible values raise `ConfigError` naming the
key, the file and what would be valid.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from engine.methods import METHODS, method_class
from engine.options import ConfigError, option

__all__ = ["Config", "ConfigError", "describe_options", "load_config", "with_absolute_paths"]

DEFAULT_METHOD = "ddpm"


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
    channels_last: bool = option(False, "keep activations in channels_last memory format (faster convolutions on "
                                 "CUDA, and with mkldnn on a CPU)")
    compile: bool | str = option(False, "torch.compile the training loss and the networks the sample grids use "
                                 "(false, true, or 'max-autotune': longer compile, faster kernels)",
                                 (False, True, "max-autotune"))
    cuda_graphs: bool | str = option(False, "capture forward + backward + optimizer of a step in a CUDA graph and "
                                     "replay it (true, or 'auto'); a run that cannot be captured trains eagerly "
                                     "and says why once", (False, True, "auto"))

    def validate(self, check):
        check(self.steps > 0, "steps", "must be > 0")
        check(self.batch_size > 0, "batch_size", "must be > 0")
        check(0 < self.lr <= 1, "lr", "must be in (0, 1] (AdamW's useful range is ~1e-5 to 1e-2)")
        check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        check(0 <= self.weight_decay <= 1, "weight_decay", "must be in [0, 1]")
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
    source: str = option("builtin:textures", "builtin:textures | builtin:digits (scikit-learn's digits, 1x28x28, "
                         "labels 0-9) | folder:PATH (one sub-folder per class) | latents:PATH")
    image_size: int = option(32, "side of the square crops fed to the model (builtin:textures, folders; digits are 28)")
    flip: bool = option(True, "random horizontal flips (builtin:textures, folders; never digits)")
    num_workers: int = option(2, "DataLoader worker processes (DALI: decoding threads) for image folders")
    loader: str = option("auto", "what decodes folder:PATH images: auto = DALI where nvidia-dali imports (on the GPU "
                         "when training on CUDA), else torch; torch = a DataLoader; dali = DALI "
                         "(pip install -e '.[dali]')", ("auto", "torch", "dali"))
    autoencoder: str = option("", "autoencoder that encodes/decodes latents: a run directory, a checkpoint or a "
                              "local diffusers folder ('' = the one the latents file records; for methods that "
                              "train on latents of builtin:textures, the built-in one)")

    def validate(self, check):
        builtin, paths = ("builtin:textures", "builtin:digits"), ("folder:", "latents:")
        check(self.source in builtin or (self.source.startswith(paths) and self.source.partition(":")[2]),
              "source", "must be 'builtin:textures', 'builtin:digits', 'folder:PATH' or 'latents:PATH'")
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
    num: int = option(16, "images (or content rows) in the sample grid")

    def validate(self, check):
        check(self.every >= 0, "every", "must be >= 0 (0 turns periodic grids off)")
        check(self.num > 0, "num", "must be > 0")


@dataclass
class EvalConfig:
    at_end: bool = option(True, "evaluate once when training finishes (printed, logged as eval/* in metrics.jsonl)")
    per_class: int = option(4, "held-out items per class the evaluation uses (LGT: contents transported into "
                            "each style); its cost grows linearly with this")

    def validate(self, check):
        check(self.per_class >= 1, "per_class", "must be >= 1 (eval.at_end = false turns evaluation off)")


@dataclass
class MethodConfig:
    name: str = option(DEFAULT_METHOD, "what is trained; it decides which method sections the config has",
                       tuple(METHODS))


SHARED_SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "checkpoint": CheckpointConfig,
    "log": LogConfig,
    "sample": SampleConfig,
    "eval": EvalConfig,
}

# Keys that moved to another section: a config still using the old place gets an error naming the
# new one instead of "unknown key".
MOVED_KEYS = {
    "autoencoder.prepare_crops": "prepare.crops",
    "autoencoder.prepare_image_size": "prepare.image_size",
    "autoencoder.prepare_steps": "prepare.autoencoder_steps",
    "autoencoder.prepare_train_size": "prepare.autoencoder_image_size",
    "autoencoder.prepare_batch_size": "prepare.autoencoder_batch_size",
    "lgt.autoencoder": "data.autoencoder",
    "sample.sampler": "ddpm.sampler",
    "sample.steps": "ddpm.sample_steps",
    "sample.eta": "ddpm.eta",
    "sample.cfg_scale": "ddpm.cfg_scale",
}


def config_sections(method: str) -> dict[str, type]:
    """The sections of a config for `method`: the shared ones, then the method's own."""
    if method not in METHODS:
        raise ConfigError(f"method.name = {method!r} is not one of {', '.join(map(repr, METHODS))}")
    return {**SHARED_SECTIONS, **method_class(method).config_sections}


def _section_owners() -> dict[str, list[str]]:
    """section -> the methods whose configs have it (shared sections: every method)."""
    owners: dict[str, list[str]] = {}
    for method in METHODS:
        for name in method_class(method).config_sections:
            owners.setdefault(name, []).append(method)
    return owners


# --------------------------------------------------------------------------- the whole config


class Config:
    """A run's settings: one dataclass instance per section, read as attributes (`cfg.train.steps`).

    The sections are the shared ones plus those of `method` (see the module doc)."""

    run: RunConfig
    method: MethodConfig
    train: TrainConfig
    data: DataConfig
    checkpoint: CheckpointConfig
    log: LogConfig
    sample: SampleConfig
    eval: EvalConfig

    def __init__(self, method: str = DEFAULT_METHOD):
        self._sections = config_sections(method)
        for name, cls in self._sections.items():
            setattr(self, name, cls())
        self.method.name = method

    @property
    def sections(self) -> dict[str, type]:
        return dict(self._sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in self._sections}

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def copy(self) -> Config:
        return copy.deepcopy(self)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"


# --------------------------------------------------------------------------- loading


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected; floats
    must be finite (NaN or inf in a config is always a mistake)."""
    origin = typing.get_origin(annotation)
    if isinstance(annotation, types.UnionType):  # e.g. bool | str: the first member type that takes it
        errors = []
        for member in typing.get_args(annotation):
            try:
                return _coerce(value, member, where)
            except ConfigError as err:
                errors.append(str(err))
        names = " or ".join(member.__name__ for member in typing.get_args(annotation))
        raise ConfigError(f"{where} must be {names}, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list of {item_type.__name__}, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if annotation is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where} must be of type {annotation.__name__}, got {value!r}")
    if annotation is float and not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r} must be a finite number")
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
    sections = cfg.sections
    moved_to = MOVED_KEYS.get(f"{section}.{key}")
    if moved_to is not None:
        raise ConfigError(f"{source}: {section}.{key} moved to {moved_to}; write it there")
    if section not in sections:
        owners = _section_owners().get(section)
        if owners:
            raise ConfigError(f"{source}: [{section}] is a section of method {' / '.join(owners)}, but method.name "
                              f"= {cfg.method.name!r}; its sections are: {', '.join(sections)}")
        raise ConfigError(f"{source}: unknown section [{section}]; valid sections for method "
                          f"{cfg.method.name!r}: {', '.join(sections)}")
    cls = sections[section]
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
    """Every section's own rules, then the method's rules across sections."""

    def checker(prefix: str, values: Any):
        def check(ok: bool, key: str, message: str) -> None:
            if not ok:
                name = f"{prefix}.{key}" if prefix else key
                shown = getattr(values, key) if prefix else _lookup(cfg, key)
                raise ConfigError(f"{source}: {name} = {shown!r} {message}")
        return check

    for name in cfg.sections:
        section = getattr(cfg, name)
        if hasattr(section, "validate"):
            section.validate(checker(name, section))
    method_class(cfg.method.name).validate_config(cfg, checker("", cfg))


def _lookup(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".", 1)
    return getattr(getattr(cfg, section), key)


def _method_of(data: dict[str, Any], overrides: list[tuple[str, str, Any]]) -> str:
    """method.name as the command line, else the file, else the default says."""
    for section, key, value in reversed(overrides):
        if (section, key) == ("method", "name"):
            return str(value)
    table = data.get("method")
    if isinstance(table, dict) and "name" in table:
        return str(table["name"])
    return DEFAULT_METHOD


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Defaults <- TOML file <- `--section.key=value` overrides, then validated."""
    source = str(path) if path is not None else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: not valid TOML: {err}") from None
    parsed = [_parse_override(arg) for arg in overrides]
    try:
        cfg = Config(_method_of(data, parsed))
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: top-level key {section!r} must be a [section] table; valid "
                              f"sections: {', '.join(cfg.sections)}")
        for key, value in values.items():
            _apply(cfg, section, key, value, str(path), from_cli=False)
    for section, key, value in parsed:
        _apply(cfg, section, key, value, "command line", from_cli=True)
    validate(cfg, source + (" + command-line overrides" if overrides else ""))
    return cfg


def with_absolute_paths(cfg: Config) -> Config:
    """The config with its data, cache and autoencoder paths made absolute, so the run's saved
    config.toml means the same files whatever directory a later command runs from."""
    resolved = cfg.copy()
    resolved.run.cache_dir = str(Path(cfg.run.cache_dir).resolve())
    kind, sep, path = cfg.data.source.partition(":")
    if kind in ("folder", "latents") and path:
        resolved.data.source = f"{kind}{sep}{Path(path).resolve()}"
    if cfg.data.autoencoder:
        resolved.data.autoencoder = str(Path(cfg.data.autoencoder).resolve())
    return resolved


def describe_options() -> str:
    """Every config key of every method with its default and documentation, for `--help`."""
    owners = _section_owners()
    sections = dict(SHARED_SECTIONS)
    for method in METHODS:
        sections.update(method_class(method).config_sections)
    lines = []
    for name, cls in sections.items():
        used_by = f"  (method {' / '.join(owners[name])})" if name in owners else ""
        lines.append(f"[{name}]{used_by}")
        defaults = cls()
        for f in dataclasses.fields(cls):
            choices = f.metadata.get("choices")
            extra = f" (one of {', '.join(map(str, choices))})" if choices else ""
            lines.append(f"  {name}.{f.name} = {getattr(defaults, f.name)!r}: {f.metadata['doc']}{extra}")
    return "\n".join(lines)
