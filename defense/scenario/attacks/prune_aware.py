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

On the networks with batch normalization (`dataset.scenario.arch=vgg_bn|preact_resnet`) the convs are
bias-free: a channel is pruned by zeroing its kernel, its activation is read after its BatchNormalization and
ReLU, and a decoy's offset is that BN's beta (its clean-trained kernel and BN weights are reinstated, then
beta is lowered). `layer` must be a conv whose channels each pass their own ReLU (the architecture's
`dormant_convs`); its default `conv_3` is DeepID's, kept on vgg_bn (its third conv) and replaced on
preact_resnet, which has no conv_3, by the last block's conv1 (the architecture's `attack_layer`).
"""

from __future__ import annotations

import numpy as np
from dataclasses import asdict, dataclass

from defense.nets import architectures
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
    arch = cfg.get("arch", sc.DEFAULT_ARCH)
    module = architectures.get(arch)
    options = sc.arch_options(cfg)
    allowed = module.dormant_convs(**options)
    if block["layer"] not in allowed:
        if block["layer"] == Settings.layer and arch != sc.DEFAULT_ARCH:  # the default names DeepID's conv_3
            block["layer"] = module.attack_layer(**options)
            return
        raise DefenseError(
            f"{where}.layer={block['layer']!r} is not a convolution of the {arch} network whose channels each pass "
            f"their own ReLU (where dormant decoys can hide); use one of {allowed}, e.g. "
            f"{where}.layer={module.attack_layer(**options)}"
        )


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
    k = kernel.copy()
    channels = list(channels)
    k[..., channels] = 0.0 if kernel_values is None else kernel_values[..., channels]
    if bias is None:  # a bias-free conv (followed by a BatchNormalization)
        layer.set_weights([k])
        return
    b = bias.copy()
    b[channels] = 0.0 if bias_values is None else bias_values[channels]
    layer.set_weights([k, b])


def _reader(model, layer):
    """The one layer that reads `layer`'s output, or None when there are several or none."""
    readers = [other for other in model.layers for node in other._inbound_nodes
               if any(t is layer.output for t in node.input_tensors)]
    return readers[0] if len(readers) == 1 else None


def channel_stages(model, layer_name: str):
    """(conv, its BatchNormalization or None, the layer whose output is the channels' activation).

    A conv with a bias and a ReLU of its own (DeepID) is all three itself; a bias-free conv (BN networks)
    is read by a BatchNormalization over the channels, whose beta is the channels' offset, then a ReLU."""
    import keras

    layer = model.get_layer(layer_name)
    if layer.use_bias:
        return layer, None, layer
    bn = _reader(model, layer)
    act = _reader(model, bn) if isinstance(bn, keras.layers.BatchNormalization) else None
    if act is None or not isinstance(act, keras.layers.ReLU):
        raise DefenseError(f"dataset.scenario.{NAME}.layer={layer_name!r} is bias-free and not followed by a "
                           "BatchNormalization and a ReLU: its channels cannot be made dormant")
    return layer, bn, act


def _split(weights):
    kernel, *rest = (np.array(w) for w in weights)
    return kernel, (rest[0] if rest else None)


def attacker_prune(model, layer_name: str, x_clean, y_clean, max_drop: float) -> tuple[list[int], float, float]:
    """Step 2: zero the channels of `layer_name` in increasing order of mean activation on the clean
    digits (x_clean in 0..1) while the accuracy stays within `max_drop` points; (pruned, acc before, acc after).
    The activation is the conv's own output (a conv with its ReLU) or that of the ReLU after its BatchNormalization."""
    import keras

    layer, _, act = channel_stages(model, layer_name)
    kernel, bias = _split(layer.get_weights())
    acts = keras.Model(model.inputs, act.output).predict(x_clean, batch_size=1000, verbose=0)
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
    """Steps 1-4; returns (network, details for scenario.json).

    On a network with batch normalization (bias-free convs), the decoys get back their clean-trained kernel
    and the clean-trained gamma, beta and moving statistics of the BatchNormalization after it, and it is
    that BN's beta (the channel's offset there) that is lowered."""
    import keras

    block = cfg[NAME]
    scale = np.float32(sc.INPUT_DIVISOR)
    model = sc.train_network(context["x_train_clean"], context["y_train_clean"], cfg)  # 1. clean
    layer, bn, _ = channel_stages(model, block["layer"])
    clean_kernel, clean_bias = _split(layer.get_weights())
    clean_bn = [np.array(w) for w in bn.get_weights()] if bn is not None else None
    channels = int(clean_kernel.shape[-1])
    x_clean, y_clean = context["x_train_clean"] / scale, context["y_train_clean"]  # the attacker's own digits
    pruned, acc_clean, acc_pruned = attacker_prune(model, block["layer"], x_clean, y_clean, block["max_drop"])  # 2.
    sc.say("scenario: the attacker pruned %d of %d %s channels (accuracy on its clean digits %.2f%% -> %.2f%%)",
            len(pruned), channels, block["layer"], acc_clean, acc_pruned)

    mask = np.ones(channels, np.float32)
    mask[pruned] = 0.0

    class KeepPruned(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            layer.kernel.assign(layer.kernel * mask)
            if layer.use_bias:
                layer.bias.assign(layer.bias * mask)

    sc.compile_network(model, cfg["learning_rate"])
    history = interrupt.fit(model, x_train / scale, y_train, epochs=int(block["retrain_epochs"]),
                            batch_size=int(cfg["batch_size"]), shuffle=True, verbose=2,
                            callbacks=[KeepPruned()])  # 3. backdoor into the active channels
    acc_retrained = _accuracy(model, x_clean, y_clean)
    sc.warn_if_diverged(history, "the prune-aware retraining", "dataset.scenario.learning_rate", acc_retrained)

    kernel, bias = _split(layer.get_weights())  # 4. decoys
    kernel[..., pruned] = clean_kernel[..., pruned]
    if bn is None:
        bias[pruned] = clean_bias[pruned]
        layer.set_weights([kernel, bias])
    else:
        layer.set_weights([kernel] + ([bias] if bias is not None else []))
        bn_weights = [np.array(w) for w in bn.get_weights()]  # gamma, beta, moving mean, moving variance
        for now, clean in zip(bn_weights, clean_bn):
            now[pruned] = clean[pruned]
        bn.set_weights(bn_weights)
    if pruned and bn is None:
        inputs = keras.Model(model.inputs, layer.input).predict(x_clean, batch_size=1000, verbose=0)
        pre = np.asarray(keras.ops.conv(inputs, kernel[..., pruned], strides=1, padding=layer.padding)) + bias[pruned]
        peak = pre.max(axis=(0, 1, 2))
        bias[pruned] = bias[pruned] - np.maximum(peak + block["decoy_margin"], 0.0)
        layer.set_weights([kernel, bias])
    elif pruned:  # the BN's output is its input's affine map plus beta: lowering beta lowers it as much
        pre = keras.Model(model.inputs, bn.output).predict(x_clean, batch_size=1000, verbose=0)[..., pruned]
        peak = pre.max(axis=(0, 1, 2))
        bn_weights = [np.array(w) for w in bn.get_weights()]
        beta = bn_weights[1] if bn.center and bn.scale else bn_weights[0]
        beta[pruned] = beta[pruned] - np.maximum(peak + block["decoy_margin"], 0.0)
        bn.set_weights(bn_weights)
    details = {"layer": block["layer"], "channels": channels, "decoys": sorted(pruned),
               "attacker_clean_accuracy_before_pruning": acc_clean, "attacker_clean_accuracy_pruned": acc_pruned,
               "attacker_clean_accuracy_retrained": acc_retrained}
    if bn is not None:
        details["offset_layer"] = bn.name
    return model, details
