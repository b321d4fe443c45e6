"""`python -m defense.run prune=clp|anp|rnp` end to end on the embedded BadNet scenario, with tiny learning
settings: the criterion's scores, history and operating point in the run's files, the learning criteria
fed the clean validation images only (a spy on what they learn from), and bad options as one line."""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from conftest import compose, lab3_overrides, run_cli
from oracles import holdout_split

TINY = {
    "clp": ["prune.clp.u=1"],
    "anp": ["prune.anp.iterations=20", "prune.anp.batch_size=32", "prune.anp.log_every=10"],
    # 64 images: unlearning (gradient ascent) on the default 500 in batches of 32 drives the embedded
    # scenario's loss to inf within the first epoch, before the epoch-end accuracy check can stop it
    "rnp": ["prune.rnp.unlearn_epochs=2", "prune.rnp.recover_epochs=2", "prune.rnp.batch_size=32",
            "prune.rnp.images=64"],
}
COMMON = ["prune.drops=[4]", "prune.eval_steps=5", "tracking=none", "compact=false", "progress=false"]


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run(criterion: str, layer: str, out: Path, monkeypatch=None, seen=None):
    """run_defense with prune=<criterion>; with `seen`, a spy records what the learning criterion learns from."""
    from defense import criteria
    from defense.run import run_defense

    if seen is not None:
        module = criteria.get(criterion)
        original = module.learn_masks

        def spy(model, layers, x, y, s, seed):
            seen.append((np.array(x), np.array(y)))
            return original(model, layers, x, y, s, seed)

        monkeypatch.setattr(module, "learn_masks", spy)
    cfg = compose([f"prune={criterion}", f"prune.layer={layer}", *TINY[criterion], *COMMON])
    return cfg, run_defense(cfg, out)


def scenario_model_and_valid(cfg):
    from defense.pipeline import load as datasets
    from defense.nets import models

    model = models.load_model(cfg.model, datasets.resolve_model_path(cfg.model, cfg.dataset))
    valid = datasets.load_split(cfg.dataset, cfg.model, "valid")
    rest, held = holdout_split(len(valid.clean))  # select.holdout: the criteria learn from the rest only
    held_out = valid.clean.subset(held)
    valid.clean = valid.clean.subset(rest)
    valid.held_out = held_out
    return model, valid


def test_clp_run_prunes_what_numpy_says(tmp_path):
    """Every Conv2D: the clp_bound column is the largest singular value of each channel's (in, kh * kw)
    kernel (numpy), and the operating point in pruned.json is mean + 1 std of each layer (statistics)."""
    cfg, _ = run("clp", "all", tmp_path)
    model, _ = scenario_model_and_valid(cfg)
    rows = read_rows(tmp_path / "channel_scores.csv")
    expected = {}
    for name in ("conv_1", "conv_2", "conv_3", "conv_4"):
        kernel = model.get_layer(name).get_weights()[0].astype(np.float64)
        kh, kw, cin, cout = kernel.shape
        bounds = [float(np.linalg.norm(kernel[..., k].reshape(kh * kw, cin).T, 2)) for k in range(cout)]
        got = [float(r["clp_bound"]) for r in rows if r["layer"] == name]
        np.testing.assert_allclose(got, bounds, rtol=1e-5)
        cut = statistics.mean(bounds) + 1.0 * statistics.stdev(bounds)
        expected[name] = [k for k, b in enumerate(bounds) if b > cut]
    pruned = json.loads((tmp_path / "pruned.json").read_text())["operating_point"]
    assert {k: v for k, v in pruned.items() if v} == {k: v for k, v in expected.items() if v}
    summary = read_rows(tmp_path / "summary.csv")
    (row,) = [r for r in summary if r["point"] == "operating_point"]
    assert int(row["channels_pruned"]) == sum(len(v) for v in expected.values()) > 0


@pytest.mark.parametrize("criterion, layer", [("anp", "[conv_3,conv_4]"), ("rnp", "conv_3")])
def test_learning_criteria_run_on_clean_validation_images_only(criterion, layer, tmp_path, monkeypatch):
    """A spy on the mask learning: every image is a clean validation image with its label (none of the
    poisoned ones), prune.<criterion>.images of them (500 by default, capped by how many there are); the masks, their history and the operating point reach the run's files."""
    from defense.nets.models import scale_pixels

    seen = []
    cfg, _ = run(criterion, layer, tmp_path, monkeypatch, seen)
    model, valid = scenario_model_and_valid(cfg)
    assert len(seen) == 1
    x, y = seen[0]
    assert len(x) == min(int(cfg.prune[criterion].images), len(valid.clean))
    assert criterion == "rnp" or int(cfg.prune[criterion].images) == 500  # ANP with the default count
    divisor = float(cfg.model.input_divisor)
    clean = scale_pixels(valid.clean.x, divisor).reshape(len(valid.clean), -1)
    poisoned = np.concatenate([scale_pixels(p.x, divisor).reshape(len(p), -1) for p in valid.poisoned.values()])
    held = scale_pixels(valid.held_out.x, divisor).reshape(len(valid.held_out), -1)
    for image, label in zip(x.reshape(len(x), -1), y):
        matches = np.flatnonzero(np.all(clean == image, axis=1))
        assert len(matches) >= 1 and label in valid.clean.y[matches]
        assert not np.any(np.all(poisoned == image, axis=1))
        assert not np.any(np.all(held == image, axis=1))  # no image held out for the defender's point

    rows = read_rows(tmp_path / "channel_scores.csv")
    masks = {(r["layer"], int(r["channel"])): float(r["mask"]) for r in rows}
    assert all(0.0 <= m <= 1.0 for m in masks.values())
    for r in rows:
        assert float(r["score"]) == pytest.approx(1.0 - float(r["mask"]), abs=1e-6)
    threshold = float(cfg.prune[criterion].threshold)
    pruned = json.loads((tmp_path / "pruned.json").read_text())["operating_point"]
    expected = {}
    for (name, c), m in sorted(masks.items()):
        if m <= threshold:
            expected.setdefault(name, []).append(c)
    assert {k: v for k, v in pruned.items() if v} == expected
    history = read_rows(tmp_path / f"{criterion}_history.csv")
    if criterion == "anp":  # 20 iterations, a row every 10
        assert [int(r["step"]) for r in history] == [10, 20] and all(float(r["loss"]) >= 0 for r in history)
        last = {key[len("mask/"):]: float(v) for key, v in history[-1].items() if key.startswith("mask/")}
        assert last == pytest.approx({f"{name}/{c}": m for (name, c), m in masks.items()}, abs=1e-6)
    else:  # 1 or 2 unlearning epochs (it stops at 20 % clean accuracy), then 2 recovering epochs
        assert 1 <= sum(r["unlearn_epoch"] != "" for r in history) <= 2
        assert [r["recover_epoch"] for r in history if r["recover_epoch"] != ""] == ["1", "2"]


@pytest.mark.parametrize("option, key", [("prune=clp prune.clp.u=-1", "prune.clp.u"),
                                         ("prune=rnp prune.rnp.threshold=-0.1", "prune.rnp.threshold"),
                                         ("prune=anp prune.anp.images=0", "prune.anp.images")])
def test_cli_bad_criterion_option_is_one_line_and_logs_nothing(option, key, tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_cli("defense.run", *option.split(), f"tracking.uri=sqlite:///{db}", "progress=false",
                   f"hydra.run.dir={tmp_path / 'run'}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert key in errors[0]
    assert not db.exists()


def test_cli_level_bn_on_a_network_without_per_channel_bn_is_one_line_and_logs_nothing(tmp_path):
    """prune.anp.level=bn on a network whose BatchNormalization normalizes the rows (axis 1), not the
    channels: one line naming the key and the layer, exit 2, no MLflow store created (no run logged)."""
    import keras

    x = keras.Input((28, 28, 1))
    h = keras.layers.Conv2D(4, 3, name="conv_a")(x)
    h = keras.layers.BatchNormalization(axis=1, name="bn_rows")(h)
    keras.Model(x, keras.layers.Dense(10, activation="softmax")(keras.layers.Flatten()(h))).save(tmp_path / "rows.h5")
    rng = np.random.default_rng(0)
    for name in ("valid", "test"):
        np.savez(tmp_path / f"{name}.npz", x=rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
                 y=np.arange(20) % 10)
    db = tmp_path / "mlflow.db"
    proc = run_cli("defense.run", "model=auto", f"model.path={tmp_path / 'rows.h5'}", "dataset=files",
                   f"dataset.clean_valid={tmp_path / 'valid.npz'}", f"dataset.clean_test={tmp_path / 'test.npz'}",
                   "prune=anp", "prune.anp.level=bn", "prune.layer=conv_a", f"tracking.uri=sqlite:///{db}",
                   "progress=false", f"hydra.run.dir={tmp_path / 'run'}")
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr[-2000:]
    assert "prune.anp.level" in errors[0] and "bn_rows" in errors[0]
    assert not db.exists()


def test_a_diverging_rnp_says_where_keeps_its_history_and_marks_its_rows(tmp_path, caplog):
    """RNP's unlearning at a learning rate of 1e30 overflows: one warning names the epoch, the history file is
    written with the row where it broke, every summary row is `diverged` and the defender's rule chooses none."""
    import logging

    from defense.run import run_defense

    cfg = compose(["prune=rnp", "prune.layer=conv_3", *TINY["rnp"], "prune.rnp.unlearn_lr=1e30", *COMMON])
    with caplog.at_level(logging.WARNING):
        run_defense(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "RNP diverged" in r.getMessage()]
    assert len(lines) == 1 and "unlearning epoch 1" in lines[0] and "prune.rnp.unlearn_lr" in lines[0]
    history = read_rows(tmp_path / "rnp_history.csv")
    assert history[-1]["diverged"] == "1.0000" or float(history[-1]["diverged"]) == 1.0
    summary = read_rows(tmp_path / "summary.csv")
    assert summary and all(r["diverged"] == "True" for r in summary)
    assert all("no horizontal flip" in r["augmentation"] for r in summary)
    defender = next(r for r in summary if r["point"] == "defender")
    assert defender["reached"] == "False"


def test_anp_on_fewer_clean_images_than_classes_warns_once(csaw_dir, tmp_path, caplog):
    """The Lab 3 network has 1283 classes and 40 clean validation images are left after the defender's
    held-out part: ANP learns from all 40 (prune.anp.images=500 capped), fewer than the classes: one warning."""
    import logging

    from defense.run import run_defense

    cfg = compose(lab3_overrides("prune=anp", "prune.layer=conv_3", "prune.anp.iterations=2", "prune.anp.log_every=1",
                                 "prune.anp.batch_size=2", "tracking=none", "prune.drops=[4]", "compact=false"))
    with caplog.at_level(logging.WARNING):
        run_defense(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "fewer than the" in r.getMessage()]
    assert lines == ["warning: prune.criterion=anp learns from 40 clean validation images, fewer than the 1283 "
                     "classes"]
    # the adaptation of the references' augmentation is named in every row: no horizontal flip, and no random
    # shifts for the conv adaptation (the Lab 3 network has no BatchNormalization)
    rows = read_rows(tmp_path / "summary.csv")
    assert rows and all(r["augmentation"] == "no random shifts; no horizontal flip (adapted: a mirrored digit or face "
                                             "is another image)" for r in rows)
