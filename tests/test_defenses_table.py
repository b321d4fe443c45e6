"""experiments/defenses_table.py reads job folders as the leaderboard does: hand-written summary.csv files of
two seeds (of three asked for) give cells, goals and diverged counts that are computed here by hand."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys

from conftest import REPO

COLUMNS = ["drop", "channels_pruned", "reached", "test_acc", "test_asr", "pruned_test_acc", "pruned_test_asr",
           "point", "oracle", "diverged"]


def write_job(folder, defense: str, seed: int, base: tuple[float, float], rows: list[dict]) -> None:
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        f"- dataset.scenario.attack=badnets\n- defense={defense}\n- dataset.scenario.seed={seed}\n")
    with open(folder / "curves.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["channels_pruned", "pruned_test_acc", "pruned_test_asr"])
        writer.writeheader()
        writer.writerow({"channels_pruned": 0, "pruned_test_acc": base[0], "pruned_test_asr": base[1]})
    with open(folder / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"drop": "", "reached": "True", "oracle": "False", "diverged": "False", **row})


def row(point: str, channels: int, g: tuple[float, float], alone: tuple[float, float], **extra) -> dict:
    return {"point": point, "channels_pruned": channels, "test_acc": g[0], "test_asr": g[1],
            "pruned_test_acc": alone[0], "pruned_test_asr": alone[1], **extra}


def test_cells_goals_and_diverged_seeds_follow_the_job_folders(tmp_path):
    out = tmp_path / "out"
    sweep = out / "preact_resnet"
    base = {1: (97.0, 100.0), 2: (96.0, 99.0)}
    # ANP, seed 1: own point B' alone 95.0 / 3.0 (goal met: loss 2, ASR 3); seed 2: B' alone 93.5 / 4.0 (loss 2.5)
    # but the defender's row of seed 2 diverged
    anp = {1: [row("operating_point", 10, (94.0, 2.0), (95.0, 3.0)),
               row("defender", 6, (95.5, 20.0), (96.0, 22.0)),
               row("oracle_test_asr", 12, (93.0, 1.0), (94.0, 1.5), oracle="True")],
           2: [row("operating_point", 11, (92.0, 3.0), (93.5, 4.0)),
               row("defender", 7, (94.0, 30.0), (94.5, 31.0), diverged="True"),
               row("oracle_test_asr", 12, (92.5, 0.5), (93.0, 0.7), oracle="True")]}
    job = 0
    for seed in (1, 2):
        write_job(sweep / str(job), "none", seed, base[seed],
                  [row("drop", 0, base[seed], base[seed], drop="0"), row("defender", 3, (90.0, 50.0), (90.0, 50.0))])
        write_job(sweep / str(job + 1), "anp", seed, base[seed], anp[seed])
        job += 2
    # seed 3's scenario failed its build check: both of its jobs stopped with one error line in run.log
    too_weak = "the badnets scenario network (x) is too weak: clean test accuracy 94.80% < 95%"
    for num, defense in ((4, "none"), (5, "anp")):
        (sweep / str(num) / ".hydra").mkdir(parents=True)
        (sweep / str(num) / ".hydra" / "overrides.yaml").write_text(f"- defense={defense}\n- dataset.scenario.seed=3\n")
        (sweep / str(num) / "run.log").write_text(f"[2026-12-03 10:59:23,550][defense][ERROR] - {too_weak}\n")
    (sweep / "artifacts" / "x").mkdir(parents=True)  # an MLflow artifact copy is no job
    (sweep / "artifacts" / "x" / "summary.csv").write_text("drop\n")
    results = tmp_path / "results"
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / "defenses_table.py"), "--reuse",
                           "--setups", "preact_resnet", "--seeds", "1", "2", "3", "--defenses", "none", "anp",
                           "--out", str(out), "--results-dir", str(results)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((results / "defenses_table.json").read_text())["results"]
    assert data["setups"]["preact_resnet"]["jobs"] == 4
    cells = {(c["defense"], point): c for point, group in data["cells"].items() for c in group}

    own = cells[("anp", "operating_point")]  # the network alone: pruned_test_*, not G's
    assert own["test_acc_mean"] == statistics.mean([95.0, 93.5])
    assert abs(own["test_asr_std"] - statistics.stdev([3.0, 4.0])) < 1e-12
    assert own["test_asr_worst"] == 4.0 and own["n"] == 2

    defender = cells[("anp", "defender")]  # G(B, B'); the diverged seed counts as diverged, not as a score
    assert defender["n"] == 1 and defender["n_diverged"] == 1 and defender["test_asr_mean"] == 20.0

    oracle = cells[("anp", "oracle_test_asr")]
    assert oracle["test_asr_mean"] == statistics.mean([1.0, 0.5])

    # `none` is the undefended B at every point, never its defender's row
    for point in ("defender", "operating_point", "oracle_test_asr"):
        assert cells[("none", point)]["test_asr_mean"] == statistics.mean([100.0, 99.0])

    goal = {g["defense"]: g for g in data["goals"]}["anp"]
    assert goal["seeds"] == 2 and goal["met"] == 2
    assert goal["acc_loss"] == [97.0 - 95.0, 96.0 - 93.5]
    md = (results / "defenses_table.md").read_text()
    assert "is **met**" in md and "1 of 2 seeds, 1 diverged" in md
    # seed 3 was asked for and never ran: the setup and every cell say so
    assert f"jobs that did not finish: scenario seed 3, 2 jobs: {too_weak}" in md
    assert [job["job"] for job in data["setups"]["preact_resnet"]["failed"]] == ["4", "5"]
    assert "4 of 6 jobs finished" in md and md.count("(2 of 3 seeds run)") == 3 * 2
    assert "BackdoorBench" in md and "84.17 / 0.73" in md
