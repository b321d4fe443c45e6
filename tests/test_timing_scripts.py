"""The timing studies of experiments/ at a tiny size: each runs from a fresh process (composing the project's
config as the apps do) and writes results whose numbers agree with what it was asked to do."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "experiments" / name), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)


def test_criteria_timing_runs_anp_for_the_asked_iterations(csaw_dir, tmp_path):
    proc = run_script("criteria_timing.py", "--iterations", "4", "--images", "16", "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "criteria_timing.json").read_text())["results"]
    assert data["iterations"] == 4 and data["images"] == 16 and data["layers"] == ["conv_3"]
    assert data["history"][-1]["step"] == 4 and 0 < data["wall_seconds"]
    assert (tmp_path / "criteria_timing.md").read_text().count("conv_3") >= 1


def test_jit_timing_measures_both_ways(csaw_dir, tmp_path):
    proc = run_script("jit_timing.py", "--iterations", "2", "--epochs", "2", "--images", "16",
                      "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    loops = json.loads((tmp_path / "jit_timing.json").read_text())["results"]["loops"]
    assert set(loops) == {"anp", "finetune"}
    for loop in loops.values():
        assert loop["plain"] > 0 and loop["xla"] > 0
        assert abs(loop["speedup"] - loop["plain"] / loop["xla"]) < 1e-9
        assert loop["max_abs_difference"] >= 0


def test_anp_step_timing_times_three_arms_and_the_variant_learns_the_same_masks_at_first(csaw_dir, tmp_path):
    """The three arms are timed on the same batches; the variant with the masks on the conv outputs computes the
    same function as ANP's step, so after three iterations its masks are still those of ANP's step up to
    rounding (they drift apart only over many iterations)."""
    proc = run_script("anp_step_timing.py", "--iterations", "2", "--repeats", "1", "--images", "16",
                      "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "anp_step_timing.json").read_text())["results"]
    arms = ["anp", "anp, masks on the conv outputs", "floor"]
    assert list(data["ms_per_iteration"]) == arms and all(len(v) == 1 and v[0] > 0 for v in data["ms_per_iteration"].values())
    assert data["layers"] == ["conv_1", "conv_2", "conv_3", "conv_4"] and data["masks"] == 20 + 40 + 60 + 80
    assert data["iterations_per_arm"] == 3 and data["times_floor"]["floor"] == 1.0
    assert abs(data["times_floor"]["anp"] - data["mean_ms_per_iteration"]["anp"] / data["mean_ms_per_iteration"]["floor"]) < 1e-12
    assert 0 <= data["largest_mask_difference"] < 1e-3
    md = (tmp_path / "anp_step_timing.md").read_text()
    assert md.count("| anp") == 2 and "| floor |" in md


def test_threads_timing_runs_both_arms_and_compares_their_summaries(tmp_path):
    """Both arms run the two jobs as asked (`--quick`: a tiny ANP and one one-epoch fine-tuning per point, on the
    embedded scenario), the second with one TensorFlow thread per job; the results name both arms, their environments, a wall time per
    repeat and, for each job, whether the arms' summaries agree."""
    proc = run_script("threads_timing.py", "--repeats", "1", "--iterations", "3", "--seed", "0", "--quick",
                      "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "threads_timing.json").read_text())["results"]
    assert set(data["arms"]) == {"default", "one thread per job"}
    assert data["arms"]["one thread per job"]["env"] == {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "1"}
    for arm in data["arms"].values():
        assert len(arm["wall_s"]) == 1 and arm["wall_s"][0] > 0 and arm["mean_wall_s"] == arm["wall_s"][0]
        assert arm["same_summaries_within"] is True  # one repeat: trivially the same
    assert set(data["same_summaries_across_arms"]) == {"anp", "fine_tuning"}
    assert "prune.anp.iterations=3" in data["jobs"]["anp"] and "finetune.grid.epochs=[1]" in data["jobs"]["fine_tuning"]
    md = (tmp_path / "threads_timing.md").read_text()
    assert "one thread per job" in md and "`TF_NUM_INTRAOP_THREADS=1`" in md


def test_multi_layer_timing_times_both_walks_and_finds_the_same_labels(tmp_path):
    """Both ways of evaluating CLP's multi-layer sweep (every step from the input, and from the earliest
    changed mask) on the embedded scenario, at 5 evaluated steps: every label compared, none differing, and
    the speed-up the ratio of the two mean times."""
    proc = run_script("multi_layer_timing.py", "--archs", "deepid", "--seed", "0", "--repeats", "1", "--eval-steps", "5",
                      "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "multi_layer_timing.json").read_text())["results"]["rows"]
    assert row["arch"] == "deepid" and row["layers"] == ["conv_1", "conv_2", "conv_3", "conv_4"] and not row["bn_level"]
    assert row["steps"] == 5 and row["channels"] == 20 + 40 + 60 + 80 and row["segments"] == 4
    assert row["labels_compared"] == row["images"] * 5 and row["labels_differing"] == 0
    whole, reused = row["mean_wall_s"]["whole walk"], row["mean_wall_s"]["from the changed mask"]
    assert whole > 0 and reused > 0 and abs(row["speed_up"] - whole / reused) < 1e-9
    assert "| deepid | 4 (conv), 200 channels | 5 |" in (tmp_path / "multi_layer_timing.md").read_text()


def test_finetune_timing_times_both_ways_and_finds_the_same_weights(tmp_path):
    """Fine-tuning with one batch per call and a whole epoch per call on the embedded scenario, 2 epochs: the same
    weights and history, the preset's B' (a fifth of conv_3's 60 channels pruned), the speed-up the ratio of the
    two mean times."""
    proc = run_script("finetune_timing.py", "--archs", "deepid", "--seed", "0", "--repeats", "1", "--epochs", "2",
                      "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "finetune_timing.json").read_text())["results"]["rows"]
    assert row["layer"] == "conv_3" and row["pruned_channels"] == 12 and row["epochs"] == 2 and row["shift"] == 2
    assert row["largest_weight_difference"] == 0.0 and row["same_history"] is True
    batch, epoch = row["mean_seconds"]["one batch per call"], row["mean_seconds"]["a whole epoch per call"]
    assert batch > 0 and epoch > 0 and abs(row["speed_up"] - batch / epoch) < 1e-9
    assert "| deepid | 12 of `conv_3` |" in (tmp_path / "finetune_timing.md").read_text()
