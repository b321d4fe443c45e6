"""Build the embedded scenario of every attack with its default settings and measure it.

    python experiments/attack_scenarios.py                 # scenario seed 0 (the development instance)
    python experiments/attack_scenarios.py --seed 1

For every attack of defense/scenario/attacks/ (`dataset.scenario.attack=<attack>`, everything else as
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
# Settings built, besides the defaults, for an attack whose defaults miss the build check (the check is
# never lowered), found by training seed 0 by hand (clean test acc / test ASR, %):
# - sig (defaults 97.1 / 0.1): train delta 40 -> 96.8 / 0.1 (test delta 40), 3.0 (128); train delta 60
#   -> 97.2 / 0.9 (60), 19.1 (128), 97.1 (192); train delta 80 -> 95.8 / 27.8 (80), 93.0 (128). Barni et
#   al. also test with a stronger signal than they train with; the weakest training signal that passes:
# - wanet (defaults 97.3 / 84.4): 40 epochs 97.8 / 83.7; s 1.0 95.8 / 52.3; cross_ratio 1 97.0 / 89.9;
#   cross_ratio 0.5 97.5 / 77.9; poison_fraction 0.2 (noise mode kept at ratio 2) 96.6 / 98.6.
CLOSEST: dict[str, list[str]] = {
    "sig": ["dataset.scenario.sig.delta=60", "dataset.scenario.sig.test_delta=192"],
    "wanet": ["dataset.scenario.wanet.poison_fraction=0.2"],
}


def build(attack: str, seed: int, extra: tuple[str, ...] = ()) -> dict:
    import defense.pipeline.schemas  # noqa: F401  (registers the config schemas before the config is composed)
    from defense.scenario.build import PICTURE_FILE, ScenarioTooWeak, ensure_scenario, read_metadata, scenario_dir

    cfg = rf.compose([f"dataset.scenario.attack={attack}", f"dataset.scenario.seed={seed}", *extra]).dataset.scenario
    row = {"attack": attack, "seed": seed, "settings": " ".join(extra) or "defaults",
           "key": os.path.basename(scenario_dir(cfg))}
    picture = PICTURES / (f"{attack}.png" if not extra else f"{attack}-closest.png")
    PICTURES.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        folder = ensure_scenario(cfg)
    except ScenarioTooWeak as err:  # too weak: report the numbers the build measured (the cache keeps nothing)
        draw_from_poisoning(cfg, picture)
        return {**row, "passed": False, **err.metrics, "error": str(err),
                "wall_seconds": round(time.perf_counter() - t0, 1)}
    meta = read_metadata(folder)
    shutil.copy(os.path.join(folder, PICTURE_FILE), picture)
    return {**row, "passed": True, **meta["metrics"],
            "min_clean_accuracy": meta["scenario"]["min_clean_accuracy"], "min_asr": meta["scenario"]["min_asr"],
            "build_seconds": meta["build_seconds"], "counts": meta["counts"],
            "attack_details": meta.get("attack_details"), "wall_seconds": round(time.perf_counter() - t0, 1)}


def draw_from_poisoning(scenario_cfg, path, count: int = 6) -> None:
    """The picture of a scenario that was not cached: a few non-target source digits and the attack's
    test-time poisoned versions of them."""
    import numpy as np

    from defense.scenario import attacks
    from defense.scenario import build as sc

    cfg = sc.resolve_config(scenario_cfg)
    x, y = sc.load_source(cfg["source"])
    idx = np.concatenate([np.flatnonzero(y == c)[:1] for c in range(10) if c != cfg["target"]])[:count]
    x_bd, y_bd, sel = attacks.get(cfg["attack"]).poison_test(x[idx], y[idx], cfg)
    sc.draw_pairs(str(path), x[idx][sel], y[idx][sel], x_bd, y_bd,
                  f"{cfg['attack']}: clean digits (top) and poisoned (bottom)")


def markdown(rows: list[dict]) -> str:
    table = []
    for r in rows:
        settings = "defaults" if r["settings"] == "defaults" else f"`{r['settings']}`"
        if r["passed"]:
            table.append([f"`{r['attack']}`", settings, f"{r['clean_test_accuracy']:.2f}", f"{r['test_asr']:.2f}",
                          "passed, cached", f"{r['build_seconds']:.0f}"])
        else:
            table.append([f"`{r['attack']}`", settings, f"{r['clean_test_accuracy']:.2f}", f"{r['test_asr']:.2f}",
                          "**below the check** (not cached)", f"{r['wall_seconds']:.0f}"])
    return (
        f"Scenario seed {rows[0]['seed']}, default settings of each attack (`dataset.scenario.attack=<attack>`), "
        "scores of the backdoored network on the scenario's 1000 clean test digits and on its poisoned test "
        "digits (attack success rate), as the builder measured them. The build check asks for at least 95% "
        "clean accuracy and 90% ASR (95% for badnets); an attack whose defaults miss it is also built with "
        "the setting that came closest (`CLOSEST` in experiments/attack_scenarios.py):\n\n"
        + rf.md_table(["attack", "settings", "clean test acc (%)", "test ASR (%)", "build check", "build time (s)"],
                      table, align="llrrlr")
    )


def main(argv=None) -> int:
    from defense.scenario.attacks import ATTACK_NAMES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="dataset.scenario.seed (0: the development instance)")
    parser.add_argument("--attacks", nargs="+", default=list(ATTACK_NAMES), choices=list(ATTACK_NAMES))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = []
    for attack in args.attacks:
        rows.append(build(attack, args.seed))
        print(rows[-1], flush=True)
        if not rows[-1]["passed"] and attack in CLOSEST:
            rows.append(build(attack, args.seed, tuple(CLOSEST[attack])))
            print(rows[-1], flush=True)
    rf.write_results(NAME, markdown(rows), {"seed": args.seed, "scenarios": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
