"""ANP: Adversarial Neuron Pruning (`prune.criterion=anp`).

Wu and Wang, "Adversarial Neuron Pruning Purifies Backdoored Deep Models", NeurIPS 2021; reference code
github.com/csdongxian/ANP_backdoor (`optimize_mask_cifar.py`, `models/anp_batchnorm.py`,
`prune_neuron_cifar.py`).

A mask m in [0, 1] per output channel of the pruned Conv2D layers and multiplicative perturbations d, e
are learned on clean validation data only, minimising

    alpha * CE(masked network) + (1 - alpha) * CE(masked network, adversarially perturbed)

per batch (`optimize_mask_cifar.py::mask_train`, lines 172-214; optimizers at lines 97-99): the
perturbations are drawn again uniform in [-eps, eps] for every batch (reset(rand_init=True)), then take
`steps` signed-gradient ascent steps of size eps / steps (loss_noise = -CE, sign_grad, noise_opt =
SGD(lr=anp_eps / anp_steps)); the masks take one SGD step on the weighted loss (momentum 0.9, lr 0.2, as
mask_optimizer there) and are clipped to [0, 1] (clip_mask). Batches are drawn with replacement
(RandomSampler(replacement=True)) from `images` seeded clean validation images (default 500: --val-frac
0.01 of CIFAR-10's 50,000), each batch randomly translated by up to `shift` pixels (transform_train's
RandomCrop(32, padding=4), lines 49-54; by default 4 px per 32 of width with masks on BatchNormalization,
none for the conv adaptation; no horizontal flip, see defense.criteria._masking.batch_shift).

Where the masks sit (defense.pruning.bn_pairing; `prune.anp.level`, default auto):

- `bn` (the reference): a conv paired with a BatchNormalization is masked and perturbed on the BN, as
  `models/anp_batchnorm.py::NoisyBatchNorm2d` (reset lines 26-29, forward lines 77-88): weight gamma * (m
  + d), bias beta * (1 + e); the network runs in training mode (BN with batch statistics), as
  model.train() in mask_train; the perturbations are not clipped after their step (the reference does
  not). Pruning a channel sets gamma := 0 (`prune_neuron_cifar.py::pruning`, lines 108-112:
  state_dict[<bn>.weight][idx] = 0).
- `conv (adapted: no BatchNormalization)`: a conv without one (DeepID, the Lab 3 network) is masked and
  perturbed on the channel itself (kernel * (m + d), bias * (m + e)), m = 0 being exactly this
  framework's pruning of the channel (kernel and bias zeroed); the network runs in inference mode and the
  perturbations are also kept within [-eps, eps], the bound of the paper. A conv without a bias has no e.

The run's `defense_variant` tag and summary.csv column say which. The network's weights are never changed.

Score = 1 - m (the lowest masks are pruned first); operating point: channels with m <= `threshold`
(default 0.2). History: every `log_every` iterations, the mean loss and natural accuracy of that block,
the mask statistics and every mask value (`mask/<layer>/<channel>`).
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
                                       mask_scores, sgd_step, split_before, step_signature)
from defense.data.arrays import shift_images
from defense.pruning import bn_pairing

NEEDS_DATA = True
log = logging.getLogger(__name__)

DEFAULTS = {"eps": 0.4, "steps": 1, "alpha": 0.2, "lr": 0.2, "momentum": 0.9, "iterations": 2000,
            "batch_size": 128, "threshold": 0.2, "log_every": 100}
BN_ZERO = ("gamma",)  # prune_neuron_cifar.py: the pruned channel's BN weight := 0


def settings(prune_cfg) -> dict:
    """`prune.anp` with the defaults filled in, every bound checked (DefenseError naming the key)."""
    given = prune_cfg.get("anp") or {}
    s = {k: given.get(k, v) if given.get(k, None) is not None else v for k, v in DEFAULTS.items()}
    whole = lambda v: float(v).is_integer()  # noqa: E731
    _bound("prune.anp.eps", s["eps"], lambda v: v >= 0, "a perturbation bound >= 0, e.g. prune.anp.eps=0.4")
    _bound("prune.anp.steps", s["steps"], lambda v: v >= 1 and whole(v), "a whole number of steps >= 1, e.g. 1")
    _bound("prune.anp.alpha", s["alpha"], lambda v: 0 <= v <= 1, "a weight in [0, 1], e.g. prune.anp.alpha=0.2")
    _bound("prune.anp.lr", s["lr"], lambda v: v > 0, "a learning rate > 0, e.g. prune.anp.lr=0.2")
    _bound("prune.anp.momentum", s["momentum"], lambda v: 0 <= v < 1, "a momentum in [0, 1), e.g. 0.9")
    _bound("prune.anp.iterations", s["iterations"], lambda v: v >= 1 and whole(v),
           "a whole number of iterations >= 1, e.g. prune.anp.iterations=2000")
    _bound("prune.anp.batch_size", s["batch_size"], lambda v: v >= 1 and whole(v),
           "a whole number of images >= 1, e.g. prune.anp.batch_size=128")
    _bound("prune.anp.threshold", s["threshold"], lambda v: 0 <= v <= 1,
           "a mask threshold in [0, 1], e.g. prune.anp.threshold=0.2")
    _bound("prune.anp.log_every", s["log_every"], lambda v: v >= 1 and whole(v),
           "a whole number of iterations >= 1, e.g. prune.anp.log_every=100")
    for key in ("steps", "iterations", "batch_size", "log_every"):
        s[key] = int(s[key])
    for key in ("eps", "alpha", "lr", "momentum", "threshold"):
        s[key] = float(s[key])
    data_settings(given, "anp", s)
    return s


def check_config(prune_cfg) -> None:
    settings(prune_cfg)


def bn_units(model, layers: list[str], cfg) -> dict[str, str]:
    """{conv: BatchNormalization} of the layers whose masks sit on a BN (`prune.anp.level`)."""
    return bn_pairing.bn_units(model, layers, settings(cfg.prune)["level"], "prune.anp.level")


class MaskLearner:
    """The masks, the perturbations and the one compiled training step of ANP.

    network: what a step runs, the whole model (its inputs are images) or the suffix of it from the
    first masked layer's input (its inputs are the prefix's outputs; defense.criteria._masking.split_before).
    jit_compile: compile the step with XLA (experiments/jit_timing.py measures both ways)."""

    def __init__(self, model, layers: list[str], s: dict, seed: int, network=None, bn_units: dict | None = None,
                 jit_compile: bool = False):
        self.model, self.s = model, s
        self.masks = ChannelMasks(model, layers, network, bn_units)
        zeros = [tf.zeros_like(m) for m in self.masks.masks]
        self.noise_w = [tf.Variable(z, trainable=False) for z in zeros]
        self.noise_b = [tf.Variable(z, trainable=False) for z in zeros]
        self.velocity = [tf.Variable(z, trainable=False) for z in zeros]
        self.rng = tf.random.Generator.from_seed(int(seed))
        # jit_compile: XLA, measured slower than the plain graph for this step on CPU
        # (python experiments/jit_timing.py -> experiments/results/jit_timing.md), so off by default
        self._step = tf.function(self._train_step, input_signature=step_signature(self.masks.network),
                                 jit_compile=jit_compile)

    def _train_step(self, x, y):
        s, masks = self.s, self.masks
        eps = s["eps"]
        if eps > 0:
            # the perturbation that most increases the loss, from a random start (optimize_mask_cifar.py, step 1)
            for n in self.noise_w + self.noise_b:
                n.assign(self.rng.uniform(tf.shape(n), -eps, eps))
            for _ in range(s["steps"]):
                with tf.GradientTape() as tape:
                    tape.watch(self.noise_w + self.noise_b)
                    loss = cross_entropy(self.model, y, masks.forward(x, True, self.noise_w, self.noise_b))
                grads = tape.gradient(loss, self.noise_w + self.noise_b)
                for i, (n, g) in enumerate(zip(self.noise_w + self.noise_b, grads)):
                    if g is None:  # a conv without bias (or a BN without beta) has no bias perturbation
                        continue
                    stepped = n + (eps / s["steps"]) * tf.sign(g)
                    on_bn = masks.bns[i % len(self.noise_w)] is not None
                    n.assign(stepped if on_bn else tf.clip_by_value(stepped, -eps, eps))
        # the masks: natural and perturbed loss (step 2)
        with tf.GradientTape() as tape:
            tape.watch(masks.masks)
            out = masks.forward(x)
            loss_nat = cross_entropy(self.model, y, out)
            if eps > 0:
                loss_rob = cross_entropy(self.model, y, masks.forward(x, True, self.noise_w, self.noise_b))
            else:
                loss_rob = 0.0
            loss = s["alpha"] * loss_nat + (1.0 - s["alpha"]) * loss_rob
        grads = tape.gradient(loss, masks.masks)
        sgd_step(masks.masks, grads, self.velocity, s["lr"], s["momentum"])
        masks.clip()
        return loss, correct(y, out)

    def step(self, x: np.ndarray, y: np.ndarray):
        """One iteration on the batch (x, y) of clean validation images (or their prefix outputs, where the
        learner runs a suffix); (loss, correct predictions)."""
        loss, hits = self._step(tf.convert_to_tensor(x), tf.convert_to_tensor(y))
        return float(loss), float(hits)


def learn_masks(model, layers: list[str], x: np.ndarray, y: np.ndarray, s: dict, seed: int):
    """Run ANP's mask learning on the scaled clean images (x, y); the learner (its masks) and the history rows.

    With the conv adaptation, the layers before the first masked one carry no mask and the network runs
    in inference mode, so their outputs are computed once per image (`split_before`) and each iteration
    runs only the rest. With masks on BatchNormalization layers the network runs in training mode (batch
    statistics everywhere), so it runs whole."""
    units = bn_pairing.bn_units(model, layers, s.get("level", "auto"), "prune.anp.level")
    shift = batch_shift(s, x, bool(units))  # random translations per batch (the references' RandomCrop)
    whole = units or shift
    prefix, network = (None, model) if whole else split_before(model, layers, x[: min(len(x), 8)])
    if prefix is not None:
        x = np.concatenate([np.asarray(prefix(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
    learner = MaskLearner(model, layers, s, seed, network, units)
    rng = np.random.default_rng(seed)
    history, losses, hits, seen = [], [], 0.0, 0
    started = time.perf_counter()
    good = [m.numpy() for m in learner.masks.masks]
    for it in range(1, s["iterations"] + 1):
        interrupt.check()  # a safe point between iterations (defense/core/interrupt.py)
        index = rng.integers(0, len(x), size=s["batch_size"])  # with replacement, as RandomSampler
        batch = shift_images(x[index], shift, rng) if shift else x[index]
        loss, ok = learner.step(batch, y[index])
        reason = divergence(loss)  # the one rule of every learning loop (defense/core/divergence.py)
        if reason is not None:  # keep the masks of the last finite iteration, and say where it broke
            for mask, value in zip(learner.masks.masks, good):
                mask.assign(value)
            history.append({"step": it, "diverged": 1.0, "seconds": time.perf_counter() - started})
            log.warning("warning: ANP's mask learning diverged at iteration %d (%s); the masks of iteration %d are "
                        "kept and the run's rows are marked diverged; lower prune.anp.lr or prune.anp.eps", it, reason,
                        it - 1)
            return learner, history
        good = [m.numpy() for m in learner.masks.masks]
        losses.append(loss)
        hits, seen = hits + ok, seen + len(index)
        if it % s["log_every"] == 0 or it == s["iterations"]:
            row = {"step": it, "loss": float(np.mean(losses)), "accuracy": 100.0 * hits / seen,
                   **learner.masks.stats(s["threshold"]), "seconds": time.perf_counter() - started}
            history.append(row)
            log.info("ANP iteration %d: loss %.4f, accuracy %.2f %%, mask mean %.3f, %d masks <= %g",
                     it, row["loss"], row["accuracy"], row["mask_mean"], row["masks_to_prune"], s["threshold"])
            losses, hits, seen = [], 0.0, 0
    reason = divergence(None, history[-1]["accuracy"], int(model.outputs[0].shape[-1])) if history else None
    if reason is not None:
        history[-1]["diverged"] = 1.0
        log.warning("warning: ANP's mask learning collapsed by iteration %d (%s); the run's rows are marked diverged",
                    history[-1]["step"], reason)
    return learner, history


def score(model, layers: list[str], clean, cfg, divisor: float) -> Scores:
    """ANP's masks on `layers`, learned from the clean validation data `clean` only."""
    s = settings(cfg.prune)
    seed = int(cfg.prune.get("seed", 0))
    units = bn_pairing.bn_units(model, layers, s["level"], "prune.anp.level")
    x, y = clean_subset(clean, s["images"], s["fraction"], seed, divisor, "prune.criterion=anp",
                        cfg.model.get("num_classes") if "model" in cfg else None)
    variant = bn_pairing.variant(units, layers)
    log.info("ANP (%s): learning %d masks on %s from %d clean validation images (%d iterations of %d)", variant,
             sum(model.get_layer(n).filters for n in layers),
             ", ".join(f"{n} ({units[n]})" if n in units else n for n in layers), len(x), s["iterations"],
             s["batch_size"])
    learner, history = learn_masks(model, layers, x, y, s, seed)
    masks = learner.masks.values("prune.anp.lr or prune.anp.eps")
    scores = mask_scores(masks, s["threshold"], history)
    scores.bn_units, scores.bn_zero, scores.variant = units, BN_ZERO, variant
    scores.augmentation = augmentation(batch_shift(s, x, bool(units)))
    return scores
