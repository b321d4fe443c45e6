"""The masked sweep predicts exactly what the Lab 3 loop (zero weights with set_weights, predict) does."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def lab3(csaw_dir):
    from defense.architecture import build_deepid
    from defense.data import load_h5

    model = build_deepid()
    model.load_weights(csaw_dir / "lab3_bd_weights.h5")
    x = np.concatenate([load_h5(csaw_dir / f).x for f in ("clean_test.h5", "sunglasses_test.h5")])
    return model, x


def test_every_step_equals_the_seed_loop_on_conv3_activation_order(lab3):
    from defense.masked import MaskedSweep, seed_style_predictions
    from defense.ranking import mean_activation_order

    model, x = lab3
    sweep = MaskedSweep(model, "conv_3", batch_size=64)
    probe = np.concatenate([np.asarray(model.get_layer("pool_3")(b[0])) for b in sweep.layer_outputs(x[:100])])
    order = mean_activation_order(probe)
    masked = sweep.predict(x, order)
    seed = seed_style_predictions(model, "conv_3", x, order)
    assert masked.shape == (200, 61)
    np.testing.assert_array_equal(masked, seed)
    # the sweep is not trivially constant: predictions change along the way
    assert (masked[:, -1] != masked[:, 0]).mean() > 0.5


@pytest.mark.parametrize("layer", ["conv_2", "conv_4"])
def test_other_conv_layers_match_too(lab3, layer):
    """conv_2 feeds pooling + a conv (linear path); conv_4 feeds Flatten + Dense."""
    from defense.masked import MaskedSweep, seed_style_predictions

    model, x = lab3
    sweep = MaskedSweep(model, layer)
    order = np.random.default_rng(1).permutation(sweep.channels)[: sweep.channels // 2]
    np.testing.assert_array_equal(sweep.predict(x[::2], order), seed_style_predictions(model, layer, x[::2], order))


def test_generic_layers_after_the_pruned_one(lab3):
    """A model with layers the fast paths do not know (BatchNorm on Rows, a sigmoid conv) still matches."""
    import keras

    from defense.masked import MaskedSweep, seed_style_predictions

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
    np.testing.assert_array_equal(sweep.predict(x, order), seed_style_predictions(model, "c1", x, order))


def test_bad_layers_are_refused(lab3):
    from defense.errors import DefenseError
    from defense.masked import MaskedSweep, channel_path

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
