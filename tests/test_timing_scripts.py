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
