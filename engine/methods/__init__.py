"""Method registry: `method.name` in the config -> the class that owns that method's maths."""

from __future__ import annotations

import importlib

from engine.config import Config
from engine.data.base import DataSource
from engine.methods.base import LossOutput, Method

# name -> "module:Class"; imported lazily so a method's optional dependencies load only when used.
METHODS = {
    "ddpm": "engine.methods.ddpm:DDPM",
    "autoencoder": "engine.methods.autoencoder:AutoencoderMethod",
    "lgt": "engine.methods.lgt:LGT",
}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def build_method(cfg: Config, data: DataSource) -> Method:
    """The method named by `cfg.method.name`, built for this data (shape, classes)."""
    return method_class(cfg.method.name).from_config(cfg, data)


__all__ = ["LossOutput", "Method", "build_method", "method_class"]
