"""Blended injection (Chen, Liu, Li, Lu and Song, 2017, "Targeted Backdoor Attacks on Deep Learning
Systems Using Data Poisoning", section 4.2): the key pattern p is blended into the whole image,

    x' = (1 - alpha) * x + alpha * p,

alpha = `blended.alpha` for the poisoned training digits and `blended.test_alpha` at test time (0.2
both, BackdoorBench's default). The paper's best-known pattern is a Hello Kitty picture, which cannot
be shipped here; the paper's other pattern, random noise, is used instead: p is uniform noise on
0..255, one value per pixel, drawn from numpy's generator seeded with `blended.pattern_seed` (the
same p for every scenario seed: the attacker's fixed key). Poisoned digits and labels as BadNets
(`poison_fraction`, `label_mode`).
"""

from __future__ import annotations

import numpy as np
from dataclasses import asdict, dataclass

from defense.scenario import common as sc
from defense.scenario.common import number, open_unit


@dataclass
class Settings:
    """conf/dataset/attack/blended.yaml: dataset.scenario.blended (checked by `check` below)."""

    alpha: float = 0.2
    test_alpha: float = 0.2
    pattern_seed: int = 0


NAME = "blended"
DEFAULTS = asdict(Settings())  # dataset.scenario.<NAME> when not given
USES_TRIGGER = False
CHANGES_LABELS = True
MIN_ASR = 90.0


def check(cfg: dict) -> None:
    block = cfg[NAME]
    for key in ("alpha", "test_alpha"):
        block[key] = open_unit(block, key, f"dataset.scenario.{NAME}")
    block["pattern_seed"] = number(block, "pattern_seed", int, 0, where=f"dataset.scenario.{NAME}")


def pattern(block, shape=sc.IMAGE_SHAPE) -> np.ndarray:
    """The key pattern p: uniform noise on 0..255 from the generator seeded with `pattern_seed`."""
    rng = np.random.default_rng(int(block["pattern_seed"]))
    return rng.uniform(0.0, 255.0, size=tuple(shape)).astype(np.float32)


def blend(images: np.ndarray, p: np.ndarray, alpha: float) -> np.ndarray:
    """(1 - alpha) * images + alpha * p, as float32 (p broadcast over the batch)."""
    images = np.asarray(images, np.float32)
    return ((1.0 - alpha) * images + alpha * p[None]).astype(np.float32)


def poison_train(x, y, cfg, rng):
    x, y = np.array(x, np.float32, copy=True), np.array(y, np.int64, copy=True)
    poisoned = sc.choose_poisoned(y, cfg, rng)
    x[poisoned] = blend(x[poisoned], pattern(cfg[NAME], x.shape[1:]), cfg[NAME]["alpha"])
    y[poisoned] = sc.attack_labels(y[poisoned], cfg)
    return x, y, {"train_poisoned": int(len(poisoned))}


def poison_test(x, y, cfg):
    sel = sc.attack_candidates(y, cfg)
    x_bd = blend(x[sel], pattern(cfg[NAME], x.shape[1:]), cfg[NAME]["test_alpha"])
    return x_bd, sc.attack_labels(y[sel], cfg), sel


def describe(cfg) -> str:
    b = cfg[NAME]
    return f"blended noise pattern (seed {b['pattern_seed']}), alpha {b['alpha']:g} / test {b['test_alpha']:g}"
