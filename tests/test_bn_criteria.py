"""ANP, RNP and CLP on networks WITH BatchNormalization, as their reference codes act there.

Oracles: one ANP iteration re-computed in float64 numpy (the network's forward pass written out, BN with
batch statistics, gradients by central finite differences); BN-level pruning checked against plain Keras
(set_weights with gamma, or gamma and beta, zeroed, then predict); CLP's ranking against numpy's
singular values with the reference's pairing (each BN with the last conv before it in layer order).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conftest import compose


# ------------------------------------------------------------------------------------------------
# tiny networks


def _randomize_bn(layer, rng, n):
    layer.set_weights([rng.uniform(0.3, 2.0, n) * rng.choice([-1.0, 1.0], n), rng.normal(size=n),
                       rng.normal(size=n) * 0.3, rng.uniform(0.2, 3.0, n)])


def _center(model, rng):
    """Random readout weights, biased so that the classes are balanced on random images."""
    out = model.get_layer("out")
    out.set_weights([rng.normal(size=out.kernel.shape), np.zeros(3)])
    logits = model.predict(images(200, 99), verbose=0)
    out.set_weights([out.get_weights()[0], -np.median(logits, axis=0)])


def conv_bn_network(seed: int = 0, act: str = "relu"):
    """conv_a -> bn_a -> relu -> conv_b -> bn_b -> relu -> flatten -> dense (logits); bias-free convs.
    act: another activation in place of the ReLUs (e.g. tanh: a channel with gamma and beta 0 still gets gradients)."""
    import keras

    def activation():
        return keras.layers.ReLU() if act == "relu" else keras.layers.Activation(act)

    rng = np.random.default_rng(seed)
    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv_a")(x)
    h = keras.layers.BatchNormalization(name="bn_a")(h)
    h = activation()(h)
    h = keras.layers.Conv2D(3, 2, use_bias=False, name="conv_b")(h)
    h = keras.layers.BatchNormalization(name="bn_b", epsilon=0.01)(h)
    h = activation()(h)
    h = keras.layers.Flatten()(h)
    model = keras.Model(x, keras.layers.Dense(3, name="out")(h))
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([rng.normal(size=layer.kernel.shape) / np.sqrt(np.prod(layer.kernel.shape[:3]))])
        if isinstance(layer, keras.layers.BatchNormalization):
            _randomize_bn(layer, rng, layer.gamma.shape[0])
    _center(model, rng)
    return model


def preact_network(seed: int = 0):
    """conv_0 -> [bn_1 -> relu -> conv_1 -> bn_2 -> relu -> conv_2] + conv_0 -> Add -> bn_3 -> relu -> flatten ->
    dense (logits): a PreAct block, bias-free convs. Pairing: conv_0-bn_1, conv_1-bn_2, conv_2-bn_3 (via the Add)."""
    import keras

    rng = np.random.default_rng(seed)
    x = keras.Input((6, 6, 2))
    c0 = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv_0")(x)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn_1")(c0))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv_1")(h)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn_2")(h))
    h = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv_2")(h)
    h = keras.layers.Add(name="add")([h, c0])
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn_3")(h))
    h = keras.layers.Flatten()(h)
    model = keras.Model(x, keras.layers.Dense(3, name="out")(h))
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            layer.set_weights([rng.normal(size=layer.kernel.shape) / np.sqrt(np.prod(layer.kernel.shape[:3]))])
        if isinstance(layer, keras.layers.BatchNormalization):
            _randomize_bn(layer, rng, layer.gamma.shape[0])
    _center(model, rng)
    return model


def images(n: int, seed: int, shape=(6, 6, 2)) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *shape)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# the pairing rule


def test_each_conv_is_paired_with_the_bn_of_its_output_channels():
    from defense.pruning import bn_pairing

    model = preact_network()
    units = bn_pairing.bn_units(model, ["conv_0", "conv_1", "conv_2"], "auto", "prune.anp.level")
    assert units == {"conv_0": "bn_1", "conv_1": "bn_2", "conv_2": "bn_3"}
    assert bn_pairing.variant(units, ["conv_0", "conv_1", "conv_2"]) == "bn"
    assert bn_pairing.bn_units(model, ["conv_0"], "conv", "prune.anp.level") == {}
    assert bn_pairing.variant({}, ["conv_0"]) == "conv (adapted: no BatchNormalization)"


# ------------------------------------------------------------------------------------------------
# BN-level pruning: the evaluator against set_weights


def set_weights_labels(model, pruned: dict, bn_of: dict, zero) -> np.ndarray:
    """Plain Keras: a clone, the BN's gamma (and beta) of the pruned channels set to 0, predict."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    for conv, channels in pruned.items():
        bn = clone.get_layer(bn_of[conv])
        gamma, beta, mean, var = bn.get_weights()
        gamma[list(channels)] = 0.0
        if "beta" in zero:
            beta[list(channels)] = 0.0
        bn.set_weights([gamma, beta, mean, var])
    return clone.predict(X_EVAL, verbose=0).argmax(1)


X_EVAL = images(96, 3)


@pytest.mark.parametrize("zero", [("gamma",), ("gamma", "beta")])
@pytest.mark.parametrize("build, layers", [(conv_bn_network, ["conv_a", "conv_b"]),
                                           (preact_network, ["conv_0", "conv_1", "conv_2"])])
def test_bn_level_pruning_predicts_what_set_weights_predicts(build, layers, zero):
    from defense.nets.models import pruned_copy_layers
    from defense.pruning import bn_pairing
    from defense.pruning.channel_masks import ChannelMasks

    model = build()
    units = bn_pairing.bn_units(model, layers, "bn", "prune.anp.level")
    engine = ChannelMasks(model, layers, 32, units, zero)
    every = [(name, c) for name in layers for c in range(model.get_layer(name).filters)]
    rng = np.random.default_rng(5)
    sets = [every[:1], every[-3:], every] + [[every[i] for i in sorted(rng.choice(len(every), k, replace=False))]
                                               for k in (2, 4, 6)]
    changed = 0
    for pairs in sets:
        pruned = {}
        for name, c in pairs:
            pruned.setdefault(name, []).append(c)
        expected = set_weights_labels(model, pruned, units, zero)
        got = engine.predict(X_EVAL, pairs, [0, len(pairs)])
        np.testing.assert_array_equal(got[:, 0], model.predict(X_EVAL, verbose=0).argmax(1))
        np.testing.assert_array_equal(got[:, 1], expected)
        copy = pruned_copy_layers(model, pruned, units, zero)
        np.testing.assert_array_equal(copy.predict(X_EVAL, verbose=0).argmax(1), expected)
        changed += int(np.any(expected != got[:, 0]))
    assert changed >= 2  # the pruning matters on these images
    assert 1 <= engine.traces <= engine.segments()  # one trace per segment of the walk at most, not per step


def test_bn_level_masks_reuse_the_walk_before_the_changed_mask_on_a_residual_network():
    """Every step of a mixed order over three BN-masked convs of a residual network: the walk from the
    earliest changed mask (the tensors before it, skip connections included, from the step before) gives the
    labels of the whole walk, and those of set_weights at the last step."""
    from defense.pruning import bn_pairing
    from defense.pruning.channel_masks import ChannelMasks

    model, layers = preact_network(), ["conv_0", "conv_1", "conv_2"]
    units = bn_pairing.bn_units(model, layers, "bn", "prune.anp.level")
    engine = ChannelMasks(model, layers, 32, units, ("gamma",))
    every = [(name, c) for name in layers for c in range(model.get_layer(name).filters)]
    pairs = [every[i] for i in np.random.default_rng(3).permutation(len(every))]
    steps = list(range(len(pairs) + 1))
    reused = engine.predict(X_EVAL, pairs, steps)
    np.testing.assert_array_equal(reused, engine.predict(X_EVAL, pairs, steps, reuse=False))
    assert len({tuple(reused[:, j]) for j in steps}) >= 3  # the labels change along the way
    pruned = {}
    for name, c in pairs:
        pruned.setdefault(name, []).append(c)
    np.testing.assert_array_equal(reused[:, -1], set_weights_labels(model, pruned, units, ("gamma",)))
    assert engine.traces <= engine.segments() + 1


# ------------------------------------------------------------------------------------------------
# ANP: one iteration against numpy


def tiny_anp_network():
    """conv (2x2, 3 filters, bias-free) -> BN -> relu -> flatten -> dense (2, logits) on 3x3x2 images."""
    import keras

    rng = np.random.default_rng(11)
    x = keras.Input((3, 3, 2))
    h = keras.layers.Conv2D(3, 2, use_bias=False, name="conv")(x)
    h = keras.layers.BatchNormalization(name="bn", epsilon=1e-3)(h)
    h = keras.layers.Flatten()(keras.layers.ReLU()(h))
    model = keras.Model(x, keras.layers.Dense(2, name="out")(h))
    model.get_layer("conv").set_weights([rng.normal(size=(2, 2, 2, 3))])
    _randomize_bn(model.get_layer("bn"), rng, 3)
    model.get_layer("out").set_weights([rng.normal(size=(12, 2)), rng.normal(size=2) * 0.1])
    return model


def numpy_loss(model, x, y, m, d, e):
    """Float64 cross-entropy of the network with gamma * (m + d) and beta * (1 + e), BN with batch statistics."""
    kernel = model.get_layer("conv").get_weights()[0].astype(np.float64)
    gamma, beta, _, _ = [w.astype(np.float64) for w in model.get_layer("bn").get_weights()]
    eps = model.get_layer("bn").epsilon
    w, b = [v.astype(np.float64) for v in model.get_layer("out").get_weights()]
    x = x.astype(np.float64)
    z = np.zeros((len(x), 2, 2, 3))
    for i, j in itertools.product(range(2), range(2)):
        z[:, i, j, :] = np.einsum("nabc,abck->nk", x[:, i:i + 2, j:j + 2, :], kernel)
    mean, var = z.mean(axis=(0, 1, 2)), z.var(axis=(0, 1, 2))
    h = (z - mean) / np.sqrt(var + eps) * (gamma * (m + d)) + beta * (1.0 + e)
    logits = np.maximum(h, 0.0).reshape(len(x), -1) @ w + b
    top = logits.max(1, keepdims=True)
    lse = np.log(np.exp(logits - top).sum(1)) + top[:, 0]
    return float(np.mean(lse - logits[np.arange(len(x)), y]))


def finite_diff(f, v, h=1e-5):
    g = np.zeros_like(v)
    for k in range(len(v)):
        up, down = v.copy(), v.copy()
        up[k] += h
        down[k] -= h
        g[k] = (f(up) - f(down)) / (2 * h)
    return g


def test_one_anp_iteration_on_a_bn_network_equals_numpy():
    import tensorflow as tf

    from defense.criteria import anp

    model = tiny_anp_network()
    before = [w.copy() for w in model.get_weights()]
    s = anp.settings(compose(["prune=anp", "prune.anp.eps=0.4", "prune.anp.alpha=0.2", "prune.anp.lr=0.2",
                              "prune.anp.momentum=0.9"]).prune)
    seed = 7
    learner = anp.MaskLearner(model, ["conv"], s, seed, None, {"conv": "bn"})
    m0 = np.array([0.9, 0.5, 0.999])
    v0 = np.array([0.3, -0.2, -4.0])  # a velocity from earlier iterations: the momentum term shows; m[2] clips at 1
    learner.masks.masks[0].assign(m0.astype(np.float32))
    learner.velocity[0].assign(v0.astype(np.float32))
    x = images(16, 4, (3, 3, 2))
    y = np.random.default_rng(4).integers(0, 2, 16).astype(np.int64)
    learner.step(x, y)

    # the noise start: uniform in [-eps, eps], drawn from the learner's seeded generator, weights then bias
    gen = tf.random.Generator.from_seed(seed)
    d0 = gen.uniform([3], -0.4, 0.4).numpy().astype(np.float64)
    e0 = gen.uniform([3], -0.4, 0.4).numpy().astype(np.float64)
    # one signed ascent step of size eps / steps on CE (loss_noise = -CE, sign_grad, SGD step), no clip
    gd = finite_diff(lambda d: numpy_loss(model, x, y, m0, d, e0), d0)
    ge = finite_diff(lambda e: numpy_loss(model, x, y, m0, d0, e), e0)
    assert np.all(np.abs(gd) > 1e-3) and np.all(np.abs(ge) > 1e-3)  # the signs are well defined
    d1, e1 = d0 + 0.4 * np.sign(gd), e0 + 0.4 * np.sign(ge)
    np.testing.assert_allclose(learner.noise_w[0].numpy(), d1, atol=1e-6)
    np.testing.assert_allclose(learner.noise_b[0].numpy(), e1, atol=1e-6)
    # the mask step: alpha * CE(natural) + (1 - alpha) * CE(perturbed), SGD with momentum, clip to [0, 1]
    total = lambda m: 0.2 * numpy_loss(model, x, y, m, 0.0, 0.0) + 0.8 * numpy_loss(model, x, y, m, d1, e1)  # noqa: E731
    g = finite_diff(total, m0)
    v1 = 0.9 * v0 + g
    m1 = np.clip(m0 - 0.2 * v1, 0.0, 1.0)
    assert m1[2] == 1.0 and 0 < m1[0] < 1
    np.testing.assert_allclose(learner.velocity[0].numpy(), v1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(learner.masks.masks[0].numpy(), m1, rtol=1e-4, atol=1e-5)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # moving statistics included


# ------------------------------------------------------------------------------------------------
# ANP and RNP score a BN network; the conv adaptation copes with bias-free convs


@pytest.mark.parametrize("level", ["bn", "conv"])
def test_anp_and_rnp_learn_on_bias_free_bn_networks(level):
    from defense.criteria import anp, rnp
    from defense.data.arrays import LabeledImages

    model = preact_network()
    before = [w.copy() for w in model.get_weights()]
    clean = LabeledImages("clean_valid", (images(40, 8) * 60 + 128).clip(0, 255).astype(np.float32),
                          np.random.default_rng(8).integers(0, 3, 40).astype(np.int64))
    layers = ["conv_0", "conv_1", "conv_2"]
    cfg = compose(["prune=anp", "prune.anp.iterations=3", "prune.anp.batch_size=8", f"prune.anp.level={level}",
                   "prune.anp.log_every=1"])
    scores = anp.score(model, layers, clean, cfg, 255.0)
    cfg = compose(["prune=rnp", "prune.rnp.unlearn_epochs=1", "prune.rnp.recover_epochs=1", "prune.rnp.batch_size=8",
                   f"prune.rnp.level={level}"])
    scores_rnp = rnp.score(model, layers, clean, cfg, 255.0)
    for sc in (scores, scores_rnp):
        for name in layers:
            mask = sc.columns["mask"][name]
            assert mask.shape == (4,) and np.all((mask >= 0) & (mask <= 1))
        if level == "bn":
            assert sc.bn_units == {"conv_0": "bn_1", "conv_1": "bn_2", "conv_2": "bn_3"} and sc.variant == "bn"
            assert sc.bn_zero == ("gamma",)
        else:
            assert sc.bn_units == {} and sc.variant == "conv (adapted: no BatchNormalization)"
    assert any(np.any(scores.columns["mask"][n] < 1) for n in layers)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


# ------------------------------------------------------------------------------------------------
# CLP: the reference's formula and pairing


def test_clp_ranking_on_a_bn_network_equals_the_reference_formula():
    import keras

    from defense import criteria
    from defense.criteria import clp

    model = preact_network(seed=3)
    layers = ["conv_0", "conv_1", "conv_2"]
    u = 0.5
    # defense.py::CLP: walk the modules in order, remember the last conv, score each BN's channels with it
    bounds, conv = {}, None
    for layer in model.layers:
        if isinstance(layer, keras.layers.Conv2D):
            conv = layer
        elif isinstance(layer, keras.layers.BatchNormalization):
            gamma, _, _, var = layer.get_weights()
            kernel = conv.get_weights()[0].astype(np.float64)  # (kh, kw, in, out)
            lips = []
            for idx in range(kernel.shape[-1]):
                w = kernel[..., idx].transpose(2, 0, 1).reshape(kernel.shape[2], -1)  # weight[idx].reshape(in, -1)
                lips.append(np.linalg.svd(w * abs(gamma[idx] / np.sqrt(var[idx])), compute_uv=False).max())
            bounds[conv.name] = np.array(lips)
    assert set(bounds) == set(layers)
    scores = clp.score(model, layers, None, compose(["prune=clp", f"prune.clp.u={u}"]), 1.0)
    for name in layers:
        b = bounds[name]
        np.testing.assert_allclose(scores.columns["clp_bound"][name], b, rtol=1e-6)
        assert scores.operating_point[name] == [int(i) for i in np.flatnonzero(b > b.mean() + u * b.std(ddof=1))]
    z = {n: (bounds[n] - bounds[n].mean()) / bounds[n].std(ddof=1) for n in layers}
    keyed = sorted(((-z[n][c], i, c, n) for i, n in enumerate(layers) for c in range(4)))
    assert criteria.global_order(scores, layers) == [(n, c) for _, _, c, n in keyed]
    assert scores.bn_units == {"conv_0": "bn_1", "conv_1": "bn_2", "conv_2": "bn_3"}
    assert scores.bn_zero == ("gamma", "beta") and scores.variant == "bn"


# ------------------------------------------------------------------------------------------------
# bad input


def test_level_bn_on_a_network_without_per_channel_bn_is_one_line():
    import keras

    from defense.core.errors import DefenseError
    from defense.criteria import anp

    x = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, use_bias=False, name="conv_a")(x)
    h = keras.layers.BatchNormalization(axis=1, name="bn_rows")(h)  # over the rows, not the channels
    model = keras.Model(x, keras.layers.Dense(2)(keras.layers.Flatten()(h)))
    cfg = compose(["prune=anp", "prune.anp.level=bn"])
    with pytest.raises(DefenseError) as err:
        anp.bn_units(model, ["conv_a"], cfg)
    message = str(err.value)
    assert "\n" not in message and "prune.anp.level" in message and "bn_rows" in message
    assert anp.bn_units(model, ["conv_a"], compose(["prune=anp"])) == {}  # auto falls back to the conv


@pytest.mark.parametrize("criterion, key, value", [("anp", "images", 0), ("rnp", "images", 0), ("anp", "level", "bnx"),
                                                   ("clp", "level", "gamma"), ("anp", "fraction", 0)])
def test_bad_bn_options_are_one_line_naming_the_key(criterion, key, value):
    from defense import criteria
    from defense.core.errors import DefenseError

    cfg = compose([f"prune={criterion}", f"prune.{criterion}.{key}={value}"])
    with pytest.raises(DefenseError) as err:
        criteria.get(criterion).check_config(cfg.prune)
    assert "\n" not in str(err.value) and f"prune.{criterion}.{key}" in str(err.value)


def test_images_count_is_capped_and_fewer_than_classes_warns(caplog):
    import logging

    from defense.criteria._masking import clean_subset
    from defense.data.arrays import LabeledImages

    clean = LabeledImages("clean_valid", images(30, 1), np.arange(30) % 3)
    x, y = clean_subset(clean, 500, None, 0, 1.0, "prune.criterion=anp", 3)
    assert len(x) == 30
    x, y = clean_subset(clean, 12, None, 0, 1.0, "prune.criterion=anp", 3)
    assert len(x) == 12
    with caplog.at_level(logging.WARNING):
        x, _ = clean_subset(clean, 2, None, 0, 1.0, "prune.criterion=anp", 3)
    warned = [r.getMessage() for r in caplog.records if "fewer than" in r.getMessage()]
    assert len(x) == 2 and len(warned) == 1 and "2 clean validation images" in warned[0]
    x, _ = clean_subset(clean, 500, 0.5, 0, 1.0, "prune.criterion=anp", 3)  # an explicit fraction replaces images
    assert len(x) == 15


# ------------------------------------------------------------------------------------------------
# the runner on a BN network: sweep, operating point, B', compact export, summary.csv and MLflow


def test_run_on_a_bn_network_prunes_the_bn_and_names_the_variant(tmp_path):
    """prune=clp on a saved conv-BN network (model=auto, dataset=files): the B' of the operating point has
    gamma and beta of exactly the operating point's channels zeroed (set_weights oracle on its labels),
    summary.csv and the MLflow run say `bn`, and no compact model is written for a BN-level B'."""
    import csv
    import json

    import keras
    import mlflow

    from defense.run import run_defense

    rng = np.random.default_rng(0)
    x = keras.Input((12, 12, 1))
    h = keras.layers.Conv2D(8, 3, use_bias=False, name="conv_a")(x)
    h = keras.layers.ReLU()(keras.layers.BatchNormalization(name="bn_a")(h))
    h = keras.layers.Flatten()(h)
    model = keras.Model(x, keras.layers.Dense(4, name="out")(h))
    model.get_layer("conv_a").set_weights([rng.normal(size=(3, 3, 1, 8)) / 3])
    gamma = rng.uniform(0.5, 1.5, 8)
    gamma[2] = 30.0  # one channel CLP must find
    model.get_layer("bn_a").set_weights([gamma, rng.normal(size=8), rng.normal(size=8) * 0.1, rng.uniform(0.5, 2, 8)])
    model.get_layer("out").set_weights([rng.normal(size=(800, 4)) * 0.1, np.zeros(4)])
    model.save(tmp_path / "bn.h5")
    pixels = rng.integers(0, 256, (60, 12, 12), dtype=np.uint8)
    labels = model.predict(pixels[..., None] / 255.0, verbose=0).argmax(1)
    for name in ("valid", "test"):
        np.savez(tmp_path / f"{name}.npz", x=pixels, y=labels)
    db = tmp_path / "mlflow.db"
    cfg = compose(["model=auto", f"model.path={tmp_path / 'bn.h5'}", "model.input_divisor=255", "dataset=files",
                   f"dataset.clean_valid={tmp_path / 'valid.npz'}", f"dataset.clean_test={tmp_path / 'test.npz'}",
                   "prune=clp", "prune.clp.u=2", "prune.layer=conv_a", "prune.drops=[4]", "progress=false",
                   f"tracking.uri=sqlite:///{db}", "tracking.log_models=false", "compact=true"])
    out = tmp_path / "run"
    run_defense(cfg, out)

    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(r["defense_variant"] == "bn" for r in rows)
    op = json.loads((out / "pruned.json").read_text())["operating_point"]
    assert op == {"conv_a": [2]}
    (row,) = [r for r in rows if r["point"] == "operating_point"]
    b_prime = keras.models.load_model(row["model_path"], compile=False)
    g, b, mean, var = [w.copy() for w in model.get_layer("bn_a").get_weights()]
    g[2], b[2] = 0.0, 0.0
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    clone.get_layer("bn_a").set_weights([g, b, mean, var])
    for got, want in zip(b_prime.get_weights(), clone.get_weights()):
        np.testing.assert_array_equal(got, want)
    assert not list((out / "models").glob("*compact*"))
    runs = mlflow.MlflowClient(f"sqlite:///{db}").search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()])
    assert [r.data.tags.get("defense_variant") for r in runs] == ["bn"] and runs[0].info.status == "FINISHED"


def test_learning_batches_are_shifted_with_bn_masks_and_not_for_the_conv_adaptation(monkeypatch):
    """null shift: 4 px per 32 of width with masks on BN (RandomCrop(32, padding=4)), none for the conv
    adaptation; an explicit shift wins. A spy on the learner's batches: every image is
    a translation of a given image by at most `shift` pixels (numpy: a window of the zero-padded images)."""
    from defense.criteria import anp

    model = conv_bn_network()
    x = images(16, 2)
    y = np.zeros(16, np.int64)
    seen = []
    original = anp.MaskLearner.step
    monkeypatch.setattr(anp.MaskLearner, "step", lambda self, xb, yb: (seen.append(np.array(xb)), original(self, xb, yb))[1])
    base = ["prune=anp", "prune.anp.iterations=2", "prune.anp.batch_size=4"]
    for extra, shift in [([], 1), (["prune.anp.level=conv"], 0), (["prune.anp.shift=2"], 2)]:
        seen.clear()
        anp.learn_masks(model, ["conv_a", "conv_b"], x, y, anp.settings(compose(base + extra).prune), 0)
        for batch in seen:
            for image in batch:
                padded = np.pad(x, ((0, 0), (shift, shift), (shift, shift), (0, 0)))
                windows = [padded[:, dy:dy + 6, dx:dx + 6] for dy in range(2 * shift + 1) for dx in range(2 * shift + 1)]
                assert any(np.any(np.all(w == image, axis=(1, 2, 3))) for w in windows)
        if shift == 0:
            assert all(np.any(np.all(x == image, axis=(1, 2, 3))) for batch in seen for image in batch)
