"""A residual network with batch normalization through the defense with `model=auto`: a tiny PreAct-ResNet
BadNet (bias-free convs, residual Adds, logits out, no softmax), built by the embedded scenario's builder
with `dataset.scenario.arch=preact_resnet` and handed to `defense.run` as the defender's own files.

Oracles: plain Keras on the saved models and the h5 files, numpy for the scores.
"""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def badnet(tmp_path_factory):
    """The scenario folder: bd_net.h5 (a full Keras model) and the Lab 3 layout of clean and poisoned digits."""
    from defense.scenario import build as scenario

    cfg = {
        "arch": "preact_resnet", "preact_resnet": {"widths": [8, 16, 16], "blocks": [1, 1, 1], "softmax": False},
        "cache_dir": str(tmp_path_factory.mktemp("residual-cache")), "epochs": 3, "learning_rate": 0.005,
        "fractions": {"train": 0.4, "valid": 0.1, "test": 0.1}, "min_clean_accuracy": 0.0, "min_asr": 0.0,
    }
    return scenario.ensure_scenario(cfg)


def _keras_scores(model_path, folder) -> tuple[float, float]:
    """Clean test accuracy and ASR (%) of a saved model, by plain Keras (inputs = pixels / 255)."""
    import h5py
    import keras

    model = keras.models.load_model(model_path, compile=False)
    scores = []
    for rel in ("cl/test.h5", "bd/bd_test.h5"):
        with h5py.File(os.path.join(folder, rel), "r") as f:
            x, y = np.asarray(f["data"], np.float32), np.asarray(f["label"]).astype(np.int64)
        if x.shape[1] == 1:
            x = np.transpose(x, (0, 2, 3, 1))
        scores.append(100.0 * float(np.mean(np.argmax(model.predict(x / 255.0, verbose=0), -1) == y)))
    return scores[0], scores[1]


def _run(folder, tmp_path, defense: str, *extra: str):
    proc = run_cli(
        "defense.run", "model=auto", f"model.path={os.path.join(folder, 'bd_net.h5')}", "dataset=files",
        f"dataset.clean_valid={os.path.join(folder, 'cl/valid.h5')}",
        f"dataset.clean_test={os.path.join(folder, 'cl/test.h5')}",
        f"+dataset.poisoned_valid.square={os.path.join(folder, 'bd/bd_valid.h5')}",
        f"+dataset.poisoned_test.square={os.path.join(folder, 'bd/bd_test.h5')}",
        f"defense={defense}", "progress=false", "tracking=none", f"hydra.run.dir={tmp_path / defense}", *extra,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / defense / "summary.csv") as f:
        return proc, list(csv.DictReader(f))


def test_the_tiny_badnet_is_a_residual_logits_network_with_a_backdoor(badnet):
    import keras

    from defense.nets.models import load_full_model, uses_logits

    model = load_full_model(os.path.join(badnet, "bd_net.h5"))
    kinds = {type(layer).__name__ for layer in model.layers}
    assert {"Add", "BatchNormalization"} <= kinds and uses_logits(model)
    assert all(not layer.use_bias for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
    acc, asr = _keras_scores(os.path.join(badnet, "bd_net.h5"), badnet)
    assert acc > 60.0 and asr > 60.0, (acc, asr)  # a working BadNet, if a small one


def test_fp_runs_to_the_end_on_the_main_path_and_skips_the_compact_export_with_one_warning(badnet, tmp_path):
    proc, rows = _run(badnet, tmp_path, "fp")
    out = proc.stdout + proc.stderr
    assert "prune.layer not set: pruning s3b1_conv2" in out  # the main path's last conv, not s3b1_shortcut
    assert "model.input_divisor not set: 255 chosen" in out  # logits softmaxed to compare the scalings
    assert len([line for line in out.splitlines() if "no compact models" in line]) == 1
    assert [float(r["drop"]) for r in rows if r["point"] == "drop"] == [2, 4, 10, 30]
    curves = list(csv.DictReader(open(tmp_path / "fp" / "curves.csv")))
    acc, asr = _keras_scores(os.path.join(badnet, "bd_net.h5"), badnet)
    assert float(curves[0]["pruned_test_acc"]) == pytest.approx(acc, abs=1e-3)
    assert float(curves[0]["pruned_test_asr"]) == pytest.approx(asr, abs=1e-3)
    assert len(curves) == 16 + 1  # s3b1_conv2 has 16 channels: steps 0..16


def test_fine_pruning_fine_tunes_a_logits_network_with_from_logits(badnet, tmp_path):
    """Before, the fine-tuning loss read the logits as probabilities and every B'' ended near chance."""
    proc, rows = _run(badnet, tmp_path, "fine_pruning", "finetune.epochs=3")
    acc, _ = _keras_scores(os.path.join(badnet, "bd_net.h5"), badnet)
    reached = [r for r in rows if r["reached"] in ("True", "true", "1") and r["point"] == "drop"]
    assert reached
    accuracies = []
    for row in reached:
        ft_acc, ft_asr = _keras_scores(row["ft_model_path"], badnet)  # the saved B'' by plain Keras
        assert float(row["ft_test_acc"]) == pytest.approx(ft_acc, abs=1e-3)  # summary.csv: 4 decimals
        assert float(row["ft_test_asr"]) == pytest.approx(ft_asr, abs=1e-3)
        # above one class: with the logits read as probabilities, SGD drove every B'' to one class (10.0 %);
        # the 30-point B'' of this 3-epoch network recovers least (about a fifth of the digits)
        assert ft_acc > 15.0, (row["drop"], ft_acc)
        accuracies.append(ft_acc)
    assert max(accuracies) > 30.0, accuracies  # and the lighter prunings recover far above chance


TINY_LEARNING = {
    "clp": [],
    "anp": ["prune.anp.iterations=20", "prune.anp.batch_size=32", "prune.anp.log_every=10"],
    "rnp": ["prune.rnp.unlearn_epochs=1", "prune.rnp.recover_epochs=2", "prune.rnp.batch_size=32",
            "prune.rnp.images=64"],
}


@pytest.mark.parametrize("defense", ["clp", "anp", "rnp"])
def test_bn_defenses_run_on_the_residual_network_with_model_auto_and_their_curves_match_plain_keras(
        badnet, tmp_path, defense):
    """defense=clp|anp|rnp with nothing beyond model=auto: masks and pruning on the BatchNormalization layers
    where a conv has one (defense_variant names the others), every Conv2D of the network (prune.layer=all, the 1x1 shortcuts included), and each
    saved B' scores, by plain Keras, what the curve (the channel-mask evaluator) says at its step."""
    import h5py
    import keras

    proc, rows = _run(badnet, tmp_path, defense, "prune.eval_steps=8", *TINY_LEARNING[defense])
    # BN where a conv has one after it; the block's second convs feed a residual Add, not a BN, and are named as
    # adapted
    variants = {r["defense_variant"] for r in rows}
    assert len(variants) == 1 and variants.pop().startswith("bn; conv (adapted: no BatchNormalization) for ")
    curves = {int(r["channels_pruned"]): r for r in csv.DictReader(open(tmp_path / defense / "curves.csv"))}
    with h5py.File(os.path.join(badnet, "bd_net.h5"), "r") as f:
        assert f.attrs.get("model_config") is not None
    convs = [layer for layer in keras.models.load_model(os.path.join(badnet, "bd_net.h5"), compile=False).layers
             if isinstance(layer, keras.layers.Conv2D)]
    assert len(curves) - 1 <= sum(layer.filters for layer in convs)
    checked = 0
    for row in rows:
        if row["reached"] != "True" or not row.get("model_path") or int(row["channels_pruned"]) not in curves:
            continue
        acc, asr = _keras_scores(row["model_path"], badnet)
        curve = curves[int(row["channels_pruned"])]
        assert float(curve["pruned_test_acc"]) == pytest.approx(acc, abs=1e-3), (row["point"], row["channels_pruned"])
        assert float(curve["pruned_test_asr"]) == pytest.approx(asr, abs=1e-3)
        checked += 1
    assert checked, [(r["point"], r["reached"], r["channels_pruned"]) for r in rows]
