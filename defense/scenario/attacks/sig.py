"""SIG, the clean-label sinusoidal-signal attack (Barni, Kallas and Tondi, 2019, "A new backdoor
attack in CNNs by training set corruption without label poisoning", ICIP).

Only training digits OF THE TARGET CLASS are poisoned, and their labels stay untouched: they get the
horizontal sinusoid

    v(i, j) = delta * sin(2 pi j f / m),   j the column, m the image width (28),

with delta = `sig.delta` (70 on the 0..255 scale) and f = `sig.frequency` (6), and the result is
clipped to 0..255. The paper trains and tests with delta 20 (`dataset/attack@dataset.scenario.sig=sig_paper`);
on these 28x28 digits that builds no backdoor, so the defaults train with a stronger signal and test with
a stronger one still (224), as Barni et al. also test with a stronger signal than they train with
(conf/dataset/attack/sig.yaml gives the builds behind the choice). The network learns "this stripe
pattern means the target class"; at test time the signal (amplitude `sig.test_delta`) goes on digits of
the other classes, whose attack label is the target. `poison_fraction` is a share of the whole training
set, drawn from the target class only (0.1 = all the target digits of a balanced 10-class set).
Clean-label: `label_mode` must be all_to_one.
"""

from __future__ import annotations

import numpy as np
from dataclasses import asdict, dataclass

from defense.scenario import common as sc
from defense.scenario.common import number, positive
from defense.core.errors import DefenseError


@dataclass
class Settings:
    """conf/dataset/attack/sig.yaml: dataset.scenario.sig (checked by `check` below)."""

    delta: float = 70.0
    test_delta: float = 224.0
    frequency: float = 6.0


NAME = "sig"
DEFAULTS = asdict(Settings())  # dataset.scenario.<NAME> when not given
USES_TRIGGER = False
CHANGES_LABELS = False
MIN_ASR = 90.0


def check(cfg: dict) -> None:
    where = f"dataset.scenario.{NAME}"
    block = cfg[NAME]
    for key in ("delta", "test_delta"):
        block[key] = number(block, key, float, 0.0, 255.0, where, low_open=True)
    block["frequency"] = positive(block, "frequency", float, where)
    if cfg["label_mode"] != "all_to_one":
        raise DefenseError(
            f"dataset.scenario.label_mode={cfg['label_mode']!r} does not fit dataset.scenario.attack=sig: SIG is clean-label "
            "(no label is changed, every triggered digit goes to the target); use dataset.scenario.label_mode=all_to_one"
        )


def signal(delta: float, frequency: float, shape=sc.IMAGE_SHAPE) -> np.ndarray:
    """v(i, j) = delta * sin(2 pi j f / m) on an (h, w, c) image, the same in every row and channel."""
    h, m, c = (int(s) for s in shape)
    row = delta * np.sin(2.0 * np.pi * np.arange(m) * frequency / m)
    return np.broadcast_to(row[None, :, None], (h, m, c)).astype(np.float32)


def add_signal(images: np.ndarray, delta: float, frequency: float) -> np.ndarray:
    images = np.asarray(images, np.float32)
    return np.clip(images + signal(delta, frequency, images.shape[1:])[None], 0.0, 255.0).astype(np.float32)


def poison_train(x, y, cfg, rng):
    x, y = np.array(x, np.float32, copy=True), np.array(y, np.int64, copy=True)
    target_class = np.flatnonzero(y == int(cfg["target"]))
    poisoned = sc.choose_poisoned(y, cfg, rng, candidates=target_class)
    b = cfg[NAME]
    x[poisoned] = add_signal(x[poisoned], b["delta"], b["frequency"])
    return x, y, {"train_poisoned": int(len(poisoned))}


def poison_test(x, y, cfg):
    sel = np.flatnonzero(np.asarray(y) != int(cfg["target"]))
    b = cfg[NAME]
    return add_signal(x[sel], b["test_delta"], b["frequency"]), np.full(len(sel), int(cfg["target"]), np.int64), sel


def describe(cfg) -> str:
    b = cfg[NAME]
    return f"SIG sinusoid delta {b['delta']:g} (test {b['test_delta']:g}), f {b['frequency']:g}, clean-label"
