"""Compact export (defense/compact.py): the pruned channels are removed, the predictions stay those of the masked B'.

Runs on the real CSAW-HackML data in ../shared/data/csaw (no skipping: missing data is a failure).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import keras
import numpy as np
import pytest
from omegaconf import OmegaConf

from defense.pruning import compact
from defense.nets import models
from defense.core.errors import DefenseError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "csaw"
LAYER = "conv_3"
# Parameters of the Lab 3 DeepID network (architecture.py of the CSAW-HackML Lab 3), counted by hand:
# conv_1 4*4*3*20+20, conv_2 3*3*20*40+40, conv_3 3*3*40*60+60, conv_4 2*2*60*80+80,
# fc_1 (5*4*60)*160+160 on pool_3, fc_2 (4*3*80)*160+160 on conv_4, output 160*1283+1283.
LAB3_PARAMS = (4 * 4 * 3 * 20 + 20) + (3 * 3 * 20 * 40 + 40) + (3 * 3 * 40 * 60 + 60) + (2 * 2 * 60 * 80 + 80) \
    + (5 * 4 * 60 * 160 + 160) + (4 * 3 * 80 * 160 + 160) + (160 * 1283 + 1283)


def _images(name: str) -> np.ndarray:
    with h5py.File(DATA / name, "r") as f:
        return np.transpose(np.asarray(f["data"][()], np.float32), (0, 2, 3, 1))


@pytest.fixture(scope="module")
def model_cfg():
    return OmegaConf.load(ROOT / "conf" / "model" / "lab3.yaml")


@pytest.fixture(scope="module")
def model_b(model_cfg):
    return models.load_model(model_cfg, str(DATA / "lab3_bd_weights.h5"))


@pytest.fixture(scope="module")
def extracts():
    """All 100 clean and 100 sunglasses faces, NHWC raw pixels (the Lab 3 network takes 0..255)."""
    x = np.concatenate([_images("clean_test.h5"), _images("sunglasses_test.h5")])
    assert x.shape == (200, 55, 47, 3)
    return x


@pytest.fixture(scope="module")
def order(model_b, extracts):
    """conv_3 channels by increasing mean pool_3 activation on the clean faces (the Lab 3 order)."""
    probe = keras.Model(model_b.inputs, model_b.get_layer("pool_3").output)
    acts = probe.predict(extracts[:100], verbose=0).mean(axis=(0, 1, 2))
    return [int(c) for c in np.argsort(acts, kind="stable")]


@pytest.mark.parametrize("n_pruned", [10, 50, 59])
def test_compact_predicts_like_masked_b_prime_on_every_extract(model_b, extracts, order, n_pruned):
    b_prime = models.pruned_copy(model_b, LAYER, order[:n_pruned])
    small = compact.compact_model(b_prime, LAYER, order[:n_pruned])
    p_full = b_prime.predict(extracts, verbose=0)
    p_small = small.predict(extracts, verbose=0)
    np.testing.assert_array_equal(np.argmax(p_small, -1), np.argmax(p_full, -1))
    np.testing.assert_allclose(p_small, p_full, rtol=0, atol=1e-5)
    # the original (unpruned) model with the channel list gives the same compact network
    from_b = compact.compact_model(model_b, LAYER, order[:n_pruned])
    np.testing.assert_allclose(from_b.predict(extracts, verbose=0), p_small, rtol=0, atol=1e-6)


def test_compact_shapes_and_parameter_count(model_b, order):
    pruned = order[:50]
    kept = sorted(set(range(60)) - set(pruned))
    b_prime = models.pruned_copy(model_b, LAYER, pruned)
    small = compact.compact_from_pruned(b_prime, LAYER)
    assert small.get_layer("conv_3").get_weights()[0].shape == (3, 3, 40, 10)
    assert small.get_layer("conv_4").get_weights()[0].shape == (2, 2, 10, 80)
    assert small.get_layer("fc_1").get_weights()[0].shape == (5 * 4 * 10, 160)
    # conv_3: 3*3*40 + 1 per filter; conv_4: 2*2*80 per input channel; fc_1: 5*4 positions * 160 per channel
    per_channel = (3 * 3 * 40 + 1) + 2 * 2 * 80 + 5 * 4 * 160
    assert b_prime.count_params() == model_b.count_params() == LAB3_PARAMS
    assert small.count_params() == LAB3_PARAMS - 50 * per_channel < b_prime.count_params()
    # the kept weights are B's own: conv_4 kernel[:, :, kept, :], fc_1 rows position*60 + kept channel
    def kernel(m, name):
        return m.get_layer(name).get_weights()[0]

    np.testing.assert_array_equal(kernel(small, "conv_3"), kernel(model_b, "conv_3")[..., kept])
    np.testing.assert_array_equal(kernel(small, "conv_4"), kernel(model_b, "conv_4")[:, :, kept, :])
    fc_1 = model_b.get_layer("fc_1").get_weights()[0].reshape(20, 60, 160)[:, kept, :].reshape(200, 160)
    np.testing.assert_array_equal(small.get_layer("fc_1").get_weights()[0], fc_1)
    # layers that do not read conv_3 are untouched
    for name in ("conv_1", "conv_2", "fc_2", "output"):
        for a, b in zip(small.get_layer(name).get_weights(), model_b.get_layer(name).get_weights()):
            np.testing.assert_array_equal(a, b)


def test_compact_from_pruned_detects_the_zeroed_channels(model_b, order):
    b_prime = models.pruned_copy(model_b, LAYER, order[:46])
    assert compact.zeroed_channels(b_prime, LAYER) == sorted(order[:46])
    assert compact.zeroed_channels(model_b, LAYER) == []
    assert compact.compact_from_pruned(b_prime, LAYER).get_layer(LAYER).filters == 14


def test_saved_compact_model_reloads_and_predicts_the_same(model_b, model_cfg, extracts, order, tmp_path):
    small = compact.compact_model(models.pruned_copy(model_b, LAYER, order[:50]), LAYER, order[:50])
    path = models.save_model(small, str(tmp_path / "model_B_10_compact.h5"))
    assert models.h5_kind(path) == "model"
    reloaded = keras.models.load_model(path, compile=False)
    np.testing.assert_allclose(reloaded.predict(extracts, verbose=0), small.predict(extracts, verbose=0),
                               rtol=0, atol=1e-6)
    again = models.load_model(model_cfg, path)  # the project's loader takes it as a full model too
    assert again.count_params() == small.count_params()


def test_export_compact_saves_and_logs(model_b, model_cfg, extracts, order, tmp_path):
    class Recorder:
        def __init__(self):
            self.params = {}

        def log_params(self, params):
            assert not set(params) & set(self.params), "MLflow params are written once"
            self.params.update(params)

    tracker = Recorder()
    b_prime = models.pruned_copy(model_b, LAYER, order[:50])
    path = compact.compact_path(tmp_path / "models" / "model_B_10.h5")
    assert path.name == "model_B_10_compact.h5"
    stats = compact.export_compact(b_prime, LAYER, order[:50], path, tracker,
                                   x=models.scale_inputs(extracts[100:], model_cfg))
    assert path.is_file()
    assert set(tracker.params) == {f"compact.drop_10.{k}" for k in
                                   ("compact_params", "full_params", "compact_predict_s", "full_predict_s")}
    assert tracker.params["compact.drop_10.full_params"] == LAB3_PARAMS
    assert stats["compact_params"] == tracker.params["compact.drop_10.compact_params"] < stats["full_params"]
    # 50 of conv_3's 60 channels gone: 3,881 parameters each (csaw_extracts results table)
    assert LAB3_PARAMS - tracker.params["compact.drop_10.compact_params"] == 50 * 3881
    assert stats["agree"] == 1.0 and stats["max_abs_diff"] < 1e-5
    # a fine-tuned B'' is saved as model_B_10_ft.h5: its compact copy logs under drop_10_ft
    ft = compact.export_compact(b_prime, LAYER, order[:50], tmp_path / "model_B_10_ft_compact.h5", tracker)
    assert "compact.drop_10_ft.compact_params" in tracker.params and ft["agree"] == 1.0


def test_compact_cli_prints_sizes_and_times(model_b, order, tmp_path, capsys):
    b_path = models.save_model(models.pruned_copy(model_b, LAYER, order[:50]), str(tmp_path / "model_B_10.h5"))
    assert compact.main([b_path, "--data", str(DATA / "clean_test.h5")]) == 0
    out = capsys.readouterr().out
    assert "601643 -> 407593 parameters" in out and "top-1 agreement 100.00 %" in out
    assert (tmp_path / "model_B_10_compact.h5").is_file()
    assert compact.main([str(DATA / "lab3_bd_weights.h5")]) == 2  # weights-only: one error line
    assert "weights-only" in capsys.readouterr().err


# ---- other architectures: per-channel layers, non-zero act(0) folded into the consumers' biases ----------------


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        weights = layer.get_weights()
        if isinstance(layer, keras.layers.BatchNormalization):
            weights = [rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if i in (0, 3) else
                       rng.normal(0, 0.5, w.shape).astype(np.float32) for i, w in enumerate(weights)]
        else:
            weights = [rng.normal(0, 0.3, w.shape).astype(np.float32) for w in weights]
        layer.set_weights(weights)
    return model


def _branchy(activation="sigmoid", consumer_padding="valid", bn=True):
    """A functional net whose pruned conv (act(0) may be != 0) feeds Conv2D, Flatten+Dense, GAP+Dense."""
    inp = keras.Input((12, 12, 3))
    h = keras.layers.Conv2D(6, 3, activation=activation, name="pruned")(inp)
    if bn:
        h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Activation("tanh", name="act")(h)
    h = keras.layers.MaxPooling2D(2, name="pool")(h)  # (5, 5, 6)
    a = keras.layers.Conv2D(4, 3, padding=consumer_padding, activation="relu", name="conv_a")(h)
    a = keras.layers.Dense(7, name="dense_a")(keras.layers.Flatten(name="flat_a")(a))
    b = keras.layers.Flatten(name="flat_b")(h)
    b = keras.layers.Dropout(0.5, name="drop_b")(b)
    b = keras.layers.Dense(7, use_bias=False, name="dense_b")(b)  # gets a bias for the folded constant
    c = keras.layers.Dense(7, name="dense_c")(keras.layers.GlobalAveragePooling2D(name="gap")(h))
    d = keras.layers.Conv2D(7, 1, padding="same", name="conv_d")(h)
    d = keras.layers.GlobalMaxPooling2D(name="gmp")(d)
    out = keras.layers.Add(name="add")([a, b, c, d])
    out = keras.layers.Dense(5, activation="softmax", name="out")(out)
    return _randomize(keras.Model(inp, out))


def test_nonzero_pruned_constant_is_folded_into_the_biases():
    model = _branchy("sigmoid")  # sigmoid(0) = 0.5, through BN and tanh: a non-zero constant
    pruned = [1, 4]
    small = compact.compact_model(model, "pruned", pruned)
    x = np.random.default_rng(1).normal(size=(64, 12, 12, 3)).astype(np.float32)
    masked = models.pruned_copy(model, "pruned", pruned)
    np.testing.assert_allclose(small.predict(x, verbose=0), masked.predict(x, verbose=0), rtol=0, atol=1e-5)
    assert small.get_layer("pruned").filters == 4
    assert small.get_layer("bn").get_weights()[0].shape == (4,)
    assert small.get_layer("conv_a").get_weights()[0].shape == (3, 3, 4, 4)
    kernel_b, bias_b = small.get_layer("dense_b").get_weights()  # dense_b had no bias: this is the folded constant
    assert kernel_b.shape == (100, 7) and np.all(bias_b != 0)
    assert small.get_layer("dense_c").get_weights()[0].shape == (4, 7)
    assert small.count_params() < model.count_params()


def test_same_padding_consumer_is_fine_with_relu_but_refused_with_a_nonzero_constant():
    relu = _branchy("relu", consumer_padding="same", bn=False)  # relu(0) = tanh(0) = 0: nothing to fold
    x = np.random.default_rng(2).normal(size=(32, 12, 12, 3)).astype(np.float32)
    small = compact.compact_model(relu, "pruned", [0, 5])
    masked = models.pruned_copy(relu, "pruned", [0, 5])
    np.testing.assert_allclose(small.predict(x, verbose=0), masked.predict(x, verbose=0), rtol=0, atol=1e-5)
    with pytest.raises(DefenseError, match="cannot be folded"):
        compact.compact_model(_branchy("sigmoid", consumer_padding="same"), "pruned", [0, 5])


def test_unsupported_graphs_and_channel_lists_are_clear_errors(model_b):
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="pruned")(inp)
    skip = keras.layers.Conv2D(4, 3, name="other")(inp)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(keras.layers.Add(name="add")([h, skip])))
    with pytest.raises(DefenseError, match="'add'.*together with other inputs"):
        compact.compact_model(keras.Model(inp, out), "pruned", [1])
    p = keras.layers.Conv2D(4, 3, activation="relu", name="pruned")(inp)
    shared = keras.layers.Conv2D(2, 2, name="shared")  # called on the pruned channels and on another tensor
    out = keras.layers.Add()([keras.layers.Flatten()(shared(p)), keras.layers.Flatten()(shared(skip))])
    with pytest.raises(DefenseError, match="'shared' is shared"):
        compact.compact_model(keras.Model(inp, out), "pruned", [1])
    with pytest.raises(DefenseError, match="at least one filter"):
        compact.compact_model(model_b, LAYER, range(60))
    with pytest.raises(DefenseError, match="outside 0..59"):
        compact.compact_model(model_b, LAYER, [60])
    with pytest.raises(DefenseError, match="no such layer"):
        compact.compact_model(model_b, "conv_9", [1])
    unchanged = compact.compact_model(model_b, LAYER, [])
    assert unchanged.count_params() == model_b.count_params()


def test_sequential_model():
    model = _randomize(keras.Sequential([
        keras.Input((10, 10, 1)), keras.layers.Conv2D(5, 3, activation="elu", name="c1"),
        keras.layers.AveragePooling2D(2), keras.layers.Conv2D(3, 2, name="c2"), keras.layers.Flatten(),
        keras.layers.Dense(4, activation="softmax"),
    ]))
    small = compact.compact_model(model, "c1", [2])  # elu(0) = 0
    x = np.random.default_rng(3).normal(size=(16, 10, 10, 1)).astype(np.float32)
    np.testing.assert_allclose(small.predict(x, verbose=0), models.pruned_copy(model, "c1", [2]).predict(x, verbose=0),
                               rtol=0, atol=1e-5)
    assert small.get_layer("c2").get_weights()[0].shape == (2, 2, 4, 3)


# ---- the per-channel rule (defense.per_channel) decides what may sit between the pruned conv and its consumers ----


def _after_pruned(activation, middle, seed=0):
    """Conv2D 'pruned' (6 channels) -> `middle` layers -> max pooling -> Conv2D -> Flatten -> Dense."""
    layers = keras.layers
    inp = keras.Input((12, 11, 3))
    h = layers.Conv2D(6, 3, activation=activation, name="pruned")(inp)  # (10, 9, 6)
    for layer in middle():
        h = layer(h)
    h = layers.MaxPooling2D(2, name="pool")(h)
    h = layers.Conv2D(4, 2, name="conv_b")(h)
    out = layers.Dense(5, activation="softmax", name="out")(layers.Flatten(name="flat")(h))
    return _randomize(keras.Model(inp, out), seed)


REFUSED = {  # layer after the pruned conv -> what the error says about it
    "activation_softmax": ("relu", lambda: [keras.layers.Activation("softmax", name="mix")],
                           r"'mix' \(Activation\).*does not keep them separate: activation softmax"),
    "softmax_layer": ("relu", lambda: [keras.layers.Softmax(name="mix")],
                      r"'mix' \(Softmax\).*softmax over the channel axis"),
    "bn_axis_1": ("sigmoid", lambda: [keras.layers.BatchNormalization(axis=1, name="mix")],
                  r"'mix' \(BatchNormalization\).*over axis 1, not the channel axis 3"),
    "bn_axis_2": ("sigmoid", lambda: [keras.layers.BatchNormalization(axis=2, name="mix")],
                  r"'mix' \(BatchNormalization\).*over axis 2, not the channel axis 3"),
    "layer_norm": ("relu", lambda: [keras.layers.LayerNormalization(name="mix")], r"'mix' \(LayerNormalization\)"),
    "zero_padding_of_sigmoid": ("sigmoid", lambda: [keras.layers.ZeroPadding2D(1, name="mix")],
                                r"'mix' \(ZeroPadding2D\).*non-zero constant 0.5"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_layers_that_mix_the_pruned_channels_are_refused(case):
    activation, middle, message = REFUSED[case]
    with pytest.raises(DefenseError, match=message):
        compact.compact_model(_after_pruned(activation, middle), "pruned", [1, 4])


def test_pruned_conv_with_a_softmax_activation_is_refused():
    inp = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, activation="softmax", name="pruned")(inp)
    out = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    with pytest.raises(DefenseError, match="activation softmax, which is not element-wise"):
        compact.compact_model(keras.Model(inp, out), "pruned", [1])


KEPT = {  # per-channel layers with non-zero constants: compacted, the constants folded into conv_b's bias
    "bn_channels_leaky_relu": (None, lambda: [keras.layers.BatchNormalization(name="bn"),
                                              keras.layers.LeakyReLU(0.2, name="leaky")]),
    "sigmoid_bn_axis_3": ("sigmoid", lambda: [keras.layers.BatchNormalization(axis=3, name="bn")]),
    "prelu_per_channel": ("tanh", lambda: [keras.layers.BatchNormalization(name="bn"),
                                           keras.layers.PReLU(shared_axes=[1, 2], name="prelu")]),
    "zero_padding_of_relu": ("relu", lambda: [keras.layers.ZeroPadding2D(1, name="pad")]),
}


@pytest.mark.parametrize("case", sorted(KEPT))
def test_per_channel_layers_with_nonzero_constants_are_compacted(case):
    activation, middle = KEPT[case]
    model = _after_pruned(activation, middle)
    pruned = [1, 4]
    small = compact.compact_model(model, "pruned", pruned)
    x = np.random.default_rng(4).normal(size=(40, 12, 11, 3)).astype(np.float32)
    expected = models.pruned_copy(model, "pruned", pruned).predict(x, verbose=0)
    np.testing.assert_allclose(small.predict(x, verbose=0), expected, rtol=0, atol=1e-5)
    kept = [0, 2, 3, 5]
    names = {layer.name for layer in model.layers}
    if "bn" in names:  # gamma, beta, moving mean, moving variance of the kept channels
        for a, b in zip(small.get_layer("bn").get_weights(), model.get_layer("bn").get_weights()):
            np.testing.assert_array_equal(a, b[kept])
    if "prelu" in names:  # one slope per channel, shape (1, 1, C)
        np.testing.assert_array_equal(small.get_layer("prelu").get_weights()[0],
                                      model.get_layer("prelu").get_weights()[0][..., kept])
    assert small.get_layer("conv_b").get_weights()[0].shape == (2, 2, 4, 4)
