"""RNP: Reconstructive Neuron Pruning (`prune.criterion=rnp`).

Li, Lyu, Ma, Koren, Lyu, Li and Jiang, "Reconstructive Neuron Pruning for Backdoor Defense", ICML 2023;
reference code github.com/bboylyg/RNP (`main.py`, `models/mask_batchnorm.py`).

1. Unlearn: gradient ascent on the cross-entropy of `images` seeded clean validation images (default
   500, the reference's --ratio 0.01 of CIFAR-10's 50,000 training images; each batch randomly translated
   by up to `shift` pixels, the reference's RandomCrop(32, padding=4) in its CIFAR-10 loader: by default
   4 px per 32 of width with masks on BatchNormalization, none for the conv adaptation, no flip),
   SGD lr `unlearn_lr` 0.01, momentum 0.9, weight decay 5e-4, the learning rate divided by 10 after
   epoch 10 (the reference's MultiStepLR schedule [10, 20]), epoch by epoch until the epoch's running
   clean accuracy falls to `clean_threshold` (20 %) or `unlearn_epochs` (20) have run
   (`main.py::train_step_unlearning`). The reference calls clip_grad_norm_ before backward(), so it
   clips nothing; neither does this module.
2. Recover: on the unlearned network (its weights frozen), learn a mask in [0, 1] per output channel of
   the pruned Conv2D layers that minimises alpha * CE on the same clean data (SGD lr `recover_lr` 0.2,
   momentum 0.9, alpha 0.2, `recover_epochs` 20; `main.py::train_step_recovering`), masks clipped to
   [0, 1] after each step.
3. Prune: the ORIGINAL network's channels with low masks. Score = 1 - mask; operating point: mask <=
   `threshold` (default 0.2, see conf/prune/rnp.yaml for its source).

Where the masks sit (defense.pruning.bn_pairing; `prune.rnp.level`, default auto):

- `bn` (the reference): a conv paired with a BatchNormalization is masked on the BN's scale, gamma * m,
  beta unchanged (`models/mask_batchnorm.py::MaskBatchNorm2d`); unlearning and recovering run the
  network in training mode (BN with batch statistics), as model.train() in
  `main.py::train_step_unlearning` and `main.py::train_step_recovering`; pruning a channel sets
  gamma := 0 (`main.py::pruning`, state_dict[<bn>.weight][idx] = 0.0).
- `conv (adapted: no BatchNormalization)`: a conv without one (DeepID) is masked on the channel itself
  (kernel and bias * m), so m = 0 is exactly this framework's pruning; the network runs in inference
  mode.

The run's `defense_variant` tag and summary.csv column say which. The unlearned weights are a copy
(tf.Variables read in place of the network's through keras.StatelessScope): the suspect network's
weights (its BatchNormalization moving statistics included) never change.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import tensorflow as tf

from defense.core import interrupt
from defense.core.divergence import divergence
from defense.config import bound as _bound
from defense.criteria import Scores
from defense.criteria._masking import (ChannelMasks, augmentation, batch_shift, clean_subset, correct, cross_entropy, data_settings,
                                       mask_scores, sgd_step, step_signature)
from defense.data.arrays import shift_images
from defense.pruning import bn_pairing

NEEDS_DATA = True
log = logging.getLogger(__name__)

UNLEARN_MILESTONES = (10, 20)  # main.py: --schedule 10 20, MultiStepLR(gamma=0.1)
DEFAULTS = {"clean_threshold": 0.2, "unlearn_lr": 0.01, "unlearn_epochs": 20, "weight_decay": 5e-4,
            "recover_lr": 0.2, "recover_epochs": 20, "alpha": 0.2, "momentum": 0.9, "batch_size": 128,
            "threshold": 0.2}
BN_ZERO = ("gamma",)  # main.py::pruning: the pruned channel's BN weight := 0


def settings(prune_cfg) -> dict:
    """`prune.rnp` with the defaults filled in, every bound checked (DefenseError naming the key)."""
    given = prune_cfg.get("rnp") or {}
    s = {k: given.get(k, v) if given.get(k, None) is not None else v for k, v in DEFAULTS.items()}
    whole = lambda v: float(v).is_integer()  # noqa: E731
    _bound("prune.rnp.clean_threshold", s["clean_threshold"], lambda v: 0 <= v <= 1,
           "a clean accuracy (fraction) in [0, 1] where unlearning stops, e.g. prune.rnp.clean_threshold=0.2")
    _bound("prune.rnp.unlearn_lr", s["unlearn_lr"], lambda v: v > 0, "a learning rate > 0, e.g. 0.01")
    _bound("prune.rnp.unlearn_epochs", s["unlearn_epochs"], lambda v: v >= 1 and whole(v),
           "a whole number of epochs >= 1, e.g. prune.rnp.unlearn_epochs=20")
    _bound("prune.rnp.weight_decay", s["weight_decay"], lambda v: v >= 0, "a weight decay >= 0, e.g. 0.0005")
    _bound("prune.rnp.recover_lr", s["recover_lr"], lambda v: v > 0, "a learning rate > 0, e.g. 0.2")
    _bound("prune.rnp.recover_epochs", s["recover_epochs"], lambda v: v >= 1 and whole(v),
           "a whole number of epochs >= 1, e.g. prune.rnp.recover_epochs=20")
    _bound("prune.rnp.alpha", s["alpha"], lambda v: 0 < v <= 1, "a loss weight in (0, 1], e.g. prune.rnp.alpha=0.2")
    _bound("prune.rnp.momentum", s["momentum"], lambda v: 0 <= v < 1, "a momentum in [0, 1), e.g. 0.9")
    _bound("prune.rnp.batch_size", s["batch_size"], lambda v: v >= 1 and whole(v),
           "a whole number of images >= 1, e.g. prune.rnp.batch_size=128")
    _bound("prune.rnp.threshold", s["threshold"], lambda v: 0 <= v <= 1,
           "a mask threshold in [0, 1], e.g. prune.rnp.threshold=0.2")
    for key in ("unlearn_epochs", "recover_epochs", "batch_size"):
        s[key] = int(s[key])
    for key in ("clean_threshold", "unlearn_lr", "weight_decay", "recover_lr", "alpha", "momentum", "threshold"):
        s[key] = float(s[key])
    data_settings(given, "rnp", s)
    return s


def check_config(prune_cfg) -> None:
    settings(prune_cfg)


def bn_units(model, layers: list[str], cfg) -> dict[str, str]:
    """{conv: BatchNormalization} of the layers whose masks sit on a BN (`prune.rnp.level`)."""
    return bn_pairing.bn_units(model, layers, settings(cfg.prune)["level"], "prune.rnp.level")


class Reconstructor:
    """The unlearned copy of the weights, the masks and RNP's two compiled training steps."""

    def __init__(self, model, layers: list[str], s: dict):
        self.model, self.s = model, s
        units = bn_pairing.bn_units(model, layers, s.get("level", "auto"), "prune.rnp.level")
        self.masks = ChannelMasks(model, layers, bn_units=units)
        originals = list(model.trainable_variables)
        self.weights = [tf.Variable(tf.convert_to_tensor(v), trainable=False) for v in originals]
        self.masks.use_base(originals, self.weights)
        self.weight_velocity = [tf.Variable(tf.zeros_like(w), trainable=False) for w in self.weights]
        self.mask_velocity = [tf.Variable(tf.zeros_like(m), trainable=False) for m in self.masks.masks]
        self.unlearn_lr = tf.Variable(s["unlearn_lr"], trainable=False, dtype=tf.float32)
        self._unlearn = tf.function(self._unlearn_step, input_signature=step_signature(model))
        self._recover = tf.function(self._recover_step, input_signature=step_signature(model))

    def _unlearn_step(self, x, y):
        with tf.GradientTape() as tape:
            tape.watch(self.weights)
            out = self.masks.forward(x, masked=False)
            loss = cross_entropy(self.model, y, out)
        grads = tape.gradient(loss, self.weights)
        # gradient ascent: SGD on -loss
        sgd_step(self.weights, [-g for g in grads], self.weight_velocity, self.unlearn_lr, self.s["momentum"],
                 self.s["weight_decay"])
        return loss, correct(y, out)

    def _recover_step(self, x, y):
        with tf.GradientTape() as tape:
            tape.watch(self.masks.masks)
            out = self.masks.forward(x)
            loss = self.s["alpha"] * cross_entropy(self.model, y, out)
        grads = tape.gradient(loss, self.masks.masks)
        sgd_step(self.masks.masks, grads, self.mask_velocity, self.s["recover_lr"], self.s["momentum"])
        self.masks.clip()
        return loss, correct(y, out)

    def unlearn(self, x, y):
        loss, hits = self._unlearn(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
        return float(loss), float(hits)

    def recover(self, x, y):
        loss, hits = self._recover(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
        return float(loss), float(hits)


def _epoch(step, x, y, batch_size: int, rng, shift: int = 0) -> tuple[float, float]:
    """One shuffled pass over (x, y) through `step`, each batch randomly translated by up to `shift` pixels;
    mean batch loss and accuracy (%)."""
    order = rng.permutation(len(x))
    losses, hits = [], 0.0
    for start in range(0, len(x), batch_size):
        interrupt.check()  # a safe point between batches (defense/core/interrupt.py)
        index = order[start:start + batch_size]
        loss, ok = step(shift_images(x[index], shift, rng) if shift else x[index], y[index])
        losses.append(loss)
        hits += ok
    return float(np.mean(losses)), 100.0 * hits / len(x)


def _diverged(history: list, step: int, loss: float, acc, variables, good, where: str, key: str,
              num_classes=None) -> bool:
    """The divergence watch of RNP's loops (defense/core/divergence.py): on a non-finite loss (or clean accuracy
    at chance after recovering) the last finite values are put back, a history row and one warning say where."""
    reason = divergence(loss, acc, num_classes)
    if reason is None:
        return False
    for variable, value in zip(variables, good):
        variable.assign(value)
    history.append({"step": step, "diverged": 1.0})
    log.warning("warning: RNP diverged at %s (%s); the values of the epoch before are kept and the run's rows are "
                "marked diverged; lower %s", where, reason, key)
    return True


def learn_masks(model, layers: list[str], x: np.ndarray, y: np.ndarray, s: dict, seed: int):
    """Unlearn, then recover; the Reconstructor (its masks) and the history rows (one per epoch: loss and clean
    accuracy; while recovering also the mask statistics and every mask value, `mask/<layer>/<channel>`)."""
    r = Reconstructor(model, layers, s)
    rng = np.random.default_rng(seed)
    shift = batch_shift(s, x, bool(r.masks.bn_units))  # the reference's RandomCrop (get_train_loader)
    history, step = [], 0
    started = time.perf_counter()
    reached = False
    good = [w.numpy() for w in r.weights]
    for epoch in range(1, s["unlearn_epochs"] + 1):
        r.unlearn_lr.assign(s["unlearn_lr"] * 0.1 ** sum(epoch > m for m in UNLEARN_MILESTONES))
        loss, acc = _epoch(r.unlearn, x, y, s["batch_size"], rng, shift)
        step += 1
        if _diverged(history, step, loss, None, r.weights, good, f"unlearning epoch {epoch}", "prune.rnp.unlearn_lr"):
            return r, history
        good = [w.numpy() for w in r.weights]
        history.append({"step": step, "unlearn_epoch": epoch, "unlearn_loss": loss, "unlearn_accuracy": acc,
                        "seconds": time.perf_counter() - started})
        log.info("RNP unlearning epoch %d: loss %.4f, clean accuracy %.2f %%", epoch, loss, acc)
        if acc <= 100.0 * s["clean_threshold"]:
            reached = True
            break
    if not reached:
        log.warning("warning: RNP: clean accuracy is still %.2f %% after prune.rnp.unlearn_epochs=%d epochs of "
                    "unlearning (bound %.0f %%); the masks are learned on that network", acc, s["unlearn_epochs"],
                    100.0 * s["clean_threshold"])
    good = [m.numpy() for m in r.masks.masks]
    for epoch in range(1, s["recover_epochs"] + 1):
        loss, acc = _epoch(r.recover, x, y, s["batch_size"], rng, shift)
        step += 1
        last = epoch == s["recover_epochs"]  # recovered clean accuracy at chance at the end: collapsed
        classes = int(model.outputs[0].shape[-1]) if last else None
        if _diverged(history, step, loss, acc if last else None, r.masks.masks, good, f"recovering epoch {epoch}",
                     "prune.rnp.recover_lr", classes):
            return r, history
        good = [m.numpy() for m in r.masks.masks]
        history.append({"step": step, "recover_epoch": epoch, "recover_loss": loss, "recover_accuracy": acc,
                        **r.masks.stats(s["threshold"]), "seconds": time.perf_counter() - started})
        log.info("RNP recovering epoch %d: loss %.4f, clean accuracy %.2f %%", epoch, loss, acc)
    return r, history


def score(model, layers: list[str], clean, cfg, divisor: float) -> Scores:
    """RNP's masks on `layers`, learned from the clean validation data `clean` only."""
    s = settings(cfg.prune)
    seed = int(cfg.prune.get("seed", 0))
    units = bn_pairing.bn_units(model, layers, s["level"], "prune.rnp.level")
    x, y = clean_subset(clean, s["images"], s["fraction"], seed, divisor, "prune.criterion=rnp",
                        cfg.model.get("num_classes") if "model" in cfg else None)
    variant = bn_pairing.variant(units, layers)
    log.info("RNP (%s): unlearning and recovering on %d clean validation images; masks on %s", variant, len(x),
             ", ".join(f"{n} ({units[n]})" if n in units else n for n in layers))
    r, history = learn_masks(model, layers, x, y, s, seed)
    masks = r.masks.values("prune.rnp.unlearn_lr or prune.rnp.recover_lr")
    scores = mask_scores(masks, s["threshold"], history)
    scores.bn_units, scores.bn_zero, scores.variant = units, BN_ZERO, variant
    scores.augmentation = augmentation(batch_shift(s, x, bool(units)))
    return scores
