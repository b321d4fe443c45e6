"""The pruning criteria of defense/criteria/: CLP against a numpy re-implementation of its formula, ANP and
RNP learning their masks from the clean validation data only, and their option checks.

Oracles: CLP (Zheng et al., ECCV 2022) re-computed here with np.linalg.norm(., 2) per channel and the
statistics module (mean, stdev with n - 1); the weights read through the plain Keras get_weights().
"""

from __future__ import annotations

import logging
import statistics

import numpy as np
import pytest

from conftest import LAB3_WEIGHTS, compose, lab3_overrides

LAB3_CONVS = ["conv_1", "conv_2", "conv_3", "conv_4"]


class NoData:
    """A clean data set that fails the test on any use: a data-free criterion must not touch it."""

    def __getattr__(self, name):
        raise AssertionError(f"a data-free criterion read clean.{name}")

    def __len__(self):
        raise AssertionError("a data-free criterion asked for len(clean)")

    def __getitem__(self, index):
        raise AssertionError("a data-free criterion indexed clean")


@pytest.fixture(scope="module")
def lab3_model(csaw_dir):
    from defense import models

    cfg = compose(lab3_overrides())
    return models.load_model(cfg.model, str(LAB3_WEIGHTS))


@pytest.fixture(scope="module")
def lab3_valid(csaw_dir):
    from defense import datasets

    cfg = compose(lab3_overrides())
    return datasets.load_split(cfg.dataset, cfg.model, "valid")


# ------------------------------------------------------------------------------------------------
# CLP


def oracle_clp(kernel: np.ndarray, bn: tuple | None) -> list[float]:
    """Largest singular value of each output channel's kernel as an (in_channels, kh * kw) matrix, times
    |gamma / sqrt(var + eps)| where a BatchNormalization (gamma, var, eps) follows the conv."""
    kh, kw, cin, cout = kernel.shape
    out = []
    for k in range(cout):
        w = kernel[:, :, :, k].astype(np.float64).reshape(kh * kw, cin).T  # rows: input channels
        value = float(np.linalg.norm(w, 2))
        if bn is not None:
            gamma, var, eps = bn
            value *= abs(float(gamma[k]) / np.sqrt(float(var[k]) + eps))
        out.append(value)
    return out


def oracle_above(bounds: list[float], u: float) -> list[int]:
    threshold = statistics.mean(bounds) + u * statistics.stdev(bounds)
    return [k for k, b in enumerate(bounds) if b > threshold]


def oracle_order(per_layer: dict[str, list[float]], layers: list[str]) -> list[tuple[str, int]]:
    """Every (layer, channel), highest standardized bound of its layer first."""
    keyed = []
    for name in layers:
        b = per_layer[name]
        mean, std = statistics.mean(b), statistics.stdev(b)
        keyed += [((v - mean) / std, name, k) for k, v in enumerate(b)]
    keyed.sort(key=lambda t: -t[0])
    return [(name, k) for _, name, k in keyed]


def clp_cfg(u: float):
    return compose(lab3_overrides("prune=clp", f"prune.clp.u={u}"))


@pytest.mark.parametrize("u", [3.0, 1.0])
def test_clp_on_the_lab3_weights_equals_numpy(lab3_model, u):
    from defense import criteria
    from defense.criteria import clp

    assert clp.NEEDS_DATA is False
    scores = clp.score(lab3_model, LAB3_CONVS, NoData(), clp_cfg(u), 1.0)
    bounds = {name: oracle_clp(lab3_model.get_layer(name).get_weights()[0], None) for name in LAB3_CONVS}
    for name in LAB3_CONVS:
        np.testing.assert_allclose(scores.columns["clp_bound"][name], bounds[name], rtol=1e-9)
        assert scores.operating_point[name] == oracle_above(bounds[name], u)
    assert criteria.global_order(scores, LAB3_CONVS) == oracle_order(bounds, LAB3_CONVS)
    if u == 1.0:  # some channels are pruned, and they are the top of the global ranking (every z > u)
        pruned = sum(len(v) for v in scores.operating_point.values())
        assert pruned > 0
        order = criteria.global_order(scores, LAB3_CONVS)
        assert sorted(order[:pruned]) == sorted((n, c) for n in LAB3_CONVS for c in scores.operating_point[n])


def bn_network():
    """conv_a (linear) -> BN -> relu; conv_b (relu, no BN); conv_c (linear) -> BN; 16 channels each, with
    non-trivial BN statistics, negative gammas, and one planted channel of conv_a with a 40x gamma."""
    import keras

    rng = np.random.default_rng(1)
    x = keras.Input((10, 10, 3))
    h = keras.layers.Conv2D(16, 3, name="conv_a")(x)
    h = keras.layers.BatchNormalization(name="bn_a", epsilon=1e-3)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(16, 3, activation="relu", name="conv_b")(h)
    h = keras.layers.Conv2D(16, 2, name="conv_c")(h)
    h = keras.layers.BatchNormalization(name="bn_c", epsilon=0.01)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(x, keras.layers.Dense(3, activation="softmax")(h))
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            k, b = layer.get_weights()
            layer.set_weights([rng.normal(size=k.shape).astype(np.float32), b])
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            gamma = rng.uniform(0.2, 2.0, n) * rng.choice([-1.0, 1.0], n)
            if layer.name == "bn_a":
                gamma[5] = 40.0
            layer.set_weights([gamma.astype(np.float32), rng.normal(size=n).astype(np.float32),
                               rng.normal(size=n).astype(np.float32), rng.uniform(0.05, 5.0, n).astype(np.float32)])
    return model


def test_clp_folds_the_batch_norm_right_after_a_conv_as_numpy_does(caplog):
    from defense import criteria
    from defense.criteria import clp

    model = bn_network()
    layers = ["conv_a", "conv_b", "conv_c"]
    with caplog.at_level(logging.WARNING):
        scores = clp.score(model, layers, NoData(), clp_cfg(3.0), 1.0)

    def bn(name):
        layer = model.get_layer(name)
        gamma, _, _, var = layer.get_weights()
        return gamma, var, layer.epsilon

    bounds = {"conv_a": oracle_clp(model.get_layer("conv_a").get_weights()[0], bn("bn_a")),
              "conv_b": oracle_clp(model.get_layer("conv_b").get_weights()[0], None),
              "conv_c": oracle_clp(model.get_layer("conv_c").get_weights()[0], bn("bn_c"))}
    for name in layers:
        np.testing.assert_allclose(scores.columns["clp_bound"][name], bounds[name], rtol=1e-6)
        assert scores.operating_point[name] == oracle_above(bounds[name], 3.0)
    assert scores.operating_point["conv_a"] == [5]  # the planted channel, and nothing else
    assert criteria.global_order(scores, layers) == oracle_order(bounds, layers)
    assert criteria.global_order(scores, layers)[0] == ("conv_a", 5)
    # conv_b (relu, no BatchNormalization after it) is scored by its kernel alone, and the log says so
    warned = [r.getMessage() for r in caplog.records if "CLP" in r.getMessage()]
    assert len(warned) == 1 and "conv_b" in warned[0] and "conv_a" not in warned[0]


# ------------------------------------------------------------------------------------------------
# option checks: one DefenseError line naming the key


@pytest.mark.parametrize("criterion, key, value", [
    ("clp", "u", -0.5),
    ("anp", "threshold", 1.5), ("anp", "threshold", -0.1), ("anp", "fraction", 0), ("anp", "fraction", 1.2),
    ("anp", "eps", -0.1), ("anp", "alpha", 2), ("anp", "iterations", 0),
    ("rnp", "threshold", 1.01), ("rnp", "fraction", 0), ("rnp", "clean_threshold", -1), ("rnp", "unlearn_lr", 0),
])
def test_bad_criterion_options_are_one_line_naming_the_key(criterion, key, value):
    from defense import criteria
    from defense.errors import DefenseError

    cfg = compose([f"prune={criterion}", f"prune.{criterion}.{key}={value}"])
    with pytest.raises(DefenseError) as err:
        criteria.get(criterion).check_config(cfg.prune)
    message = str(err.value)
    assert "\n" not in message and f"prune.{criterion}.{key}" in message
    compose([f"prune={criterion}"])  # the defaults themselves pass
    criteria.get(criterion).check_config(compose([f"prune={criterion}"]).prune)
