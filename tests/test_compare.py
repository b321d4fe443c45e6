"""A 2-job joblib multirun lands as 2 children of one MLflow parent run; `defense.compare` reports on it."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONF = REPO / "conf"
CSAW = (REPO.parent / "shared" / "data" / "csaw").resolve()
LAB3_WEIGHTS = CSAW / "lab3_bd_weights.h5"
DROPS = [2, 4, 10, 30]


def cli(module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DEFENSE_MLFLOW_PARENT_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def compose_compare(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="compare", overrides=overrides)


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def read_rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """`python -m defense.run -m hydra/launcher=joblib hydra.launcher.n_jobs=2 prune.criterion=activation,l1`."""
    assert (CSAW / "clean_test.h5").is_file(), f"the real CSAW-HackML extracts are missing at {CSAW}"
    tmp = tmp_path_factory.mktemp("joblib")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = cli("defense.run", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "prune.criterion=activation,l1",
               "model=lab3", f"model.path={LAB3_WEIGHTS}", "dataset=csaw_extract", f"dataset.root={CSAW}",
               f"tracking.uri={uri}", "tracking.log_models=false", f"hydra.sweep.dir={tmp / 'sweep'}", "progress=false")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "uri": uri, "sweep_dir": tmp / "sweep"}


def test_joblib_jobs_are_two_children_of_one_parent_run(sweep):
    c = client(sweep["uri"])
    exp = c.get_experiment_by_name("backdoor-prune")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("defense.parent") == "true"]
    assert len(parents) == 1 and len(runs) == 3
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert (sweep["sweep_dir"] / "mlflow_parent_run_id.txt").read_text().strip() == parent.info.run_id
    children = [r for r in runs if r is not parent]
    assert all(r.data.tags.get("mlflow.parentRunId") == parent.info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in children)
    assert sorted(r.data.params["prune.criterion"] for r in children) == ["activation", "l1"]
    # the two jobs ran at the same time, in two loky worker processes
    a, b = sorted(children, key=lambda r: r.info.start_time)
    assert b.info.start_time < a.info.end_time, "the joblib jobs did not overlap in time"


def test_report_over_the_sweep(sweep):
    out = sweep["tmp"] / "compare"
    proc = cli("defense.compare", f"tracking.uri={sweep['uri']}", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    c = client(sweep["uri"])
    parent_id = (sweep["sweep_dir"] / "mlflow_parent_run_id.txt").read_text().strip()
    children = {r.info.run_id: r for r in c.search_runs(
        [c.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")}

    rows = read_rows(out / "comparison.csv")
    assert len(rows) == 2 and {r["run_id"] for r in rows} == set(children)
    assert sorted(r["criterion"] for r in rows) == ["activation", "l1"]
    assert all(r["network"] == "lab3" and r["layer"] == "conv_3" and r["finetune"] == "none" for r in rows)
    # the unpruned network's scores, by a plain Keras predict on the test half of the extracts
    import h5py
    import numpy as np

    from defense.nets.architectures.deepid import build_deepid

    net = build_deepid()
    net.load_weights(LAB3_WEIGHTS)
    expected_base = []
    for name, key in (("clean_test.h5", "label"), ("sunglasses_test.h5", "label")):
        with h5py.File(CSAW / name, "r") as f:
            x = np.transpose(f["data"][50:], (0, 2, 3, 1)).astype(np.float32)
            y = f[key][50:].astype(np.int64)
        expected_base.append(100.0 * float(np.mean(np.argmax(net.predict(x, verbose=0), -1) == y)))

    def der(acc_before, acc_after, asr_before, asr_after):  # BackdoorBench's DER, on fractions
        return (max(0.0, (asr_before - asr_after) / 100) - max(0.0, (acc_before - acc_after) / 100) + 1) / 2

    for row in rows:
        path = c.download_artifacts(row["run_id"], "summary.csv", str(_mkdir(sweep["tmp"] / "dl" / row["run_id"])))
        all_rows = read_rows(Path(path))
        summary = {float(s["drop"]): s for s in all_rows if s["point"] == "drop"}
        base_acc, base_asr = float(row["base_test_acc"]), float(row["base_test_asr"])
        assert [base_acc, base_asr] == pytest.approx(expected_base)
        for drop in DROPS:
            s = summary[drop]
            assert int(row[f"drop{drop}_channels_pruned"]) == int(s["channels_pruned"])
            assert float(row[f"drop{drop}_test_acc"]) == pytest.approx(float(s["test_acc"]))
            assert float(row[f"drop{drop}_test_asr"]) == pytest.approx(float(s["test_asr"]))
            expected_der = der(base_acc, float(s["test_acc"]), base_asr, float(s["test_asr"]))
            assert float(row[f"drop{drop}_der"]) == pytest.approx(expected_der, abs=1e-4)
        for point in ("defender", "oracle_test_asr"):  # the defender's and the oracle's rows, as summary.csv has them
            (s,) = [r for r in all_rows if r["point"] == point]
            assert int(row[f"{point}_channels_pruned"]) == int(s["channels_pruned"])
            assert float(row[f"{point}_test_asr"]) == pytest.approx(float(s["test_asr"]))
            assert float(row[f"{point}_der"]) == pytest.approx(
                der(base_acc, float(s["test_acc"]), base_asr, float(s["test_asr"])), abs=1e-4)

    table = (out / "comparison.md").read_text()
    assert sum(line.startswith("| ") for line in table.splitlines()) == 3  # header + 2 runs
    assert "| defender ch | defender acc | defender ASR | defender DER |" in table
    assert "| ORACLE ch | ORACLE acc | ORACLE ASR | ORACLE DER |" in table and "not available to a defender" in table
    png = (out / "comparison.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    logged = {a.path for a in c.list_artifacts(parent_id, "comparison")}
    assert logged == {"comparison/comparison.csv", "comparison/comparison.md", "comparison/comparison.png"}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_report_selects_by_parent_or_by_experiment(sweep, tmp_path):
    from defense.compare import compare

    parent_id = (sweep["sweep_dir"] / "mlflow_parent_run_id.txt").read_text().strip()
    by_parent = compare(compose_compare([f"tracking.uri={sweep['uri']}", f"compare.parent={parent_id}"]), tmp_path / "p")
    by_experiment = compare(compose_compare([f"tracking.uri={sweep['uri']}", "compare.experiment=backdoor-prune",
                                             "compare.x=channels_pruned"]), tmp_path / "e")
    assert by_parent["parent"] == parent_id and by_experiment["parent"] is None
    assert {r["run_id"] for r in by_parent["rows"]} == {r["run_id"] for r in by_experiment["rows"]}
    assert len(by_parent["rows"]) == 2 and by_parent["drops"] == DROPS
    assert (tmp_path / "e" / "comparison.png").is_file()


def _one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def test_report_on_an_empty_or_missing_experiment_says_so(tmp_path):
    from defense.tracking.tracker import _experiment_id

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # no store at all: refused, and not created
    _one_line_error(cli("defense.compare", f"tracking.uri={uri}", f"hydra.run.dir={tmp_path / 'c0'}"),
                    "no MLflow store", "nothing to compare")
    assert not (tmp_path / "mlflow.db").exists()

    _experiment_id(client(uri), "empty", uri)
    _one_line_error(cli("defense.compare", f"tracking.uri={uri}", "compare.experiment=empty", f"hydra.run.dir={tmp_path / 'c1'}"),
                    "'empty'", "has no runs")
    _one_line_error(cli("defense.compare", f"tracking.uri={uri}", "compare.experiment=missing", f"hydra.run.dir={tmp_path / 'c2'}"),
                    "no MLflow experiment 'missing'")
    _one_line_error(cli("defense.compare", f"tracking.uri={uri}", "tracking.experiment=empty", f"hydra.run.dir={tmp_path / 'c3'}"),
                    "no sweep", "'empty'")
    assert not any((tmp_path / f"c{i}" / "comparison.csv").exists() for i in range(4))


def test_parent_lookup_prefers_the_sweep_folder_over_a_stale_environment(tmp_path, monkeypatch):
    """joblib/loky keeps its workers (and their environment) for the next multirun of a process."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from defense.tracking import tracker as tracking

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra.mode=MULTIRUN", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    saved = HydraConfig.instance().cfg
    try:
        HydraConfig.instance().set_config(cfg)
        monkeypatch.setenv(tracking.PARENT_ENV, "stale-parent-of-the-last-sweep")
        assert tracking.parent_run_id() == "stale-parent-of-the-last-sweep"  # no marker: the environment
        (tmp_path / tracking.PARENT_FILE).write_text("this-sweeps-parent\n")
        assert tracking.parent_run_id() == "this-sweeps-parent"
    finally:
        HydraConfig.instance().cfg = saved


def test_table_has_operating_point_columns_only_when_a_run_has_one():
    from defense.compare import markdown, table_rows

    def run(run_id, criterion, op):
        return {"run_id": run_id, "run_name": run_id, "defense_name": criterion, "network": "lab3", "criterion": criterion,
                "layer": "conv_3",
                "finetune": "none", "dataset": "csaw_extract", "defended": "G(B,B')", "base_test_acc": 97.0,
                "base_test_asr": 100.0, "thresholds": {4.0: {"channels_pruned": 40, "test_acc": 93.0, "test_asr": 99.0,
                                                              "der": 0.485}}, "operating_point": op}

    op = {"channels_pruned": 7, "test_acc": 95.5, "test_asr": 12.25, "der": 0.91}
    rows, drops = table_rows([run("aaaaaaaa1", "clp", op), run("bbbbbbbb2", "activation", None)])
    assert drops == [4.0]
    assert [rows[0][f"op_{k}"] for k in ("channels_pruned", "test_acc", "test_asr", "der")] == [7, 95.5, 12.25, 0.91]
    assert [rows[1][f"op_{k}"] for k in ("channels_pruned", "test_acc", "test_asr", "der")] == ["", "", "", ""]
    text = markdown(rows, drops, "# t")
    assert "| op ch | op acc | op ASR | op DER |" in text
    assert "| 7 | 95.50 | 12.25 | 0.910 |" in text and "| n/r | n/r | n/r | n/r |" in text
    without, _ = table_rows([run("bbbbbbbb2", "activation", None)])
    assert "op_der" not in without[0] and "op ch" not in markdown(without, drops, "# t")


def test_leaderboard_point_reads_the_defender_or_the_oracle_row():
    from defense.analysis.leaderboard import operating_row
    from defense.core.errors import DefenseError

    summary = [{"point": "drop", "drop": "4", "channels_pruned": "40"},
               {"point": "defender", "drop": "", "channels_pruned": "30"},
               {"point": "oracle_test_asr", "drop": "", "channels_pruned": "50"}]
    assert operating_row(summary, 4.0) == (summary[0], "drop 4")
    assert operating_row(summary, 4.0, point="defender") == (summary[1], "defender")
    assert operating_row(summary, 4.0, point="oracle_test_asr") == (summary[2], "ORACLE test ASR")
    with pytest.raises(DefenseError, match="leaderboard.point=defender: run r1 has no such summary.csv row"):
        operating_row(summary[:1], 4.0, "r1", "defender")


def test_a_bad_leaderboard_point_is_one_error():
    from defense.compare import check_layout
    from defense.core.errors import DefenseError

    cfg = compose_compare(["compare.layout=leaderboard", "leaderboard.point=best"])
    with pytest.raises(DefenseError, match="leaderboard.point='best' is not known; use one of operating_point, "
                                           "defender, oracle_test_asr"):
        check_layout(cfg)
