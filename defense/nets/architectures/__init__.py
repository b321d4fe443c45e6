"""Architectures a weights-only model file is loaded onto, one module each (`model.architecture=<name>`).

An architecture module defines `build(input_shape, num_classes, **options)` returning an unbuilt-weights
Keras model; `get(name)` finds it by importing `defense.nets.architectures.<name>`."""

from __future__ import annotations

import importlib
import pkgutil


def names() -> list[str]:
    """Every architecture module in this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    """The module of architecture `name`, or None when there is none."""
    if name not in names():
        return None
    return importlib.import_module(f"{__name__}.{name}")
