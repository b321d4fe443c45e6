"""The baseline defenses (conf/defense: none, fine_tuning, random_pruning beside fp and fine_pruning),
the `experiment=defenses` sweep with its `defense.compare` report, and `experiment=finetune_ablation`.

Oracles: plain Keras `load_model` + `predict` on the scenario's h5 files read with h5py, and
BackdoorBench's DER written out by hand; none of the runner's scoring code.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import CONF, REPO, compose

TINY = ["finetune.epochs=1", "compact=false", "tracking.log_models=false", "progress=false"]
DEFENSES = ["none", "fine_tuning", "random_pruning", "fp", "fine_pruning"]


def read_rows(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def der(acc_before, acc_after, asr_before, asr_after):
    """BackdoorBench's DER on fractions, d = before - after."""
    return (max(0.0, (asr_before - asr_after) / 100) - max(0.0, (acc_before - acc_after) / 100) + 1) / 2


def plain_labels(model_path: Path, h5_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 labels of the saved Keras model, the file's labels): h5py, pixels / 255, Keras predict."""
    import h5py
    import keras

    with h5py.File(h5_path, "r") as f:
        x = np.asarray(f["data"], np.float32)
        y = np.asarray(f["label"], np.int64)
    if x.ndim == 4 and x.shape[1] == 1:  # channels first, as the Lab 3 files are
        x = np.transpose(x, (0, 2, 3, 1))
    model = keras.models.load_model(model_path, compile=False)
    return np.argmax(model.predict(x / 255.0, verbose=0), axis=-1), y


@pytest.fixture(scope="module")
def scenario():
    """The embedded scenario's folder (bd_net.h5 and the Lab 3 layout), built once per test session."""
    from defense.scenario.build import ensure_scenario

    return Path(ensure_scenario(compose([]).dataset.scenario))


@pytest.fixture(scope="module")
def b_scores(scenario):
    """B's clean test accuracy and test ASR (%), from a plain Keras predict of bd_net.h5."""
    pred, y = plain_labels(scenario / "bd_net.h5", scenario / "cl" / "test.h5")
    pred_bd, target = plain_labels(scenario / "bd_net.h5", scenario / "bd" / "bd_test.h5")
    return {"acc": 100 * float(np.mean(pred == y)), "asr": 100 * float(np.mean(pred_bd == target)),
            "clean": pred, "poisoned": pred_bd}


# ---- the presets --------------------------------------------------------------------------------
def test_every_defense_preset_names_itself_and_sets_its_parts():
    from defense.config import defense_name

    presets = sorted(p.stem for p in (CONF / "defense").glob("*.yaml"))
    assert set(DEFENSES) <= set(presets)
    for preset in presets:
        assert compose([f"defense={preset}"]).defense_name == preset
    none, ft, rnd, fp, fpr = (compose([f"defense={d}"]) for d in DEFENSES)
    assert list(none.prune.drops) == [0] and none.stop.rule == "max_drop" and none.finetune.kind == "none"
    assert list(ft.prune.drops) == [0] and ft.stop.rule == "max_drop" and ft.finetune.kind == "clean"
    assert rnd.prune.criterion == "random" and rnd.finetune.kind == "none" and list(rnd.prune.drops) == [2, 4, 10, 30]
    assert fp.prune.criterion == "activation" and fp.finetune.kind == "none" and list(fp.prune.drops) == [2, 4, 10, 30]
    assert fpr.prune.criterion == "activation" and fpr.stop.rule == "all"
    # fine-tuning alone is the same fine-tuning as fine-pruning, and as the experiment=fine_pruning preset,
    # whose values are the ones docs/defenses.md, "Fine-pruning", states: SGD 0.05, momentum 0.9, cosine, 30 epochs, 2 px
    expected = {"kind": "clean", "optimizer": "sgd", "learning_rate": 0.05, "momentum": 0.9, "lr_schedule": "cosine",
                "epochs": 30, "batch_size": 64, "shift": 2, "holdout": 0.0, "seed": 0}
    for cfg in (ft, fpr, compose(["experiment=fine_pruning"])):
        assert {k: cfg.finetune[k] for k in expected} == expected
    assert dict(ft.finetune) == dict(fpr.finetune)
    experiment = compose(["experiment=fine_pruning"])
    assert experiment.defense_name == "fine_pruning" and experiment.prune.layer == "conv_3"
    assert list(experiment.prune.drops) == [2, 4, 10, 30] and experiment.stop.rule == "all"
    # an experiment's own choices still win over the preset it names, and the command line over both
    assert compose(["experiment=fine_pruning", "finetune.epochs=3"]).finetune.epochs == 3
    # a custom defense is named after its criterion, "+ft" when fine-tuned
    assert compose([]).defense_name is None
    assert defense_name(compose(["prune.criterion=l1"])) == "l1"
    assert defense_name(compose(["prune.criterion=l1", "finetune=clean"])) == "l1+ft"
    assert defense_name(compose(["defense=fp"])) == "fp"


def test_unpruned_defenses_refuse_thresholds_that_would_prune(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "defense.run", "defense=none", "prune.drops=[10]", "tracking=none",
                           f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "defense=none" in errors[0] and "prune.drops" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "summary.csv").exists()


# ---- experiment=defenses: every preset, one MLflow child each, then defense.compare ------------------
def test_defenses_experiment_sweeps_every_preset():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=["experiment=defenses"], return_hydra_config=True)
    assert sorted(cfg.hydra.sweeper.params.defense.split(",")) == sorted(DEFENSES + ["clp", "anp", "rnp"])


@pytest.fixture(scope="module")
def defenses_sweep(tmp_path_factory, scenario):
    """The defenses on the embedded scenario in one MLflow store: `python -m defense.run -m
    experiment=defenses` over the presets that fine-tune nothing (a finetune.* override on the command
    line would reach every job of the sweep, and those have no fine-tuning settings), and defense=fine_tuning
    and defense=fine_pruning with one epoch of fine-tuning (the presets' 30 would take minutes) as single
    runs; then `python -m defense.compare compare.experiment=backdoor-prune` over all five."""
    from defense.run import run_defense

    tmp = tmp_path_factory.mktemp("defenses")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DEFENSE_MLFLOW_PARENT_RUN_ID", None)
    swept = ["none", "random_pruning", "fp"]
    # stop=max_drop: the sweep ends at the 30-point drop instead of pruning every channel
    proc = subprocess.run([sys.executable, "-m", "defense.run", "-m", "experiment=defenses", f"defense={','.join(swept)}",
                           "stop=max_drop", *TINY[1:], f"tracking.uri={uri}", f"hydra.sweep.dir={tmp / 'sweep'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    from omegaconf import OmegaConf

    jobs = {}
    for job in sorted((tmp / "sweep").glob("[0-9]*")):
        jobs[OmegaConf.load(job / "config.yaml").defense_name] = job
    assert sorted(jobs) == sorted(swept)
    run_ids = {}
    # the defender's grid of the presets cut to one 1-epoch setting (finetune.grid), as TINY cuts the others
    grid = ["finetune.grid.epochs=[1]", "finetune.grid.learning_rate=[0.05]"]
    for name, extra in (("fine_tuning", []), ("fine_pruning", ["prune.drops=[10]", "stop=max_drop"])):
        jobs[name] = tmp / name
        cfg = compose([f"defense={name}", *TINY, *grid, *extra, f"tracking.uri={uri}"])
        run_ids[name] = run_defense(cfg, jobs[name])["run_id"]
    compare = subprocess.run([sys.executable, "-m", "defense.compare", f"tracking.uri={uri}",
                              "compare.experiment=backdoor-prune", f"hydra.run.dir={tmp / 'compare'}"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert compare.returncode == 0, compare.stderr[-3000:]
    return {"uri": uri, "jobs": jobs, "swept": swept, "run_ids": run_ids, "compare": tmp / "compare",
            "stdout": compare.stdout}


def test_defense_none_scores_b_itself(defenses_sweep, b_scores):
    job = defenses_sweep["jobs"]["none"]
    rows = read_rows(job / "summary.csv")
    (row,) = [r for r in rows if r["point"] == "drop"]
    # the defender's and the oracle's points of defense=none: step 0, B itself, the only candidate
    assert [(r["point"], r["channels_pruned"], r["oracle"]) for r in rows[1:]] == [("defender", "0", "False"),
                                                                                  ("oracle_test_asr", "0", "True")]
    assert float(row["drop"]) == 0 and int(row["channels_pruned"]) == 0 and row["reached"] == "True"
    # the defended network G(B, B) is B: its scores are a plain predict of bd_net.h5
    assert float(row["test_acc"]) == pytest.approx(b_scores["acc"], abs=1e-3)
    assert float(row["test_asr"]) == pytest.approx(b_scores["asr"], abs=1e-3)
    assert float(row["pruned_test_acc"]) == pytest.approx(b_scores["acc"], abs=1e-3)
    assert float(row["der"]) == pytest.approx(0.5)
    assert len(read_rows(job / "curves.csv")) == 1  # no pruning step was evaluated
    assert "ft_test_acc" not in row


def test_defense_fine_tuning_scores_the_fine_tuned_b(defenses_sweep, b_scores, scenario):
    job = defenses_sweep["jobs"]["fine_tuning"]
    rows = read_rows(job / "summary.csv")
    (row,) = [r for r in rows if r["point"] == "drop"]
    defender = next(r for r in rows if r["point"] == "defender")
    assert defender["channels_pruned"] == "0" and defender["diverged"] == "False"
    # the grid's one setting (lr 0.05 x 1 epoch) kept the held-out accuracy, or the point is B itself
    assert defender["ft_within_budget"] in ("True", "False")
    if defender["ft_within_budget"] == "True":
        assert float(defender["ft_learning_rate"]) == 0.05 and defender["ft_epochs_setting"] == "1"
    assert float(row["drop"]) == 0 and int(row["channels_pruned"]) == 0
    saved = job / "models" / "model_B_0_ft.h5"
    assert row["ft_model_path"] == str(saved) and row["ft_epochs"] == "1"
    pred, y = plain_labels(saved, scenario / "cl" / "test.h5")
    pred_bd, target = plain_labels(saved, scenario / "bd" / "bd_test.h5")
    acc, asr = 100 * float(np.mean(pred == y)), 100 * float(np.mean(pred_bd == target))
    g_clean = np.where(pred == b_scores["clean"], pred, 10)  # G(B, B''): N = 10 where B and B'' disagree
    g_bd = np.where(pred_bd == b_scores["poisoned"], pred_bd, 10)
    g_acc, g_asr = 100 * float(np.mean(g_clean == y)), 100 * float(np.mean(g_bd == target))
    assert float(row["ft_test_acc"]) == pytest.approx(acc, abs=1e-3)
    assert float(row["ft_test_asr"]) == pytest.approx(asr, abs=1e-3)
    assert float(row["ft_g_test_acc"]) == pytest.approx(g_acc, abs=1e-3)
    assert float(row["ft_g_test_asr"]) == pytest.approx(g_asr, abs=1e-3)
    assert float(row["ft_der"]) == pytest.approx(der(b_scores["acc"], acc, b_scores["asr"], asr), abs=1e-4)
    assert asr < b_scores["asr"]  # one epoch at 0.05 already moves the backdoor


def test_defenses_sweep_is_one_child_run_per_defense(defenses_sweep):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=defenses_sweep["uri"])
    runs = client.search_runs([client.get_experiment_by_name("backdoor-prune").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("defense.parent") == "true"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 1 + len(DEFENSES) and parent.info.status == "FINISHED"
    assert sorted(r.data.tags["defense_name"] for r in children) == sorted(defenses_sweep["swept"])
    assert sorted(r.data.params["defense_name"] for r in children) == sorted(defenses_sweep["swept"])
    for name, run_id in defenses_sweep["run_ids"].items():
        assert client.get_run(run_id).data.tags["defense_name"] == name


def test_compare_report_lists_the_baselines_beside_the_defenses(defenses_sweep, b_scores):
    rows = {r["defense_name"]: r for r in read_rows(defenses_sweep["compare"] / "comparison.csv")}
    assert sorted(rows) == sorted(DEFENSES)
    for row in rows.values():
        assert float(row["base_test_acc"]) == pytest.approx(b_scores["acc"], abs=1e-3)
        assert float(row["base_test_asr"]) == pytest.approx(b_scores["asr"], abs=1e-3)
    none, ft = rows["none"], rows["fine_tuning"]
    assert none["defended"] == "G(B,B')" and int(none["drop0_channels_pruned"]) == 0
    assert float(none["drop0_test_acc"]) == pytest.approx(b_scores["acc"], abs=1e-3)
    assert float(none["drop0_der"]) == pytest.approx(0.5)
    assert none["drop10_test_acc"] == ""  # not a threshold of defense=none
    assert ft["defended"] == "B''" and int(ft["drop0_channels_pruned"]) == 0
    ft_summary = read_rows(defenses_sweep["jobs"]["fine_tuning"] / "summary.csv")[0]
    assert float(ft["drop0_test_asr"]) == pytest.approx(float(ft_summary["ft_test_asr"]))
    for name in ("fp", "random_pruning", "fine_pruning"):
        assert rows[name]["drop0_test_acc"] == "" and rows[name]["drop10_channels_pruned"] != ""
    assert rows["fine_pruning"]["defended"] == "B''" and rows["fp"]["defended"] == "G(B,B')"
    table = (defenses_sweep["compare"] / "comparison.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(lines) == 1 + len(DEFENSES)
    assert [cell.strip() for cell in lines[0].split("|")[1:3]] == ["run", "defense"]
    assert sorted(line.split("|")[2].strip() for line in lines[1:]) == sorted(DEFENSES)


# ---- experiment=finetune_ablation ---------------------------------------------------------------------
def test_finetune_ablation_end_to_end(tmp_path, defenses_sweep, b_scores):
    """A tiny grid: drops {0, 10} x epochs [1, 2] x learning rates [0.02, 0.05]; the (drop, 1 epoch, 0.05)
    cells are the fine_tuning and fine_pruning jobs of the defenses sweep (same 1-epoch fine-tuning)."""
    from mlflow import MlflowClient

    from defense.run import run_defense

    uri = defenses_sweep["uri"]  # the store of the defenses (its tables exist already), another experiment
    cfg = compose(["experiment=finetune_ablation", "ablation.epochs=[1,2]", "ablation.learning_rate=[0.02,0.05]",
                   "prune.drops=[10]", f"tracking.uri={uri}", "tracking.experiment=ablation", *TINY])
    result = run_defense(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "ablation.csv")
    cells = [(float(r["drop"]), int(r["epochs"]), float(r["learning_rate"])) for r in rows]
    assert sorted(cells) == sorted((d, e, lr) for d in (0.0, 10.0) for e in (1, 2) for lr in (0.02, 0.05))
    (threshold,) = [r for r in result["summary"] if r["point"] == "drop"]
    for r in rows:
        assert r["reached"] == "True"
        assert int(r["channels_pruned"]) == (0 if float(r["drop"]) == 0 else threshold["channels_pruned"])
        assert float(r["base_test_acc"]) == pytest.approx(b_scores["acc"], abs=1e-3)
        assert float(r["base_test_asr"]) == pytest.approx(b_scores["asr"], abs=1e-3)
        for key in ("ft_test_acc", "ft_test_asr", "ft_g_test_acc", "ft_g_test_asr"):
            assert 0.0 <= float(r[key]) <= 100.0
        for net in ("ft", "ft_g"):
            acc, asr = float(r[f"{net}_test_acc"]), float(r[f"{net}_test_asr"])
            assert float(r[f"{net}_der"]) == pytest.approx(der(b_scores["acc"], acc, b_scores["asr"], asr), abs=1e-4)
            assert 0.0 <= float(r[f"{net}_der"]) <= 1.0
        assert int(r["ft_epochs_run"]) == int(r["epochs"])
    # the grid's cells are the presets' fine-tunings: drop 0 = defense=fine_tuning, drop 10 = defense=fine_pruning
    by_cell = dict(zip(cells, rows))
    ft_job = read_rows(defenses_sweep["jobs"]["fine_tuning"] / "summary.csv")[0]
    fp_job = {float(r["drop"]): r for r in read_rows(defenses_sweep["jobs"]["fine_pruning"] / "summary.csv")
              if r["point"] == "drop"}[10.0]
    for cell, job in (((0.0, 1, 0.05), ft_job), ((10.0, 1, 0.05), fp_job)):
        assert int(by_cell[cell]["channels_pruned"]) == int(job["channels_pruned"])
        for key in ("ft_test_acc", "ft_test_asr", "ft_g_test_acc", "ft_g_test_asr"):
            assert float(by_cell[cell][key]) == pytest.approx(float(job[key]), abs=1e-3), (cell, key)
    png = (tmp_path / "run" / "ablation.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "fine-tuning alone" in (tmp_path / "run" / "ablation.md").read_text()
    # MLflow: the files as artifacts, the grid as params, each cell's scores as metrics (step = epochs)
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert {"ablation.csv", "ablation.png", "ablation.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert run.data.params["ablation.epochs"] == "[1, 2]" and run.data.params["ablation.learning_rate"] == "[0.02, 0.05]"
    history = client.get_metric_history(run.info.run_id, "ablation/drop_10/lr_0.05/ft_test_asr")
    assert sorted(m.step for m in history) == [1, 2]
    assert {m.step: m.value for m in history}[2] == pytest.approx(float(by_cell[(10.0, 2, 0.05)]["ft_test_asr"]), abs=1e-3)


def test_ablation_cells_that_collapse_are_blank_and_marked(tmp_path, caplog):
    """A learning rate far too large collapses every cell's fine-tuning: by the package's one rule (a loss that is
    not finite, or clean accuracy at chance on the held-out images) each cell is marked diverged, its scores left
    blank, and one warning names it; a sane rate's cells are not marked, and their held-out accuracy is that of a
    network that learned the task (far above chance)."""
    import logging

    from defense.core.divergence import CHANCE_FACTOR, chance_accuracy
    from defense.run import run_defense

    cfg = compose(["experiment=finetune_ablation", "ablation.epochs=[1]", "ablation.learning_rate=[0.05,1000]",
                   "prune.drops=[10]", "tracking=none", *TINY])
    with caplog.at_level(logging.WARNING):
        run_defense(cfg, tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "ablation.csv")
    floor = CHANCE_FACTOR * chance_accuracy(int(cfg.model.num_classes))
    for r in rows:
        if float(r["learning_rate"]) == 1000:
            assert r["diverged"] == "True", r
            assert all(r[k] == "" for k in ("ft_test_acc", "ft_test_asr", "ft_g_test_acc")), r  # blank cells
        else:
            assert r["diverged"] == "False" and float(r["ft_holdout_acc"]) > 3 * floor, r
            assert 0.0 <= float(r["ft_test_acc"]) <= 100.0
    warned = [m for m in caplog.messages if "ablation cell" in m and "diverged" in m]
    assert len(warned) == sum(r["diverged"] == "True" for r in rows) == 2, caplog.messages


def test_bad_ablation_grids_name_the_key():
    from defense.core.errors import DefenseError
    from defense.pipeline.stages import check_config  # the run's checks: the shared keys, then each stage's section

    for override, words in (("ablation.epochs=[]", "ablation.epochs"), ("ablation.epochs=[0,2]", "ablation.epochs"),
                            ("ablation.learning_rate=[-0.1]", "ablation.learning_rate"),
                            ("ablation.epochs=[2,2]", "once"), ("finetune=none", "finetune=none")):
        with pytest.raises(DefenseError, match=words.replace(".", r"\.")):
            check_config(compose(["experiment=finetune_ablation", override]), "run")
    assert math.isfinite(compose(["experiment=finetune_ablation"]).ablation.learning_rate[0])


# ---- experiments/finetune_ablation_seeds.py ----------------------------------------------------------
def test_ablation_seeds_study_statistics_and_bad_attack(monkeypatch):
    """The study's per-cell statistics on two hand-made seeds (numpy mean and n - 1 std as the oracle),
    and an attack this checkout does not know: one error line, exit 2, nothing run."""
    sys.path.insert(0, str(REPO / "experiments"))
    import finetune_ablation_seeds as study

    def record(seed, b_acc, ft_asr, fp_asr):
        def cell(drop, asr):
            return {"drop": drop, "epochs": 1, "learning_rate": 0.05, "reached": True,
                    "channels_pruned": 0 if drop == 0 else 7,
                    "ft_test_acc": 90.0, "ft_test_asr": asr, "ft_der": 0.9, "ft_g_test_acc": 89.0,
                    "ft_g_test_asr": asr, "ft_g_der": 0.89}
        pruning = [{"drop": 4.0, "reached": True, "channels_pruned": 7, "b_prime_acc": 92.0, "b_prime_asr": 100.0,
                    "g_acc": 91.0, "g_asr": 100.0, "b_prime_der": 0.48, "g_der": 0.47}]
        return {"seed": seed, "b_test_acc": b_acc, "b_test_asr": 100.0, "seconds": {"activation_run": 1.0},
                "drop0_runs_agree": True, "pruning": {"activation": pruning, "random": pruning},
                "cells": {"activation": [cell(0.0, ft_asr), cell(4.0, fp_asr)],
                          "random": [cell(0.0, ft_asr), cell(4.0, 50.0)]}}

    diverged = record(3, 95.0, 20.0, float("nan"))
    diverged["cells"]["activation"][1]["diverged"] = True  # its scores are blank (NaN), as run_ablation leaves them
    with_diverged = study.summarize([record(1, 97.0, 30.0, 10.0), diverged])
    cell = {(r["defense"], r["drop"], r["epochs"]): r for r in with_diverged["rows"]}[("fine_pruning", 4.0, 1)]
    assert cell["diverged"] == 1 and cell["asr"]["n"] == 1 and cell["asr"]["mean"] == 10.0
    monkeypatch.setattr(study, "DROPS", (4.0,))  # the hand-made seeds' grid: drop 4 x 1 epoch
    monkeypatch.setattr(study, "EPOCHS", [1])
    shown = study.markdown([record(1, 97.0, 30.0, 10.0), diverged], with_diverged, "badnets")
    assert "10.00 (1 diverged)" in shown and "reached at" not in shown
    summary = study.summarize([record(1, 97.0, 30.0, 10.0), record(2, 96.0, 50.0, 2.0)])
    rows = {(r["defense"], r["drop"], r["epochs"]): r for r in summary["rows"]}
    assert rows[("fine_tuning", 0.0, 1)]["asr"]["mean"] == pytest.approx(40.0)
    assert rows[("fine_tuning", 0.0, 1)]["asr"]["std"] == pytest.approx(float(np.std([30.0, 50.0], ddof=1)))
    assert rows[("fine_pruning", 4.0, 1)]["asr"]["max"] == 10.0
    assert rows[("random_fine_tuning", 4.0, 1)]["asr"]["mean"] == 50.0
    assert rows[("fine_tuning", 0.0, 0)]["acc"]["mean"] == pytest.approx(96.5)  # B itself at 0 epochs
    assert rows[("fine_pruning", 4.0, 0)]["asr"]["mean"] == 100.0  # B' (pruning alone) at 0 epochs
    proc = subprocess.run([sys.executable, "experiments/finetune_ablation_seeds.py", "--attack", "no_such_attack",
                           "--seeds", "1", "--out", str(REPO / "outputs" / "never")], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "no_such_attack" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (REPO / "outputs" / "never").exists()


def test_pruning_defense_presets_set_what_each_paper_prunes():
    # CLP, ANP and RNP score every convolutional layer and prune at their own operating point, with no
    # fine-tuning (Zheng et al. 2022, Wu and Wang 2021, Li et al. 2023); the thresholds are the criteria's
    # config defaults (conf/prune/<name>.yaml)
    for name, key, value in (("clp", "u", 3.0), ("anp", "threshold", 0.2), ("rnp", "threshold", 0.2)):
        cfg = compose([f"defense={name}"])
        assert (cfg.defense_name, cfg.prune.criterion, cfg.prune.layer) == (name, name, "all")
        assert cfg.finetune.kind == "none" and cfg.prune[name][key] == value
