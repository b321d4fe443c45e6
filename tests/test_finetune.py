"""Fine-pruning (finetune=clean): B'' keeps its pruned channels at zero, trains on clean validation
data only, is scored with RA/DER, and the `experiment=fine_pruning` preset runs end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import REPO, compose, lab3_overrides

FAST = ["finetune=clean", "finetune.epochs=2", "tracking=none", "progress=false"]


def _rows(x: np.ndarray) -> set[bytes]:
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32))
    return {row.tobytes() for row in x.reshape(len(x), -1)}


# ---- scores on a hand-made case -----------------------------------------------------------------
def test_der_and_ra_on_a_hand_made_case():
    from defense.core import metrics
    from defense.pipeline.finetune import der, score_fine_pruned

    # DER = (max(0, dASR) - max(0, dACC) + 1) / 2 on fractions, d = before - after
    assert metrics.defense_effectiveness_rating(90.0, 88.0, 100.0, 4.0) == pytest.approx((0.96 - 0.02 + 1) / 2)
    assert metrics.defense_effectiveness_rating(90.0, 95.0, 10.0, 20.0) == pytest.approx(0.5)  # no gain, no cost
    assert metrics.defense_effectiveness_rating(100.0, 0.0, 100.0, 0.0) == pytest.approx(0.5)
    assert math.isnan(der(90.0, 88.0, float("nan"), float("nan")))

    num_classes = 3
    clean_y = np.array([0, 1, 2, 1, 0])
    pred_b_clean = np.array([0, 1, 2, 1, 0])  # B: 100 % clean accuracy
    pred_ft_clean = np.array([0, 1, 2, 2, 0])  # B'': 80 %; G(B, B'') flags image 3 -> 80 %
    target = np.array([0, 0, 0, 0])
    clean_label = np.array([1, 2, 1, 2])
    pred_b = np.array([0, 0, 0, 0])  # B: ASR 100 %, RA 0 %
    pred_ft = np.array([1, 2, 0, 1])  # B'': ASR 25 %, RA 50 % (images 0 and 1 back to their true label)
    row = score_fine_pruned(clean_y, pred_b_clean, pred_ft_clean, {"square": (target, clean_label, pred_b, pred_ft)},
                            num_classes)
    assert row["base_test_acc"] == pytest.approx(100.0)
    assert row["base_test_asr"] == pytest.approx(100.0)
    assert row["ft_test_acc"] == pytest.approx(80.0)
    assert row["ft_test_asr"] == pytest.approx(25.0)
    assert row["ft_test_ra"] == pytest.approx(50.0)
    assert row["ft_der"] == pytest.approx((0.75 - 0.20 + 1) / 2)  # 0.775
    # G(B, B''): B's label where they agree, class 3 ("backdoored") where they differ
    assert row["ft_g_test_acc"] == pytest.approx(80.0)
    assert row["ft_g_test_asr"] == pytest.approx(25.0)  # only image 2: both say 0
    assert row["ft_g_test_ra"] == pytest.approx(0.0)  # G never says the true label where B was fooled
    assert row["ft_g_der"] == pytest.approx(0.775)

    # several poisoned sets: means plus per-set columns; RA is nan without clean_label
    two = score_fine_pruned(clean_y, pred_b_clean, pred_ft_clean,
                            {"a": (target, clean_label, pred_b, pred_ft), "b": (target, None, pred_b, pred_b)},
                            num_classes, base_acc=99.0, base_asr=90.0)
    assert two["base_test_acc"] == 99.0 and two["base_test_asr"] == 90.0
    assert two["ft_test_asr_a"] == pytest.approx(25.0) and two["ft_test_asr_b"] == pytest.approx(100.0)
    assert two["ft_test_asr"] == pytest.approx(62.5)
    assert two["ft_test_ra"] == pytest.approx(50.0)  # mean over the sets that have clean_label
    assert math.isnan(two["ft_test_ra_b"])
    assert two["ft_der"] == pytest.approx((max(0, 0.90 - 0.625) - (0.99 - 0.80) + 1) / 2)


def test_bad_finetune_options_name_the_option():
    from omegaconf import OmegaConf

    from defense.core.errors import DefenseError
    from defense.pipeline.finetune import finetune_settings, split_holdout

    with pytest.raises(DefenseError, match="finetune.optimizer"):
        finetune_settings(OmegaConf.create({"kind": "clean", "optimizer": "rmsprop"}))
    with pytest.raises(DefenseError, match="finetune.holdout"):
        finetune_settings(OmegaConf.create({"kind": "clean", "holdout": 1.0}))
    with pytest.raises(DefenseError, match="finetune.epochs"):
        finetune_settings(OmegaConf.create({"kind": "clean", "epochs": 0}))
    train, hold = split_holdout(10, 0.2, 0)
    assert len(hold) == 2 and sorted(set(train) | set(hold)) == list(range(10)) and not set(train) & set(hold)


# ---- the pruned channels stay pruned --------------------------------------------------------------
def test_rezeroing_keeps_channels_zero_even_where_gradients_are_not(tmp_path):
    """A linear conv layer: the pruned channels get non-zero gradients, yet end exactly zero."""
    import keras
    from omegaconf import OmegaConf

    from defense.nets import models
    from defense.data.arrays import LabeledImages
    from defense.pipeline.finetune import fine_tune, pruned_channels_zero
    from defense.tracking.tracker import Tracker

    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(6, 3, activation=None, name="conv_3")(inp)  # act(0) = 0 but d/dw != 0
    out = keras.layers.Dense(3, activation="softmax")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    rng = np.random.default_rng(0)
    images = LabeledImages("clean", rng.random((64, 8, 8, 1), dtype=np.float32), rng.integers(0, 3, 64))
    cfg = OmegaConf.create({"model": {"input_divisor": 1.0}, "prune": {"layer": "conv_3"},
                            "finetune": {"kind": "clean", "epochs": 3, "learning_rate": 0.05, "batch_size": 16,
                                         "optimizer": "sgd", "holdout": 0.25, "patience": 5}})
    pruned = [1, 4]

    # without re-zeroing these channels would come back to life
    alive = models.pruned_copy(model, "conv_3", pruned)
    alive.compile(optimizer=keras.optimizers.SGD(0.05), loss="sparse_categorical_crossentropy")
    alive.fit(images.x, images.y, epochs=1, batch_size=16, verbose=0)
    assert not pruned_channels_zero(alive, "conv_3", pruned)

    before = models.pruned_copy(model, "conv_3", pruned)
    kept_before = before.get_layer("conv_3").get_weights()[0][..., [0, 2, 3, 5]].copy()
    b2, info = fine_tune(cfg, before, pruned, images, Tracker(), "drop_test")
    kernel, bias = b2.get_layer("conv_3").get_weights()
    assert np.all(kernel[..., pruned] == 0.0) and np.all(bias[pruned] == 0.0)
    assert not np.allclose(kernel[..., [0, 2, 3, 5]], kept_before)  # the rest did train
    assert info["ft_train_images"] == 48 and info["ft_holdout_images"] == 16
    path = models.save_model(b2, tmp_path / "b2.h5")
    again = keras.models.load_model(path, compile=False)
    assert pruned_channels_zero(again, "conv_3", pruned)


def test_shift_images_translates_each_image_with_zero_fill():
    from defense.pipeline.finetune import shift_images

    x = np.arange(2 * 5 * 4 * 1, dtype=np.float32).reshape(2, 5, 4, 1) + 1
    rng = np.random.default_rng(0)
    assert shift_images(x, 0, rng) is x
    out = shift_images(x, 1, rng)
    assert out.shape == x.shape
    for src, dst in zip(x, out):
        # some (dy, dx) in [-1, 1]^2 maps src onto dst, the uncovered border is zero
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = np.zeros_like(src)
                ys, yd = (slice(0, 5 - dy), slice(dy, 5)) if dy >= 0 else (slice(-dy, 5), slice(0, 5 + dy))
                xs, xd = (slice(0, 4 - dx), slice(dx, 4)) if dx >= 0 else (slice(-dx, 4), slice(0, 4 + dx))
                ref[yd, xd] = src[ys, xs]
                matches.append(np.array_equal(ref, dst))
        assert any(matches)


@pytest.fixture(scope="module", params=[(0, True), (2, False)], ids=["arrays", "shifted-no-compact"])
def lab3_run(request, tmp_path_factory, csaw_dir):
    """One fine-pruning run on the real Lab 3 extracts (without and with augmentation, with and without
    the compact models), fit spied on."""
    shift, compact = request.param
    import keras

    from defense.run import run_defense

    calls = []
    original = keras.Model.fit

    def spy(self, x=None, y=None, *args, **kwargs):
        if isinstance(x, keras.utils.PyDataset):  # the augmenting batches: every batch they gave
            batches = [x[i] for i in range(len(x))]
            x.on_epoch_end()
            record = {"x": np.array(x.x), "y": np.array(x.y),
                      "batches": [(np.array(bx), np.array(by)) for bx, by in batches]}
        else:
            record = {"x": np.array(x), "y": np.array(y), "batches": []}
        record["validation_data"] = kwargs.get("validation_data")
        calls.append(record)
        return original(self, x, y, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(keras.Model, "fit", spy)
    try:
        cfg = compose(lab3_overrides(*FAST, "prune.drops=[2,30]", f"finetune.shift={shift}", f"compact={compact}"))
        out = tmp_path_factory.mktemp("ft_lab3")
        result = run_defense(cfg, out)
    finally:
        mp.undo()
    return cfg, out, result, calls


def test_pruned_channels_are_exactly_zero_in_the_saved_fine_pruned_models(lab3_run):
    from defense.nets import models
    from defense.reporting import report

    cfg, out, result, _ = lab3_run
    reached = [row for row in result["summary"] if row["reached"] and "ft_model_path" in row]
    # both drops, and the defender's and the oracle's points where their one fine-tuning kept the held-out accuracy
    assert [row["point"] for row in reached][:2] == ["drop", "drop"]
    assert all(row["point"] in ("defender", "oracle_test_asr") and row["ft_within_budget"] for row in reached[2:])
    keys = {"defender": "defender", "oracle_test_asr": "oracle"}
    for row in reached:
        key = keys.get(row["point"], format(row["drop"], "g"))
        path = out / "models" / f"model_B_{key}_ft.h5"
        assert path.is_file() and row["ft_model_path"] == str(path)
        b2 = models.load_model(cfg.model, path)
        pruned = [int(c) for c in result["order"][: row["channels_pruned"]]]
        kernel, bias = b2.get_layer(cfg.prune.layer).get_weights()
        assert np.all(kernel[..., pruned] == 0.0) and np.all(bias[pruned] == 0.0)
        b1 = models.load_model(cfg.model, out / "models" / f"model_B_{key}.h5")
        assert not np.array_equal(b1.get_layer("fc_1").get_weights()[0], b2.get_layer("fc_1").get_weights()[0])
    rows = report.read_csv(out / "summary.csv")
    for key in ("base_test_acc", "base_test_asr", "ft_test_acc", "ft_test_asr", "ft_test_ra", "ft_der",
                "ft_g_test_acc", "ft_g_test_asr"):
        assert key in rows[0] and rows[0][key] != ""
    assert float(rows[0]["base_test_acc"]) == pytest.approx(result["curves"][0]["pruned_test_acc"])
    table = (out / "results.md").read_text()
    assert "B'' test acc" in table and "G(B,B'') ASR" in table and "B'' DER" in table


def test_compact_fine_pruned_model_predicts_what_b2_predicts(lab3_run):
    """models/model_B_{drop}_ft_compact.h5: B'' with its pruned conv_3 channels removed, same outputs
    as B'' on the real test faces (oracle: plain Keras predict of both saved files); none with compact=false."""
    import keras

    from defense.pipeline import load as datasets
    from defense.nets.models import scale_inputs

    cfg, out, result, _ = lab3_run
    reached = [row for row in result["summary"] if row["reached"]]
    if not cfg.compact:
        assert not list((out / "models").glob("*_compact.h5")), "compact=false still wrote compact models"
        assert all("ft_compact_path" not in row for row in reached)
        return
    test = datasets.load_split(cfg.dataset, cfg.model, "test")
    x = np.concatenate([scale_inputs(images.x, cfg.model) for images in [test.clean, *test.poisoned.values()]])
    keys = {"defender": "defender", "oracle_test_asr": "oracle"}
    # every fine-tuned network: both drops, and the defender's / oracle's where their fine-tuning kept the budget
    reached = [row for row in reached if row.get("ft_model_path")]
    assert [row["point"] for row in reached][:2] == ["drop", "drop"]
    for row in reached:
        drop = keys.get(row["point"], format(row["drop"], "g"))
        path = out / "models" / f"model_B_{drop}_ft_compact.h5"
        assert path.is_file() and row["ft_compact_path"] == str(path)
        b2 = keras.models.load_model(out / "models" / f"model_B_{drop}_ft.h5", compile=False)
        small = keras.models.load_model(path, compile=False)
        filters = b2.get_layer(cfg.prune.layer).filters
        assert small.get_layer(cfg.prune.layer).filters == filters - row["channels_pruned"]
        assert small.count_params() < b2.count_params() or row["channels_pruned"] == 0  # the oracle may prune none
        p_full = b2.predict(x, verbose=0)
        p_small = small.predict(x, verbose=0)
        np.testing.assert_allclose(p_small, p_full, atol=1e-5)
        assert np.array_equal(p_small.argmax(-1), p_full.argmax(-1))


def test_fine_tuning_sees_only_the_clean_validation_data(lab3_run):
    from oracles import holdout_split

    from defense.pipeline import load as datasets
    from defense.nets.models import scale_inputs

    cfg, _, result, calls = lab3_run
    # every reached row once (the defender's and the oracle's points: one setting each, finetune=clean has no grid)
    assert len(calls) == sum(row["reached"] for row in result["summary"])
    valid = datasets.load_split(cfg.dataset, cfg.model, "valid")
    rest, held = holdout_split(len(valid.clean))  # select.holdout: never trained on
    held_out = _rows(scale_inputs(valid.clean.x[held], cfg.model))
    valid.clean = valid.clean.subset(rest)
    test = datasets.load_split(cfg.dataset, cfg.model, "test")
    allowed_x = scale_inputs(valid.clean.x, cfg.model)
    allowed = {k: int(y) for k, y in zip((r.tobytes() for r in allowed_x.reshape(len(allowed_x), -1)), valid.clean.y)}
    forbidden = set()
    for images in [test.clean, *test.poisoned.values(), *valid.poisoned.values()]:
        forbidden |= _rows(scale_inputs(images.x, cfg.model))
    for call in calls:
        xs = [(call["x"], call["y"])]
        if call["validation_data"] is not None:
            xs.append(tuple(np.asarray(a) for a in call["validation_data"]))
        seen = 0
        for x, y in xs:
            keys = [r.tobytes() for r in np.ascontiguousarray(x, dtype=np.float32).reshape(len(x), -1)]
            assert all(k in allowed for k in keys), "fine-tuning got an image that is not clean validation data"
            assert not set(keys) & forbidden, "fine-tuning got a test or poisoned image"
            assert not set(keys) & held_out, "fine-tuning got a held-out image of the defender's point"
            assert [allowed[k] for k in keys] == [int(v) for v in y], "labels are not the clean validation labels"
            seen += len(keys)
        assert seen == len(valid.clean)  # train + holdout = the clean validation set less select's, nothing else
        if cfg.finetune.shift:
            # the augmented batches are translations of the training images (same labels, same count)
            assert call["batches"]
            assert sum(len(by) for _, by in call["batches"]) == len(call["y"])
            assert sorted(int(v) for _, by in call["batches"] for v in by) == sorted(int(v) for v in call["y"])
            for bx, _ in call["batches"]:
                assert bx.shape[1:] == allowed_x.shape[1:]
                assert not _rows(bx) & forbidden


# ---- the preset on the embedded BadNets scenario --------------------------------------------------
def test_fine_pruning_preset_runs_end_to_end(tmp_path):
    from defense.run import run_defense

    preset = REPO / "conf" / "experiment" / "fine_pruning.yaml"
    assert preset.is_file()
    cfg = compose(["experiment=fine_pruning", "tracking=none", "progress=false", "finetune.epochs=1",
                   "finetune.grid.epochs=[1]", "finetune.grid.learning_rate=[0.05]", "prune.drops=[10]"])
    assert cfg.finetune.kind == "clean"
    assert cfg.dataset.kind == "scenario"
    result = run_defense(cfg, tmp_path)
    row = result["summary"][0]
    assert row["reached"] and (tmp_path / "models" / "model_B_10_ft.h5").is_file()
    # the row's DER is BackdoorBench's formula on the row's own scores (on fractions, d = before - after)
    expected_der = (max(0.0, row["base_test_asr"] - row["ft_test_asr"]) - max(0.0, row["base_test_acc"] - row["ft_test_acc"])
                    + 100.0) / 200.0
    assert row["ft_der"] == pytest.approx(expected_der) and not math.isnan(row["ft_test_acc"])
    assert (tmp_path / "prune_result.png").is_file()


def test_pruned_channels_stay_zero_when_fine_tuning_diverges():
    # a fine-tuning that blows up leaves NaN weights; the pruned channels must still be exactly 0
    # (NaN * 0 is NaN, so a multiplicative re-zeroing would not do it)
    import keras

    from defense.pipeline.finetune import _fine_tune_callback, _pruned_masks, pruned_layers_zero
    from defense.tracking.tracker import Tracker

    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Conv2D(4, 3, name="conv")])
    kernel, bias = model.get_layer("conv").get_weights()
    model.get_layer("conv").set_weights([np.full_like(kernel, np.nan), np.full_like(bias, np.nan)])
    callback = _fine_tune_callback(_pruned_masks(model, {"conv": [1, 3]}), {"patience": 0}, "drop_2", Tracker(), False)
    callback.rezero()
    kernel, bias = model.get_layer("conv").get_weights()
    assert pruned_layers_zero(model, {"conv": [1, 3]})
    assert np.isnan(kernel[..., [0, 2]]).all() and np.isnan(bias[[0, 2]]).all()  # the others untouched
