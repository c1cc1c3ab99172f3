"""The building blocks of config sections, shared by the config layer and every method.

A section is a dataclass whose fields are made with `option(default, doc, choices)` and which may
define `validate(self, check)`, calling `check(ok, key, message)` for each rule. This module
imports nothing from the engine, so any layer can define a section without an import cycle.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A configuration problem, reported before any work is done."""


def option(default: Any, doc: str, choices: tuple | None = None) -> Any:
    """A config field with its documentation (and closed set of values, if any)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"doc": doc, "choices": choices})
    return field(default=default, metadata={"doc": doc, "choices": choices})
