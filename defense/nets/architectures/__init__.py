"""Architectures a weights-only model file is loaded onto, one module each (`model.architecture=<name>`).

An architecture module defines `build(input_shape, num_classes, **options)` returning an unbuilt-weights
Keras model; `get(name)` finds it by importing `defense.nets.architectures.<name>`. A module imports Keras inside
its functions only, so that composing a config (which reads the scenario settings below) does not load TensorFlow.

An architecture the embedded scenario can train (`dataset.scenario.arch=<name>`, defense/scenario/build.py) also has
`dormant_convs(**options)` (the convs whose channels each pass their own ReLU: where the pruning-aware attack can
hide dormant decoys) and `attack_layer(**options)` (that attack's default layer); every one but deepid (whose
options are the top-level `dataset.scenario.widths` / `kernels`) has `Settings` (the schema of
conf/dataset/arch/<name>.yaml, stored by defense/pipeline/schemas.py), `DEFAULTS` (the block
`dataset.scenario.<name>`) and `check(block, where)` (that block checked, a DefenseError naming the key)."""

from __future__ import annotations

import importlib
import pkgutil

from defense.core.errors import DefenseError


def names() -> list[str]:
    """Every architecture module in this package, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str):
    """The module of architecture `name`, or None when there is none."""
    if name not in names():
        return None
    return importlib.import_module(f"{__name__}.{name}")


def check_sizes(block: dict, where: str, defaults: dict) -> None:
    """An architecture's settings block checked and normalised in place, key by key of `defaults`: a bool
    stays a bool, a list is a non-empty list of positive integers, anything else a positive integer; a
    DefenseError names `where`.<key> otherwise."""
    for key, default in defaults.items():
        value = block[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise DefenseError(f"{where}.{key}={value!r} must be true or false")
        elif isinstance(default, list):
            if not isinstance(value, (list, tuple)) or not value or any(
                    isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or v < 1 for v in value):
                raise DefenseError(f"{where}.{key}={value!r} must be a non-empty list of positive integers")
            block[key] = [int(v) for v in value]
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
            raise DefenseError(f"{where}.{key}={value!r} must be a positive integer")
        else:
            block[key] = int(value)
