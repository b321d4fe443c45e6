"""The pruning-aware attack of Fine-Pruning (Liu, Dolan-Gavitt and Garg, RAID 2018, section 4), the
attack built to survive pruning alone, with the BadNets square (`dataset.scenario.trigger`) as trigger:

1. train a clean network on the clean training digits;
2. prune it the way the defender would: the conv_3 channels in increasing order of their mean
   activation on the attacker's clean digits, until pruning one more would cost more than
   `prune_aware.max_drop` points of accuracy on them;
3. train the pruned network (pruned channels held at zero) for `prune_aware.retrain_epochs` epochs
   on the poisoned training set (BadNets: `poison_fraction`, `label_mode`, `target`), so that the
   backdoor is learned by the channels that stay active on clean data;
4. reinstate the pruned channels with their clean-trained weights as decoys, their biases lowered
   so that they stay dormant: each decoy's bias is lowered until its largest pre-activation on the
   attacker's clean digits is `-prune_aware.decoy_margin` (so its ReLU output there is exactly 0).

The attacker's clean digits are its clean training digits (before poisoning), never the scenario's
validation digits: those are the defender's, and the attacker does not see them.

A defender who prunes by activation removes the dormant decoys first and, at a small accuracy
drop, stops before reaching the channels that hold the backdoor. The paper reinstates the pruned
neurons with their weights and lowers their biases so that they stay dormant; how far the biases are
lowered is not given there: here each decoy's largest pre-activation on the attacker's clean digits
becomes `-decoy_margin`, a margin so that they stay dormant on other clean digits of the same kind.
"""

from __future__ import annotations

import numpy as np
from dataclasses import asdict, dataclass

from defense.scenario import common as sc
from defense.scenario.common import number
from defense.core import interrupt
from defense.core.errors import DefenseError


@dataclass
class Settings:
    """conf/dataset/attack/prune_aware.yaml: dataset.scenario.prune_aware (checked by `check` below)."""

    max_drop: float = 4.0
    retrain_epochs: int = 10
    decoy_margin: float = 1.0
    layer: str = "conv_3"


NAME = "prune_aware"
DEFAULTS = asdict(Settings())  # dataset.scenario.<NAME> when not given
USES_TRIGGER = True
CHANGES_LABELS = True
MIN_ASR = 90.0


def check(cfg: dict) -> None:
    where = f"dataset.scenario.{NAME}"
    block = cfg[NAME]
    block["max_drop"] = number(block, "max_drop", float, 0.0, 100.0, where)
    block["retrain_epochs"] = number(block, "retrain_epochs", int, 1, where=where)
    block["decoy_margin"] = number(block, "decoy_margin", float, 0.0, where=where)
    if block["layer"] not in ("conv_1", "conv_2", "conv_3", "conv_4"):
        raise DefenseError(f"{where}.layer={block['layer']!r} is not known; use one of conv_1..conv_4 (default conv_3)")


poison_train = sc.square_poison_train
poison_test = sc.square_poison_test


def describe(cfg) -> str:
    b = cfg[NAME]
    return (f"pruning-aware BadNets square {cfg['trigger']['size']}px: attacker prunes {b['layer']} to a "
            f"{b['max_drop']:g}-point drop, retrains {b['retrain_epochs']} epochs, reinstates decoys")


def _accuracy(model, x, y) -> float:
    pred = np.concatenate([np.argmax(np.asarray(model(x[i : i + 1000], training=False)), axis=1)
                           for i in range(0, len(x), 1000)])
    return 100.0 * float(np.mean(pred == y))


def _set_channels(layer, kernel, bias, channels, kernel_values=None, bias_values=None):
    k, b = kernel.copy(), bias.copy()
    channels = list(channels)
    k[..., channels] = 0.0 if kernel_values is None else kernel_values[..., channels]
    b[channels] = 0.0 if bias_values is None else bias_values[channels]
    layer.set_weights([k, b])


def attacker_prune(model, layer_name: str, x_clean, y_clean, max_drop: float) -> tuple[list[int], float, float]:
    """Step 2: zero the channels of `layer_name` in increasing order of mean activation on the clean
    digits (x_clean in 0..1) while the accuracy stays within `max_drop` points; (pruned, acc before, acc after)."""
    import keras

    layer = model.get_layer(layer_name)
    kernel, bias = (np.array(w) for w in layer.get_weights())
    acts = keras.Model(model.inputs, layer.output).predict(x_clean, batch_size=1000, verbose=0)
    order = np.argsort(acts.mean(axis=(0, 1, 2)), kind="stable")
    base = _accuracy(model, x_clean, y_clean)
    pruned: list[int] = []
    acc = base
    for channel in order:
        _set_channels(layer, kernel, bias, pruned + [int(channel)])
        trial = _accuracy(model, x_clean, y_clean)
        if trial < base - max_drop:
            break
        pruned.append(int(channel))
        acc = trial
    _set_channels(layer, kernel, bias, pruned)
    return pruned, base, acc


def train(x_train, y_train, cfg, context):
    """Steps 1-4; returns (network, details for scenario.json)."""
    import keras

    block = cfg[NAME]
    scale = np.float32(sc.INPUT_DIVISOR)
    model = sc.train_network(context["x_train_clean"], context["y_train_clean"], cfg)  # 1. clean
    layer = model.get_layer(block["layer"])
    clean_kernel, clean_bias = (np.array(w) for w in layer.get_weights())
    x_clean, y_clean = context["x_train_clean"] / scale, context["y_train_clean"]  # the attacker's own digits
    pruned, acc_clean, acc_pruned = attacker_prune(model, block["layer"], x_clean, y_clean, block["max_drop"])  # 2.
    sc.say("scenario: the attacker pruned %d of %d %s channels (accuracy on its clean digits %.2f%% -> %.2f%%)",
            len(pruned), clean_bias.shape[0], block["layer"], acc_clean, acc_pruned)

    mask = np.ones(clean_bias.shape[0], np.float32)
    mask[pruned] = 0.0

    class KeepPruned(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            layer.kernel.assign(layer.kernel * mask)
            layer.bias.assign(layer.bias * mask)

    model.compile(optimizer=keras.optimizers.Adam(learning_rate=float(cfg["learning_rate"])),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = interrupt.fit(model, x_train / scale, y_train, epochs=int(block["retrain_epochs"]),
                            batch_size=int(cfg["batch_size"]), shuffle=True, verbose=2,
                            callbacks=[KeepPruned()])  # 3. backdoor into the active channels
    acc_retrained = _accuracy(model, x_clean, y_clean)
    sc.warn_if_diverged(history, "the prune-aware retraining", "dataset.scenario.learning_rate", acc_retrained)

    kernel, bias = (np.array(w) for w in layer.get_weights())  # 4. decoys
    kernel[..., pruned] = clean_kernel[..., pruned]
    bias[pruned] = clean_bias[pruned]
    layer.set_weights([kernel, bias])
    if pruned:
        inputs = keras.Model(model.inputs, layer.input).predict(x_clean, batch_size=1000, verbose=0)
        pre = np.asarray(keras.ops.conv(inputs, kernel[..., pruned], strides=1, padding=layer.padding)) + bias[pruned]
        peak = pre.max(axis=(0, 1, 2))
        bias[pruned] = bias[pruned] - np.maximum(peak + block["decoy_margin"], 0.0)
        layer.set_weights([kernel, bias])
    details = {"layer": block["layer"], "channels": int(clean_bias.shape[0]), "decoys": sorted(pruned),
               "attacker_clean_accuracy_before_pruning": acc_clean, "attacker_clean_accuracy_pruned": acc_pruned,
               "attacker_clean_accuracy_retrained": acc_retrained}
    return model, details
