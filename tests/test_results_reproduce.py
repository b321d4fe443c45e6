"""The cheapest generated result, rebuilt: the BadNets seed-0 scenario of experiments/attack_scenarios.py.

The scenario is built in this test session's cache (or reused from it when another test built it first,
from the same code) and its backdoored network's scores must equal, to the digits the results file
prints, the row that experiments/results/attack_scenarios.json recorded. A results file made before a
change that moves the numbers fails here until it is regenerated.
"""

from __future__ import annotations

import json

from conftest import REPO, compose

RESULTS = REPO / "experiments" / "results" / "attack_scenarios.json"


def test_badnets_seed0_scenario_rebuilds_to_the_numbers_of_its_results_file():
    from defense.scenario.build import ensure_scenario, read_metadata, scenario_dir

    recorded = json.loads(RESULTS.read_text())
    rows = [r for r in recorded["results"]["scenarios"]
            if r["attack"] == "badnets" and r["seed"] == 0 and r["settings"] == "defaults"]
    assert len(rows) == 1, "attack_scenarios.json holds no BadNets seed-0 row: run python experiments/attack_scenarios.py"
    row = rows[0]
    cfg = compose(["dataset.scenario.attack=badnets", "dataset.scenario.seed=0"]).dataset.scenario
    assert scenario_dir(cfg).endswith(row["key"])  # the same settings, hence the same cache key
    metrics = read_metadata(ensure_scenario(cfg))["metrics"]
    for key in ("clean_test_accuracy", "test_asr", "clean_valid_accuracy", "valid_asr"):
        assert f"{metrics[key]:.2f}" == f"{row[key]:.2f}", (key, metrics[key], row[key])
