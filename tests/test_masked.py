"""The masked sweep predicts exactly what the Lab 3 loop (zero weights with set_weights, predict) does."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from oracles import set_weights_predictions

L = keras.layers


@pytest.fixture(scope="module")
def lab3(csaw_dir):
    from defense.nets.architectures.deepid import build_deepid
    from defense.data.arrays import load_h5

    model = build_deepid()
    model.load_weights(csaw_dir / "lab3_bd_weights.h5")
    x = np.concatenate([load_h5(csaw_dir / f).x for f in ("clean_test.h5", "sunglasses_test.h5")])
    return model, x


def test_every_step_equals_the_set_weights_loop_on_conv3_activation_order(lab3):
    from defense.pruning.masked import MaskedSweep
    from defense.criteria.activation import mean_activation_order

    model, x = lab3
    sweep = MaskedSweep(model, "conv_3", batch_size=64)
    probe = np.concatenate([np.asarray(model.get_layer("pool_3")(b[0])) for b in sweep.layer_outputs(x[:100])])
    order = mean_activation_order(probe)
    masked = sweep.predict(x, order)
    plain = set_weights_predictions(model, "conv_3", x, order)
    assert masked.shape == (200, 61)
    np.testing.assert_array_equal(masked, plain)
    # the sweep is not trivially constant: predictions change along the way
    assert (masked[:, -1] != masked[:, 0]).mean() > 0.5


@pytest.mark.parametrize("layer", ["conv_2", "conv_4"])
def test_other_conv_layers_match_too(lab3, layer):
    """conv_2 feeds pooling + a conv (linear path); conv_4 feeds Flatten + Dense."""
    from defense.pruning.masked import MaskedSweep

    model, x = lab3
    sweep = MaskedSweep(model, layer)
    order = np.random.default_rng(1).permutation(sweep.channels)[: sweep.channels // 2]
    np.testing.assert_array_equal(sweep.predict(x[::2], order), set_weights_predictions(model, layer, x[::2], order))


def test_generic_layers_after_the_pruned_one(lab3):
    """A model with layers the fast paths do not know (BatchNorm on Rows, a sigmoid conv) still matches."""
    from defense.pruning.masked import MaskedSweep

    keras.utils.set_random_seed(0)
    inp = keras.Input((12, 10, 3))
    h = keras.layers.Conv2D(6, 3, activation="sigmoid", name="c1")(inp)  # pruned channels read 0.5
    h = keras.layers.MaxPooling2D(name="p1")(h)
    a = keras.layers.Conv2D(5, 2, activation="relu", name="c2")(h)
    b = keras.layers.Dense(7, activation="tanh", name="d_per_position")(h)  # materialised path
    merged = keras.layers.Concatenate(name="cat")([keras.layers.Flatten()(a), keras.layers.Flatten()(b)])
    merged = keras.layers.BatchNormalization(name="bn")(merged)
    out = keras.layers.Dense(4, activation="softmax", name="out")(merged)
    model = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(40, 12, 10, 3)).astype(np.float32)
    order = [3, 0, 5, 1]
    sweep = MaskedSweep(model, "c1", batch_size=16)
    np.testing.assert_array_equal(sweep.predict(x, order), set_weights_predictions(model, "c1", x, order))


def test_bad_layers_are_refused(lab3):
    from defense.core.errors import DefenseError
    from defense.pruning.masked import MaskedSweep, channel_path

    model, _ = lab3
    with pytest.raises(DefenseError, match="not a channels-last Conv2D"):
        MaskedSweep(model, "pool_3")
    with pytest.raises(DefenseError, match="no such layer"):
        MaskedSweep(model, "conv_9")
    assert channel_path(model, "conv_3", "pool_3") == ["conv_3", "pool_3"]
    with pytest.raises(DefenseError, match="not downstream"):
        channel_path(model, "conv_3", "pool_2")
    with pytest.raises(DefenseError, match="not downstream"):
        channel_path(model, "conv_3", "conv_4")


# ---- tiny synthetic networks: which layers after the pruned conv keep the fast path --------------------------


def _random_weights(model, seed=0):
    """Seeded random weights; batch norms get statistics far from (0, 1) so that they matter."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            weights = [rng.uniform(0.5, 1.5, w.shape) if i in (0, 3) else rng.normal(0, 0.5, w.shape)
                       for i, w in enumerate(weights)]  # gamma, beta, moving mean, moving variance
        else:
            weights = [rng.normal(0, 0.4, w.shape) for w in weights]
        layer.set_weights([w.astype(np.float32) for w in weights])
    return model


def _tiny(activation, middle, head="conv", seed=0):
    """Conv2D 'pruned' (6 channels, `activation`) -> `middle` layers -> a pooled conv + dense head or GAP + dense."""
    inp = keras.Input((10, 9, 3))
    h = L.Conv2D(6, 3, activation=activation, name="pruned")(inp)  # (8, 7, 6)
    for layer in middle():
        h = layer(h)
    if head == "conv":
        h = L.MaxPooling2D(name="pool")(h)
        h = L.Conv2D(4, 2, activation="relu", name="conv_b")(h)
        h = L.Flatten(name="flat")(h)
    else:
        h = L.GlobalAveragePooling2D(name="gap")(h)
    out = L.Dense(5, activation="softmax", name="out")(h)
    return _random_weights(keras.Model(inp, out), seed)


ROW, CHANNEL = "per row", "per-channel"
# (activation of the pruned conv, layers after it, head, expected route of some layers)
TINY_CASES = {
    # channel-mixing layers right after the pruned conv: the exact per-row path, never the fast one
    "activation_softmax": ("relu", lambda: [L.Activation("softmax", name="mix")], "conv",
                           {"mix": ROW, "pool": ROW, "conv_b": ROW}),
    "softmax_layer": ("relu", lambda: [L.Softmax(name="mix")], "conv", {"mix": ROW, "conv_b": ROW}),
    "softmax_layer_over_height": ("relu", lambda: [L.Softmax(axis=1, name="mix")], "conv", {"mix": ROW}),
    "bn_axis_1": ("sigmoid", lambda: [L.BatchNormalization(axis=1, name="mix")], "conv", {"mix": ROW}),
    "bn_axis_2": ("sigmoid", lambda: [L.BatchNormalization(axis=2, name="mix")], "conv", {"mix": ROW}),
    "layer_norm": ("relu", lambda: [L.LayerNormalization(name="mix")], "conv", {"mix": ROW}),
    "zero_padding_of_sigmoid": ("sigmoid", lambda: [L.ZeroPadding2D(1, name="mix")], "conv", {"mix": ROW}),
    # per-channel layers with non-zero constants: the fast path
    "bn_channels_leaky_relu": (None, lambda: [L.BatchNormalization(name="bn"), L.LeakyReLU(0.2, name="leaky")],
                               "conv", {"bn": CHANNEL, "leaky": CHANNEL, "pool": CHANNEL, "flat": ROW,
                                        "conv_b": "split conv", "out": ROW}),
    "sigmoid_bn_axis_3": ("sigmoid", lambda: [L.BatchNormalization(axis=3, name="bn")], "conv",
                          {"bn": CHANNEL, "conv_b": "split conv"}),
    "zero_padding_of_relu": ("relu", lambda: [L.ZeroPadding2D(1, name="pad")], "conv", {"pad": CHANNEL}),
    "elu_gap_dense": ("sigmoid", lambda: [L.ELU(name="elu")], "gap",
                      {"elu": CHANNEL, "gap": CHANNEL, "out": "split dense"}),
}


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_networks_match_the_set_weights_loop_at_every_step(case):
    from defense.pruning.masked import MaskedSweep

    activation, middle, head, routes = TINY_CASES[case]
    model = _tiny(activation, middle, head, seed=1 if case == "sigmoid_bn_axis_3" else 0)  # seed 0: constant labels
    x = np.random.default_rng(1).normal(size=(48, 10, 9, 3)).astype(np.float32)
    order = [4, 1, 5, 0, 2]
    sweep = MaskedSweep(model, "pruned", batch_size=20)
    assert {name: how for name, how in sweep.routes if name in routes} == routes
    masked = sweep.predict(x, order)
    plain = set_weights_predictions(model, "pruned", x, order)
    assert masked.shape == (48, 6)
    np.testing.assert_array_equal(masked, plain)
    assert (plain[:, -1] != plain[:, 0]).any()  # pruning changes some predictions: the check is not vacuous


def test_sequential_network_matches_too():
    from defense.pruning.masked import MaskedSweep

    model = _random_weights(keras.Sequential([
        keras.Input((9, 9, 2)), L.Conv2D(5, 3, activation="sigmoid", name="pruned"),
        L.BatchNormalization(name="bn"), L.Activation("softmax", name="mix"), L.Flatten(),
        L.Dense(4, activation="softmax"),
    ]), seed=3)
    x = np.random.default_rng(2).normal(size=(30, 9, 9, 2)).astype(np.float32)
    sweep = MaskedSweep(model, "pruned")
    assert dict(sweep.routes)["bn"] == CHANNEL and dict(sweep.routes)["mix"] == ROW
    plain = set_weights_predictions(model, "pruned", x, [2, 0, 4])
    np.testing.assert_array_equal(sweep.predict(x, [2, 0, 4]), plain)
    assert (plain != plain[:, :1]).any()


def test_probe_path_follows_per_channel_layers_only():
    from defense.core.errors import DefenseError
    from defense.pruning.masked import channel_path

    model = _tiny("relu", lambda: [L.BatchNormalization(name="bn"), L.LeakyReLU(name="leaky")])
    assert channel_path(model, "pruned", "pool") == ["pruned", "bn", "leaky", "pool"]
    for mixing in (L.BatchNormalization(axis=1, name="mix"), L.Activation("softmax", name="mix")):
        model = _tiny("relu", lambda: [mixing])
        with pytest.raises(DefenseError, match="prune.probe='pool' is not downstream"):
            channel_path(model, "pruned", "pool")


def test_pruned_conv_with_a_channel_mixing_activation_is_refused():
    from defense.core.errors import DefenseError
    from defense.pruning.masked import MaskedSweep, conv_layer

    inp = keras.Input((6, 6, 1))
    out = L.Dense(2)(L.Flatten()(L.Conv2D(3, 3, activation="softmax", name="c")(inp)))
    model = keras.Model(inp, out)
    with pytest.raises(DefenseError, match="prune.layer='c' uses the activation softmax, which is not element-wise"):
        MaskedSweep(model, "c")
    with pytest.raises(DefenseError, match="not element-wise"):
        conv_layer(model, "c")


def test_channel_masks_of_every_conv_layer_equal_the_set_weights_loop(lab3):
    """Channels of conv_1..conv_4 pruned together, in one global order: ChannelMasks (mask variables in one
    traced graph) predicts what zeroing the same kernels and biases with set_weights + predict does."""
    from oracles import set_weights_predictions_pairs

    from defense.pruning.channel_masks import ChannelMasks

    model, x = lab3
    x = x[::4]
    layers = ["conv_1", "conv_2", "conv_3", "conv_4"]
    pairs = [(name, c) for name in layers for c in range(model.get_layer(name).filters)]
    pairs = [pairs[i] for i in np.random.default_rng(2).permutation(len(pairs))]  # 200 pairs, layers mixed
    steps = [0, 1, 3, 8, 20, 60, 199]
    masks = ChannelMasks(model, layers, batch_size=32)
    masked = masks.predict(x, pairs, steps)
    np.testing.assert_array_equal(masked, set_weights_predictions_pairs(model, x, pairs, steps))
    assert len({name for name, _ in pairs[:8]}) >= 3  # the compared steps prune several layers at once
    assert (masked[:, 3] != masked[:, 0]).any()  # and change predictions
    every = list(range(0, 200, 3))  # consecutive steps that change one or two layers: the walk starts at a cut
    np.testing.assert_array_equal(masks.predict(x, pairs, every), masks.predict(x, pairs, every, reuse=False))
    assert masks.traces >= 3  # the whole walk and at least two segments that start at a cut
    masks.predict(x[:40], pairs[::-1], [5, 50])  # more steps and batches: no segment is traced again
    assert masks.traces <= masks.segments() + 1 == 5  # each segment once, and the whole walk (reuse=False)
    assert all(np.all(v.numpy() == 1) for v in masks.masks.values())  # the masks are reset after predict
