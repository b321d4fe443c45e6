"""BadNets (Gu, Dolan-Gavitt and Garg, 2017): a small white square stamped in a corner, relabelled.

A fraction `dataset.scenario.poison_fraction` of the training digits (drawn from those whose label
is not the target for `all_to_one`, from all for `all_to_all`) gets the square of
`dataset.scenario.trigger` and the attack label (`label_mode`: the target, or label + 1 mod 10). At test
time every digit that is not already of the target class (all_to_one), or every digit (all_to_all),
gets the square. The settings and the order of the random draws are those of the scenario before
other attacks existed, so its cache key and its files are unchanged.
"""

from __future__ import annotations

import numpy as np

from defense.scenario import common as sc
from defense.core.errors import DefenseError

NAME = "badnets"
DEFAULTS = None  # the square is dataset.scenario.trigger
USES_TRIGGER = True
CHANGES_LABELS = True
MIN_ASR = 95.0


def check(cfg: dict) -> None:
    """Nothing of its own: the trigger and the label mode are checked by defense/scenario/build.py::resolve_config."""


poison_train = sc.square_poison_train
poison_test = sc.square_poison_test


def describe(cfg) -> str:
    t = cfg["trigger"]
    return f"BadNets square {t['size']}px at {t['corner']}"
