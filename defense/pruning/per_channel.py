"""Which Keras layers keep the pruned channels separate: the one rule of `defense.pruning.masked` and `defense.compact`.

Pruning output channel c of a conv layer (kernel and bias set to zero) makes that channel the constant
act(0) at every position. Both the masked sweep and the compact export follow that constant through
the layers after the pruned one, as long as each layer

- keeps every channel on one axis and computes each output channel from the same input channel only,
- and turns a constant channel into a constant channel.

`channel_rule(layer, rank, axis)` says, for a layer whose input has `rank` axes (batch included) and
carries the pruned layer's channels on `axis`, which of these it is:

`PASS`        the value is unchanged on a constant channel: pooling, global pooling, cropping,
              nearest/bilinear up-sampling, dropout and noise layers (inactive at inference),
              Identity, ActivityRegularization;
`MAP`         element-wise or per-channel: the constant becomes another constant, found by calling the
              layer on it (`ChannelRule.constants`): Activation with an element-wise function (e.g.
              sigmoid(0) = 0.5), ReLU, LeakyReLU, ELU, PReLU with its slopes shared over every axis but
              the channels, Rescaling by scalars, BatchNormalization over the channel axis
              (BN(act(0)) = gamma * (act(0) - mean) / sqrt(var + eps) + beta, per channel);
`ZERO_PAD`    zero padding: per channel, but the padded border is 0, so a pruned channel stays
              constant only while its constant is 0 (e.g. after ReLU);
`MIXING`      everything else: softmax / log_softmax / GLU / sparsemax (over the channel axis, the
              pruned channel changes the others), a Softmax layer, BatchNormalization over another axis
              or several axes (the constant becomes a different value at each position of that axis),
              LayerNormalization, GroupNormalization, channels-first layers on a channels-last tensor,
              and any layer type this module does not know (subclasses included).

The linear consumers that read the channels (Conv2D, Dense) and Flatten are not per-channel layers:
the callers handle them (they are sliced or split per input channel there).

    rule = channel_rule(layer, rank=4, axis=3)
    if rule.per_channel:
        k_after = rule.constants(layer, k_before)   # None: the layer does not keep the constants constant
    else:
        raise DefenseError(f"{layer.name} ... {rule.what}")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PASS = "pass"
MAP = "map"
ZERO_PAD = "zero padding"
MIXING = "mixing"

# keras.activations that act on each element alone (looked up by identity, never by a name the model gives)
ELEMENTWISE_ACTIVATIONS = (
    "celu", "elu", "exponential", "gelu", "hard_shrink", "hard_sigmoid", "hard_silu", "hard_swish", "hard_tanh",
    "leaky_relu", "linear", "log_sigmoid", "mish", "relu", "relu6", "selu", "sigmoid", "silu", "soft_shrink",
    "softplus", "softsign", "sparse_plus", "sparse_sigmoid", "squareplus", "swish", "tanh", "tanh_shrink",
)

_POOLING = {
    "MaxPooling1D": 3, "MaxPooling2D": 4, "MaxPooling3D": 5,
    "AveragePooling1D": 3, "AveragePooling2D": 4, "AveragePooling3D": 5,
}
_GLOBAL_POOLING = {
    "GlobalMaxPooling1D": 3, "GlobalMaxPooling2D": 4, "GlobalMaxPooling3D": 5,
    "GlobalAveragePooling1D": 3, "GlobalAveragePooling2D": 4, "GlobalAveragePooling3D": 5,
}
_RESAMPLING = {  # spatial layers with a data_format (Cropping1D / UpSampling1D have none: channels last)
    "Cropping1D": 3, "Cropping2D": 4, "Cropping3D": 5, "UpSampling1D": 3, "UpSampling2D": 4, "UpSampling3D": 5,
}
_ZERO_PADDING = {"ZeroPadding1D": 3, "ZeroPadding2D": 4, "ZeroPadding3D": 5}
# identity at inference, on any tensor
_INFERENCE_IDENTITY = (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise", "GaussianDropout",
    "AlphaDropout", "Identity", "ActivityRegularization",
)
_ELEMENTWISE_LAYERS = ("ReLU", "LeakyReLU", "ELU")


@dataclass(frozen=True)
class ChannelRule:
    """What one layer does to the pruned layer's channels (see the module docstring)."""

    kind: str  # PASS, MAP, ZERO_PAD or MIXING
    rank: int  # rank of the layer's input (batch included)
    axis: int  # the channels' axis in the input (non-negative)
    out_axis: int | None  # the channels' axis in the output; None when MIXING
    what: str  # the layer's effect in words, for messages: "max pooling", "softmax over the channel axis", ...

    @property
    def per_channel(self) -> bool:
        return self.kind != MIXING

    def constants(self, layer, k: np.ndarray) -> np.ndarray | None:
        """The constant of each channel after `layer`, from `k`, the constants before it.

        `k` holds one value per index of the channel axis (shape (C,), or (P, C) for the channels-last
        Flatten of P positions: the flattened axis). Returns float64 of k's shape, or None when some
        channel does not stay constant (zero padding of a non-zero constant). MIXING layers: None.
        """
        k = np.asarray(k, np.float64)
        if self.kind == PASS:
            return k
        if self.kind == ZERO_PAD:
            return k if not np.any(k != 0) else None
        if self.kind != MAP:
            return None
        import tensorflow as tf

        shape = [1] * self.rank
        shape[self.axis] = int(k.size)
        out = layer(tf.constant(k.reshape(shape), tf.float32), training=False)
        return np.asarray(out, np.float64).reshape(k.shape)


def is_elementwise_activation(fn) -> bool:
    """Whether `fn` is one of the keras.activations that act on each element alone (not softmax, glu, ...)."""
    import keras

    for name in ELEMENTWISE_ACTIVATIONS:
        try:
            if fn is keras.activations.get(name):
                return True
        except ValueError:  # an activation this Keras version does not have
            continue
    return False


def activation_name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _axes(value, rank: int) -> list[int]:
    values = [value] if isinstance(value, int) else list(value)
    return sorted({int(a) % rank for a in values})


def _layer_channel_axis(layer, rank: int) -> int:
    """The axis a spatial layer treats as its channels (its data_format; channels last when it has none)."""
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else rank - 1


def channel_rule(layer, rank: int, axis: int = -1) -> ChannelRule:
    """The rule for `layer` reading a tensor of `rank` axes whose axis `axis` holds the pruned layer's channels."""
    import keras

    rank = int(rank)
    axis = int(axis) % rank
    kind = type(layer).__name__
    known = getattr(keras.layers, kind, None) is type(layer)  # exactly a Keras layer class, not a subclass

    def rule(k, what, out_axis=axis):
        return ChannelRule(k, rank, axis, out_axis if k != MIXING else None, what)

    def mixing(what):
        return rule(MIXING, what)

    if not known:
        return mixing(f"a {kind} layer, which is not known to keep each channel separate")
    if axis == 0:
        return mixing("the channels are on the batch axis")

    if kind in _INFERENCE_IDENTITY:
        return rule(PASS, f"{kind} (identity at inference)")

    if kind in _POOLING or kind in _GLOBAL_POOLING or kind in _RESAMPLING or kind in _ZERO_PADDING:
        expected = {**_POOLING, **_GLOBAL_POOLING, **_RESAMPLING, **_ZERO_PADDING}[kind]
        if rank != expected:
            return mixing(f"{kind} on a tensor of rank {rank}")
        if _layer_channel_axis(layer, rank) != axis:
            return mixing(f"{kind} with data_format={getattr(layer, 'data_format', None)!r} pools or moves the "
                          f"channel axis {axis}")
        if kind in _GLOBAL_POOLING:
            out_axis = axis if getattr(layer, "keepdims", False) else 1
            return rule(PASS, f"{kind} (global pooling, per channel)", out_axis)
        if kind == "UpSampling2D" and layer.interpolation not in ("nearest", "bilinear"):
            return mixing(f"UpSampling2D with interpolation={layer.interpolation!r} (only nearest and bilinear "
                          "keep a constant exactly)")
        if kind in _ZERO_PADDING:
            return rule(ZERO_PAD, f"{kind} (the border is 0: a channel stays constant only when its constant is 0)")
        return rule(PASS, f"{kind} (per channel)")

    if kind == "Activation":
        name = activation_name(layer.activation)
        if is_elementwise_activation(layer.activation):
            return rule(MAP, f"element-wise activation {name}")
        return mixing(f"activation {name}, which is not element-wise (it mixes the channels)")
    if kind in _ELEMENTWISE_LAYERS:
        return rule(MAP, f"{kind} (element-wise)")
    if kind == "Softmax":
        axes = _axes(layer.axis, rank)
        where = "the channel axis" if axes == [axis] else f"axes {axes}"
        return mixing(f"softmax over {where}")
    if kind == "PReLU":
        shared = set(_axes(layer.shared_axes or [], rank))
        if shared >= set(range(1, rank)) - {axis}:
            return rule(MAP, "PReLU with one slope per channel")
        return mixing(
            f"PReLU with slopes that vary along other axes than the channels (shared_axes={layer.shared_axes})"
        )
    if kind == "Rescaling":
        if np.ndim(layer.scale) == 0 and np.ndim(layer.offset) == 0:
            return rule(MAP, "Rescaling by scalars")
        return mixing("Rescaling by arrays")
    if kind == "BatchNormalization":
        axes = _axes(layer.axis, rank)
        if axes == [axis]:
            return rule(MAP, "BatchNormalization over the channel axis")
        return mixing(f"BatchNormalization over axis {layer.axis}, not the channel axis {axis} (a pruned channel's "
                      "constant becomes a different value along that axis)")
    if kind in ("LayerNormalization", "GroupNormalization", "UnitNormalization"):
        return mixing(f"{kind} (normalises across positions or channels)")
    return mixing(f"a {kind} layer, which is not known to keep each channel separate")
