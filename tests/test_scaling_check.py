"""A configured pixel scaling that the clean validation data contradicts is said in one warning line
(defense/pruning/autodetect.py::warn_if_scaling_mismatch), with the real Lab 3 network (it expects raw 0..255 pixels)."""

from __future__ import annotations

import logging

import numpy as np

from conftest import compose, lab3_overrides


def _lab3(divisor):
    from defense.nets import models
    from defense.pipeline.load import load_split

    cfg = compose(lab3_overrides(f"model.input_divisor={divisor}"))
    return cfg, models.load_model(cfg.model), load_split(cfg.dataset, cfg.model, "valid")


def _cross_entropy(model, x, y):
    """Oracle: a plain Keras predict and numpy's mean -log p(label)."""
    probs = model.predict(x, verbose=0)
    return float(np.mean(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0))))


def test_lab3_weights_fed_pixels_over_255_warn_once_naming_both_scores_and_the_key(csaw_dir, caplog):
    from defense.pruning.autodetect import warn_if_scaling_mismatch

    cfg, model, valid = _lab3(255)
    raw = _cross_entropy(model, valid.clean.x.astype(np.float32), valid.clean.y)
    scaled = _cross_entropy(model, valid.clean.x.astype(np.float32) / 255.0, valid.clean.y)
    assert scaled - raw > 1.0  # the oracle agrees that pixels / 255 fit these weights clearly worse
    with caplog.at_level(logging.WARNING, logger="defense.autodetect"):
        assert warn_if_scaling_mismatch(cfg.model, model, valid.clean)
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0]
    line = lines[0]
    assert line.startswith("warning: model.input_divisor=255 fits the clean validation data clearly worse than 1")
    assert f"cross-entropy {scaled:.3f}" in line and f"against {raw:.3f}" in line
    assert "set model.input_divisor=1" in line


def test_the_right_scaling_is_not_warned_about(csaw_dir, caplog):
    from defense.pruning.autodetect import warn_if_scaling_mismatch

    cfg, model, valid = _lab3(1)
    with caplog.at_level(logging.WARNING, logger="defense.autodetect"):
        assert not warn_if_scaling_mismatch(cfg.model, model, valid.clean)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_run_with_the_wrong_scaling_says_so(csaw_dir, tmp_path, caplog):
    from defense.run import run_defense

    cfg = compose(lab3_overrides("model.input_divisor=255", "tracking=none", "stop=fraction", "stop.fraction=0.1",
                                 "prune.drops=[2]"))
    with caplog.at_level(logging.WARNING):
        run_defense(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if "model.input_divisor=255 fits" in r.getMessage()]
    assert len(lines) == 1
