"""Build the embedded scenario of every attack with its default settings and measure it.

    python experiments/attack_scenarios.py                 # scenario seed 0 (the development instance)
    python experiments/attack_scenarios.py --seed 1

For every attack of defense/attacks/ (`dataset.scenario.attack=<attack>`, everything else as
conf/dataset/badnets_mnist.yaml) the scenario is built (or reused from the cache: the time is then
the one scenario.json recorded when it was built) and its backdoored network's clean test accuracy
and test attack success rate are read from its scenario.json. Writes
experiments/results/attack_scenarios.{md,json} and copies each scenario's triggers.png to
docs/attacks/<attack>.png (the pictures the README shows).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results_files as rf  # noqa: E402

rf.use_this_checkout()

NAME = "attack_scenarios"
PICTURES = rf.REPO / "docs" / "attacks"


def build(attack: str, seed: int) -> dict:
    import defense.config  # noqa: F401  (registers the config schemas before the config is composed)
    from defense.scenario import PICTURE_FILE, ScenarioTooWeak, ensure_scenario, read_metadata, scenario_dir

    cfg = rf.compose([f"dataset.scenario.attack={attack}", f"dataset.scenario.seed={seed}"]).dataset.scenario
    t0 = time.perf_counter()
    try:
        folder = ensure_scenario(cfg)
    except ScenarioTooWeak as err:  # too weak: report the numbers the build measured (the cache keeps nothing)
        return {"attack": attack, "seed": seed, "key": os.path.basename(scenario_dir(cfg)), "passed": False,
                **err.metrics, "error": str(err), "wall_seconds": round(time.perf_counter() - t0, 1)}
    meta = read_metadata(folder)
    PICTURES.mkdir(parents=True, exist_ok=True)
    shutil.copy(os.path.join(folder, PICTURE_FILE), PICTURES / f"{attack}.png")
    return {"attack": attack, "seed": seed, "key": meta["key"], "passed": True, **meta["metrics"],
            "min_clean_accuracy": meta["scenario"]["min_clean_accuracy"], "min_asr": meta["scenario"]["min_asr"],
            "build_seconds": meta["build_seconds"], "counts": meta["counts"],
            "attack_details": meta.get("attack_details"), "wall_seconds": round(time.perf_counter() - t0, 1)}


def markdown(rows: list[dict]) -> str:
    table = []
    for r in rows:
        if r["passed"]:
            table.append([f"`{r['attack']}`", f"{r['clean_test_accuracy']:.2f}", f"{r['test_asr']:.2f}",
                          f"{r['min_clean_accuracy']:g} / {r['min_asr']:g}", f"{r['build_seconds']:.0f}"])
        else:
            table.append([f"`{r['attack']}`", f"{r['clean_test_accuracy']:.2f}", f"{r['test_asr']:.2f}",
                          "**below the check** (not cached)", f"{r['wall_seconds']:.0f}"])
    return (
        f"Scenario seed {rows[0]['seed']}, default settings of each attack (`dataset.scenario.attack=<attack>`), "
        "scores of the backdoored network on the scenario's 1000 clean test digits and on its poisoned test "
        "digits (attack success rate), as the builder measured them:\n\n"
        + rf.md_table(["attack", "clean test acc (%)", "test ASR (%)", "build check acc / ASR (%)", "build time (s)"],
                      table, align="lrrlr")
    )


def main(argv=None) -> int:
    from defense.attacks import ATTACK_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="dataset.scenario.seed (0: the development instance)")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACK_NAMES), choices=list(ATTACK_NAMES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    for attack in args.attacks:
        rows.append(build(attack, args.seed))
        print(rows[-1], flush=True)
    rf.write_results(NAME, markdown(rows), {"seed": args.seed, "scenarios": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
