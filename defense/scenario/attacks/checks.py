"""Checks of the attacks' own settings: one DefenseError naming the key and its allowed range."""

from __future__ import annotations

from defense.scenario import build as sc
from defense.core.errors import DefenseError


def number(block: dict, key: str, kind, low=None, high=None, where: str = "dataset.scenario", low_open=False):
    return sc._number(block, key, kind, low, high, where, low_open=low_open)


def open_unit(block: dict, key: str, where: str) -> float:
    """A number strictly between 0 and 1."""
    value = sc._number(block, key, float, where=where)
    if not 0.0 < value < 1.0:
        raise DefenseError(f"{where}.{key}={block[key]!r} must be strictly between 0 and 1, e.g. {where}.{key}=0.2")
    return value


def positive(block: dict, key: str, kind, where: str):
    return sc._number(block, key, kind, 0, where=where, low_open=True)
