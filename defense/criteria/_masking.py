"""Learned per-channel masks on Conv2D layers or their BatchNormalization, without touching the network's
weights (ANP and RNP).

With a BatchNormalization paired with the conv (defense.pruning.bn_pairing), the mask sits where the
references put it: on the BN's scale, gamma_k * m_k (RNP's MaskBatchNorm2d), and ANP's perturbations
enter as gamma_k * (m_k + d_k) and beta_k * (1 + e_k) (ANP's NoisyBatchNorm2d); the network then runs
in training mode (BN with batch statistics), as the references' model.train(). Without one (DeepID), the
conv adaptation below.

A mask m_k in [0, 1] scales output channel k of a masked Conv2D as a whole, kernel and bias:
z_k = m_k * (W_k * x) + m_k * b_k, so m_k = 0 is exactly what pruning the channel does in this framework
(defense.nets.models.pruned_copy zeroes its kernel and bias). ANP's multiplicative perturbations enter as
z_k = (m_k + d_k) * (W_k * x) + (m_k + e_k) * b_k. The masked network is the suspect network itself, read
through `keras.StatelessScope`: inside the scope its kernels and biases read as the masked values (and,
for RNP, every trainable variable as its unlearned copy), so the network's own variables are never
assigned, and one compiled `tf.function` step serves every iteration.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from defense.nets.models import scale_pixels, uses_logits  # noqa: F401  (uses_logits: ANP's and RNP's losses)


def cross_entropy(model, y, out) -> tf.Tensor:
    """Mean cross-entropy of integer labels `y` (the softmax's logits are used where there is one)."""
    return tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, out, from_logits=uses_logits(model)))


def correct(y, out) -> tf.Tensor:
    return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(out, axis=-1), tf.cast(y, tf.int64)), tf.float32))


def step_signature(network):
    """One input signature for every batch size: one trace per compiled step."""
    shape = [None, *[int(s) for s in network.input_shape[1:]]]
    return [tf.TensorSpec(shape, tf.float32), tf.TensorSpec([None], tf.int64)]


def split_before(model, layers: list[str], probe: np.ndarray):
    """(prefix, suffix): the network cut at the input of the earliest of `layers` in the network, so that
    masks on `layers` act only in `suffix` and the prefix's outputs can be computed once per image.

    The suffix shares the network's layers (and variables). Where the cut does not separate the graph
    (a path to the output bypasses it) or suffix(prefix(probe)) differs from the network on the probe
    images, the prefix is None and the suffix is the whole network."""
    position = {layer.name: i for i, layer in enumerate(model.layers)}
    first = model.get_layer(min(layers, key=lambda name: position[name]))  # the earliest, whatever the list order
    if len(model.inputs) != 1 or first.input is model.inputs[0]:
        return None, model
    try:
        prefix = keras.Model(model.inputs[0], first.input)
        suffix = keras.Model(first.input, model.outputs)
        whole = np.asarray(model(probe, training=False))
        cut = np.asarray(suffix(prefix(probe, training=False), training=False))
    except Exception:  # noqa: BLE001 - any failure to cut: use the whole network
        return None, model
    if not set(layers) <= {layer.name for layer in suffix.layers}:
        return None, model
    if whole.shape != cut.shape or not np.allclose(whole, cut, rtol=1e-4, atol=1e-5):
        return None, model
    return prefix, suffix


class ChannelMasks:
    """One mask variable per output channel of each Conv2D in `layers`, all ones at first.

    base: optional {id(variable): tf.Variable} of replacement values for the network's variables (RNP's
    unlearned copy); masked kernels and biases scale those replacements.
    bn_units: {conv: BatchNormalization name} of the convs whose mask sits on their BN's gamma; with any,
    forward() runs the network in training mode (batch statistics), as the references' model.train()."""

    def __init__(self, model, layers: list[str], network=None, bn_units: dict | None = None):
        self.model = model
        self.network = model if network is None else network  # what forward() runs: model or a suffix of it
        self.layers = list(layers)
        self.bn_units = dict(bn_units or {})
        self.training = bool(self.bn_units)
        self.convs = [model.get_layer(name) for name in self.layers]
        self.bns = [model.get_layer(self.bn_units[name]) if name in self.bn_units else None for name in self.layers]
        self.masks = [tf.Variable(tf.ones([int(conv.filters)]), trainable=False, name=f"mask_{name}")
                      for name, conv in zip(self.layers, self.convs)]
        self.base: dict[int, tuple] = {}

    def use_base(self, variables, copies) -> None:
        self.base = {id(v): (v, c) for v, c in zip(variables, copies)}

    def _read(self, variable):
        return tf.convert_to_tensor(self.base[id(variable)][1] if id(variable) in self.base else variable)

    def mapping(self, masked: bool = True, noise_w=None, noise_b=None) -> list:
        """(variable, value) pairs for keras.StatelessScope."""
        pairs, done = [], set()
        if masked:
            for i, conv in enumerate(self.convs):
                bn = self.bns[i]
                if bn is not None:  # anp_batchnorm.py: weight * (mask + noise), bias * (1 + noise_bias)
                    coeff = self.masks[i] if noise_w is None else self.masks[i] + noise_w[i]
                    pairs.append((bn.gamma, self._read(bn.gamma) * coeff))
                    done.add(id(bn.gamma))
                    if bn.beta is not None and noise_b is not None:
                        pairs.append((bn.beta, self._read(bn.beta) * (1.0 + noise_b[i])))
                        done.add(id(bn.beta))
                    continue
                coeff = self.masks[i] if noise_w is None else self.masks[i] + noise_w[i]
                pairs.append((conv.kernel, self._read(conv.kernel) * coeff))
                done.add(id(conv.kernel))
                if conv.bias is not None:
                    coeff_b = self.masks[i] if noise_b is None else self.masks[i] + noise_b[i]
                    pairs.append((conv.bias, self._read(conv.bias) * coeff_b))
                    done.add(id(conv.bias))
        pairs += [(v, tf.convert_to_tensor(c)) for key, (v, c) in self.base.items() if key not in done]
        return pairs

    def forward(self, x, masked: bool = True, noise_w=None, noise_b=None):
        with keras.StatelessScope(state_mapping=self.mapping(masked, noise_w, noise_b)):
            return self.network(x, training=self.training)

    def clip(self) -> None:
        for m in self.masks:
            m.assign(tf.clip_by_value(m, 0.0, 1.0))

    def values(self, what: str = "") -> dict[str, np.ndarray]:
        """The masks per layer; a DefenseError when the learning diverged (a mask is NaN), naming `what` to lower."""
        from defense.core.errors import DefenseError

        values = {name: m.numpy().astype(np.float64) for name, m in zip(self.layers, self.masks)}
        if not all(np.all(np.isfinite(v)) for v in values.values()):
            raise DefenseError(f"the mask learning diverged (a mask is NaN); lower {what or 'the learning rates'}")
        return values

    def stats(self, threshold: float) -> dict:
        """Mean and minimum mask value, how many channels the operating point would prune (mask <= `threshold`),
        and every mask value, as `mask/<layer>/<channel>`."""
        values = [m.numpy() for m in self.masks]
        every = np.concatenate(values)
        row = {"mask_mean": float(every.mean()), "mask_min": float(every.min()),
               "masks_to_prune": int((every <= threshold).sum())}
        for name, v in zip(self.layers, values):
            row.update({f"mask/{name}/{c}": float(m) for c, m in enumerate(v)})
        return row


def sgd_step(variables, grads, velocity, lr, momentum: float, weight_decay: float = 0.0) -> None:
    """torch.optim.SGD's update (the reference codes' optimizer): g += wd * p; v = mu * v + g; p -= lr * v."""
    for p, g, v in zip(variables, grads, velocity):
        if weight_decay:
            g = g + weight_decay * p
        v.assign(momentum * v + g)
        p.assign_sub(lr * v)


def clean_subset(clean, images: int | None, fraction: float | None, seed: int, divisor: float, what: str,
                 num_classes: int | None = None):
    """A seeded choice of the clean validation images, scaled for the network; (x, y).

    `images` of them (capped by how many there are), or, where `fraction` is given instead, that share of
    them (at least one)."""
    from defense.core.errors import DefenseError

    if clean is None or len(clean) == 0:
        raise DefenseError(f"{what} learns its masks from clean validation data, and there is none; give a data set "
                           "with clean validation images")
    if fraction is not None:
        n = max(1, int(round(fraction * len(clean))))
    else:
        n = min(int(images), len(clean))
    if num_classes is not None and n < int(num_classes):
        import logging

        logging.getLogger(__name__).warning("warning: %s learns from %d clean validation images, fewer than the %d "
                                            "classes", what, n, int(num_classes))
    index = np.sort(np.random.default_rng(seed).choice(len(clean), size=n, replace=False))
    return scale_pixels(clean.x[index], divisor), np.asarray(clean.y[index], np.int64)


def data_settings(given, name: str, s: dict) -> None:
    """`prune.<name>.images`, `.fraction` and `.level` into `s`, checked (a DefenseError naming the key).

    images: how many clean validation images learn the masks (>= 1; default 500, the references' count:
    ANP's --val-frac 0.01 and RNP's 1 % of CIFAR-10's 50,000 training images), capped by what the
    defender has. fraction: the former option, still honoured when set explicitly (it then replaces
    images). level: auto, bn or conv (defense.pruning.bn_pairing)."""
    from defense.config import bound
    from defense.pruning.bn_pairing import check_level

    images = given.get("images", None)
    s["images"] = 500 if images is None else images
    bound(f"prune.{name}.images", s["images"], lambda v: v >= 1 and float(v).is_integer(),
          f"a whole number of clean validation images >= 1, e.g. prune.{name}.images=500")
    s["images"] = int(s["images"])
    fraction = given.get("fraction", None)
    if fraction is not None:
        bound(f"prune.{name}.fraction", fraction, lambda v: 0 < v <= 1,
              f"a fraction of the clean validation data in (0, 1], e.g. prune.{name}.fraction=0.05, or give "
              f"prune.{name}.images instead")
        fraction = float(fraction)
    s["fraction"] = fraction
    s["level"] = check_level(f"prune.{name}.level", given.get("level", None) or "auto")
    shift = given.get("shift", None)
    if shift is not None:
        bound(f"prune.{name}.shift", shift, lambda v: v >= 0 and float(v).is_integer(),
              f"a whole number of pixels >= 0, e.g. prune.{name}.shift=4, or null (4 px per 32 with BN masks, "
              "else 0)")
        shift = int(shift)
    s["shift"] = shift


def batch_shift(s: dict, x: np.ndarray, on_bn: bool) -> int:
    """The random translation (pixels) of every training batch: `shift`, or, null, the references'
    RandomCrop(32, padding=4) scaled to the image width (round(4 * width / 32)) when the masks sit on
    BatchNormalization layers (the reference variant), and 0 for the conv adaptation (as before: its
    prefix outputs are computed once per image). No horizontal flip: the references' RandomHorizontalFlip
    is for CIFAR-10, and mirrored digits are other symbols."""
    if s.get("shift") is not None:
        return int(s["shift"])
    return int(round(4 * x.shape[2] / 32)) if on_bn and x.ndim == 4 else 0


def augmentation(shift: int) -> str:
    """The `augmentation` tag and summary.csv column of ANP and RNP: what their learning did to the clean images,
    naming the adaptation of the references' transform_train (RandomCrop(32, padding=4) and RandomHorizontalFlip
    on CIFAR-10)."""
    crop = f"random shifts up to {shift} px (the references' RandomCrop)" if shift else "no random shifts"
    return f"{crop}; no horizontal flip (adapted: a mirrored digit or face is another image)"


def mask_scores(masks: dict, threshold: float, history):
    """The Scores of a learned channel mask (ANP, RNP): score 1 - mask, so the lowest masks are pruned
    first; own operating point: the channels whose mask is <= threshold (as both reference pruning
    scripts compare); the masks as a column of channel_scores.csv."""
    from defense.criteria import Scores

    return Scores(
        values={n: 1.0 - m for n, m in masks.items()},
        prune_first="high",
        operating_point={n: [int(c) for c in np.flatnonzero(m <= threshold)] for n, m in masks.items()},
        columns={"mask": masks},
        history=history,
    )
