"""`compare.layout=leaderboard`: attacks x defenses at each defense's own operating point.

The aggregation (operating-point choice, mean ± sample std over seeds, DER, accuracy loss) is checked
against numbers computed by hand; a tiny sweep on the embedded BadNets scenario (two criteria as the
defense axis, driven through the `sweep_axis` resolver as conf/experiment/leaderboard.yaml drives its
axes) is checked against the runs' own summary.csv and curves.csv files on disk.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from conftest import CONF, REPO, compose

def HAND_DER(acc0, acc1, asr0, asr1):  # noqa: N802 - BackdoorBench's DER, written out on percentages
    return (max(0.0, (asr0 - asr1) / 100) - max(0.0, (acc0 - acc1) / 100) + 1) / 2


def read_rows(path: Path) -> list[dict]:
    with Path(path).open() as f:
        return list(csv.DictReader(f))


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DEFENSE_MLFLOW_PARENT_RUN_ID", None)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)


def one_error_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------
# the aggregation, against hand-computed values

def summary_row(drop, channels, acc, asr, reached=True, **extra) -> dict:
    """A summary.csv row as report.read_csv returns it (strings)."""
    row = {"drop": "" if drop is None else str(drop), "channels_pruned": "" if not reached else str(channels),
           "test_acc": "" if not reached else str(acc), "test_asr": "" if not reached else str(asr),
           "reached": str(reached)}
    row.update({k: str(v) for k, v in extra.items()})
    return row


def fake_run(run_id, params, tags, base, summary, start=0) -> dict:
    """What defense/compare.py::describe_run returns for a run (the keys the leaderboard reads)."""
    return {"run_id": run_id, "params": params, "tags": tags, "base_test_acc": base[0], "base_test_asr": base[1],
            "summary": summary, "start_time": start}


def hand_runs() -> list[dict]:
    scenario = {"dataset.scenario.seed": "1", "model.name": "badnets_mnist", "prune.criterion": "activation"}
    thresholds = lambda acc4, asr4: [summary_row(2, 20, 95.0, 100.0), summary_row(4, 30, acc4, asr4),  # noqa: E731
                                     summary_row(10, 40, 80.0, 50.0)]
    return [
        # badnets (scenario without dataset.scenario.attack) x fp, seeds 1 and 2: the 4-point rows count
        fake_run("a1", scenario, {"defense_name": "fp"}, (97.0, 100.0), thresholds(93.0, 90.0), start=10),
        fake_run("a2", {**scenario, "dataset.scenario.seed": "2"}, {"defense_name": "fp"}, (98.0, 99.0),
                 thresholds(95.0, 79.0), start=11),
        # an older run of the same job as a1: the newer one counts
        fake_run("a1-old", scenario, {"defense_name": "fp"}, (97.0, 100.0), thresholds(10.0, 0.0), start=1),
        # sig x clp: its own operating point wins over the 4-point row
        fake_run("c1", {**scenario, "dataset.scenario.attack": "sig"}, {"defense_name": "clp"}, (96.0, 100.0),
                 [summary_row(2, 3, 95.0, 99.0), summary_row(4, 6, 92.0, 50.0),
                  summary_row(None, 5, 90.0, 10.0, point="operating_point")], start=12),
        # badnets x fine_tuning (param, not tag): its one row (drop 0), the fine-tuned B''
        fake_run("d1", {**scenario, "defense_name": "fine_tuning"}, {}, (97.0, 100.0),
                 [summary_row(0, 0, 97.0, 100.0, ft_test_acc=96.5, ft_test_asr=1.5, ft_der=0.9675)], start=13),
        # sig x fine_pruning: the 4-point threshold never reached
        fake_run("e1", {**scenario, "dataset.scenario.attack": "sig"}, {"defense_name": "fine_pruning"},
                 (96.0, 100.0), [summary_row(2, 3, 95.0, 99.0), summary_row(4, None, None, None, reached=False)],
                 start=14),
        # a run without defense_name, fine-tuned l1, on the Lab 3 network's files: column l1+ft, row lab3
        fake_run("f1", {"model.name": "lab3", "prune.criterion": "l1", "finetune.kind": "clean"}, {"model": "lab3"},
                 (98.0, 100.0), [summary_row(4, 7, 96.0, 100.0, ft_test_acc=97.0, ft_test_asr=2.0, ft_der=0.98)],
                 start=15),
        # lab3 x fp: its learning diverged (the row is marked): no score, counted as diverged
        fake_run("g1", {"model.name": "lab3", "prune.criterion": "activation"}, {"defense_name": "fp", "model": "lab3"},
                 (98.0, 100.0), [summary_row(4, 7, 9.0, 0.0, diverged=True)], start=16),
    ]


def test_aggregation_matches_hand_computed_cells(tmp_path):
    from defense.analysis import leaderboard

    out = leaderboard.write_leaderboard(hand_runs(), tmp_path, 4.0, "hand-made runs", "sqlite:///nowhere.db")
    board = out["board"]
    assert board["attacks"] == ["badnets", "sig", "lab3"]
    assert board["defenses"] == ["fine_tuning", "fp", "fine_pruning", "clp", "l1+ft"]
    rows = {r["attack"]: r for r in read_rows(tmp_path / "leaderboard.csv")}

    def val(attack, key):
        return float(rows[attack][key])

    # badnets x fp: seeds 1 and 2 at the 4-point drop: acc 93, 95; ASR 90, 79; B 97/100 and 98/99
    der1, der2 = HAND_DER(97.0, 93.0, 100.0, 90.0), HAND_DER(98.0, 95.0, 99.0, 79.0)
    assert (der1, der2) == pytest.approx((0.53, 0.585))
    assert val("badnets", "fp_test_acc_mean") == pytest.approx(94.0)
    assert val("badnets", "fp_test_acc_std") == pytest.approx(math.sqrt(2.0), rel=1e-4)  # n - 1
    assert val("badnets", "fp_test_asr_mean") == pytest.approx(84.5)
    assert val("badnets", "fp_test_asr_std") == pytest.approx(math.sqrt(2 * 5.5 ** 2), rel=1e-4)
    assert val("badnets", "fp_der_mean") == pytest.approx(0.5575, abs=1e-5)
    assert val("badnets", "fp_der_std") == pytest.approx(math.sqrt(2 * 0.0275 ** 2), rel=1e-4)
    assert val("badnets", "fp_acc_loss_mean") == pytest.approx(3.5)
    assert val("badnets", "fp_acc_loss_std") == pytest.approx(math.sqrt(0.5), rel=1e-4)
    assert rows["badnets"]["fp_n_seeds"] == "2" and rows["badnets"]["fp_point"] == "drop 4"
    # sig x clp: the operating-point row, not the 4-point one; one seed: no std
    assert val("sig", "clp_test_acc_mean") == 90.0 and val("sig", "clp_test_asr_mean") == 10.0
    assert val("sig", "clp_der_mean") == pytest.approx(HAND_DER(96.0, 90.0, 100.0, 10.0))
    assert rows["sig"]["clp_test_acc_std"] == "" and rows["sig"]["clp_point"] == "operating_point"
    # badnets x fine_tuning: the one row at drop 0, B'' and its own DER
    assert (val("badnets", "fine_tuning_test_acc_mean"), val("badnets", "fine_tuning_test_asr_mean")) == (96.5, 1.5)
    assert val("badnets", "fine_tuning_der_mean") == pytest.approx(0.9675)
    assert val("badnets", "fine_tuning_acc_loss_mean") == pytest.approx(0.5)
    assert rows["badnets"]["fine_tuning_point"] == "drop 0" and rows["badnets"]["fine_tuning_defended"] == "B''"
    # sig x fine_pruning: not reached; cells that were not run are blank
    assert rows["sig"]["fine_pruning_n_seeds"] == "0" and rows["sig"]["fine_pruning_test_acc_mean"] == ""
    assert rows["badnets"]["clp_n_seeds"] == "" and rows["lab3"]["fp_test_acc_mean"] == ""
    assert val("lab3", "l1+ft_test_asr_mean") == 2.0
    # the worst seed is the highest ASR among the reached seeds (badnets x fp: 90 and 79)
    assert val("badnets", "fp_test_asr_worst") == 90.0 and rows["badnets"]["fp_n_diverged"] == "0"
    # lab3 x fp diverged: no score, one diverged seed
    assert rows["lab3"]["fp_n_diverged"] == "1" and rows["lab3"]["fp_n_seeds"] == "0"

    runs = read_rows(tmp_path / "leaderboard_runs.csv")
    assert sorted(r["run_id"] for r in runs) == sorted(r["run_id"] for r in hand_runs())
    md = (tmp_path / "leaderboard.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == "| attack | fine_tuning | fp | fine_pruning | clp | l1+ft |"
    assert table[1].startswith("| badnets | 96.50 / 1.50 / 0.968 | 94.00 ± 1.41 / 84.50 ± 7.78 / ")
    assert table[2] == "| sig |  |  | n/r | 90.00 / 10.00 / 0.920 |  |"
    assert "(worst ASR 90.00)" in table[1] and "| diverged (1 of 1 seeds) |" in table[3]
    assert f"tensorflow {metadata.version('tensorflow')}" in md and "Report: `python" in md
    assert (tmp_path / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_drop_that_is_no_threshold_of_a_run_is_one_clear_error(tmp_path):
    from defense.analysis import leaderboard
    from defense.core.errors import DefenseError

    with pytest.raises(DefenseError, match=r"leaderboard.drop=5 is not a threshold of run a1 \(prune.drops: 2, 4, 10\)"):
        leaderboard.write_leaderboard(hand_runs(), tmp_path, 5.0, "hand-made runs", "sqlite:///nowhere.db")
    assert not (tmp_path / "leaderboard.csv").exists()


# ---------------------------------------------------------------------------------------------------
# experiment=leaderboard: its axes, and bad axes before any run

def sweep_params(overrides: list[str]) -> dict:
    from omegaconf import OmegaConf

    from defense.config import check_sweep_axes

    with __import__("hydra").initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = __import__("hydra").compose(config_name="config", overrides=["experiment=leaderboard", *overrides],
                                          return_hydra_config=True)
    check_sweep_axes(cfg)
    return OmegaConf.to_container(cfg.hydra.sweeper.params, resolve=True)


def test_experiment_axes_are_attacks_defenses_and_seeds():
    assert sweep_params([]) == {
        "dataset.scenario.attack": "badnets,blended,sig,wanet,prune_aware",
        "defense": "none,fine_tuning,random_pruning,fp,fine_pruning,clp,anp,rnp",
        "dataset.scenario.seed": "1,2,3,4,5",
    }
    assert sweep_params(["leaderboard.seeds=[1,2,3]", "leaderboard.attacks=[sig]"])["dataset.scenario.seed"] == "1,2,3"
    cfg = compose(["experiment=leaderboard"])
    assert (cfg.progress, cfg.compact, cfg.tracking.log_models) == (False, False, False)

    from defense.core.errors import DefenseError

    for bad, words in ((["leaderboard.seeds=[1,2,1]"], "seeds=[1,2,1] repeats 1: give each value once"), (["leaderboard.attacks=['a b']"], "'a b'"),
                       (["leaderboard.defenses=[]"], "non-empty list")):
        with pytest.raises(DefenseError, match=words.replace("[", r"\[").replace("]", r"\]")):
            sweep_params(bad)


def test_bad_axis_or_layout_is_one_line_and_nothing_runs(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = cli("defense.run", "-m", "experiment=leaderboard", "leaderboard.seeds=[]", f"tracking.uri=sqlite:///{db}",
               f"hydra.sweep.dir={tmp_path / 'sweep'}")
    one_error_line(proc, "leaderboard.seeds=[]", "non-empty list")
    assert not db.exists() and not (tmp_path / "sweep").exists()
    one_error_line(cli("defense.compare", "compare.layout=grid", f"hydra.run.dir={tmp_path / 'c'}"),
                   "compare.layout='grid'", "compare.layout=leaderboard")
    one_error_line(cli("defense.compare", "compare.layout=leaderboard", "leaderboard.drop=-1",
                       f"hydra.run.dir={tmp_path / 'c'}"), "leaderboard.drop=-1", ">= 0")


# ---------------------------------------------------------------------------------------------------
# a tiny sweep on the embedded scenario, through the sweep_axis resolver, and its leaderboard

# conf/experiment/leaderboard.yaml's settings with axes that exist without the attack scenarios and the
# defense presets: the criterion as the defense, the scenario seed; the attack is read from the config
AXES_ON_CRITERIA = """# @package _global_
leaderboard:
  attacks: [badnets]
  defenses: [activation, l1]
  seeds: [0]
progress: false
compact: false
tracking:
  log_models: false
hydra:
  sweeper:
    params:
      prune.criterion: ${sweep_axis:leaderboard.defenses}
      dataset.scenario.seed: ${sweep_axis:leaderboard.seeds}
"""


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("leaderboard")
    (tmp / "conf" / "experiment").mkdir(parents=True)
    (tmp / "conf" / "experiment" / "leaderboard_on_criteria.yaml").write_text(AXES_ON_CRITERIA)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = cli("defense.run", "-m", f"hydra.searchpath=[file://{tmp / 'conf'}]", "experiment=leaderboard_on_criteria",
               "prune.drops=[2,4]", "stop=max_drop", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp / 'sweep'}")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return {"tmp": tmp, "uri": uri, "sweep_dir": tmp / "sweep"}


def test_leaderboard_of_a_sweep_reads_each_run_at_its_operating_point(tiny_sweep):
    from mlflow import MlflowClient
    from omegaconf import OmegaConf

    from defense.compare import compare
    from defense.core.errors import DefenseError

    out = tiny_sweep["tmp"] / "compare"
    result = compare(compose(["compare.layout=leaderboard", f"tracking.uri={tiny_sweep['uri']}"], "compare"), out)
    parent_id = (tiny_sweep["sweep_dir"] / "mlflow_parent_run_id.txt").read_text().strip()
    assert result["parent"] == parent_id

    # the oracle: each job's own summary.csv (drop 4) and curves.csv (the unpruned B at step 0) on disk
    expected = {}
    for job in sorted(tiny_sweep["sweep_dir"].glob("[0-9]")):
        criterion = OmegaConf.load(job / "config.yaml").prune.criterion
        row = next(r for r in read_rows(job / "summary.csv") if r["point"] == "drop" and float(r["drop"]) == 4.0)
        step0 = read_rows(job / "curves.csv")[0]
        assert int(step0["channels_pruned"]) == 0
        acc0, asr0 = float(step0["pruned_test_acc"]), float(step0["pruned_test_asr"])
        acc, asr = float(row["test_acc"]), float(row["test_asr"])
        expected[criterion] = {"test_acc": acc, "test_asr": asr, "der": HAND_DER(acc0, acc, asr0, asr),
                               "acc_loss": acc0 - acc}
    assert sorted(expected) == ["activation", "l1"]
    (row,) = read_rows(out / "leaderboard.csv")
    assert row["attack"] == "badnets"
    for criterion, scores in expected.items():
        for key, value in scores.items():
            assert float(row[f"{criterion}_{key}_mean"]) == pytest.approx(value, abs=1e-3), (criterion, key)
        assert row[f"{criterion}_n_seeds"] == "1" and row[f"{criterion}_point"] == "drop 4"

    client = MlflowClient(tracking_uri=tiny_sweep["uri"])
    parent = client.get_run(parent_id)
    assert "defense.run -m" in parent.data.tags["sweep_command"]
    assert "experiment=leaderboard_on_criteria" in parent.data.tags["sweep_command"]
    assert f"keras {metadata.version('keras')}" in parent.data.tags["sweep_versions"]
    md = (out / "leaderboard.md").read_text()
    assert parent.data.tags["sweep_command"] in md and f"mlflow {metadata.version('mlflow')}" in md
    assert {a.path for a in client.list_artifacts(parent_id, "leaderboard")} == {
        f"leaderboard/{name}" for name in ("leaderboard.csv", "leaderboard.md", "leaderboard.png",
                                           "leaderboard_runs.csv")}
    png = (out / "leaderboard.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    with pytest.raises(DefenseError, match="leaderboard.drop=10 is not a threshold"):
        compare(compose(["compare.layout=leaderboard", "leaderboard.drop=10", f"tracking.uri={tiny_sweep['uri']}"],
                        "compare"), tiny_sweep["tmp"] / "compare10")


def test_none_is_the_undefended_network_at_the_defenders_point(tmp_path):
    """At leaderboard.point=defender a defense's cell reads its `defender` row; `none` (no defense) stays
    the unpruned B of its one row, whatever channels a defender row of its run would prune."""
    from defense.analysis import leaderboard

    scenario = {"dataset.scenario.seed": "1", "model.name": "badnets_mnist", "prune.criterion": "activation"}
    runs = [
        fake_run("n1", scenario, {"defense_name": "none"}, (97.0, 100.0),
                 [summary_row(0, 0, 97.0, 100.0, point="drop"),
                  summary_row(None, 3, 96.0, 99.0, point="defender")]),
        fake_run("p1", scenario, {"defense_name": "fp"}, (97.0, 100.0),
                 [summary_row(4, 30, 93.0, 90.0, point="drop"),
                  summary_row(None, 12, 95.5, 80.0, point="defender")]),
    ]
    board = leaderboard.write_leaderboard(runs, tmp_path, 4.0, "hand-made runs", "sqlite:///nowhere.db",
                                          point="defender")["board"]
    none, fp = board["cells"][("badnets", "none")], board["cells"][("badnets", "fp")]
    assert (none["test_acc_mean"], none["test_asr_mean"], none["channels_pruned_mean"]) == (97.0, 100.0, 0.0)
    assert (fp["test_acc_mean"], fp["test_asr_mean"], fp["channels_pruned_mean"]) == (95.5, 80.0, 12.0)
    assert fp["points"] == ["defender"]
