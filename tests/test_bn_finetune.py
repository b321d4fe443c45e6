"""Fine-tuning a B' whose channels are pruned on BatchNormalization layers (ANP, RNP: gamma := 0; CLP: gamma and
beta := 0): the pruned BN parameters stay exactly 0, everything else trains, the conv is not pruned instead.

Oracles: the weights read back with plain Keras (get_weights, and the saved .h5 files loaded again), a plain
`fit` without the re-zeroing (the pruned gammas would come back), pruned.json for which channels were pruned.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from conftest import compose
from test_bn_criteria import conv_bn_network, images, preact_network

NETWORKS = {"conv_bn": (conv_bn_network, {"conv_a": [1, 3], "conv_b": [0]}),
            "conv_bn_tanh": (lambda: conv_bn_network(act="tanh"), {"conv_a": [1, 3], "conv_b": [0]}),
            "preact": (preact_network, {"conv_0": [2], "conv_1": [0, 3], "conv_2": [1]})}  # conv_2 via the Add


def _cfg(epochs: int = 2):
    from omegaconf import OmegaConf

    return OmegaConf.create({"model": {"input_divisor": 1.0}, "prune": {"layer": None},
                             "finetune": {"kind": "clean", "epochs": epochs, "learning_rate": 0.05, "batch_size": 8,
                                          "optimizer": "sgd", "holdout": 0.25, "patience": 5}})


def _clean(n: int = 48):
    from defense.data.arrays import LabeledImages

    return LabeledImages("clean", images(n, 1), np.random.default_rng(1).integers(0, 3, n).astype(np.int64))


def _bn_weights(model, bn: str) -> dict[str, np.ndarray]:
    gamma, beta, mean, var = model.get_layer(bn).get_weights()
    return {"gamma": gamma, "beta": beta, "mean": mean, "var": var}


@pytest.mark.parametrize("zero", [("gamma",), ("gamma", "beta")], ids=["gamma", "gamma_beta"])
@pytest.mark.parametrize("net", sorted(NETWORKS))
def test_fine_tuning_keeps_the_pruned_bn_parameters_at_zero_and_trains_the_rest(net, zero):
    import keras

    from defense.nets.models import pruned_copy_layers
    from defense.pipeline.finetune import fine_tune, pruned_layers_zero
    from defense.pruning import bn_pairing
    from defense.tracking.tracker import Tracker

    build, pruned = NETWORKS[net]
    model = build()
    units = bn_pairing.bn_units(model, list(pruned), "bn", "prune.clp.level")
    assert set(units) == set(pruned)
    b_prime = pruned_copy_layers(model, pruned, units, zero)
    before = {bn: _bn_weights(b_prime, bn) for bn in units.values()}
    kernels = {conv: b_prime.get_layer(conv).get_weights()[0].copy() for conv in pruned}
    clean = _clean()

    # the oracle that the re-zeroing matters: a plain fit brings pruned parameters back, except where a ReLU follows
    # a channel with gamma and beta 0 (it outputs relu(0) = 0, and ReLU's gradient at 0 is 0: nothing reaches them)
    alive = keras.models.clone_model(b_prime)
    alive.set_weights(b_prime.get_weights())
    alive.compile(optimizer=keras.optimizers.SGD(0.05), loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    alive.fit(clean.x, clean.y, epochs=1, batch_size=8, verbose=0)
    assert (not pruned_layers_zero(alive, pruned, units, zero)) == (net == "conv_bn_tanh" or zero == ("gamma",))

    b2, info = fine_tune(_cfg(), b_prime, pruned, clean, Tracker(), "drop_test", bn_units=units, bn_zero=zero)
    assert info["ft_epochs"] == 2 and info["ft_train_images"] == 36
    for conv, channels in pruned.items():
        after, was = _bn_weights(b2, units[conv]), before[units[conv]]
        kept = [c for c in range(len(after["gamma"])) if c not in channels]
        assert np.all(after["gamma"][channels] == 0.0)  # exactly, bit for bit
        if "beta" in zero:
            assert np.all(after["beta"][channels] == 0.0)
        else:  # ANP, RNP: beta of a pruned channel is not pruned (the channel outputs its beta) and trains
            assert np.all(after["beta"][channels] != 0.0)
        assert not np.allclose(after["gamma"][kept], was["gamma"][kept])  # the other gammas trained
        assert not np.allclose(after["mean"], was["mean"]) and not np.allclose(after["var"], was["var"])  # moving stats
        kernel = b2.get_layer(conv).get_weights()[0]
        assert np.all(np.any(kernel[..., channels] != 0.0, axis=(0, 1, 2)))  # the conv was not pruned instead
        assert kernel.shape == kernels[conv].shape
    assert pruned_layers_zero(b2, pruned, units, zero)
    assert not pruned_layers_zero(b2, pruned)  # read as conv pruning, the same B'' is not pruned


def test_the_bn_re_zeroing_leaves_nan_parameters_zero_where_pruned():
    """A diverged fine-tuning (NaN weights): `where`, not a product, so the pruned gamma and beta are still 0."""
    from defense.pipeline.finetune import _fine_tune_callback, _pruned_masks, pruned_layers_zero
    from defense.tracking.tracker import Tracker

    model = conv_bn_network()
    bn = model.get_layer("bn_a")
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([np.full_like(gamma, np.nan), np.full_like(beta, np.nan), mean, var])
    pruned, units = {"conv_a": [0, 2]}, {"conv_a": "bn_a"}
    callback = _fine_tune_callback(_pruned_masks(model, pruned, units, ("gamma", "beta")), {"patience": 0}, "drop_2",
                                   Tracker(), False)
    callback.rezero()
    gamma, beta, mean2, var2 = bn.get_weights()
    assert np.all(gamma[[0, 2]] == 0.0) and np.all(beta[[0, 2]] == 0.0)
    assert np.isnan(gamma[[1, 3]]).all() and np.isnan(beta[[1, 3]]).all()  # the others untouched
    np.testing.assert_array_equal(mean2, mean)  # the moving statistics are never masked
    assert pruned_layers_zero(model, pruned, units, ("gamma", "beta"))
    assert not np.any(model.get_layer("conv_a").get_weights()[0] == 0.0)  # the conv is not touched


# ------------------------------------------------------------------------------------------------
# end to end: defense=clp on the embedded scenario with dataset.scenario.arch=vgg_bn, fine-tuned

TINY_VGG_BN = ["dataset.scenario.arch=vgg_bn", "dataset.scenario.vgg_bn.widths=[8,8,8,8]",
               "dataset.scenario.vgg_bn.dense=16", "dataset.scenario.epochs=3", "dataset.scenario.learning_rate=0.005",
               "dataset.scenario.fractions.train=0.4", "dataset.scenario.fractions.valid=0.1",
               "dataset.scenario.fractions.test=0.1", "dataset.scenario.min_clean_accuracy=0",
               "dataset.scenario.min_asr=0"]


def test_clp_on_a_vgg_bn_scenario_is_fine_tuned_with_its_bn_channels_kept_pruned(tmp_path, caplog):
    """defense=clp + finetune=sgd_cosine (1 epoch, a learning rate that keeps the held-out accuracy within the
    defender's budget): every reached row is fine-tuned, the drops and the operating point by fine_tune, the
    defender's and the oracle's points through their grid (choose_finetuning); every saved B'' has gamma and
    beta of exactly the channels of pruned.json at 0 and those channels' conv kernels not zeroed."""
    import logging

    import keras

    from defense.pipeline.sweep import point_name
    from defense.run import run_defense

    cfg = compose([*TINY_VGG_BN, "defense=clp", "finetune=sgd_cosine", "finetune.epochs=1",
                   "finetune.learning_rate=0.005", "finetune.shift=0", "prune.drops=[4,30]", "tracking=none",
                   "progress=false"])
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING):
        run_defense(cfg, out)
    assert not [r for r in caplog.records if "no fine-tuning" in r.getMessage()]
    with (out / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    kept = json.loads((out / "pruned.json").read_text())
    reached = [r for r in rows if r["reached"] == "True"]
    assert {r["point"] for r in reached} == {"drop", "operating_point", "defender", "oracle_test_asr"}
    assert all(r["defense_variant"] == "bn" for r in rows)
    assert {r["point"]: r["ft_within_budget"] for r in reached if r["point"] in ("defender", "oracle_test_asr")} == \
        {"defender": "True", "oracle_test_asr": "True"}
    checked = 0
    for row in reached:
        assert row["diverged"] == "False"
        for key in ("ft_test_acc", "ft_test_asr", "ft_der", "ft_g_test_acc", "ft_g_test_asr", "ft_holdout_acc"):
            assert math.isfinite(float(row[key])), (row["point"], key)
        name = point_name({"point": row["point"], "drop": float(row["drop"] or "nan")})
        pruned = kept[name]
        assert sum(len(c) for c in pruned.values()) == int(row["channels_pruned"])
        b2 = keras.models.load_model(row["ft_model_path"], compile=False)  # the saved B'', by plain Keras
        b1 = keras.models.load_model(row["model_path"], compile=False)
        assert not all(np.array_equal(a, b) for a, b in zip(b1.get_weights(), b2.get_weights()))  # it did train
        for conv, channels in pruned.items():
            bn = f"bn_{conv.split('_')[1]}"  # vgg_bn: conv_k -> bn_k
            gamma, beta, _, _ = b2.get_layer(bn).get_weights()
            assert np.all(gamma[channels] == 0.0) and np.all(beta[channels] == 0.0), (name, conv)
            kernel = b2.get_layer(conv).get_weights()[0]
            assert np.all(np.any(kernel[..., channels] != 0.0, axis=(0, 1, 2))), (name, conv)
            checked += len(channels)
        assert row.get("ft_compact_path", "") == ""
    assert checked >= 3  # pruned channels were checked (drop 30 alone prunes several)
    assert not list((out / "models").glob("*compact*"))


@pytest.mark.parametrize("shift", [0, 1], ids=["arrays", "shifted"])
@pytest.mark.parametrize("zero", [("gamma",), ("gamma", "beta")], ids=["gamma", "gamma_beta"])
@pytest.mark.parametrize("net", ["conv_bn_tanh", "preact"])
def test_whole_epoch_calls_give_the_weights_of_one_batch_per_call_with_a_callback_re_zeroing(net, zero, shift):
    """whole_epochs (a compiled epoch, the pruned parameters kept at 0 by a variable constraint) against one batch
    per call re-zeroed by a callback after each: the same weights bit for bit and the same per-epoch history, on
    networks where a plain fit brings the pruned parameters back (the test above), with a holdout and the cosine
    schedule, with and without the shifted batches."""
    from omegaconf import OmegaConf

    from defense.nets.models import pruned_copy_layers
    from defense.pipeline.finetune import fine_tune, pruned_layers_zero
    from defense.pruning import bn_pairing
    from defense.tracking.tracker import Tracker

    build, pruned = NETWORKS[net]
    model = build()
    units = bn_pairing.bn_units(model, list(pruned), "bn", "prune.clp.level")
    cfg = _cfg(epochs=3)
    cfg.finetune.update({"shift": shift, "lr_schedule": "cosine", "momentum": 0.9})
    runs = {}
    for whole in (True, False):
        history = []
        b_prime = pruned_copy_layers(model, pruned, units, zero)
        b2, info = fine_tune(OmegaConf.create(OmegaConf.to_container(cfg)), b_prime, pruned, _clean(), Tracker(),
                             "drop_test", bn_units=units, bn_zero=zero, history=history, whole_epochs=whole)
        assert pruned_layers_zero(b2, pruned, units, zero)
        assert all(v.constraint is None for v in b2.weights)  # the constraints are taken off after
        runs[whole] = (b2.get_weights(), info, history)
    (w_whole, info_whole, h_whole), (w_batch, info_batch, h_batch) = runs[True], runs[False]
    assert len(h_whole) == 3 and info_whole == info_batch
    for a, b in zip(w_whole, w_batch):
        np.testing.assert_array_equal(a, b)
    assert h_whole == h_batch
