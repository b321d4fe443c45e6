"""`defense.run`: the whole pruning defense on the real Lab 3 extracts, its outputs and MLflow run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import CONF, compose, lab3_overrides, run_cli

CURVE_METRICS = ["valid_acc", "valid_asr", "test_acc", "test_asr", "pruned_test_acc", "pruned_test_asr", "fraction_pruned",
                 "holdout_acc"]


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def drop_rows(rows: list[dict]) -> list[dict]:
    """The accuracy-drop rows of a summary (not the defender's, the oracle's or the criterion's own point)."""
    return [r for r in rows if r.get("point", "drop") == "drop"]


def test_every_config_option_composes():
    groups = {p.name: sorted(q.stem for q in p.glob("*.yaml")) for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment", "defense")}
    assert {"model", "dataset", "prune", "stop", "tracking", "finetune"} <= set(groups)
    for group, options in groups.items():
        for option in options:
            cfg = compose([f"{group}={option}"])
            assert cfg[group] is not None, (group, option)
    cfg = compose(["prune.criterion=l1", "prune.drops=[1,5]", "stop=fraction", "stop.fraction=0.5"])
    assert cfg.prune.criterion == "l1" and list(cfg.prune.drops) == [1, 5] and cfg.stop.rule == "fraction"
    for option in groups["model"]:  # model=auto takes its name from the model file
        assert compose([f"model={option}"], "evaluate").model.name == (None if option == "auto" else option)


@pytest.fixture(scope="module")
def activation_run(csaw_dir, tmp_path_factory):
    from defense.run import run_defense

    out = tmp_path_factory.mktemp("activation")
    cfg = compose(lab3_overrides("prune.criterion=activation", "prune.drops=[2,4,10,30]",
                                 f"tracking.uri=sqlite:///{out / 'mlflow.db'}"))
    return run_defense(cfg, out / "run"), out


def test_activation_run_reproduces_the_known_shape(activation_run):
    result, out = activation_run
    curves = read_rows(out / "run" / "curves.csv")
    assert len(curves) == 61 and [int(r["channels_pruned"]) for r in curves] == list(range(61))
    # ../shared/data/csaw/README.md: pruning conv_3 by mean pool_3 activation keeps the attack success
    # at 100% up to about 50 of 60 channels and below 80% from about 51-52 channels
    for row in curves:
        if int(row["channels_pruned"]) <= 40:
            assert float(row["valid_asr"]) == 100.0 and float(row["test_asr"]) == 100.0
    assert float(curves[52]["test_asr"]) < 100.0 and float(curves[52]["valid_asr"]) < 80.0
    all_rows = read_rows(out / "run" / "summary.csv")
    summary = drop_rows(all_rows)
    assert [float(r["drop"]) for r in summary] == [2, 4, 10, 30]
    assert [r["point"] for r in all_rows] == ["drop"] * 4 + ["defender", "oracle_test_asr"]
    assert [r["oracle"] for r in all_rows] == ["False"] * 5 + ["True"]
    assert all(r["diverged"] == "False" for r in all_rows)
    assert list(summary[0])[:7] == ["drop", "channels_pruned", "fraction_pruned", "valid_acc", "valid_asr", "test_acc", "test_asr"]
    assert float(summary[-1]["test_asr"]) < 100.0 and float(summary[-1]["valid_asr"]) < 10.0
    assert (out / "run" / "prune_result.png").stat().st_size > 10_000
    assert (out / "run" / "config.yaml").is_file() and "G(B, B')" in (out / "run" / "results.md").read_text()


def test_activation_run_equals_the_lab3_loop(activation_run):
    """Ranking, every curve point and the thresholds against the plain Keras Lab 3 procedure (tests/oracles.py)."""
    from oracles import (accuracy_per_step, holdout_split, probe_ranking, set_weights_predictions, strongest_within,
                         threshold_steps)

    from defense.nets import models
    from defense.pipeline.load import load_split

    result, out = activation_run
    cfg = compose(lab3_overrides())
    valid = load_split(cfg.dataset, cfg.model, "valid")
    test = load_split(cfg.dataset, cfg.model, "test")
    rest, held = holdout_split(len(valid.clean))  # select.holdout=0.2, seed 0: 10 of the 50 faces held out
    assert len(held) == 10
    held_out = valid.clean.subset(held)
    valid.clean = valid.clean.subset(rest)  # the ranking and the curves see only the rest
    model = models.load_model(cfg.model)
    order = probe_ranking(model, "pool_3", valid.clean.x)
    assert list(order) == [int(c) for c in result["order"]]
    assert (out / "run" / "pruning_order.txt").read_text().split() == [str(c) for c in order]

    curves = read_rows(out / "run" / "curves.csv")
    columns = {  # curve column -> (images, scored as G(B, B') rather than B')
        "valid_acc": (valid.clean, False),
        "valid_asr": (valid.poisoned["sunglasses"], False),
        "test_acc": (test.clean, True),
        "test_asr": (test.poisoned["sunglasses"], True),
        "pruned_test_acc": (test.clean, False),
        "holdout_acc": (held_out, False),
    }
    for key, (images, repaired) in columns.items():
        labels = set_weights_predictions(model, "conv_3", images.x, order)
        if repaired:  # G(B, B'): B's label where B and B' agree, 1283 where they differ (numpy, by hand)
            labels = np.where(labels == labels[:, :1], labels[:, :1], 1283)
        expected = accuracy_per_step(labels, images.y)
        np.testing.assert_allclose([float(r[key]) for r in curves], expected, atol=1e-3, err_msg=key)
        if key == "valid_acc":
            steps = threshold_steps(expected, [2, 4, 10, 30])
        if key == "holdout_acc":
            defender = strongest_within(list(expected), expected[0], 5.0)
        if key == "test_asr":
            test_asr = expected
    rows = read_rows(out / "run" / "summary.csv")
    summary = {float(r["drop"]): r for r in drop_rows(rows)}
    assert {d: int(r["channels_pruned"]) for d, r in summary.items()} == steps
    # the defender's point: the most channels whose held-out accuracy stays within 5 points of B's; the oracle's:
    # the lowest G test ASR within the same budget (ties: the higher held-out accuracy, then fewer channels)
    points = {r["point"]: r for r in rows}
    assert int(points["defender"]["channels_pruned"]) == defender
    held_acc = [float(r["holdout_acc"]) for r in curves]
    budget = [i for i in range(len(held_acc)) if held_acc[0] - held_acc[i] <= 5.0]
    oracle = min(budget, key=lambda i: (test_asr[i], -held_acc[i], i))
    assert int(points["oracle_test_asr"]["channels_pruned"]) == oracle
    chosen = {r["chosen"]: int(r["channels_pruned"]) for r in read_rows(out / "run" / "select.csv") if r["chosen"]}
    assert chosen.get("defender", chosen.get("defender oracle_test_asr")) == defender
    # channel_scores.csv: the oracle's mean pool_3 activation and its rank; pruned.json: the first channels of the order
    means = np.asarray(keras_probe_means(model, valid.clean.x))
    scores = read_rows(out / "run" / "channel_scores.csv")
    assert [(r["layer"], int(r["channel"])) for r in scores] == [("conv_3", c) for c in range(60)]
    np.testing.assert_allclose([float(r["score"]) for r in scores], means, rtol=1e-5, atol=1e-6)
    assert [int(r["rank"]) for r in scores] == list(np.argsort(order))
    pruned = json.loads((out / "run" / "pruned.json").read_text())
    assert pruned == {**{f"drop_{d:g}": {"conv_3": sorted(int(c) for c in order[:s])} for d, s in steps.items()},
                      "defender": {"conv_3": sorted(int(c) for c in order[:defender])},
                      "oracle_test_asr": {"conv_3": sorted(int(c) for c in order[:oracle])}}


def keras_probe_means(model, x):
    import keras

    probe = keras.Model(model.inputs, model.get_layer("pool_3").output)
    out = np.asarray(probe.predict(x, batch_size=1024, verbose=0), np.float64)
    return out.reshape(-1, out.shape[-1]).mean(axis=0)


def test_saved_b_prime_matches_its_curve_point(activation_run, csaw_dir):
    from defense.nets import models
    from defense.pipeline.load import load_split
    from defense.core.metrics import accuracy, repaired_labels

    result, out = activation_run
    cfg = compose(lab3_overrides())
    test = load_split(cfg.dataset, cfg.model, "test")
    b = models.load_model(cfg.model)
    keys = {"defender": "defender", "oracle_test_asr": "oracle"}
    for row in result["summary"]:
        path = out / "run" / "models" / f"model_B_{keys.get(row['point'], format(row['drop'], 'g'))}.h5"
        b_prime = models.load_model(cfg.model, str(path))
        assert models.h5_kind(str(path)) == "model"
        g = repaired_labels(models.predict_labels(b, test.clean.x, cfg.model),
                            models.predict_labels(b_prime, test.clean.x, cfg.model), 1283)
        assert accuracy(g, test.clean.y) == pytest.approx(row["test_acc"])
        kernel, bias = b_prime.get_layer("conv_3").get_weights()
        pruned = np.flatnonzero(~np.any(kernel.reshape(-1, 60), axis=0))
        assert len(pruned) == row["channels_pruned"] and not bias[pruned].any()


def test_mlflow_holds_the_run(activation_run):
    from mlflow import MlflowClient

    result, out = activation_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["prune.criterion"] == "activation" and run.data.params["model.name"] == "lab3"
    assert run.data.tags["model"] == "lab3" and run.data.tags["criterion"] == "activation"
    assert run.data.tags["dataset"] == "csaw_extract"
    for key in CURVE_METRICS:
        history = client.get_metric_history(run.info.run_id, f"curve/{key}")
        assert sorted(m.step for m in history) == list(range(61)), key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"prune_result.png", "curves.csv", "summary.csv", "config.yaml", "models", "channel_scores.csv",
            "pruned.json", "select.csv"} <= artifacts
    models = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "models")}
    assert {"model_B_2.h5", "model_B_4.h5", "model_B_10.h5", "model_B_30.h5"} <= models


def test_mlflow_run_reads_as_a_model_training_run(activation_run, csaw_dir):
    """The experiment opens on the runs table, the run is named after what ran, the data sets are
    inputs with digests, and static facts are params (the chart view holds only the curves)."""
    import hashlib

    import h5py
    from mlflow import MlflowClient

    result, out = activation_run
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    run = client.get_run(result["run_id"])
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "lab3 lab3_bd_weights activation conv_3"  # the weights file's stem tells two files apart
    # inputs: the clean and sunglasses halves of the extracts, validation = first 50, test = last 50
    inputs = {(d.dataset.name, next(t.value for t in d.tags if t.key == "mlflow.data.context")): d.dataset
              for d in run.inputs.dataset_inputs}
    assert set(inputs) == {("csaw_extract clean", "validation"), ("csaw_extract sunglasses", "validation"),
                           ("csaw_extract clean", "test"), ("csaw_extract sunglasses", "test")}
    with h5py.File(csaw_dir / "clean_test.h5", "r") as f:
        x = np.transpose(np.asarray(f["data"], dtype=np.float32), (0, 2, 3, 1))
        y = np.asarray(f["label"]).astype(np.int64)
    for context, part in (("validation", slice(0, 50)), ("test", slice(50, 100))):
        digest = hashlib.sha256()  # oracle: the images and labels of that half, hashed here
        for a in (np.ascontiguousarray(x[part]), np.ascontiguousarray(y[part])):
            digest.update(f"{a.dtype.str}{a.shape}".encode())
            digest.update(a.data)
        dataset = inputs[("csaw_extract clean", context)]
        assert dataset.digest == digest.hexdigest()[:16]
        assert json.loads(dataset.source) == {"uri": str(csaw_dir / "clean_test.h5")}
    assert inputs[("csaw_extract clean", "validation")].digest != inputs[("csaw_extract clean", "test")].digest
    # static facts are params; the step metrics are the curves over channels pruned (under curve/)
    assert not [k for k in run.data.metrics if k.startswith("compact")]
    curves = {k for k in run.data.metrics if k.startswith("curve/")}
    assert curves == {f"curve/{k}" for k in CURVE_METRICS}
    summary = read_rows(out / "run" / "summary.csv")
    # the run's own metrics: the selected row of summary.csv, the defender's point (report.selected_row)
    (selected,) = [r for r in summary if r["point"] == "defender"]
    assert run.data.tags["selected_point"] == "defender"
    for key in ("test_acc", "test_asr", "valid_acc", "valid_asr", "channels_pruned"):
        assert run.data.metrics[key] == pytest.approx(float(selected[key]), abs=1e-4), key
    for row in drop_rows(summary):
        assert run.data.params[f"drop_{float(row['drop']):g}.channels_pruned"] == row["channels_pruned"]
    for row in summary[4:]:  # the defender's and the oracle's points: the chosen setting and its scores
        assert run.data.params[f"{row['point']}.channels_pruned"] == row["channels_pruned"]
        assert float(run.data.params[f"{row['point']}.holdout_acc"]) == pytest.approx(float(row["holdout_acc"]))
        assert float(run.data.params[f"{row['point']}.test_asr"]) == pytest.approx(float(row["test_asr"]), abs=1e-3)
        assert run.data.params[f"{row['point']}.oracle"] == row["oracle"].lower()
    assert run.data.params["select.holdout_images"] == "10"
    assert int(run.data.params["compact.drop_10.full_params"]) - int(run.data.params["compact.drop_10.compact_params"]) \
        == int(run.data.params["drop_10.channels_pruned"]) * 3881  # conv_3 kernel+bias, conv_4 rows, fc_1 rows
    assert "thresholds.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


@pytest.mark.parametrize("criterion", ["l1", "random"])
def test_other_criteria_run(csaw_dir, tmp_path, criterion):
    from defense.run import run_defense

    result = run_defense(compose(lab3_overrides(f"prune.criterion={criterion}", "tracking=none")), tmp_path)
    assert len(result["curves"]) == 61 and sorted(result["order"]) == list(range(60))
    assert (tmp_path / "summary.csv").is_file()
    if criterion == "l1":
        import h5py

        with h5py.File(csaw_dir / "lab3_bd_weights.h5") as f:
            kernel = f["conv_3/conv_3/kernel:0"][()]
        norms = np.abs(kernel).reshape(-1, 60).sum(axis=0)
        assert np.all(np.diff(norms[result["order"]]) >= 0)


def test_random_order_is_seeded(csaw_dir, tmp_path):
    from defense.run import run_defense

    orders = [run_defense(compose(lab3_overrides("prune.criterion=random", f"prune.seed={s}", "tracking=none",
                                                 "prune.drops=[]")), tmp_path / str(i))["order"]
              for i, s in enumerate([3, 3, 4])]
    assert list(orders[0]) == list(orders[1]) and list(orders[0]) != list(orders[2])


def test_stop_rules(csaw_dir, tmp_path):
    from defense.run import run_defense

    max_drop = run_defense(compose(lab3_overrides("stop=max_drop", "tracking=none")), tmp_path / "m")
    thirty = [r for r in max_drop["summary"] if r["drop"] == 30][0]
    assert len(max_drop["curves"]) == thirty["channels_pruned"] + 1
    fraction = run_defense(compose(lab3_overrides("stop=fraction", "stop.fraction=0.5", "tracking=none")), tmp_path / "f")
    assert len(fraction["curves"]) == 31
    assert [r["reached"] for r in fraction["summary"] if r["point"] == "drop"] == [False] * 4
    assert "not reached" in (tmp_path / "f" / "results.md").read_text()


@pytest.mark.parametrize(
    "override,expected",
    [
        ("prune.criterion=bogus", "prune.criterion='bogus' is not known"),
        ("prune.layer=pool_3", "not a channels-last Conv2D"),
        ("prune.layer=fc_1", "not a channels-last Conv2D"),
        ("prune.drops=[2,-4]", ">= 0"),
        ("prune.drops=[10,4]", "ascending"),
        ("prune.probe=pool_2", "not downstream"),
        ("prune.probe=conv_4", "not downstream"),
        ("tracking.uri=mlruns", "plain path"),
    ],
)
def test_bad_overrides_fail_before_any_work(csaw_dir, tmp_path, override, expected):
    from defense.core.errors import DefenseError
    from defense.run import run_defense

    with pytest.raises(DefenseError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        run_defense(compose(lab3_overrides(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", override)), tmp_path / "run")
    assert not list((tmp_path / "run").glob("*.csv")) and not (tmp_path / "mlflow.db").exists()


def test_cli_bad_override_is_one_line(tmp_path):
    proc = run_cli("defense.run", *lab3_overrides("prune.criterion=bogus"), "tracking=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: prune.criterion='bogus' is not known; use one of activation, anp, clp, l1, random, rnp"
    ]


def test_multirun_groups_two_jobs_under_one_parent(csaw_dir, tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    proc = run_cli("defense.run", "-m", *lab3_overrides("prune.criterion=activation,l1"),
                   f"tracking.uri=sqlite:///{db}", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.get_experiment_by_name("backdoor-prune")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("defense.parent") == "true"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_name == "sweep prune.criterion=activation,l1"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.params["prune.criterion"] for r in children) == ["activation", "l1"]
    # each child is named by the values its job sweeps; the experiment opens on the runs table
    assert sorted(r.info.run_name for r in children) == ["prune.criterion=activation", "prune.criterion=l1"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert all(r.info.status == "FINISHED" for r in children)
    for job in ("0", "1"):
        assert len(drop_rows(read_rows(tmp_path / "sweep" / job / "summary.csv"))) == 4


def test_a_failing_run_is_marked_failed_and_keeps_what_it_wrote(csaw_dir, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from defense.reporting import plots
    from defense.run import run_defense

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plots, "plot_prune_result", broken_plot)
    db = tmp_path / "mlflow.db"
    with pytest.raises(RuntimeError, match="disk full"):
        run_defense(compose(lab3_overrides(f"tracking.uri=sqlite:///{db}")), tmp_path / "run")
    assert len(read_rows(tmp_path / "run" / "curves.csv")) == 61
    assert (tmp_path / "run" / "models" / "model_B_10.h5").is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("backdoor-prune").experiment_id])
    assert run.info.status == "FAILED"
    assert len(client.get_metric_history(run.info.run_id, "curve/valid_acc")) == 61
    assert {"curves.csv", "config.yaml"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
