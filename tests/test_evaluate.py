"""`defense.evaluate` reproduces the scores of the five real CSAW-HackML networks on the extracts."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conftest import CSAW, compose, run_cli

# network option, weights file, clean correct /100, {poisoned set: correct /100} (../shared/data/csaw/README.md)
TABLE = [
    ("lab3", "lab3_bd_weights.h5", 99, {"sunglasses": 100}),
    ("csaw2020_sunglasses", "sunglasses_bd_weights.h5", 95, {"sunglasses": 100}),
    ("csaw2020_anonymous_1", "anonymous_1_bd_weights.h5", 96, {"lipstick": 92}),
    ("csaw2020_anonymous_2", "anonymous_2_bd_weights.h5", 94, {}),
    ("csaw2020_multi", "multi_trigger_multi_target_bd_weights.h5", 91, {"eyebrows": 91, "lipstick": 92, "sunglasses": 100}),
]


def evaluate_overrides(model: str, weights, split: str = "all") -> list[str]:
    return [f"model={model}", f"model.path={weights}", "dataset=csaw_extract", f"dataset.root={CSAW}", f"split={split}"]


@pytest.mark.parametrize("model,weights,clean,asr", TABLE, ids=[t[0] for t in TABLE])
def test_every_network_reproduces_the_readme_table(csaw_dir, model, weights, clean, asr):
    from defense.evaluate import evaluate

    scores = evaluate(compose(evaluate_overrides(model, csaw_dir / weights), "evaluate"))
    assert scores["clean_acc"] == pytest.approx(clean)
    assert {k.split("/", 1)[1]: v for k, v in scores.items() if k.startswith("asr/")} == pytest.approx(asr)


def test_valid_and_test_halves_add_up_to_all(csaw_dir):
    from defense.evaluate import evaluate

    args = evaluate_overrides("lab3", csaw_dir / "lab3_bd_weights.h5")
    halves = [evaluate(compose(args[:-1] + [f"split={s}"], "evaluate"))["clean_acc"] for s in ("valid", "test")]
    assert np.mean(halves) == pytest.approx(99.0)


def test_cli_prints_like_eval_py(csaw_dir):
    proc = run_cli("defense.evaluate", *evaluate_overrides("lab3", csaw_dir / "lab3_bd_weights.h5"), "hydra.run.dir=/tmp/defense-test-eval")
    assert proc.returncode == 0, proc.stderr
    assert "Clean Classification accuracy: 99.00 %" in proc.stdout.splitlines()
    assert "Attack Success Rate: 100.00 %" in proc.stdout.splitlines()


def test_cli_names_each_poisoned_set(csaw_dir):
    proc = run_cli(
        "defense.evaluate",
        *evaluate_overrides("csaw2020_multi", csaw_dir / "multi_trigger_multi_target_bd_weights.h5"),
        "hydra.run.dir=/tmp/defense-test-eval-multi",
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "Clean Classification accuracy: 91.00 %" in lines
    for line in ("Attack Success Rate (eyebrows): 91.00 %", "Attack Success Rate (lipstick): 92.00 %",
                 "Attack Success Rate (sunglasses): 100.00 %"):
        assert line in lines


def test_full_model_saved_and_loaded_predicts_identically(csaw_dir, tmp_path):
    from defense.nets import models
    from defense.data.arrays import load_h5

    cfg = compose(evaluate_overrides("lab3", csaw_dir / "lab3_bd_weights.h5"), "evaluate")
    model = models.load_model(cfg.model)
    path = models.save_model(model, tmp_path / "bd_net.h5")
    assert models.h5_kind(str(path)) == "model"
    again = models.load_model(cfg.model, str(path))
    x = load_h5(csaw_dir / "clean_test.h5").x
    np.testing.assert_array_equal(models.predict_labels(model, x, cfg.model), models.predict_labels(again, x, cfg.model))
    np.testing.assert_allclose(model.predict(x, verbose=0), again.predict(x, verbose=0), rtol=0, atol=0)


def test_full_model_file_evaluates_the_same_way(csaw_dir, tmp_path):
    """A full legacy .h5 model (architecture + weights) given as model.path, through the CLI."""
    from defense.nets import models

    cfg = compose(evaluate_overrides("lab3", csaw_dir / "lab3_bd_weights.h5"), "evaluate")
    path = models.save_model(models.load_model(cfg.model), tmp_path / "bd_net.h5")
    with h5py.File(path, "r") as f:
        assert "model_config" in f.attrs
    proc = run_cli("defense.evaluate", *evaluate_overrides("lab3", path), f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr
    assert "Clean Classification accuracy: 99.00 %" in proc.stdout
    assert "Attack Success Rate: 100.00 %" in proc.stdout
