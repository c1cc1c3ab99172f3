"""Method registry: `method.name` in the config -> the class that owns that method's maths and
config sections."""

from __future__ import annotations

from engine.methods.autoencoder import AutoencoderMethod
from engine.methods.base import LossOutput, Method
from engine.methods.ddpm import DDPM
from engine.methods.flow_map_matching import FlowMapMatching
from engine.methods.flow_matching import FlowMatching
from engine.methods.lgt import LGT
from engine.methods.score_flow import ScoreFlow

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (DDPM, AutoencoderMethod, LGT, FlowMatching,
                                                                   FlowMapMatching, ScoreFlow)}


def method_class(name: str) -> type[Method]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid: {', '.join(METHODS)}")
    return METHODS[name]


__all__ = ["METHODS", "LossOutput", "Method", "method_class"]
