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

from defense.scenario import build as sc
from defense.core.errors import DefenseError

NAME = "badnets"
DEFAULTS = None  # the square is dataset.scenario.trigger
USES_TRIGGER = True
CHANGES_LABELS = True
MIN_ASR = 95.0


def check(cfg: dict) -> None:
    """Nothing of its own: the trigger and the label mode are checked by defense.scenario.resolve_config."""


def choose_poisoned(labels: np.ndarray, cfg, rng: np.random.Generator, candidates: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of `round(poison_fraction * len(labels))` training images drawn from `candidates`
    (default: the images a trigger may go on, defense/scenario.py::attack_candidates)."""
    if candidates is None:
        candidates = sc.attack_candidates(labels, cfg)
    n_poison = int(round(cfg["poison_fraction"] * len(labels)))
    if n_poison < 1 or n_poison > len(candidates):
        raise DefenseError(
            f"dataset.scenario.poison_fraction={cfg['poison_fraction']} asks for {n_poison} poisoned training "
            f"images, but {len(candidates)} can carry the trigger; choose a fraction giving 1..{len(candidates)}"
        )
    return np.sort(rng.choice(candidates, size=n_poison, replace=False))


def poison_train(x: np.ndarray, y: np.ndarray, cfg, rng: np.random.Generator):
    x, y = np.array(x, np.float32, copy=True), np.array(y, np.int64, copy=True)
    poisoned = choose_poisoned(y, cfg, rng)
    x[poisoned] = sc.stamp_trigger(x[poisoned], cfg["trigger"])
    y[poisoned] = sc.attack_labels(y[poisoned], cfg)
    return x, y, {"train_poisoned": int(len(poisoned))}


def poison_test(x: np.ndarray, y: np.ndarray, cfg):
    sel = sc.attack_candidates(y, cfg)
    return sc.stamp_trigger(x[sel], cfg["trigger"]), sc.attack_labels(y[sel], cfg), sel


def describe(cfg) -> str:
    t = cfg["trigger"]
    return f"BadNets square {t['size']}px at {t['corner']}"
