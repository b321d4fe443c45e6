"""experiments/benchmark.py at a tiny size, and the sweep's uint8 input path against float32 inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version

import numpy as np
import pytest

from conftest import CSAW, REPO, compose

SCRIPT = REPO / "experiments" / "benchmark.py"
KEYS = ["ratio_seed_over_sweep", "ratio_sweep_over_one_pass", "peak_rss_gib", "seed_loop_steps_measured",
        "seed_loop_s", "sweep_s", "one_pass_s", "seed_loop_step_s", "seed_loop_ranking_s", "seed_loop_b_once_s",
        "seed_loop_measured_s", "same_ranking", "curve_values_compared", "curve_values_differing",
        "labels_compared", "labels_differing", "every_step_labels_compared", "every_step_label_mismatches", "agree"]


def run_benchmark(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from conftest import require_csaw

    require_csaw()
    tmp = tmp_path_factory.mktemp("benchmark")
    proc = run_benchmark("--out", str(tmp / "out"), "--results-dir", str(tmp / "results"), "--tile", "1",
                         "--seed-steps", "12")
    return proc, tmp


def test_tiny_benchmark_writes_consistent_numbers(tiny_run):
    proc, tmp = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp / "out" / "benchmark.json").read_text())
    assert set(KEYS) <= set(report)
    published = json.loads((tmp / "results" / "benchmark.json").read_text())
    assert published["results"] == report and published["command"].startswith("python experiments/benchmark.py")
    # 12 steps requested, spread from the first to the last of the 60 steps of conv_3
    steps = report["seed_loop_measured_steps"]
    assert report["seed_loop_steps_measured"] == 12 == len(steps) and report["steps"] == 60
    assert steps[0] == 1 and steps[-1] == 60 and all(a < b for a, b in zip(steps, steps[1:]))
    assert report["seed_loop_scaled"] is True
    # the totals are the sums of their parts, and the ratios the ratios of the timings
    # (seconds are rounded to 4 decimals: 60 rounded steps are off by at most 60 * 5e-5)
    parts = report["seed_loop_ranking_s"] + report["seed_loop_b_once_s"]
    assert report["seed_loop_s"] == pytest.approx(parts + 60 * report["seed_loop_step_s"], abs=4e-3)
    assert report["seed_loop_measured_s"] == pytest.approx(parts + 12 * report["seed_loop_step_s"], abs=1e-3)
    assert report["seed_loop_b_once_s"] == report["one_pass_s"]
    assert report["ratio_seed_over_sweep"] == pytest.approx(report["seed_loop_s"] / report["sweep_s"], abs=0.006)
    assert report["ratio_sweep_over_one_pass"] == pytest.approx(report["sweep_s"] / report["one_pass_s"], abs=6e-4)
    assert report["peak_rss_gib"] > 0
    # agreement, with the counts worked out by hand: 100 faces per set, step 0 + 12 measured steps
    assert report["agree"] is True and report["same_ranking"] is True and report["disagreements"] == []
    assert report["curve_values_compared"] == 13 * 6 and report["curve_values_differing"] == 0
    assert report["labels_compared"] == 13 * 4 * 100 and report["labels_differing"] == 0
    # every step: the 100 distinct clean faces and their 100 sunglasses copies, 61 columns, once each
    assert report["every_step_labels_compared"] == 2 * 100 * 61 and report["every_step_label_mismatches"] == 0
    assert report["sizes"] == {"valid": 100, "test": 100} and report["input_dtype"] == "uint8"
    # (d) every conv layer of DeepID masked at --multi-steps 5 (default) evenly spaced steps of its 200 channels,
    # traced at most once per segment (not per step), its labels of the 2 x 100 distinct faces equal to the
    # set_weights loop's at each step
    multi = report["multi_layer"]
    assert multi["layers"] == ["conv_1", "conv_2", "conv_3", "conv_4"] and multi["channels"] == 20 + 40 + 60 + 80
    assert multi["steps"] == [0, 50, 100, 150, 200] and 1 <= multi["traces"] <= multi["segments"] == 4
    assert multi["labels_compared"] == 5 * 2 * 100 and multi["labels_differing"] == 0
    assert report["ratio_multi_step_over_one_pass"] == pytest.approx(multi["step_s"] / report["one_pass_s"], rel=0.01)


def test_tiny_benchmark_publishes_what_it_prints(tiny_run):
    proc, tmp = tiny_run
    md = (tmp / "results" / "benchmark.md").read_text()
    printed = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(printed) == 17
    for line in printed:  # the same rows, same labels and values, in the published table
        assert line in md.splitlines()
    assert "| a / b " in md and "| every step, distinct faces " in md and "| d / c (goal <= 1.2) " in md
    assert f"tensorflow {version('tensorflow')}" in md and f"keras {version('keras')}" in md
    assert f"numpy {version('numpy')}" in md and f"python {sys.version.split()[0]}" in md
    assert "--tile 1 --seed-steps 12" in md.splitlines()[0] and f"{len(os.sched_getaffinity(0))} CPU cores" in md


def test_a_disagreeing_run_exits_1_and_says_what_differs(csaw_dir, tmp_path):
    proc = run_benchmark("--out", str(tmp_path / "out"), "--results-dir", str(tmp_path / "results"), "--tile", "1",
                         "--seed-order", "reversed")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "(a) and (b) disagree" in proc.stderr
    for what in ("ranking: (a) and (b) first differ at position 0", "curve values:", "B' labels at the measured steps:",
                 "every-step labels"):
        assert what in proc.stderr
    report = json.loads((tmp_path / "out" / "benchmark.json").read_text())
    assert report["agree"] is False and report["same_ranking"] is False
    assert report["seed_loop_steps_measured"] == 10  # the default
    assert report["labels_differing"] > 0 and report["every_step_label_mismatches"] > 0
    assert not (tmp_path / "results").exists()  # a disagreeing run publishes nothing


@pytest.mark.parametrize("args, expected", [
    (["--seed-steps", "5"], "--seed-steps"),
    (["--seed-steps", "61"], "conv_3 has 60 channels"),
    (["--tile", "0"], "--tile"),
    (["--multi-steps", "1"], "--multi-steps must be >= 2"),
    (["--weights", "/nonexistent/w.h5"], "--weights /nonexistent/w.h5 not found"),
])
def test_bad_options_are_one_error_and_exit_2(csaw_dir, tmp_path, args, expected):
    proc = run_benchmark("--out", str(tmp_path), *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "benchmark.json").exists()


def test_uint8_pixels_only_when_lossless():
    from defense.data.arrays import LabeledImages, as_uint8_pixels

    y = np.zeros(2, np.int64)
    whole = LabeledImages("a", np.array([[0.0, 17.0], [254.0, 255.0]], np.float32), y)
    packed = as_uint8_pixels(whole)
    assert packed.x.dtype == np.uint8 and packed.x.tolist() == [[0, 17], [254, 255]]
    for x in ([[0.5, 1.0], [2.0, 3.0]], [[0.0, 256.0], [1.0, 2.0]], [[-1.0, 0.0], [1.0, 2.0]], [[0.0, 1.0], [2.0, 1 / 255]]):
        kept = as_uint8_pixels(LabeledImages("b", np.array(x, np.float32), y))
        assert kept.x.dtype == np.float32 and kept.x.tolist() == np.array(x, np.float32).tolist()


def test_sweep_labels_with_uint8_inputs_equal_float32_inputs(csaw_dir):
    """run_sweep on uint8 pixels gives exactly the labels of float32 pixels (batches of 64: a partial
    last batch), for raw-pixel Lab 3 and for a network that divides by 255 per batch."""
    from defense.nets import models
    from defense.data.arrays import as_uint8_pixels
    from defense.pipeline.load import Split, load_split
    from defense.pruning.masked import MaskedSweep
    from defense.pipeline.sweep import run_sweep

    for model_name, weights in (("lab3", "lab3_bd_weights.h5"), ("csaw2020_sunglasses", "sunglasses_bd_weights.h5")):
        cfg = compose([f"model={model_name}", f"model.path={CSAW / weights}", "dataset=csaw_extract",
                       f"dataset.root={CSAW}", "tracking=none", "stop=all", "batch_size=64", "progress=false"])
        model = models.load_model(cfg.model)
        valid, test = (load_split(cfg.dataset, cfg.model, s) for s in ("valid", "test"))
        assert valid.clean.x.dtype == np.float32
        packed = [Split(as_uint8_pixels(s.clean), {k: as_uint8_pixels(v) for k, v in s.poisoned.items()})
                  for s in (valid, test)]
        assert packed[0].clean.x.dtype == np.uint8 and packed[1].poisoned["sunglasses"].x.dtype == np.uint8
        as_float = run_sweep(cfg, model, valid, test, progress=False)
        as_uint8 = run_sweep(cfg, model, *packed, progress=False)
        assert list(as_uint8.order) == list(as_float.order)
        assert sorted(as_uint8.predictions) == sorted(as_float.predictions)
        for key, labels in as_float.predictions.items():
            np.testing.assert_array_equal(as_uint8.predictions[key], labels)
        assert as_uint8.curves == as_float.curves
        # per-batch scaling equals scaling the whole float32 set first (the engine's former input)
        engine = MaskedSweep(model, "conv_3", batch_size=64)
        whole = engine.predict(models.scale_inputs(test.clean.x, cfg.model), as_float.order[:60])
        np.testing.assert_array_equal(engine.predict(packed[1].clean.x, as_float.order[:60],
                                                     divisor=models.input_divisor(cfg.model)), whole)
        np.testing.assert_array_equal(whole, as_float.predictions["test_clean"])


def test_streamed_and_kept_validation_outputs_give_the_same_sweep(csaw_dir, monkeypatch):
    """The clean validation set's pruned-layer outputs are kept from the ranking pass when they fit the
    cache budget, else streamed twice: both give the same ranking and labels (set_weights loop: tests/oracles.py)."""
    from oracles import set_weights_predictions

    from defense.nets import models
    from defense.pipeline import sweep
    from defense.pipeline.load import load_split

    cfg = compose(["model=lab3", f"model.path={CSAW / 'lab3_bd_weights.h5'}", "dataset=csaw_extract",
                   f"dataset.root={CSAW}", "tracking=none", "batch_size=16", "progress=false"])
    model = models.load_model(cfg.model)
    valid, test = (load_split(cfg.dataset, cfg.model, s) for s in ("valid", "test"))
    kept = sweep.run_sweep(cfg, model, valid, test, progress=False)
    monkeypatch.setattr(sweep, "VALID_OUTPUTS_CACHE_BYTES", 0)
    streamed = sweep.run_sweep(cfg, model, valid, test, progress=False)
    assert list(streamed.order) == list(kept.order)
    np.testing.assert_array_equal(streamed.predictions["valid_clean"], kept.predictions["valid_clean"])
    np.testing.assert_array_equal(kept.predictions["valid_clean"],
                                  set_weights_predictions(model, "conv_3", valid.clean.x, kept.order))
