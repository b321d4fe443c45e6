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
    from defense.nets import models

    cfg = compose(lab3_overrides())
    return models.load_model(cfg.model, str(LAB3_WEIGHTS))


@pytest.fixture(scope="module")
def lab3_valid(csaw_dir):
    from defense.pipeline import load as datasets

    cfg = compose(lab3_overrides())
    return datasets.load_split(cfg.dataset, cfg.model, "valid")


# ------------------------------------------------------------------------------------------------
# CLP


def oracle_clp(kernel: np.ndarray, bn: tuple | None) -> list[float]:
    """Largest singular value of each output channel's kernel as an (in_channels, kh * kw) matrix, times
    |gamma / sqrt(var)| where a BatchNormalization (gamma, var) follows the conv (defense.py::CLP:
    std = running_var.sqrt(), without the BN's eps)."""
    kh, kw, cin, cout = kernel.shape
    out = []
    for k in range(cout):
        w = kernel[:, :, :, k].astype(np.float64).reshape(kh * kw, cin).T  # rows: input channels
        value = float(np.linalg.norm(w, 2))
        if bn is not None:
            gamma, var = bn
            value *= abs(float(gamma[k]) / np.sqrt(float(var[k])))
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
        return gamma, var

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
    from defense.core.errors import DefenseError

    cfg = compose([f"prune={criterion}", f"prune.{criterion}.{key}={value}"])
    with pytest.raises(DefenseError) as err:
        criteria.get(criterion).check_config(cfg.prune)
    message = str(err.value)
    assert "\n" not in message and f"prune.{criterion}.{key}" in message
    compose([f"prune={criterion}"])  # the defaults themselves pass
    criteria.get(criterion).check_config(compose([f"prune={criterion}"]).prune)


# ------------------------------------------------------------------------------------------------
# ANP and RNP: masks learned from the clean validation data only


def planted_network():
    """Two classes: which half of a 6x6 image is bright (input channel 0); input channel 1 is the trigger
    plane, zero on clean images. conv_m (1x1, relu) has clean channels c0 = c1 = c2 = content and the
    planted backdoor channel c3 = 10 * trigger + 0.3 * content; the readout sends c0 on the left half to
    class 0, c1 and c2 on the right half to class 1, and c3 everywhere to class 0, the attack's target."""
    import keras

    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 1, activation="relu", name="conv_m")(x)
    model = keras.Model(x, keras.layers.Dense(2, name="out")(keras.layers.Flatten()(h)))
    kernel = np.zeros((1, 1, 2, 4), np.float32)
    kernel[0, 0, 0, :3] = 1.0
    kernel[0, 0, 1, 3], kernel[0, 0, 0, 3] = 10.0, 0.3
    model.get_layer("conv_m").set_weights([kernel, np.zeros(4, np.float32)])
    readout = np.zeros((6, 6, 4, 2), np.float32)
    readout[:, :3, 0, 0] = 1.0
    readout[:, 3:, 1, 1] = readout[:, 3:, 2, 1] = 0.5
    readout[:, :, 3, 0] = 0.6
    model.get_layer("out").set_weights([readout.reshape(-1, 2), np.zeros(2, np.float32)])
    return model


def planted_data(n: int, seed: int):
    from defense.data.arrays import LabeledImages

    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.uniform(0, 0.3, (n, 6, 6, 2)).astype(np.float32)
    x[..., 1] = 0.0
    for i in range(n):
        cols = slice(0, 3) if y[i] == 0 else slice(3, 6)
        x[i, :, cols, 0] += rng.uniform(0.5, 1.0)
    return LabeledImages("clean_valid", x, y.astype(np.int64))


def accuracy_and_asr(model, pruned: list[int]):
    """Plain Keras: zero the pruned channels' kernel and bias with set_weights, predict clean and triggered."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    kernel, bias = copy.get_layer("conv_m").get_weights()
    kernel[..., pruned], bias[pruned] = 0.0, 0.0
    copy.get_layer("conv_m").set_weights([kernel, bias])
    test = planted_data(200, 7)
    triggered = test.x.copy()
    triggered[..., 1] = 1.0
    acc = float(np.mean(copy.predict(test.x, verbose=0).argmax(1) == test.y))
    asr = float(np.mean(copy.predict(triggered[test.y != 0], verbose=0).argmax(1) == 0))
    return acc, asr


def test_anp_finds_the_planted_backdoor_channel_with_one_traced_step(monkeypatch):
    from defense import criteria
    from defense.criteria import anp

    model = planted_network()
    assert accuracy_and_asr(model, []) == (1.0, 1.0)
    before = [w.copy() for w in model.get_weights()]
    learners = []
    original = anp.learn_masks

    def keep(*args, **kwargs):
        learner, history = original(*args, **kwargs)
        learners.append(learner)
        return learner, history

    monkeypatch.setattr(anp, "learn_masks", keep)
    cfg = compose(["prune=anp", "prune.anp.iterations=30", "prune.anp.batch_size=32", "prune.anp.fraction=1",
                   "prune.anp.log_every=10"])
    scores = anp.score(model, ["conv_m"], planted_data(64, 0), cfg, 1.0)
    mask = scores.columns["mask"]["conv_m"]
    assert np.all((mask >= 0) & (mask <= 1))
    assert scores.operating_point == {"conv_m": [3]} and mask[3] <= 0.2 and np.all(mask[:3] > 0.9)
    np.testing.assert_allclose(scores.values["conv_m"], 1.0 - mask)
    assert criteria.global_order(scores, ["conv_m"])[0] == ("conv_m", 3)
    assert accuracy_and_asr(model, scores.operating_point["conv_m"]) == (1.0, 0.0)
    assert [row["step"] for row in scores.history] == [10, 20, 30]
    assert all(np.isfinite(row["loss"]) and row["masks_to_prune"] >= 0 for row in scores.history)
    assert [scores.history[-1][f"mask/conv_m/{c}"] for c in range(4)] == pytest.approx(list(mask))  # every mask logged
    assert learners[0]._step.experimental_get_tracing_count() == 1  # one compiled step, never retraced
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the suspect net is untouched


@pytest.mark.parametrize("criterion, options", [
    ("anp", ["prune.anp.iterations=3", "prune.anp.batch_size=8", "prune.anp.log_every=1", "prune.anp.fraction=0.2"]),
    ("rnp", ["prune.rnp.unlearn_epochs=2", "prune.rnp.recover_epochs=1", "prune.rnp.batch_size=8",
             "prune.rnp.fraction=0.2"]),
])
def test_masks_are_learned_from_the_given_clean_validation_images_only(criterion, options, lab3_model, lab3_valid,
                                                                      monkeypatch):
    """A spy on the learning: every image it sees is one of the clean validation images given, with its
    label; no file is opened while scoring; masks in [0, 1]; the network's weights unchanged."""
    import h5py

    from defense import criteria
    from defense.nets.models import scale_pixels

    module = criteria.get(criterion)
    assert module.NEEDS_DATA is True
    seen = []
    original = module.learn_masks

    def spy(model, layers, x, y, s, seed):
        seen.append((np.array(x), np.array(y)))
        return original(model, layers, x, y, s, seed)

    def no_files(*args, **kwargs):
        raise AssertionError(f"{criterion} opened a file while scoring: {args[:1]}")

    monkeypatch.setattr(module, "learn_masks", spy)
    monkeypatch.setattr(h5py, "File", no_files)
    monkeypatch.setattr(np, "load", no_files)
    before = [w.copy() for w in lab3_model.get_weights()]
    cfg = compose(lab3_overrides(f"prune={criterion}", *options))
    clean = lab3_valid.clean
    scores = module.score(lab3_model, ["conv_3", "conv_4"], clean, cfg, 1.0)

    assert len(seen) == 1
    x, y = seen[0]
    assert len(x) == round(0.2 * len(clean)) and len(x) < len(clean)
    given = scale_pixels(clean.x, 1.0).reshape(len(clean), -1)
    for image, label in zip(x.reshape(len(x), -1), y):
        matches = np.flatnonzero(np.all(given == image, axis=1))
        assert len(matches) >= 1 and label in clean.y[matches]
    for name in ("conv_3", "conv_4"):
        mask = scores.columns["mask"][name]
        assert mask.shape == (lab3_model.get_layer(name).filters,) and np.all((mask >= 0) & (mask <= 1))
    assert scores.history and all(np.isfinite(v) for row in scores.history for v in row.values())
    assert all(np.array_equal(a, b) for a, b in zip(before, lab3_model.get_weights()))


def test_anp_learns_the_same_masks_with_the_prefix_computed_once(lab3_model, lab3_valid, monkeypatch):
    """The speed-up (the layers before the first masked one run once per image) changes nothing: the masks
    equal those learned running the whole network every iteration."""
    from defense.criteria import _masking, anp

    cfg = compose(lab3_overrides("prune=anp", "prune.anp.iterations=4", "prune.anp.batch_size=8",
                                 "prune.anp.fraction=0.2"))
    prefix, suffix = _masking.split_before(lab3_model, ["conv_3"], lab3_valid.clean.x[:2])
    assert prefix is not None and suffix.layers[1].name == "conv_3"
    _, suffix = _masking.split_before(lab3_model, ["conv_4", "conv_3"], lab3_valid.clean.x[:2])  # any list order
    assert suffix.layers[1].name == "conv_3"
    cut = anp.score(lab3_model, ["conv_3"], lab3_valid.clean, cfg, 1.0).columns["mask"]["conv_3"]
    monkeypatch.setattr(anp, "split_before", lambda model, layers, probe: (None, model))
    whole = anp.score(lab3_model, ["conv_3"], lab3_valid.clean, cfg, 1.0).columns["mask"]["conv_3"]
    assert np.any(cut < 1.0)
    np.testing.assert_allclose(cut, whole, atol=1e-4)
