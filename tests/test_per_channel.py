"""The per-channel rule (defense.per_channel) on each kind of layer, against answers worked out by hand.

The tensor has rank 4, channels last (axis 3), unless a test says otherwise.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from defense.pruning.per_channel import MAP, MIXING, PASS, ZERO_PAD, channel_rule, is_elementwise_activation

L = keras.layers


@pytest.mark.parametrize(
    "layer, kind, out_axis",
    [
        (L.MaxPooling2D(), PASS, 3),
        (L.AveragePooling2D(2, padding="same"), PASS, 3),  # the average leaves the padding out: a constant stays
        (L.Cropping2D(1), PASS, 3),
        (L.UpSampling2D(2), PASS, 3),
        (L.UpSampling2D(2, interpolation="bilinear"), PASS, 3),
        (L.GlobalAveragePooling2D(), PASS, 1),  # (B, H, W, C) -> (B, C)
        (L.GlobalMaxPooling2D(keepdims=True), PASS, 3),
        (L.Dropout(0.5), PASS, 3),
        (L.SpatialDropout2D(0.5), PASS, 3),
        (L.GaussianNoise(1.0), PASS, 3),
        (L.Identity(), PASS, 3),
        (L.ZeroPadding2D(1), ZERO_PAD, 3),
        (L.Activation("sigmoid"), MAP, 3),
        (L.Activation("relu"), MAP, 3),
        (L.ReLU(), MAP, 3),
        (L.LeakyReLU(0.2), MAP, 3),
        (L.ELU(), MAP, 3),
        (L.PReLU(shared_axes=[1, 2]), MAP, 3),
        (L.Rescaling(2.0, offset=1.0), MAP, 3),
        (L.BatchNormalization(), MAP, 3),
        (L.BatchNormalization(axis=3), MAP, 3),
        (L.BatchNormalization(axis=-1), MAP, 3),
        # channel-mixing, or not keeping a pruned channel constant
        (L.Activation("softmax"), MIXING, None),
        (L.Activation("log_softmax"), MIXING, None),
        (L.Softmax(), MIXING, None),
        (L.Softmax(axis=1), MIXING, None),
        (L.BatchNormalization(axis=1), MIXING, None),
        (L.BatchNormalization(axis=2), MIXING, None),
        (L.LayerNormalization(), MIXING, None),
        (L.LayerNormalization(axis=1), MIXING, None),
        (L.PReLU(), MIXING, None),  # one slope per position: the constant would vary over the positions
        (L.UpSampling2D(2, interpolation="bicubic"), MIXING, None),
        (L.MaxPooling2D(data_format="channels_first"), MIXING, None),  # would pool over W and the channels
        (L.MaxPooling1D(2), MIXING, None),  # a rank-3 layer on a rank-4 tensor
        (L.Reshape((2, -1)), MIXING, None),
        (L.Dense(3), MIXING, None),  # the callers handle the linear consumers themselves
        (L.Flatten(), MIXING, None),
        (L.Lambda(lambda t: t), MIXING, None),
    ],
    ids=lambda v: (f"{type(v).__name__}:{getattr(v, 'name', '')}" if isinstance(v, L.Layer) else str(v)),
)
def test_rule_of_each_layer_kind(layer, kind, out_axis):
    rule = channel_rule(layer, rank=4, axis=3)
    assert (rule.kind, rule.out_axis) == (kind, out_axis)
    assert rule.per_channel == (kind != MIXING)
    assert rule.what  # every answer says why, for the error messages


def test_a_subclass_of_a_known_layer_is_unknown():
    class MyReLU(L.ReLU):
        def call(self, inputs):
            return inputs[..., ::-1]  # a subclass may do anything, e.g. reverse the channels

    assert channel_rule(MyReLU(), 4, 3).kind == MIXING


def test_channels_on_another_axis():
    # channels first: axis 1 of (B, C, H, W)
    assert channel_rule(L.MaxPooling2D(data_format="channels_first"), 4, 1).kind == PASS
    assert channel_rule(L.MaxPooling2D(), 4, 1).kind == MIXING
    assert channel_rule(L.BatchNormalization(axis=1), 4, 1).kind == MAP
    assert channel_rule(L.GlobalAveragePooling2D(data_format="channels_first"), 4, 1).out_axis == 1
    assert channel_rule(L.Dropout(0.1), 4, 0).kind == MIXING  # the batch axis is never the channels
    # after a channels-last Flatten: (B, P*C), one feature per position and channel
    assert channel_rule(L.BatchNormalization(), 2, 1).kind == MAP
    assert channel_rule(L.Dropout(0.1), 2, 1).kind == PASS


def test_constants_of_pass_and_zero_padding():
    k = np.array([0.0, 0.5, -2.0])
    np.testing.assert_array_equal(channel_rule(L.MaxPooling2D(), 4, 3).constants(None, k), k)
    pad = L.ZeroPadding2D(1)
    np.testing.assert_array_equal(channel_rule(pad, 4, 3).constants(pad, np.zeros(3)), np.zeros(3))
    assert channel_rule(pad, 4, 3).constants(pad, k) is None  # the 0 border differs from 0.5 and -2
    softmax = L.Activation("softmax")
    assert channel_rule(softmax, 4, 3).constants(softmax, k) is None


def _built(layer, shape, weights):
    layer.build(shape)
    layer.set_weights([np.asarray(w, np.float32) for w in weights])
    return layer


def test_constants_of_elementwise_and_per_channel_layers():
    def constants(layer, k, rank=4):
        return channel_rule(layer, rank, rank - 1).constants(layer, np.asarray(k, np.float64))

    # sigmoid(0) = 1/2, sigmoid(1) = e/(1+e) = 0.7310586, sigmoid(-2) = 1/(1+e^2) = 0.1192029
    np.testing.assert_allclose(constants(L.Activation("sigmoid"), [0, 1, -2]), [0.5, 0.7310586, 0.1192029], atol=1e-6)
    np.testing.assert_allclose(constants(L.LeakyReLU(0.2), [-1, 0, 2]), [-0.2, 0, 2], atol=1e-7)
    np.testing.assert_allclose(constants(L.ReLU(max_value=1.0), [-1, 0.5, 3]), [0, 0.5, 1], atol=1e-7)
    np.testing.assert_allclose(constants(L.ELU(), [-1, 2]), [np.exp(-1) - 1, 2], atol=1e-6)
    np.testing.assert_allclose(constants(L.Rescaling(2.0, offset=1.0), [0, 1.5]), [1, 4], atol=1e-7)
    prelu = _built(L.PReLU(shared_axes=[1, 2]), (None, 5, 5, 3), [[[[0.1, 0.2, 0.3]]]])
    np.testing.assert_allclose(constants(prelu, [-1, -1, 2]), [-0.1, -0.2, 2], atol=1e-7)
    # BN at inference: gamma * (k - mean) / sqrt(var + eps) + beta; eps = 0 here
    # channel 0: 2 * (1.5 - 0.5) / 2 + 1 = 2; channel 1: 1 * (0 + 1) / 1 + 0 = 1
    bn = _built(L.BatchNormalization(epsilon=0.0), (None, 5, 5, 2), [[2, 1], [1, 0], [0.5, -1], [4, 1]])
    np.testing.assert_allclose(constants(bn, [1.5, 0]), [2, 1], atol=1e-6)
    # after a Flatten of 2 positions x 2 channels: k is (P, C), the batch norm has one entry per feature p*C + c
    flat_bn = _built(L.BatchNormalization(epsilon=0.0), (None, 4),
                     [[1, 1, 2, 2], [0, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_allclose(constants(flat_bn, [[1, 1], [1, 1]], rank=2), [[1, 2], [2, 3]], atol=1e-6)


def test_elementwise_activations():
    assert is_elementwise_activation(keras.activations.relu)
    assert is_elementwise_activation(keras.activations.get("sigmoid"))
    assert is_elementwise_activation(keras.activations.get(None))  # linear
    assert not is_elementwise_activation(keras.activations.softmax)
    assert not is_elementwise_activation(keras.activations.log_softmax)
    assert not is_elementwise_activation(keras.activations.glu)
    assert not is_elementwise_activation(lambda t: t)  # unknown: treated as mixing
