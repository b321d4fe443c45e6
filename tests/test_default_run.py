"""The README's main command: `python -m defense.run` with no arguments, on the embedded default."""

from __future__ import annotations

import csv
import re

import pytest

from conftest import run_cli


def test_default_run_completes_and_writes_the_results(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = run_cli("defense.run", f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri=sqlite:///{db}", "progress=false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    with (tmp_path / "run" / "summary.csv").open() as f:
        summary = list(csv.DictReader(f))
    assert [float(r["drop"]) for r in summary if r["point"] == "drop"] == [2, 4, 10, 30]
    assert [r["point"] for r in summary if r["point"] != "drop"] == ["defender", "oracle_test_asr"]
    with (tmp_path / "run" / "curves.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 61
    # the results table is printed at the end, one row per threshold
    assert "Pruning conv_3 of badnets_mnist by activation" in proc.stdout
    assert len(re.findall(r"^\| acc_drop_\d+%", proc.stdout, flags=re.M)) == 4
    unpruned = re.search(r"Unpruned B: clean valid accuracy ([\d.]+) %, valid ASR ([\d.]+) %", proc.stdout)
    assert float(unpruned.group(1)) >= 95 and float(unpruned.group(2)) >= 95
    # no TensorFlow start-up lines, and the footer ends the output: files, MLflow run and runs table, verdict
    assert not re.search(r"oneDNN custom operations|cudart_stub|absl::InitializeLog", proc.stdout + proc.stderr)
    tail = proc.stdout.strip().splitlines()[-6:]
    assert tail[0].startswith("done in ") and tail[0].endswith(str(tmp_path / "run"))
    assert tail[-1].startswith("verdict: ")
    for name in ("prune_result.png", "config.yaml", "run.log", "models/model_B_10.h5"):
        assert (tmp_path / "run" / name).is_file(), name

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("backdoor-prune").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["model"] == "badnets_mnist"


def test_default_evaluate_scores_the_scenario_backdoor(tmp_path):
    proc = run_cli("defense.evaluate", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean = float(re.search(r"Clean Classification accuracy: ([\d.]+) %", proc.stdout).group(1))
    asr = float(re.search(r"Attack Success Rate: ([\d.]+) %", proc.stdout).group(1))
    assert clean >= 95 and asr >= 95


@pytest.mark.parametrize("attack", ["sig", "wanet"])
def test_attack_defaults_build_and_evaluate_with_no_other_option(attack, tmp_path):
    """conf/dataset/attack/sig.yaml and wanet.yaml hold settings that pass the scenario's build check
    (the papers' settings, sig_paper and wanet_paper, do not on these digits): the scenario builds with
    no other option and its backdoored network reaches the check's bounds."""
    proc = run_cli("defense.evaluate", f"dataset.scenario.attack={attack}", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    clean = float(re.search(r"Clean Classification accuracy: ([\d.]+) %", proc.stdout).group(1))
    asr = float(re.search(r"Attack Success Rate: ([\d.]+) %", proc.stdout).group(1))
    assert clean >= 95 and asr >= 90  # the build check's bounds for these attacks
