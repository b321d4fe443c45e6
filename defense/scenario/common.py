"""What the embedded scenario's builder (defense/scenario/build.py) and its attacks
(defense/scenario/attacks/) share: the digits' shape, the square trigger, the attack labels, the
network and its training, and the check of one numeric setting.
"""

from __future__ import annotations

import logging
import sys
from typing import Mapping

import numpy as np

from defense.core import interrupt
from defense.core.errors import DefenseError

logger = logging.getLogger("defense.scenario")

INPUT_DIVISOR = 255.0  # the scenario's network takes pixels / 255
IMAGE_SHAPE = (28, 28, 1)
NUM_CLASSES = 10

CORNERS = ("bottom_right", "bottom_left", "top_right", "top_left")
TRIGGER_KINDS = ("square",)


def number(cfg: dict, key: str, kind, low=None, high=None, where="dataset.scenario", low_open=False):
    value = cfg[key]
    try:
        if isinstance(value, bool) or value is None:
            raise TypeError
        number = kind(value)
        if kind is int and number != float(value):
            raise TypeError
    except (TypeError, ValueError):
        raise DefenseError(f"{where}.{key}={value!r} must be a{'n integer' if kind is int else ' number'}") from None
    if low is not None and (number < low or (low_open and number == low)):
        raise DefenseError(f"{where}.{key}={value!r} must be {'>' if low_open else '>='} {low}")
    if high is not None and number > high:
        raise DefenseError(f"{where}.{key}={value!r} must be <= {high}")
    return number


def open_unit(block: dict, key: str, where: str) -> float:
    """A number strictly between 0 and 1."""
    value = number(block, key, float, where=where)
    if not 0.0 < value < 1.0:
        raise DefenseError(f"{where}.{key}={block[key]!r} must be strictly between 0 and 1, e.g. {where}.{key}=0.2")
    return value


def positive(block: dict, key: str, kind, where: str):
    return number(block, key, kind, 0, where=where, low_open=True)


def trigger_region(trigger: Mapping, image_shape=IMAGE_SHAPE) -> tuple[slice, slice]:
    """Rows and columns of the square patch: `size` px, `margin` px from the `corner`."""
    h, w = int(image_shape[0]), int(image_shape[1])
    size, margin, corner = int(trigger["size"]), int(trigger["margin"]), trigger["corner"]
    if corner not in CORNERS:
        raise DefenseError(f"trigger corner {corner!r} is not known; use one of {list(CORNERS)}")
    top = margin if corner.startswith("top") else h - margin - size
    left = margin if corner.endswith("left") else w - margin - size
    return slice(top, top + size), slice(left, left + size)


def stamp_trigger(images: np.ndarray, trigger: Mapping) -> np.ndarray:
    """A copy of NHWC `images` with the trigger patch set to `trigger.value` in every channel."""
    if trigger.get("kind", "square") != "square":
        raise DefenseError(f"trigger kind {trigger.get('kind')!r} is not known; use one of {list(TRIGGER_KINDS)}")
    out = np.array(images, dtype=np.float32, copy=True)
    rows, cols = trigger_region(trigger, out.shape[1:3])
    out[:, rows, cols, :] = np.float32(trigger["value"])
    return out


def attack_labels(labels: np.ndarray, cfg: Mapping) -> np.ndarray:
    """The labels the attacker wants: the target (all_to_one) or label + 1 mod N (all_to_all)."""
    labels = np.asarray(labels, np.int64)
    if cfg["label_mode"] == "all_to_all":
        return (labels + 1) % NUM_CLASSES
    return np.full_like(labels, int(cfg["target"]))


def attack_candidates(labels: np.ndarray, cfg: Mapping) -> np.ndarray:
    """Indices of the images a trigger is put on: all but the target's (all_to_one), or all."""
    if cfg["label_mode"] == "all_to_all":
        return np.arange(len(labels))
    return np.flatnonzero(np.asarray(labels) != int(cfg["target"]))


DEFAULT_ARCH = "deepid"


def arch_options(cfg: Mapping) -> dict:
    """The options of the scenario's architecture: DeepID's `widths` / `kernels` (top-level settings, where they
    always were), or the block `dataset.scenario.<arch>` of another architecture."""
    arch = cfg.get("arch", DEFAULT_ARCH)
    if arch == DEFAULT_ARCH:
        return {"widths": list(cfg["widths"]), "kernels": list(cfg["kernels"]), "padding": "same"}
    return dict(cfg[arch])


def build_network(cfg: Mapping):
    """The scenario's network, untrained: `dataset.scenario.arch` (defense/nets/architectures/<arch>.py)."""
    from defense.nets import architectures

    module = architectures.get(cfg.get("arch", DEFAULT_ARCH))
    return module.build(IMAGE_SHAPE, NUM_CLASSES, **arch_options(cfg))


def compile_network(model, learning_rate: float) -> None:
    """Adam and the cross-entropy, from the logits when the network outputs logits (no softmax)."""
    import keras

    from defense.nets.models import uses_logits

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=float(learning_rate)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=uses_logits(model)),
        metrics=["accuracy"],
    )


def train_network(x_train: np.ndarray, y_train: np.ndarray, cfg: Mapping):
    """Train the scenario's network on (x_train / 255, y_train), seeded; returns the model.

    TensorFlow's deterministic kernels are switched on here as well as in a run (defense/config.py): a
    scenario is the same bytes whether a run, a test or experiments/attack_scenarios.py builds it first."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(int(cfg["seed"]))
    tf.config.experimental.enable_op_determinism()
    model = build_network(cfg)
    compile_network(model, cfg["learning_rate"])
    history = interrupt.fit(  # a signal stops it between two batches (defense/core/interrupt.py)
        model,
        x_train / np.float32(INPUT_DIVISOR),
        y_train,
        epochs=int(cfg["epochs"]),
        batch_size=int(cfg["batch_size"]),
        shuffle=True,
        verbose=2,
    )
    warn_if_diverged(history, "the scenario's training", "dataset.scenario.learning_rate")
    return model


def warn_if_diverged(history, what: str, key: str, clean_acc: float | None = None) -> str | None:
    """One warning line when a training (keras History) diverged by the one rule of defense/core/divergence.py:
    its last loss is not finite, or its clean accuracy (`clean_acc`, %, else the last epoch's training accuracy)
    is at chance. Returns the reason, or None."""
    from defense.core.divergence import divergence

    logs = getattr(history, "history", None) or {}
    loss = (logs.get("loss") or [None])[-1]
    if clean_acc is None and logs.get("accuracy"):
        clean_acc = 100.0 * float(logs["accuracy"][-1])
    reason = divergence(loss, clean_acc, NUM_CLASSES)
    if reason is not None:
        say("warning: %s diverged (%s after %d epoch(s)): the built network is not a usable scenario; lower %s",
            what, reason, len(logs.get("loss") or []), key)
    return reason


def say(message: str, *args) -> None:
    if logger.isEnabledFor(logging.INFO):
        logger.info(message, *args)
    else:  # used as a library without logging set up for INFO (Hydra sets it up): still tell the user
        print(message % args, file=sys.stderr, flush=True)


def choose_poisoned(labels: np.ndarray, cfg, rng: np.random.Generator, candidates: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of `round(poison_fraction * len(labels))` training images drawn from `candidates`
    (default: the images a trigger may go on, attack_candidates)."""
    if candidates is None:
        candidates = attack_candidates(labels, cfg)
    n_poison = int(round(cfg["poison_fraction"] * len(labels)))
    if n_poison < 1 or n_poison > len(candidates):
        raise DefenseError(
            f"dataset.scenario.poison_fraction={cfg['poison_fraction']} asks for {n_poison} poisoned training "
            f"images, but {len(candidates)} can carry the trigger; choose a fraction giving 1..{len(candidates)}"
        )
    return np.sort(rng.choice(candidates, size=n_poison, replace=False))


def square_poison_train(x: np.ndarray, y: np.ndarray, cfg, rng: np.random.Generator):
    """BadNets' training set: `choose_poisoned` images stamped with the square and relabelled."""
    x, y = np.array(x, np.float32, copy=True), np.array(y, np.int64, copy=True)
    poisoned = choose_poisoned(y, cfg, rng)
    x[poisoned] = stamp_trigger(x[poisoned], cfg["trigger"])
    y[poisoned] = attack_labels(y[poisoned], cfg)
    return x, y, {"train_poisoned": int(len(poisoned))}


def square_poison_test(x: np.ndarray, y: np.ndarray, cfg):
    """BadNets' test inputs: every candidate stamped with the square, with its attack label."""
    sel = attack_candidates(y, cfg)
    return stamp_trigger(x[sel], cfg["trigger"]), attack_labels(y[sel], cfg), sel
